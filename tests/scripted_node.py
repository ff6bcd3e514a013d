"""A node on loopback that follows a script per connection: what a test needs to drive the
client side of the conversation (``clients.connection``, the client, subscribers) through
exactly the frames it wants, including wrong ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from raftseq.clients import SequencerClient
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import Role

FRAME_TIMEOUT_S = 5.0
SCENARIO_TIMEOUT_S = 20.0


class ScriptedNode:
    """A node on loopback that hands each accepted connection to the next script in turn.
    Script failures are kept in ``errors``; ``stop`` closes every connection and the port."""

    def __init__(self, scripts: list[Callable[[ScriptedConnection], Awaitable[None]]]) -> None:
        self.scripts = list(scripts)
        self.errors: list[BaseException] = []
        self.connections = 0
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            if not self.scripts:
                raise AssertionError(f"unexpected connection number {self.connections}")
            await self.scripts.pop(0)(ScriptedConnection(reader, writer, self))
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=FRAME_TIMEOUT_S)
        if self._server is not None:
            await self._server.wait_closed()


class ScriptedConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node: ScriptedNode) -> None:
        self.reader = reader
        self.writer = writer
        self.node = node
        self.framer = protocol.FrameReader("client")
        self.buffered: list = []

    async def next_frame(self) -> object:
        while not self.buffered:
            data = await asyncio.wait_for(self.reader.read(65536), FRAME_TIMEOUT_S)
            assert data, "the client closed the connection"
            self.buffered += [f for f in self.framer.feed(data) if not isinstance(f, protocol.Heartbeat)]
        frame = self.buffered.pop(0)
        assert not isinstance(frame, protocol.FrameError), frame
        return frame

    async def welcome(self) -> protocol.Hello:
        hello = await self.next_frame()
        assert isinstance(hello, protocol.Hello), hello
        self.send(protocol.Welcome("n1", protocol.PROTOCOL_VERSION, Role.LEADER, "", 0, 500))
        return hello

    async def submits(self, count: int) -> list[int]:
        """The client_seqs of the next `count` submits (Submit or SubmitBatch frames)."""
        seen: list[int] = []
        while len(seen) < count:
            frame = await self.next_frame()
            if isinstance(frame, protocol.Submit):
                seen.append(frame.client_seq)
            elif isinstance(frame, protocol.SubmitBatch):
                seen += range(frame.first_client_seq, frame.first_client_seq + len(frame.payloads))
            else:
                raise AssertionError(f"expected submits, got {frame}")
        return seen

    def send(self, *frames: object) -> None:
        self.writer.write(b"".join(protocol.encode_frame(f) for f in frames))

    async def hold_until_stopped(self) -> None:
        await self.node.stopping.wait()


@contextlib.asynccontextmanager
async def scripted_client(
    scripts: list[Callable[[ScriptedConnection], Awaitable[None]]], **options
) -> AsyncIterator[tuple[ScriptedNode, SequencerClient]]:
    """A ``ScriptedNode`` following `scripts` and a ``SequencerClient`` of it (`options`), both
    closed at the end; a block that ends without an exception asserts the scripts ran clean."""
    node = ScriptedNode(scripts)
    c = SequencerClient([await node.start()], **options)
    try:
        yield node, c
    finally:
        await c.close()
        await node.stop()
    assert not node.errors, node.errors
