"""A blocking facade over ``SequencerClient`` for scripts: an event loop on a private thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

from raftseq.clients.client import Message, SequencerClient, subscribe
from raftseq.clients.endpoints import endpoints_from_env, token_from_env
from raftseq.clients.tls import tls_from_env
from raftseq.clients.errors import ClientClosed


class BlockingSequencerClient:
    """``with BlockingSequencerClient(endpoints, session="s") as c: seq = c.submit(b"x")``.

    Takes the same endpoints and keyword options as ``SequencerClient``. Without ``with`` it
    connects on first use (``submit``, ``submit_many``); ``close()`` is final: every call after
    it raises ``ClientClosed`` at once.
    """

    def __init__(self, endpoints: str | Iterable[str | tuple[str, int]], *, session: str, **options: object) -> None:
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"raftseq-blocking-{session}", daemon=True)
        self._thread.start()
        self._options = options
        try:
            self._client: SequencerClient = self._call(self._make(endpoints, session, options))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_env(cls, *, session: str, environ: Mapping[str, str] | None = None, **options: object) -> BlockingSequencerClient:
        """As ``SequencerClient.from_env``: endpoints from ``$RAFTSEQ_ENDPOINTS`` (else the local
        cluster's), the token from ``$RAFTSEQ_TOKEN`` unless ``token=`` is given."""
        options.setdefault("token", token_from_env(environ))
        options.setdefault("tls", tls_from_env(environ))
        return cls(endpoints_from_env(environ), session=session, **options)

    @staticmethod
    async def _make(endpoints: str | Iterable[str | tuple[str, int]], session: str, options: dict) -> SequencerClient:
        return SequencerClient(endpoints, session=session, **options)

    def _call(self, coro, timeout: float | None = None):
        if self._closed:
            coro.close()
            raise ClientClosed()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self) -> None:
        self._call(self._client.connect())

    def submit(self, payload: bytes) -> int:
        """Sequence `payload` and return its sequence number (blocks until committed)."""
        return self._call(self._client.submit(payload))

    def submit_many(self, payloads: Sequence[bytes]) -> list[int]:
        """Pipelined submits; returns their sequence numbers in order."""

        async def run() -> list[int]:
            await self._client.connect()
            futures = []
            for payload in payloads:
                await self._client.wait_for_room()
                futures.append(self._client.submit_nowait(payload))
            return list(await asyncio.gather(*futures))

        return self._call(run())

    def subscribe(self, from_seq: int = 1, *, limit: int | None = None, timeout_s: float | None = None) -> Iterator[Message]:
        """Yield messages from `from_seq`; stops after `limit` messages or `timeout_s` of silence."""
        if self._closed:
            raise ClientClosed()
        agen = subscribe(
            self._client.endpoints,
            from_seq=from_seq,
            token=self._client.token,
            session=f"{self._client.session}.sub",
            metrics=self._options.get("metrics"),
        )
        count = 0
        try:
            while limit is None or count < limit:
                try:
                    message = self._call(agen.__anext__(), timeout_s)
                except TimeoutError:
                    return
                count += 1
                yield message
        finally:
            try:
                self._call(agen.aclose(), 5)
            except Exception:  # noqa: BLE001 - closing a dead stream
                pass

    def close(self) -> None:
        """Stop, for good (closing twice is harmless)."""
        if self._closed:
            return
        try:
            self._call(self._client.close(), 10)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> BlockingSequencerClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
