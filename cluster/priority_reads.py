"""Reading the priority lane's connections between the handles of a busy loop.

A saturated leader's loop turn is several milliseconds: Raft ticks that apply ~400-entry
batches (~1.2 ms each) and reads of the bulk connections. A priority credential's frame that
arrives meanwhile waits for the rest of that turn and for its place in the next one: 5.5 ms at
the mean under 170k bulk msg/s (``bench_priority --stages``), half of an admin submit's time.

``PriorityReads`` keeps the sockets of the connections whose credential has ``priority`` in an
epoll set of its own. ``take`` asks that set, without waiting, which of them have bytes, and
reads those at once through their transports, as the loop would have on its next turn (the
gateway then handles the frames as any read). The node calls it before every Raft tick and
before it handles a bulk connection's read: the priority frame waits for one handle, not for
a turn. When no priority connection is open, ``take`` costs one attribute test.

The read goes through the socket transport's own read handler, ``_read_ready``, a private
method of asyncio's selector transports (3.11 to 3.13): the bytes take the same path as the
loop's own read, and a read the loop later starts on a drained socket finds nothing
(``BlockingIOError``, which asyncio ignores). Under TLS the connection's transport is asyncio's
TLS layer over the socket's transport (``_ssl_protocol._transport``, as private): that one is
read, and the TLS layer decrypts and hands the frame on as it would on the loop's turn. A
transport with neither is not watched: its reads wait for the loop's turn.
"""

from __future__ import annotations

import asyncio
import select

_EPOLL = getattr(select, "epoll", None)


def _socket_transport(transport: asyncio.BaseTransport) -> asyncio.BaseTransport | None:
    """The transport that reads `transport`'s socket: itself, or under TLS the socket's
    transport beneath asyncio's TLS layer; None when there is none to be found."""
    for candidate in (transport, getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)):
        if candidate is not None and callable(getattr(candidate, "_read_ready", None)):
            return candidate
    return None


class PriorityReads:
    """The priority connections' sockets, read between the loop's handles (``take``)."""

    def __init__(self) -> None:
        self._epoll = _EPOLL() if _EPOLL is not None else None
        #: Descriptor -> the connection's transport and the one that reads its socket (the
        #: same, but under TLS), and transport -> descriptor (a closed socket's ``fileno()``
        #: is -1; its number may be another socket's by then).
        self._by_fd: dict[int, tuple[asyncio.BaseTransport, asyncio.BaseTransport]] = {}
        self._fds: dict[asyncio.BaseTransport, int] = {}
        self._taking = False
        #: Reads taken between handles (for tests).
        self.reads_taken = 0

    def __len__(self) -> int:
        return len(self._fds)

    def watch(self, transport: asyncio.BaseTransport) -> bool:
        """Read `transport` between handles from now on. False when it cannot be (no epoll
        here, a transport without a socket read handler of its own, a closed socket)."""
        if transport in self._fds:
            return True
        sock = transport.get_extra_info("socket")
        reader = _socket_transport(transport)
        if self._epoll is None or sock is None or reader is None:
            return False
        fd = sock.fileno()
        if fd < 0 or transport.is_closing():
            return False
        stale = self._by_fd.pop(fd, None)
        if stale is not None:  # that number's earlier socket is closed: forget it
            del self._fds[stale[0]]
            self._unregister(fd)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # a closed socket's registration outlived it (a dup): renewed
            self._epoll.modify(fd, select.EPOLLIN)
        self._by_fd[fd] = (transport, reader)
        self._fds[transport] = fd
        return True

    def unwatch(self, transport: asyncio.BaseTransport) -> None:
        fd = self._fds.pop(transport, None)
        if fd is None:
            return
        del self._by_fd[fd]
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # the socket is closed: the kernel dropped it from the set

    def take(self, reading: asyncio.BaseTransport | None = None) -> None:
        """Read every watched socket that has bytes now, through its transport; never
        `reading`, the transport whose read the caller is handling (its next bytes after the
        ones in hand, not before them)."""
        if not self._fds or self._taking:
            return
        self._taking = True
        try:
            for fd, _ in self._epoll.poll(0):
                watched = self._by_fd.get(fd)
                if watched is None or watched[0] is reading:
                    continue
                transport, reader = watched
                if transport.is_closing() or reader.is_closing():
                    self.unwatch(transport)
                    continue
                if not reader.is_reading():
                    continue  # paused: the loop resumes it when it may read
                self.reads_taken += 1
                reader._read_ready()  # noqa: SLF001 - the module docstring says why
        finally:
            self._taking = False
