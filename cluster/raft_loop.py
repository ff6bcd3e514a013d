"""pysyncobj driven by the node's asyncio loop instead of its own tick thread.

With pysyncobj's tick thread, every Raft round of the leader crossed threads twice: a proposed
batch went from the loop to the tick thread (a pipe write, a wake-up, the GIL), and its commit
came back with ``call_soon_threadsafe`` (another wake-up and the GIL, which the tick thread
kept while it sent the next AppendEntries). Measured on the 2-core machine, those two hand-offs
were about a fifth of a 1 ms round trip, and the GIL ping-pong cost CPU on every node.

Here pysyncobj's sockets are served by the loop: ``LoopPoller`` is the poller pysyncobj
subscribes its sockets to, and each socket event is followed at once by a tick
(``SyncObj._onTick(0)``: commit index, apply, AppendEntries). Ticks also run on a timer
(``tick_period_s``, for heartbeats and election timeouts) and right after a proposal. All of
pysyncobj, the state machine and the journal then run on the loop thread, one callback at a
time: nothing in the node needs a lock for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pysyncobj.syncobj
from pysyncobj.poller import POLL_EVENT_TYPE, Poller

_READ_OR_ERROR = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR


class LoopPoller(Poller):
    """pysyncobj's poller interface on an asyncio loop.

    ``subscribe`` registers a socket for the events pysyncobj asks for (the loop reports an
    error condition as readable, where pysyncobj's socket code finds it). ``poll`` returns at
    once: events reach pysyncobj when the loop sees them, each followed by ``after_event()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callbacks: dict[int, Callable[[int, int], None]] = {}
        self._reading: set[int] = set()
        self._writing: set[int] = set()
        #: Called after pysyncobj handled an event (the replica runs a tick there).
        self.after_event: Callable[[], None] = lambda: None

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:  # noqa: N803
        self._callbacks[descr] = callback
        loop = self._loop
        if eventMask & _READ_OR_ERROR:
            if descr not in self._reading:
                loop.add_reader(descr, self._ready, descr, POLL_EVENT_TYPE.READ)
                self._reading.add(descr)
        elif descr in self._reading:
            loop.remove_reader(descr)
            self._reading.discard(descr)
        if eventMask & POLL_EVENT_TYPE.WRITE:
            if descr not in self._writing:
                loop.add_writer(descr, self._ready, descr, POLL_EVENT_TYPE.WRITE)
                self._writing.add(descr)
        elif descr in self._writing:
            loop.remove_writer(descr)
            self._writing.discard(descr)

    def unsubscribe(self, descr: int) -> None:
        """pysyncobj closes a socket first and unsubscribes it second: the kernel has dropped
        the descriptor from the loop's epoll set already, and the loop's selector forgets it
        when it finds it closed (OSError), which is all that is left to do."""
        self._callbacks.pop(descr, None)
        loop = self._loop
        for registered, remove in ((self._reading, loop.remove_reader), (self._writing, loop.remove_writer)):
            if descr in registered:
                registered.discard(descr)
                try:
                    remove(descr)
                except OSError:
                    pass

    def poll(self, timeout: float) -> None:
        """Nothing to wait for: the loop delivers events as they come."""

    def close(self) -> None:
        for descr in list(self._callbacks):
            self.unsubscribe(descr)

    def _ready(self, descr: int, event: int) -> None:
        callback = self._callbacks.get(descr)
        if callback is None:
            return
        callback(descr, event)
        self.after_event()


_original_create_poller = pysyncobj.syncobj.createPoller


def _create_poller(poller_type: object) -> Poller:
    if isinstance(poller_type, LoopPoller):
        return poller_type
    return _original_create_poller(poller_type)


# pysyncobj builds its poller from ``SyncObjConf.pollerType``; a LoopPoller passed there is used
# as it is (any other value keeps pysyncobj's own choice).
pysyncobj.syncobj.createPoller = _create_poller
