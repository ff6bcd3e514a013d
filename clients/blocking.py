"""A blocking facade over ``SequencerClient`` for scripts: an event loop on a private thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

from raftseq.clients.client import Message, SequencerClient, subscribe


class BlockingSequencerClient:
    """``with BlockingSequencerClient(endpoints, session="s") as c: seq = c.submit(b"x")``.

    Takes the same keyword options as ``SequencerClient``.
    """

    def __init__(self, endpoints: Sequence[str], *, session: str, **options: object) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"raftseq-blocking-{session}", daemon=True)
        self._thread.start()
        self._endpoints = list(endpoints)
        self._options = options
        self._client: SequencerClient = self._call(self._make(endpoints, session, options))

    @staticmethod
    async def _make(endpoints: Sequence[str], session: str, options: dict) -> SequencerClient:
        return SequencerClient(endpoints, session=session, **options)

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self) -> None:
        self._call(self._client.connect())

    def submit(self, payload: bytes) -> int:
        """Sequence `payload` and return its sequence number (blocks until committed)."""
        return self._call(self._client.submit(payload))

    def submit_many(self, payloads: Sequence[bytes]) -> list[int]:
        """Pipelined submits; returns their sequence numbers in order."""

        async def run() -> list[int]:
            futures = []
            for payload in payloads:
                await self._client.wait_for_room()
                futures.append(self._client.submit_nowait(payload))
            return list(await asyncio.gather(*futures))

        return self._call(run())

    def subscribe(self, from_seq: int = 1, *, limit: int | None = None, timeout_s: float | None = None) -> Iterator[Message]:
        """Yield messages from `from_seq`; stops after `limit` messages or `timeout_s` of silence."""
        agen = subscribe(
            self._endpoints,
            from_seq=from_seq,
            token=str(self._options.get("token", "")),
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
        try:
            self._call(self._client.close(), 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> BlockingSequencerClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
