"""pysyncobj driven by the node's asyncio loop instead of its own tick thread.

With pysyncobj's tick thread, every Raft round of the leader crossed threads twice: a proposed
batch went from the loop to the tick thread (a pipe write, a wake-up, the GIL), and its commit
came back with ``call_soon_threadsafe`` (another wake-up and the GIL, which the tick thread
kept while it sent the next AppendEntries). Measured on the 2-core machine, those two hand-offs
were about a fifth of a 1 ms round trip, and the GIL ping-pong cost CPU on every node.

Here pysyncobj's sockets are served by the loop: ``LoopPoller`` is the poller pysyncobj
subscribes its sockets to, and each socket event is followed at once by a tick
(``RaftMember``: commit index, apply, AppendEntries). Ticks also run on a timer
(``tick_period_s``, for heartbeats and election timeouts) and right after a proposal.
pysyncobj uses a ``LoopPoller`` passed as ``SyncObjConf.pollerType`` once
``raft.patches.install()`` ran. All of pysyncobj, the state machine and the journal then run on
the loop thread, one callback at a time: nothing in the node needs a lock for them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from pysyncobj.poller import POLL_EVENT_TYPE, Poller

_READ_OR_ERROR = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR


class _Subscription:
    __slots__ = ("callback", "generation", "reading", "writing")

    def __init__(self, generation: int) -> None:
        self.callback: Callable[[int, int], None] | None = None
        self.generation = generation
        self.reading = False
        self.writing = False


class LoopPoller(Poller):
    """pysyncobj's poller interface on an asyncio loop.

    ``subscribe`` registers a socket for the events pysyncobj asks for (the loop reports an
    error condition as readable, where pysyncobj's socket code finds it). ``poll`` returns at
    once: events reach pysyncobj when the loop sees them, each followed by ``after_event()``.

    Every subscription of a descriptor number carries a generation: an event the loop queued
    for a socket pysyncobj has closed meanwhile (and whose number a new socket may already
    have) is dropped, never handed to the new socket's callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscriptions: dict[int, _Subscription] = {}
        self._generations = itertools.count(1)
        #: Called after pysyncobj handled an event (the member runs a tick there).
        self.after_event: Callable[[], None] = lambda: None
        #: Called, inside ``except``, when pysyncobj's event handler raised.
        self.on_error: Callable[[], None] = lambda: None
        #: The member's ``raft.link_guard.LinkGuard`` (its links' limits, counters and timers).
        self.link_guard: object = None

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:  # noqa: N803
        sub = self._subscriptions.get(descr)
        if sub is None:
            sub = self._subscriptions[descr] = _Subscription(next(self._generations))
        sub.callback = callback
        loop = self._loop
        for flag, mask, event, add, remove in (
            ("reading", _READ_OR_ERROR, POLL_EVENT_TYPE.READ, loop.add_reader, loop.remove_reader),
            ("writing", POLL_EVENT_TYPE.WRITE, POLL_EVENT_TYPE.WRITE, loop.add_writer, loop.remove_writer),
        ):
            want = bool(eventMask & mask)
            if want != getattr(sub, flag):
                if want:
                    add(descr, self._ready, descr, sub.generation, event)
                else:
                    remove(descr)
                setattr(sub, flag, want)

    def unsubscribe(self, descr: int) -> None:
        """pysyncobj closes a socket first and unsubscribes it second: the kernel has dropped
        the descriptor from the loop's epoll set already, and the loop's selector forgets it
        when it finds it closed (OSError), which is all that is left to do. An event already
        queued for it is dropped by its generation."""
        sub = self._subscriptions.pop(descr, None)
        if sub is None:
            return
        loop = self._loop
        for registered, remove in ((sub.reading, loop.remove_reader), (sub.writing, loop.remove_writer)):
            if registered:
                try:
                    remove(descr)
                except OSError:
                    pass

    def poll(self, timeout: float) -> None:
        """Nothing to wait for: the loop delivers events as they come."""

    def close(self) -> None:
        for descr in list(self._subscriptions):
            self.unsubscribe(descr)

    def _ready(self, descr: int, generation: int, event: int) -> None:
        sub = self._subscriptions.get(descr)
        if sub is None or sub.generation != generation:
            return  # queued for a socket that is gone
        try:
            sub.callback(descr, event)
        except Exception:  # noqa: BLE001 - as pysyncobj's own poll loop: counted, logged, go on
            self.on_error()
        self.after_event()
