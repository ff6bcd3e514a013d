"""What subscribers may read: the journal's contiguous end, published after each append.

The node's applied batches (and catch-up's filled holes) ``wake()`` the subscriptions waiting in
``wait_readable``; a subscription reads the journal through its own cursor up to
``readable_seq``. Everything runs on the node's loop.
"""

from __future__ import annotations

import asyncio

from raftseq.sequencer.journal import Journal


class Publication:
    def __init__(self, journal: Journal, *, recheck_interval_s: float) -> None:
        self._journal = journal
        #: A waiting subscription re-checks after this long (a heartbeat interval) even unwoken.
        self._recheck_interval_s = recheck_interval_s
        #: Last sequence number subscribers may read: published, and below any journal hole.
        self.readable_seq = journal.contiguous_last_seq
        self._event = asyncio.Event()
        self._waiters = 0  # subscriptions inside wait_readable

    async def wait_readable(self, seq: int) -> None:
        """Return once ``readable_seq >= seq`` (or after a heartbeat interval, to re-check)."""
        self._waiters += 1
        try:
            while True:
                self.readable_seq = self._journal.contiguous_last_seq
                if self.readable_seq >= seq:
                    return
                event = self._event
                try:
                    # Not asyncio.wait_for: in Python 3.11 a cancel that came with the wake-up
                    # was lost (the subscription went on for a closed connection).
                    async with asyncio.timeout(self._recheck_interval_s):
                        await event.wait()
                except TimeoutError:
                    return
        finally:
            self._waiters -= 1

    def wake(self) -> None:
        """New records are readable (applied, or fetched into a hole): wake the waiting
        subscriptions."""
        self.readable_seq = self._journal.contiguous_last_seq
        if not self._waiters:
            return  # nobody waits; a subscriber reads the journal's position before it waits
        event = self._event
        self._event = asyncio.Event()
        event.set()
