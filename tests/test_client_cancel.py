"""``SequencerClient.submit`` and ``submit_batch`` stop when their task is cancelled, also when
the cancel comes in the loop iteration that their outcome arrives."""

from __future__ import annotations

import asyncio

import pytest

from raftseq.clients import SequencerClient

#: Loop iterations let run before the outcome and the cancel come: the submit is waiting by then.
SETTLE_ITERATIONS = 5


def _client_with_one_pending(future: asyncio.Future) -> SequencerClient:
    client = SequencerClient(["127.0.0.1:1"], session="cancelled", token="")

    async def nothing(*args: object) -> None:
        return None

    client._connect_on_first_use = nothing
    client.wait_for_room = nothing
    client.submit_nowait = lambda payload: future
    client.submit_batch_nowait = lambda payloads: future
    return client


@pytest.mark.parametrize("batch", [False, True], ids=["submit", "submit_batch"])
@pytest.mark.parametrize("acked_first", [True, False], ids=["acked-then-cancelled", "cancelled-then-acked"])
def test_a_submit_cancelled_as_its_ack_arrives_is_cancelled(batch: bool, acked_first: bool) -> None:
    """A loop that submits until it is cancelled must stop. ``asyncio.wait_for`` of Python 3.11
    returned the ack that came with the cancel and lost the cancel: the loop went on."""

    async def scenario() -> None:
        future = asyncio.get_running_loop().create_future()
        client = _client_with_one_pending(future)
        task = asyncio.create_task(client.submit_batch([b"x"]) if batch else client.submit(b"x"))
        for _ in range(SETTLE_ITERATIONS):
            await asyncio.sleep(0)
        assert not task.done()
        outcome = [7] if batch else 7
        if acked_first:
            future.set_result(outcome)
            task.cancel()
        else:
            task.cancel()
            future.set_result(outcome)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 10))
