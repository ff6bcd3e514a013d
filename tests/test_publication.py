"""``cluster.publication``: a subscription waiting for records is woken by ``wake`` and stops
when it is cancelled, also when both come in the same loop iteration."""

from __future__ import annotations

import asyncio

import pytest

from raftseq.cluster.publication import Publication


class Journal:
    contiguous_last_seq = 0


#: Loop iterations let run before the wait is woken and cancelled: the waiter is inside its
#: wait after a few, whatever the wait is built of.
SETTLE_ITERATIONS = 5


@pytest.mark.parametrize("woken_first", [True, False], ids=["woken-then-cancelled", "cancelled-then-woken"])
def test_a_waiting_subscription_cancelled_as_records_arrive_stops(woken_first: bool) -> None:
    """A subscription whose connection closes (its task cancelled) in the iteration that new
    records wake it must stop. ``asyncio.wait_for`` of Python 3.11 returned the wake-up instead
    and the cancel was lost: the subscription went on serving a closed connection."""

    async def scenario() -> None:
        journal = Journal()
        publication = Publication(journal, recheck_interval_s=30)
        waiter = asyncio.create_task(publication.wait_readable(1))
        for _ in range(SETTLE_ITERATIONS):
            await asyncio.sleep(0)
        assert publication._waiters == 1 and not waiter.done()
        journal.contiguous_last_seq = 1
        if woken_first:
            publication.wake()
            waiter.cancel()
        else:
            waiter.cancel()
            publication.wake()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert publication._waiters == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_waiting_subscription_is_woken_by_new_records_and_rechecks_unwoken() -> None:
    async def scenario() -> None:
        journal = Journal()
        publication = Publication(journal, recheck_interval_s=0.05)
        # Unwoken, it returns after the recheck interval (readable_seq still short).
        await publication.wait_readable(1)
        assert publication.readable_seq == 0
        slow = Publication(journal, recheck_interval_s=30)
        waiter = asyncio.create_task(slow.wait_readable(1))
        for _ in range(SETTLE_ITERATIONS):
            await asyncio.sleep(0)
        journal.contiguous_last_seq = 1
        slow.wake()
        await asyncio.wait_for(waiter, 5)
        assert slow.readable_seq == 1

    asyncio.run(asyncio.wait_for(scenario(), 10))
