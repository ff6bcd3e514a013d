"""A TCP fault proxy for the Raft links of a local cluster, run inside the test process.

One ``FaultProxy`` owns a thread with its own asyncio loop. Each *link* is a listening address
on 127.0.0.1 that forwards every accepted connection to one target address. A link has two
directions: ``"forward"`` (bytes from the side that connected to the target) and ``"backward"``
(the target's answers). Each direction has a mode and a delay, changed from any thread while
connections are open:

``pass``  bytes flow, each chunk held back ``delay_ms`` after it was read (order kept).
``drop``  a blackhole: bytes are read and thrown away, the connections stay open, so both ends
          see silence — what a partition looks like to pysyncobj while it lasts. A TCP stream
          cannot skip bytes, so when the direction leaves ``drop`` every connection of the link
          that lost bytes is reset (as a real connection that died during the partition); the
          ends reconnect. A connection accepted while ``forward`` drops is held silent and
          never reaches the target (a lost SYN); it is reset at the heal.
``hold``  a stall: nothing is read or delivered, nothing is lost; at the heal the held bytes
          arrive late and in order (a partition shorter than TCP's patience, where the kernel
          retransmits everything afterwards). Stale messages then reach the receiver.

``reset(link)`` closes every connection of a link at once with a TCP reset.

A connection reaches the target only while ``forward`` is ``pass`` (it waits otherwise). Every
direction buffers at most ``queue_chunks_max`` chunks of ``chunk_bytes``; beyond that the proxy
stops reading and TCP flow control pushes back on the sender.

    proxy = FaultProxy().start()
    proxy.add_link("n3-n1", "127.0.0.1:12005", "127.0.0.1:12101")
    proxy.set_fault("n3-n1", "forward", mode="drop")
    proxy.heal("n3-n1")
    proxy.stop()

A link's listening socket and its connections to the target can live in other network
namespaces (``listen_netns`` / ``target_netns``: a path such as ``/run/netns/NAME``; needs
root): the socket is created by a short-lived thread that joined the namespace, and a socket
stays in the namespace it was created in. ``ChaosCluster(network="netns")`` uses this to reach
the client ports of nodes that run in their own namespaces.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("raftseq.chaos.proxy")

PASS = "pass"
DROP = "drop"
HOLD = "hold"
MODES = (PASS, DROP, HOLD)
FORWARD = "forward"
BACKWARD = "backward"
DIRECTIONS = (FORWARD, BACKWARD)

CHUNK_BYTES_DEFAULT = 64 * 1024
QUEUE_CHUNKS_MAX_DEFAULT = 16
CONNECT_TIMEOUT_S_DEFAULT = 2.0
CONTROL_TIMEOUT_S = 5.0
DELAY_MS_MAX = 60_000.0


@dataclass(frozen=True)
class DirectionFault:
    mode: str = PASS
    delay_ms: float = 0.0


@dataclass
class LinkStats:
    """Counters of one link since it was added (a snapshot; safe to keep)."""

    connections_accepted: int = 0
    connections_open: int = 0
    connections_reset: int = 0
    upstream_failures: int = 0
    bytes_forwarded: dict[str, int] = field(default_factory=lambda: {FORWARD: 0, BACKWARD: 0})
    bytes_dropped: dict[str, int] = field(default_factory=lambda: {FORWARD: 0, BACKWARD: 0})


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host, int(port)


_CLONE_NEWNET = 0x40000000


def socket_in_netns(netns: str | None) -> socket.socket:
    """A new TCP socket in the network namespace `netns` (a path such as ``/run/netns/X``;
    None: this process's). setns(2) changes only the calling thread, so a fresh thread joins
    the namespace, creates the socket and ends."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    result: list = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)

    thread = threading.Thread(target=make, name="raftseq-netns-socket", daemon=True)
    thread.start()
    thread.join(CONTROL_TIMEOUT_S)
    if not result:
        raise OSError(f"could not create a socket in {netns} in time")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _reset_socket(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Link:
    def __init__(self, name: str, listen: str, target: str, target_netns: str | None = None) -> None:
        self.name = name
        self.listen = listen
        self.target = target
        self.target_netns = target_netns
        self.faults = {FORWARD: DirectionFault(), BACKWARD: DirectionFault()}
        self.stats = LinkStats()
        self.connections: set[_Connection] = set()
        self.server: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Wake every pump waiting for a change of this link's faults."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self) -> None:
        await self._changed.wait()

    async def wait_while_held(self, direction: str) -> None:
        """Return once `direction` is not ``hold``."""
        while self.faults[direction].mode == HOLD:
            await self.wait_change()


class _Connection:
    _ids = itertools.count(1)

    def __init__(self, link: _Link, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter, *, queue_chunks_max: int) -> None:
        self.id = next(self._ids)
        self.link = link
        self.readers: dict[str, asyncio.StreamReader | None] = {FORWARD: down_reader, BACKWARD: None}
        self.writers: dict[str, asyncio.StreamWriter | None] = {FORWARD: None, BACKWARD: down_writer}
        self.down_writer = down_writer
        self.up_writer: asyncio.StreamWriter | None = None
        self.queues = {d: asyncio.Queue(maxsize=queue_chunks_max) for d in DIRECTIONS}
        self.lost = False
        self.closed = False
        self.tasks: list[asyncio.Task] = []

    def drop(self, direction: str, data: bytes) -> None:
        """Throw `data` away (a ``drop`` fault): the connection has lost bytes."""
        self.lost = True
        self.link.stats.bytes_dropped[direction] += len(data)

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.down_writer, self.up_writer):
            if writer is None:
                continue
            if reset:
                _reset_socket(writer)
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.link.connections.discard(self)
        self.link.stats.connections_open = len(self.link.connections)


class FaultProxy:
    """Fault-injecting TCP forwarding for named links. Every method is thread-safe; the
    control methods return once the change is in effect on the proxy's loop."""

    def __init__(
        self,
        *,
        chunk_bytes: int = CHUNK_BYTES_DEFAULT,
        queue_chunks_max: int = QUEUE_CHUNKS_MAX_DEFAULT,
        connect_timeout_s: float = CONNECT_TIMEOUT_S_DEFAULT,
    ) -> None:
        if chunk_bytes < 1 or queue_chunks_max < 1:
            raise ValueError("chunk_bytes and queue_chunks_max must be >= 1")
        self.chunk_bytes = chunk_bytes
        self.queue_chunks_max = queue_chunks_max
        self.connect_timeout_s = connect_timeout_s
        self._links: dict[str, _Link] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="raftseq-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT_S):
            raise RuntimeError("proxy loop did not start")
        return self

    def stop(self) -> None:
        """Close every listener and connection and end the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CONTROL_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        for link in self._links.values():
            if link.server is not None:
                link.server.close()
            for conn in list(link.connections):
                conn.close(reset=False)
        for link in self._links.values():
            if link.server is not None:
                await link.server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CONTROL_TIMEOUT_S)

    def _call(self, coro):
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    # --- links ----------------------------------------------------------------------------

    def add_link(self, name: str, listen: str, target: str, *, listen_netns: str | None = None, target_netns: str | None = None) -> str:
        """Listen on `listen` (``HOST:PORT``; port 0 picks one) and forward to `target`, each
        in its network namespace (default: this process's). Returns the listening address.
        Raises ``OSError`` when it cannot be bound."""
        _split_address(target)
        host, port = _split_address(listen)
        sock = socket_in_netns(listen_netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            self._call(self._add_link(name, f"{host}:{sock.getsockname()[1]}", target, target_netns, sock))
        except BaseException:
            sock.close()
            raise
        return self._links[name].listen

    async def _add_link(self, name: str, listen: str, target: str, target_netns: str | None, sock: socket.socket) -> None:
        if name in self._links:
            raise ValueError(f"link {name!r} exists")
        link = _Link(name, listen, target, target_netns)
        link.server = await asyncio.start_server(lambda r, w: self._accept(link, r, w), sock=sock, limit=self.chunk_bytes)
        self._links[name] = link

    @property
    def links(self) -> list[str]:
        return list(self._links)

    def listen_address(self, name: str) -> str:
        return self._links[name].listen

    def target_address(self, name: str) -> str:
        return self._links[name].target

    def fault(self, name: str, direction: str) -> DirectionFault:
        return self._links[name].faults[direction]

    def stats(self, name: str) -> LinkStats:
        async def snapshot() -> LinkStats:
            s = self._links[name].stats
            return LinkStats(
                s.connections_accepted,
                s.connections_open,
                s.connections_reset,
                s.upstream_failures,
                dict(s.bytes_forwarded),
                dict(s.bytes_dropped),
            )

        return self._call(snapshot())

    # --- faults ---------------------------------------------------------------------------

    def set_fault(self, name: str, direction: str, *, mode: str | None = None, delay_ms: float | None = None) -> DirectionFault:
        """Change one direction of a link; unchanged fields keep their value. Returns the new
        fault of that direction."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if delay_ms is not None and not 0 <= delay_ms <= DELAY_MS_MAX:
            raise ValueError(f"delay_ms must be 0..{DELAY_MS_MAX}, got {delay_ms}")
        return self._call(self._set_faults([(name, direction, mode, delay_ms)]))[0]

    def set_faults(self, changes: Iterable[tuple[str, str, str | None, float | None]]) -> None:
        """Several ``(link, direction, mode, delay_ms)`` changes applied together (one loop
        step: no connection sees half of a partition)."""
        changes = list(changes)
        for _, direction, mode, delay_ms in changes:
            if direction not in DIRECTIONS or (mode is not None and mode not in MODES):
                raise ValueError(f"bad change {direction!r} {mode!r}")
            if delay_ms is not None and not 0 <= delay_ms <= DELAY_MS_MAX:
                raise ValueError(f"delay_ms must be 0..{DELAY_MS_MAX}, got {delay_ms}")
        self._call(self._set_faults(changes))

    def heal(self, name: str | None = None) -> None:
        """Every direction of `name` (or of every link) back to ``pass`` with no delay."""
        names = [name] if name is not None else list(self._links)
        self.set_faults([(n, d, PASS, 0.0) for n in names for d in DIRECTIONS])

    async def _set_faults(self, changes: list) -> list[DirectionFault]:
        results = []
        touched: dict[str, _Link] = {}
        left_drop: set[str] = set()
        for name, direction, mode, delay_ms in changes:
            link = self._links[name]
            old = link.faults[direction]
            new = DirectionFault(old.mode if mode is None else mode, old.delay_ms if delay_ms is None else float(delay_ms))
            link.faults[direction] = new
            if old.mode == DROP and new.mode != DROP:
                left_drop.add(name)
            touched[name] = link
            results.append(new)
        for name in left_drop:
            link = touched[name]
            if DROP in (link.faults[FORWARD].mode, link.faults[BACKWARD].mode):
                continue
            for conn in list(link.connections):
                if conn.lost:
                    link.stats.connections_reset += 1
                    conn.close(reset=True)
        for link in touched.values():
            link.notify()
        return results

    def reset(self, name: str) -> int:
        """Reset every open connection of a link now. Returns how many."""

        async def run() -> int:
            link = self._links[name]
            conns = list(link.connections)
            for conn in conns:
                link.stats.connections_reset += 1
                conn.close(reset=True)
            return len(conns)

        return self._call(run())

    # --- forwarding -----------------------------------------------------------------------

    async def _accept(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(link, reader, writer, queue_chunks_max=self.queue_chunks_max)
        link.connections.add(conn)
        link.stats.connections_accepted += 1
        link.stats.connections_open = len(link.connections)
        conn.tasks.append(asyncio.current_task())
        try:
            # Until forward passes, the connection is held: bytes from the dialer are read
            # (and thrown away under drop) but the target is not contacted.
            while link.faults[FORWARD].mode != PASS:
                if link.faults[FORWARD].mode == DROP:
                    await self._discard_until_change(conn, link, reader)
                else:
                    await link.wait_change()
                if conn.closed:
                    return
            try:
                up_reader, up_writer = await asyncio.wait_for(self._connect(link), self.connect_timeout_s)
            except (OSError, TimeoutError):
                link.stats.upstream_failures += 1
                conn.close(reset=True)  # the dialer sees what a refused connection looks like
                return
            if conn.closed:
                up_writer.close()
                return
            conn.up_writer = up_writer
            conn.readers[BACKWARD] = up_reader
            conn.writers[FORWARD] = up_writer
            for direction in DIRECTIONS:
                for kind in ("read", "write"):
                    conn.tasks.append(
                        asyncio.create_task(self._pump(conn, direction, kind), name=f"{link.name}-{conn.id}-{direction}-{kind}")
                    )
        except asyncio.CancelledError:
            # Cancelled by the connection's close (a reset, the proxy stopping): it ends here.
            # Not re-raised: this task is the stream server's connection callback, and Python
            # 3.11's server logs a cancelled one as "Exception in callback".
            conn.close(reset=False)
        except Exception:  # noqa: BLE001 - one connection's failure must not stop the proxy
            log.exception("proxy link %s: connection %d failed", link.name, conn.id)
            conn.close(reset=True)

    async def _connect(self, link: _Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = _split_address(link.target)
        if link.target_netns is None:
            return await asyncio.open_connection(host, port, limit=self.chunk_bytes)
        sock = socket_in_netns(link.target_netns)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock, limit=self.chunk_bytes)
        except BaseException:
            sock.close()
            raise

    async def _discard_until_change(self, conn: _Connection, link: _Link, reader: asyncio.StreamReader) -> None:
        change = asyncio.ensure_future(link.wait_change())
        try:
            while not change.done() and not conn.closed:
                read = asyncio.ensure_future(reader.read(self.chunk_bytes))
                done, _ = await asyncio.wait({read, change}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    break
                data = read.result()
                if not data:
                    conn.close(reset=False)
                    return
                conn.drop(FORWARD, data)
        finally:
            change.cancel()

    async def _pump(self, conn: _Connection, direction: str, kind: str) -> None:
        """Run the `kind` (``read`` or ``write``) pump of one direction; a failure resets the
        connection."""
        queue = conn.queues[direction]
        try:
            if kind == "read":
                await self._read_pump(conn, direction, conn.readers[direction], queue)
            else:
                await self._write_pump(conn, direction, queue, conn.writers[direction])
        except (OSError, asyncio.IncompleteReadError):
            conn.close(reset=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one connection's failure must not stop the proxy
            log.exception("proxy link %s: %s pump failed", conn.link.name, kind)
            conn.close(reset=True)

    async def _read_pump(self, conn: _Connection, direction: str, reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        """Chunks read from `reader`, queued with the time they may go out."""
        link = conn.link
        loop = asyncio.get_running_loop()
        while True:
            await link.wait_while_held(direction)
            data = await reader.read(self.chunk_bytes)
            if not data:
                await queue.put(None)
                return
            fault = link.faults[direction]
            if fault.mode == DROP:
                conn.drop(direction, data)
                continue
            await queue.put((loop.time() + fault.delay_ms / 1000.0, data))

    async def _write_pump(self, conn: _Connection, direction: str, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """Queued chunks written to `writer` once due and not held."""
        link = conn.link
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None:
                conn.close(reset=False)  # one end closed: close the other
                return
            release_at, data = item
            wait_s = release_at - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await link.wait_while_held(direction)
            if link.faults[direction].mode == DROP:
                conn.drop(direction, data)
                continue
            writer.write(data)
            await writer.drain()
            link.stats.bytes_forwarded[direction] += len(data)
