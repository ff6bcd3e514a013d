"""The leader's batcher: submits in, Raft log entries out, per-entry results back.

A fake Raft records each proposal (decoded with ``sequencer.protocol.decode_batch``) and its
completion callback; a test commits or fails a proposal by calling that callback on the loop,
as a Raft tick does (``cluster.raft_loop``). The batcher runs on a real asyncio loop; tests wait
for replies through futures, never by sleeping.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from raftseq.cluster.batcher import PRIORITY_HOLDS_BULK_MAX_S, Batcher, CommitOutcome, PendingSubmit
from raftseq.cluster.config import BatcherConfig
from raftseq.cluster.raft import FAIL_REASON
from raftseq.sequencer import protocol
from raftseq.sequencer.machine import ApplyResult, EntryResult, Outcome

WAIT_S = 5.0  # upper bound on waiting for an event that should come at once


# --- helpers: one per verb ------------------------------------------------------------------


@dataclass
class Proposal:
    data: bytes
    batch: protocol.Batch
    callback: object
    answered: bool = False

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [(e.session, e.client_seq) for e in self.batch.entries]


class FakeRaft:
    """Records proposals; a test decides when and how each one ends."""

    def __init__(self) -> None:
        self.proposals: list[Proposal] = []
        self.next_seq = 1

    def propose(self, data: bytes, callback) -> None:
        self.proposals.append(Proposal(data, protocol.decode_batch(data), callback))

    def result_of(self, proposal: Proposal) -> ApplyResult:
        """What ``machine.apply`` would return: every entry sequenced, numbers in order."""
        first = self.next_seq
        results = []
        for entry in proposal.batch.entries:
            results.append(EntryResult(entry.session, entry.client_seq, Outcome.SEQUENCED, self.next_seq))
            self.next_seq += 1
        return ApplyResult(results, first, self.next_seq - 1, proposal.batch.leader_time_ns, b"")

    def commit_all_new(self, proposal: Proposal) -> ApplyResult:
        """Commit as ``machine.apply`` reports a batch of new entries only (``outcomes`` None)."""
        first = self.next_seq
        self.next_seq += len(proposal.batch.entries)
        result = ApplyResult(None, first, self.next_seq - 1, proposal.batch.leader_time_ns, b"", entries=proposal.batch.entries)
        self.finish(proposal, result, FAIL_REASON.SUCCESS)
        return result

    def commit(self, proposal: Proposal) -> ApplyResult:
        result = self.result_of(proposal)
        self.finish(proposal, result, FAIL_REASON.SUCCESS)
        return result

    def fail(self, proposal: Proposal, error: int) -> None:
        self.finish(proposal, None, error)

    @staticmethod
    def finish(proposal: Proposal, result, error: int) -> None:
        """Call the completion callback, on the loop as a Raft tick does."""
        proposal.answered = True
        proposal.callback(result, error)


@dataclass
class Replies:
    """Every reply a submit got, in arrival order, with the thread it arrived on."""

    got: list[tuple[str, int, object]] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)
    _waiters: list[tuple[int, asyncio.Future]] = field(default_factory=list)

    def submit(self, session: str, client_seq: int, payload: bytes = b"x") -> PendingSubmit:
        def reply(seq: int, outcome: object, payload_bytes: int) -> None:
            self.got.append((session, seq, outcome))
            self.threads.add(threading.get_ident())
            for count, waiter in self._waiters:
                if len(self.got) >= count and not waiter.done():
                    waiter.set_result(None)

        return PendingSubmit(session, client_seq, payload, reply)

    async def wait_for(self, count: int) -> None:
        if len(self.got) >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        await asyncio.wait_for(waiter, WAIT_S)

    def of(self, session: str, client_seq: int) -> list[object]:
        return [outcome for s, c, outcome in self.got if (s, c) == (session, client_seq)]


async def drain() -> None:
    """Let the loop run every callback scheduled so far (call_soon callbacks run in order)."""
    loop = asyncio.get_running_loop()
    for _ in range(2):
        done = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done


def make_batcher(raft: FakeRaft, *, clock_ns=None, now_s=None, start: bool = True, **limits) -> Batcher:
    config = BatcherConfig(**limits)
    kwargs = {"clock_ns": clock_ns} if clock_ns is not None else {}
    if now_s is not None:
        kwargs["now_s"] = now_s
    batcher = Batcher(config, raft.propose, loop=asyncio.get_running_loop(), **kwargs)
    if start:
        batcher.start()
    return batcher


def batcher_on_fakes(**options) -> tuple[FakeRaft, Replies, Batcher]:
    """A fake Raft, a recorder of replies and a batcher proposing to that Raft (``make_batcher``'s options)."""
    raft = FakeRaft()
    return raft, Replies(), make_batcher(raft, **options)


def run(test):
    """Run an async test body on a fresh loop, bounded in time."""
    asyncio.run(asyncio.wait_for(test(), 15))


async def commit_everything(raft: FakeRaft, replies: Replies, batcher: Batcher) -> None:
    """Commit proposals oldest first until nothing is in flight."""
    while batcher.in_flight:
        proposal = next(p for p in raft.proposals if not p.answered)
        raft.commit(proposal)
        await replies.wait_for(sum(len(p.batch.entries) for p in raft.proposals if p.answered))
        await drain()


def sizes(raft: FakeRaft) -> list[int]:
    return [len(p.batch.entries) for p in raft.proposals]


# --- natural batching -----------------------------------------------------------------------


def test_one_submit_is_proposed_at_once_as_a_batch_of_one():
    async def story():
        raft, replies, batcher = batcher_on_fakes()

        assert batcher.offer(replies.submit("alpha", 1, b"hello"))

        assert sizes(raft) == [1]
        assert raft.proposals[0].batch.entries == [protocol.Entry("alpha", 1, b"hello")]
        assert raft.proposals[0].batch.format_version == protocol.BATCH_FORMAT_VERSION
        assert (batcher.queued, batcher.in_flight) == (0, 1)
        assert (batcher.batches_proposed, batcher.entries_proposed) == (1, 1)

    run(story)


def test_nothing_is_proposed_before_start():
    async def story():
        raft, replies, batcher = batcher_on_fakes(start=False)
        for seq in (1, 2, 3):
            assert batcher.offer(replies.submit("alpha", seq))
        assert raft.proposals == [] and batcher.queued == 3

        batcher.start()

        assert sizes(raft) == [3]

    run(story)


def test_submits_wait_for_the_batch_in_flight_then_go_as_one_batch():
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        batcher.offer(replies.submit("alpha", 1))
        for seq in (2, 3, 4):
            batcher.offer(replies.submit("alpha", seq))
        batcher.offer(replies.submit("bravo", 1))
        assert sizes(raft) == [1]
        assert batcher.queued == 4

        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        await drain()

        assert sizes(raft) == [1, 4]
        assert raft.proposals[1].keys == [("alpha", 2), ("alpha", 3), ("alpha", 4), ("bravo", 1)]
        assert batcher.queued == 0

    run(story)


def test_a_full_batch_goes_out_while_one_is_in_flight_up_to_in_flight_max():
    async def story():
        raft, replies, batcher = batcher_on_fakes(entries_max=3, in_flight_max=2)
        batcher.offer(replies.submit("alpha", 1))
        assert sizes(raft) == [1]

        for seq in (2, 3):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1], "a batch that is not full waits"
        batcher.offer(replies.submit("alpha", 4))
        assert sizes(raft) == [1, 3], "a full batch goes out while one is in flight"

        for seq in range(5, 10):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1, 3], "no more than in_flight_max batches in flight"
        assert batcher.in_flight == 2 and batcher.queued == 5

        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        await drain()
        assert sizes(raft) == [1, 3, 3]
        assert batcher.in_flight == 2 and batcher.queued == 2

        raft.commit(raft.proposals[1])
        await replies.wait_for(4)
        await drain()
        assert sizes(raft) == [1, 3, 3], "two queued submits wait behind the batch in flight"

        raft.commit(raft.proposals[2])
        await replies.wait_for(7)
        await drain()
        assert sizes(raft) == [1, 3, 3, 2]
        assert [k for p in raft.proposals for k in p.keys] == [("alpha", s) for s in range(1, 10)]

    run(story)


def test_in_flight_max_of_one_proposes_one_batch_at_a_time():
    async def story():
        raft, replies, batcher = batcher_on_fakes(entries_max=2, in_flight_max=1)
        for seq in range(1, 8):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1]

        for n in range(1, 5):
            raft.commit(raft.proposals[-1])
            await replies.wait_for(sum(sizes(raft)))
            await drain()
            assert batcher.in_flight <= 1
        assert sizes(raft) == [1, 2, 2, 2]

    run(story)


# --- group commit (power durability) -------------------------------------------------------


def test_with_unsynced_entries_below_the_bound_a_batch_goes_out_while_others_wait_for_their_commit():
    """Power durability: a commit waits for the leader's fsync; a batch that waited for the
    commit before it left one batch per fsync (1.3 entries per fsync measured)."""

    async def story():
        raft, replies = FakeRaft(), Replies()
        unsynced = [0]
        batcher = make_batcher(raft, in_flight_max=4, unsynced_entries_max=2)
        batcher.unsynced = lambda: unsynced[0]
        batcher.offer(replies.submit("alpha", 1))
        unsynced[0] = 1  # the first batch waits for the leader's fsync
        batcher.offer(replies.submit("alpha", 2))
        assert sizes(raft) == [1, 1], "proposed while the first waits for its fsync"
        unsynced[0] = 2
        for seq in (3, 4):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1, 1], "at unsynced_entries_max, submits wait"
        unsynced[0] = 0
        batcher.flush()  # the log's durable index rose (``SequencerReplica.on_durable``)
        assert sizes(raft) == [1, 1, 2]
        unsynced[0] = 1
        for seq in range(5, 9):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1, 1, 2, 1] and batcher.in_flight == 4, "in_flight_max still bounds the batches in flight"
        assert batcher.queued == 3
        await commit_everything(raft, replies, batcher)
        assert [k for p in raft.proposals for k in p.keys] == [("alpha", s) for s in range(1, 9)]

    run(story)


def test_without_an_unsynced_count_or_with_a_bound_of_zero_a_batch_waits_for_the_commit():
    async def story():
        for bound, unsynced in ((8, None), (0, lambda: 0)):
            raft, replies = FakeRaft(), Replies()
            batcher = make_batcher(raft, unsynced_entries_max=bound)
            batcher.unsynced = unsynced
            for seq in (1, 2, 3):
                batcher.offer(replies.submit("alpha", seq))
            assert sizes(raft) == [1], f"bound {bound}, unsynced {unsynced}"

    run(story)


# --- the byte limit -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_every_encoded_batch_stays_within_bytes_max(seed):
    rng = random.Random(seed)
    bytes_max = rng.choice([600, 2048, 5000])

    async def story():
        raft, replies, batcher = batcher_on_fakes(bytes_max=bytes_max, entries_max=50, start=False)
        offered = []
        for i in range(120):
            session = "s" * rng.randint(1, protocol.limits.SESSION_BYTES_MAX)
            client_seq = rng.choice([1, 200, 70_000, 2**40, 2**63 - 200]) + i
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            assert batcher.offer(replies.submit(session, client_seq, payload))
            offered.append((session, client_seq, payload))
        batcher.start()

        await commit_everything(raft, replies, batcher)

        assert all(len(p.data) <= bytes_max for p in raft.proposals)
        assert all(len(p.batch.entries) <= 50 for p in raft.proposals)
        assert [(e.session, e.client_seq, e.payload) for p in raft.proposals for e in p.batch.entries] == offered
        assert len(raft.proposals) > 2

    run(story)


def test_a_batch_full_by_bytes_goes_out_while_one_is_in_flight():
    # A batch closes "when it reaches its count or byte limit" (DESIGN.md section 3): with
    # large payloads the byte limit fills a batch long before entries_max does.
    async def story():
        raft, replies, batcher = batcher_on_fakes(entries_max=1000, bytes_max=1000, in_flight_max=2)
        batcher.offer(replies.submit("alpha", 1, b"a" * 400))
        for seq in range(2, 8):
            batcher.offer(replies.submit("alpha", seq, b"a" * 400))

        assert len(raft.proposals) == 2, "a batch full by bytes waits for the one in flight"
        assert sizes(raft) == [1, 2]

    run(story)


# --- the queue limit ------------------------------------------------------------------------


def test_a_full_queue_refuses_the_submit():
    async def story():
        raft, replies, batcher = batcher_on_fakes(queue_entries_max=3)
        assert batcher.offer(replies.submit("alpha", 1))  # proposed at once, not queued
        for seq in (2, 3, 4):
            assert batcher.offer(replies.submit("alpha", seq))

        assert batcher.offer(replies.submit("alpha", 5)) is False
        assert batcher.queued == 3
        assert [k for p in raft.proposals for k in p.keys] == [("alpha", 1)]

        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        await drain()
        assert batcher.queued == 0
        assert batcher.offer(replies.submit("alpha", 5))
        await drain()
        assert replies.of("alpha", 5) == [], "a refused submit is never answered by the batcher"

    run(story)


def test_the_bytes_held_are_bounded_and_released_when_answered():
    # Entries alone once bounded the leader: 50,000 queued submits of 32 KiB are 1.6 GB.
    async def story():
        payload = bytes(32 * 1024)
        cost = PendingSubmit("alpha", 1, payload, lambda *_: None).cost_bytes
        raft, replies, batcher = batcher_on_fakes(held_bytes_max=3 * cost, bytes_max=60 * 1024, in_flight_max=1)
        for seq in (1, 2, 3):
            assert batcher.offer(replies.submit("alpha", seq, payload))
        assert batcher.held_bytes == 3 * cost
        assert batcher.offer(replies.submit("alpha", 4, payload)) is False

        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        assert batcher.held_bytes == 2 * cost
        assert batcher.offer(replies.submit("alpha", 4, payload))
        batcher.stop("no longer leader")
        assert batcher.held_bytes == 0

    run(story)


def test_offer_all_takes_every_submit_or_none_at_the_same_bounds_as_one_by_one():
    # The gateway offers a frame's submits at once; when they do not all fit it offers them
    # one by one, so offer_all must refuse exactly when one of them would be refused.
    async def story():
        cost = PendingSubmit("alpha", 1, b"x", lambda *_: None).cost_bytes
        raft, replies, batcher = batcher_on_fakes(queue_entries_max=4, held_bytes_max=5 * cost, in_flight_max=1)
        batcher.offer(replies.submit("alpha", 1))  # proposed at once: held, not queued
        assert batcher.offer_all([replies.submit("alpha", c) for c in (2, 3, 4, 5, 6)]) is False, "5 > queue_entries_max"
        assert batcher.offer_all([replies.submit("alpha", c) for c in (2, 3, 4, 5)]) is True, "4 queued, 5 held: at both bounds"
        assert (batcher.queued, batcher.held_bytes) == (4, 5 * cost)
        assert batcher.offer_all([replies.submit("alpha", 6)]) is False
        batcher.flush()
        assert len(raft.proposals) == 1, "offer_all proposes nothing; flush waits for the batch in flight"
        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        await drain()
        assert [p.keys for p in raft.proposals[1:]] == [[("alpha", c) for c in (2, 3, 4, 5)]], "the rest as one batch"
        assert batcher.held_bytes == 4 * cost

    run(story)


def test_a_queue_taken_whole_or_in_parts_makes_the_same_batches():
    # The whole queue goes at once when it fits a batch; else entry by entry up to the bounds.
    async def story():
        raft, replies, batcher = batcher_on_fakes(entries_max=3, bytes_max=300, in_flight_max=1)
        batcher.offer(replies.submit("alpha", 1, b"a"))
        for seq in range(2, 9):
            batcher.offer(replies.submit("alpha", seq, b"a" * 40))
        batcher.offer(replies.submit("bravo", 1, b"b" * 250))
        batcher.offer(replies.submit("bravo", 2, b"b"))
        await commit_everything(raft, replies, batcher)
        assert sizes(raft) == [1, 3, 3, 1, 1, 1], "by entries_max, then by bytes_max (the first of a batch always fits)"
        assert batcher.held_bytes == 0 and batcher.queued == 0

    run(story)


# --- commits --------------------------------------------------------------------------------


def test_commits_reply_in_order_on_the_loop():
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        observed = []
        batcher.latency_observer = lambda seconds, count: observed.extend([seconds] * count)
        batcher.offer(replies.submit("alpha", 1))
        for session, seq in [("bravo", 1), ("alpha", 2), ("bravo", 2), ("charlie", 7)]:
            batcher.offer(replies.submit(session, seq))

        first = raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        await drain()
        second = raft.commit(raft.proposals[1])
        await replies.wait_for(5)

        assert [(s, c) for s, c, _ in replies.got] == [("alpha", 1), ("bravo", 1), ("alpha", 2), ("bravo", 2), ("charlie", 7)]
        assert [outcome for _, _, outcome in replies.got] == first.results + second.results
        assert [outcome.seq for _, _, outcome in replies.got] == [1, 2, 3, 4, 5]
        assert replies.threads == {threading.get_ident()}, "replies arrive on the loop's thread"
        assert len(observed) == 5 and all(seconds >= 0 for seconds in observed)
        assert batcher.in_flight == 0 and batcher.batches_unknown == 0

    run(story)


class NodeStopped(Exception):
    """Stands in for ``fail_stop`` (which ends the process)."""


@pytest.fixture
def stops(monkeypatch) -> None:
    def fail_stop(message: str, *args: object) -> None:
        raise NodeStopped(message % args)

    monkeypatch.setattr("raftseq.cluster.invariant.fail_stop", fail_stop)


def test_a_commit_reported_inside_propose_stops_the_node(stops):
    """A Raft tick reports commits; proposing only queues a command for the next tick. A commit
    reported before ``propose`` returns would re-enter the batcher mid-proposal: a bug, and the
    node stops (inside pysyncobj's apply an exception would have the entry applied again)."""

    class InlineRaft(FakeRaft):
        def propose(self, data: bytes, callback) -> None:
            super().propose(data, callback)
            self.commit(self.proposals[-1])

    async def story():
        raft, replies = InlineRaft(), Replies()
        batcher = make_batcher(raft)
        with pytest.raises(NodeStopped, match="before its propose call returned"):
            batcher.offer(replies.submit("alpha", 1))
        assert replies.got == []

    run(story)


def test_a_failing_reply_stops_the_node_instead_of_raising_into_raft(stops):
    async def story():
        raft = FakeRaft()
        batcher = make_batcher(raft)

        def broken_reply(client_seq: int, outcome: object, payload_bytes: int) -> None:
            raise RuntimeError("reply failed")

        batcher.offer(PendingSubmit("alpha", 1, b"x", broken_reply))
        with pytest.raises(NodeStopped, match="reply failed"):
            raft.commit(raft.proposals[0])

    run(story)


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (FAIL_REASON.LEADER_CHANGED, "leader_changed"),
        (FAIL_REASON.NOT_LEADER, "not_leader"),
        (FAIL_REASON.QUEUE_FULL, "queue_full"),
        (FAIL_REASON.MISSING_LEADER, "missing_leader"),
        (FAIL_REASON.DISCARDED, "discarded"),
        (FAIL_REASON.REQUEST_DENIED, "request_denied"),
        (99, "raft error 99"),
    ],
)
def test_a_failed_commit_replies_outcome_unknown_with_the_reason(error, text):
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        batcher.offer(replies.submit("alpha", 1))
        batcher.offer(replies.submit("alpha", 2))
        batcher.offer(replies.submit("bravo", 1))

        assert sizes(raft) == [1]
        raft.fail(raft.proposals[0], error)
        await replies.wait_for(1)

        ((session, seq, outcome),) = replies.got
        assert (session, seq) == ("alpha", 1)
        assert isinstance(outcome, CommitOutcome)
        assert outcome.result is None and outcome.error == text
        assert batcher.batches_unknown == 1
        await drain()
        assert sizes(raft) == [1, 2], "the queue moves on after a failure"

        raft.fail(raft.proposals[1], error)
        await replies.wait_for(3)
        assert [o.error for _, _, o in replies.got] == [text] * 3

    run(story)


@pytest.mark.parametrize("result", [None, "apply result with an error"], ids=["no-result", "not-applied"])
def test_a_success_without_an_applied_batch_replies_outcome_unknown(result):
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        batcher.offer(replies.submit("alpha", 1))
        applied = None if result is None else ApplyResult([], 0, 0, 0, b"", error="undecodable batch")

        raft.finish(raft.proposals[0], applied, FAIL_REASON.SUCCESS)
        await replies.wait_for(1)

        outcome = replies.got[0][2]
        assert isinstance(outcome, CommitOutcome) and outcome.error == "batch not applied"

    run(story)


def test_new_submits_in_a_row_that_share_acked_are_answered_in_one_call():
    async def story():
        raft, replies, batcher = batcher_on_fakes(in_flight_max=1)
        runs = []

        def acked(first_client_seq: int, first_seq: int, count: int, payload_bytes: int) -> None:
            runs.append((first_client_seq, first_seq, count, payload_bytes))

        def other(first_client_seq: int, first_seq: int, count: int, payload_bytes: int) -> None:
            runs.append(("other", first_client_seq, first_seq, count))

        batcher.offer(replies.submit("alpha", 1))  # in flight alone
        for client_seq, payload in ((2, b"ab"), (3, b"c"), (5, b"d")):  # 5: not the next of 3
            batcher.offer(PendingSubmit("alpha", client_seq, payload, lambda *_: None, acked=acked))
        batcher.offer(PendingSubmit("bravo", 6, b"e", lambda *_: None, acked=other))
        batcher.offer(replies.submit("alpha", 9))  # no acked: its reply, as ever
        batcher.offer(PendingSubmit("alpha", 10, b"f", lambda *_: None, acked=acked))
        raft.commit_all_new(raft.proposals[0])
        await replies.wait_for(1)
        await drain()
        raft.commit_all_new(raft.proposals[1])
        await replies.wait_for(2)
        assert runs == [(2, 2, 2, 3), (5, 4, 1, 1), ("other", 6, 5, 1), (10, 7, 1, 1)]
        assert [(s, c, outcome) for s, c, outcome in replies.got] == [("alpha", 1, 1), ("alpha", 9, 6)]
        assert batcher.held_bytes == 0

    run(story)


def test_submits_that_came_in_together_are_observed_together():
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        observed = []
        batcher.latency_observer = lambda seconds, count: observed.append((seconds, count))
        came_in_ns = time.monotonic_ns()
        one_frame = [PendingSubmit("alpha", c, b"x", lambda *_: None, enqueued_ns=came_in_ns) for c in (1, 2, 3)]
        assert batcher.offer_all(one_frame)
        assert batcher.offer(PendingSubmit("bravo", 1, b"x", lambda *_: None, enqueued_ns=came_in_ns + 1))
        batcher.flush()
        raft.commit(raft.proposals[0])
        await drain()
        assert [count for _, count in observed] == [3, 1]
        assert observed[0][0] > observed[1][0] > 0

    run(story)


# --- commit timeout -------------------------------------------------------------------------


def test_a_commit_timeout_replies_unknown_and_ignores_the_late_commit():
    async def story():
        raft, replies, batcher = batcher_on_fakes(commit_timeout_s=0.05)
        observed = []
        batcher.latency_observer = lambda seconds, count: observed.extend([seconds] * count)
        batcher.offer(replies.submit("alpha", 1))
        batcher.offer(replies.submit("alpha", 2))

        await replies.wait_for(1)

        ((_, seq, outcome),) = replies.got
        assert seq == 1 and isinstance(outcome, CommitOutcome) and outcome.error == "commit timeout"
        assert batcher.batches_unknown == 1
        await drain()
        assert sizes(raft) == [1, 1], "the queued submit is proposed once the first batch timed out"

        raft.commit(raft.proposals[0])  # the late commit of the timed-out batch
        raft.commit(raft.proposals[1])
        await replies.wait_for(2)
        await drain()

        assert len(replies.of("alpha", 1)) == 1
        assert isinstance(replies.of("alpha", 2)[0], EntryResult)
        assert len(replies.got) == 2
        assert len(observed) == 1

    run(story)


def test_a_commit_timeout_expires_each_batch_by_its_own_deadline():
    async def story():
        raft, replies, batcher = batcher_on_fakes(commit_timeout_s=0.2, entries_max=1, in_flight_max=2)
        batcher.offer(replies.submit("alpha", 1))
        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        batcher.offer(replies.submit("alpha", 2))
        batcher.offer(replies.submit("alpha", 3))
        assert sizes(raft) == [1, 1, 1]

        raft.commit(raft.proposals[2])
        await replies.wait_for(2)
        await replies.wait_for(3)

        assert isinstance(replies.of("alpha", 1)[0], EntryResult)
        assert isinstance(replies.of("alpha", 3)[0], EntryResult)
        assert replies.of("alpha", 2)[0].error == "commit timeout"
        assert batcher.in_flight == 0 and batcher.batches_unknown == 1

    run(story)


# --- stop -----------------------------------------------------------------------------------


def test_stop_answers_queued_and_in_flight_submits_exactly_once():
    async def story():
        raft, replies, batcher = batcher_on_fakes(entries_max=2, in_flight_max=2, commit_timeout_s=0.05)
        for seq in range(1, 7):
            batcher.offer(replies.submit("alpha", seq))
        assert sizes(raft) == [1, 2] and batcher.queued == 3

        batcher.stop("no longer leader")

        assert len(replies.got) == 6
        assert sorted(c for _, c, _ in replies.got) == list(range(1, 7))
        assert all(isinstance(o, CommitOutcome) and o.error == "no longer leader" for _, _, o in replies.got)
        assert (batcher.queued, batcher.in_flight, batcher.batches_unknown) == (0, 0, 2)

        # Late commits and the commit-timeout timer change nothing.
        raft.commit(raft.proposals[0])
        raft.fail(raft.proposals[1], FAIL_REASON.LEADER_CHANGED)
        expired = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, expired.set_result, None)
        await asyncio.wait_for(expired, WAIT_S)
        await drain()
        assert len(replies.got) == 6
        assert sizes(raft) == [1, 2]

    run(story)


def test_after_stop_and_start_new_submits_are_proposed_again():
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        batcher.offer(replies.submit("alpha", 1))
        batcher.stop("no longer leader")
        batcher.offer(replies.submit("alpha", 2))
        assert sizes(raft) == [1] and batcher.queued == 1

        batcher.start()

        assert sizes(raft) == [1, 1]
        raft.commit(raft.proposals[1])
        await replies.wait_for(2)
        assert isinstance(replies.of("alpha", 2)[0], EntryResult)

    run(story)


# --- leader time ----------------------------------------------------------------------------


def test_leader_time_never_decreases_when_the_clock_goes_backwards():
    readings = iter([1_000, 500, 2_000, 1_999, 2_000, 10, 3_000])

    async def story():
        raft, replies, batcher = batcher_on_fakes(clock_ns=lambda: next(readings))
        for seq in range(1, 8):
            batcher.offer(replies.submit("alpha", seq))
            raft.commit(raft.proposals[-1])
            await replies.wait_for(seq)

        times = [p.batch.leader_time_ns for p in raft.proposals]
        assert times == [1_000, 1_000, 2_000, 2_000, 2_000, 2_000, 3_000]

    run(story)


def test_leader_time_stays_monotonic_across_stop_and_start():
    readings = iter([5_000, 4_000])

    async def story():
        raft, replies, batcher = batcher_on_fakes(clock_ns=lambda: next(readings))
        batcher.offer(replies.submit("alpha", 1))
        batcher.stop("no longer leader")
        batcher.start()
        batcher.offer(replies.submit("alpha", 2))

        assert [p.batch.leader_time_ns for p in raft.proposals] == [5_000, 5_000]

    run(story)


# --- the gateway's use of the batcher -------------------------------------------------------


def test_offer_without_proposing_then_flush_makes_one_batch():
    # cluster/gateway.py queues every submit of one frame with ``offer(..., propose=False)``
    # and then calls ``flush()``, so that a frame of submits becomes one batch.
    async def story():
        raft, replies, batcher = batcher_on_fakes()
        for seq in (1, 2, 3):
            assert batcher.offer(replies.submit("alpha", seq), propose=False)
        assert raft.proposals == []

        batcher.flush()

        assert sizes(raft) == [3]

    run(story)


# --- a seeded random history ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_histories_answer_every_submit_exactly_once(seed):
    rng = random.Random(seed)
    clock = [10_000]

    def clock_ns() -> int:
        clock[0] += rng.randint(-50, 100)
        return clock[0]

    async def story():
        raft, replies = FakeRaft(), Replies()
        entries_max, in_flight_max = rng.randint(1, 6), rng.randint(1, 3)
        monotonic = ManualClock()
        batcher = make_batcher(
            raft,
            clock_ns=clock_ns,
            now_s=monotonic,
            entries_max=entries_max,
            in_flight_max=in_flight_max,
            bytes_max=400,
            queue_entries_max=12,
            priority_queue_entries_max=3,
            priority_bulk_in_flight_entries_max=rng.randint(1, 8),
        )
        accepted: list[tuple[str, int]] = []
        next_seq = {"alpha": 1, "bravo": 1, "admin": 1}
        for _ in range(300):
            action = rng.random()
            monotonic.s += rng.random() * 0.3
            if action < 0.5:
                session = rng.choice(["alpha", "bravo", "admin"])
                submit = replies.submit(session, next_seq[session], b"p" * rng.randint(0, 120))
                if batcher.offer(submit, priority=session == "admin"):
                    accepted.append((session, next_seq[session]))
                    next_seq[session] += 1
            elif action < 0.9:
                open_ = [p for p in raft.proposals if not p.answered]
                if open_:
                    proposal = rng.choice(open_[:2])
                    if rng.random() < 0.8:
                        raft.commit(proposal)
                    else:
                        raft.fail(proposal, FAIL_REASON.LEADER_CHANGED)
                    await drain()
            elif action < 0.95:
                batcher.stop("no longer leader")
                batcher.start()
            assert batcher.in_flight <= in_flight_max
        batcher.stop("node shutting down")
        await drain()

        answered = [(s, c) for s, c, _ in replies.got]
        assert sorted(answered) == sorted(accepted), "every accepted submit answered exactly once"
        proposed = [k for p in raft.proposals for k in p.keys]
        assert len(proposed) == len(set(proposed)), "no submit proposed twice"
        for session in ("alpha", "bravo", "admin"):
            mine = [c for s, c in proposed if s == session]
            assert mine == sorted(mine), "a session's submits are proposed in client_seq order"
        for proposal in raft.proposals:
            assert 1 <= len(proposal.batch.entries) <= entries_max
            assert len(proposal.data) <= 400
        times = [p.batch.leader_time_ns for p in raft.proposals]
        assert times == sorted(times)
        for session, client_seq, outcome in replies.got:
            if isinstance(outcome, EntryResult):
                assert (outcome.session, outcome.client_seq) == (session, client_seq)

    run(story)


# --- the priority lane ----------------------------------------------------------------------


def test_a_priority_submit_goes_first_in_the_next_batch():
    async def story():
        raft, replies, batcher = batcher_on_fakes(in_flight_max=1)
        observed: dict[str, int] = {"all": 0, "priority": 0}
        batcher.latency_observer = lambda seconds, count: observed.__setitem__("all", observed["all"] + count)
        batcher.priority_latency_observer = lambda seconds, count: observed.__setitem__("priority", observed["priority"] + count)
        assert batcher.offer(replies.submit("bulk", 1))  # proposed at once
        for seq in (2, 3, 4):
            assert batcher.offer(replies.submit("bulk", seq))
        assert batcher.offer(replies.submit("admin", 1), priority=True)
        # The pipeline's one slot is taken: it waits for that commit, never beyond in_flight_max.
        assert [p.keys for p in raft.proposals] == [[("bulk", 1)]]
        raft.commit(raft.proposals[0])
        await replies.wait_for(1)
        # Then first, before the bulk submits queued before it, in a batch of its own (its
        # apply and answer wait for no bulk entry), and the bulk ones once it committed.
        assert [p.keys for p in raft.proposals[1:]] == [[("admin", 1)]]
        assert batcher.priority_entries_proposed == 1 and batcher.entries_proposed == 2
        raft.commit(raft.proposals[1])
        await replies.wait_for(2)
        assert raft.proposals[2].keys == [("bulk", 2), ("bulk", 3), ("bulk", 4)]
        assert batcher.offer(replies.submit("admin", 2), priority=True)
        await commit_everything(raft, replies, batcher)
        assert [(s, c, outcome.seq) for s, c, outcome in replies.got] == [
            ("bulk", 1, 1),
            ("admin", 1, 2),
            ("bulk", 2, 3),
            ("bulk", 3, 4),
            ("bulk", 4, 5),
            ("admin", 2, 6),
        ]
        # Every ack's latency is observed once, the priority lane's once more on their own.
        assert observed == {"all": 6, "priority": 2}, observed

    run(story)


class ManualClock:
    """The batcher's monotonic clock (``now_s``), moved by the test."""

    def __init__(self) -> None:
        self.s = 1000.0

    def __call__(self) -> float:
        return self.s


def after_a_priority_submit(admin_payload: bytes = b"", bulk: int = 0, **options) -> tuple[ManualClock, FakeRaft, Replies, Batcher]:
    """A batcher on fakes with a manual monotonic clock (``priority_recent_s`` 1 s) that was
    just offered ("admin", 1) in the priority lane (priority traffic is recent), then
    ("bulk", 1..`bulk`)."""
    clock = ManualClock()
    raft, replies, batcher = batcher_on_fakes(now_s=clock, priority_recent_s=1.0, **options)
    assert batcher.offer(replies.submit("admin", 1, admin_payload), priority=True)
    for seq in range(1, bulk + 1):
        assert batcher.offer(replies.submit("bulk", seq))
    return clock, raft, replies, batcher


#: A pipeline of 4 batches of 10 in which bulk may hold only 8 entries while priority traffic
#: is recent: less than one batch, so that room is what holds bulk back.
BULK_ROOM_BELOW_A_BATCH = {"in_flight_max": 4, "entries_max": 10, "priority_bulk_in_flight_entries_max": 8}
#: A pipeline of 8 batches of 6 in which bulk may hold 60 entries while priority traffic is
#: recent: more than the whole pipeline (48), so only the hold behind priority batches holds it back.
BULK_ROOM_ABOVE_THE_PIPELINE = {"in_flight_max": 8, "entries_max": 6, "priority_bulk_in_flight_entries_max": 60}


def bulk_keys_ahead_of(raft: FakeRaft, key: tuple[str, int]) -> int:
    """Bulk entries proposed before the batch holding `key` and not yet committed when it was proposed."""
    index = next(i for i, p in enumerate(raft.proposals) if key in p.keys)
    return sum(len([k for k in p.keys if k[0] == "bulk"]) for p in raft.proposals[:index] if not p.answered)


def test_while_priority_traffic_is_recent_bulk_leaves_a_slot_and_few_entries_ahead():
    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=100, **BULK_ROOM_BELOW_A_BATCH)
        # Bulk holds at most 8 entries in flight, in batches of at least half that room.
        assert batcher.bulk_in_flight <= 8
        assert all(len(p.keys) <= 10 for p in raft.proposals)
        admin_seq = 2
        for _ in range(30):
            assert batcher.in_flight <= 3, "bulk took the slot kept for the lane"
            assert batcher.bulk_in_flight <= 8
            assert batcher.offer(replies.submit("admin", admin_seq), priority=True)
            assert ("admin", admin_seq) in [p.keys[0] for p in raft.proposals], "the priority submit waited for a commit"
            assert bulk_keys_ahead_of(raft, ("admin", admin_seq)) <= 8
            admin_seq += 1
            raft.commit(next(p for p in raft.proposals if not p.answered))
            await drain()
            clock.s += 0.1
        await commit_everything(raft, replies, batcher)
        assert batcher.in_flight == 0 and batcher.bulk_in_flight == 0 and batcher.held_bytes == 0
        assert sorted(c for s, c, _ in replies.got if s == "bulk") == list(range(1, 101))

    run(story)


def test_bulk_has_the_whole_pipeline_again_once_priority_traffic_is_no_longer_recent():
    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=200, **BULK_ROOM_BELOW_A_BATCH)
        assert batcher.priority_recent()
        assert batcher.in_flight <= 3 and batcher.bulk_in_flight <= 8
        clock.s += 0.9
        raft.commit(raft.proposals[0])  # the priority submit's batch: recent from its answer on
        await replies.wait_for(1)
        clock.s += 0.9
        assert batcher.priority_recent(), "recency counted from the submit, not from its answer"
        clock.s += 0.1  # a second without a priority submit coming or answered
        assert not batcher.priority_recent()
        raft.commit(next(p for p in raft.proposals if not p.answered))
        await drain()
        assert batcher.in_flight == 4 and batcher.bulk_in_flight > 8, "bulk still held back"
        assert all(len(p.keys) == 10 for p in raft.proposals[-3:])
        await commit_everything(raft, replies, batcher)
        assert len(replies.got) == 201

    run(story)


def test_no_trickle_of_small_bulk_batches_while_priority_traffic_is_recent():
    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(
            in_flight_max=8, entries_max=6, priority_bulk_in_flight_entries_max=10, bulk=40
        )
        raft.commit(raft.proposals[0])  # the priority batch: bulk waited for it
        await drain()
        # Bulk: a batch of 6 (room 10), then none of 4 (room below half the bound) until a commit.
        assert sizes(raft) == [1, 6]
        raft.commit(raft.proposals[1])
        await drain()
        assert sizes(raft) == [1, 6, 6], "the bulk commit's room was not used"
        await commit_everything(raft, replies, batcher)
        assert len(replies.got) == 41

    run(story)


def test_no_bulk_batch_is_proposed_behind_a_priority_batch_in_raft():
    """A bulk batch proposed behind a priority one does not delay it in Raft's order, but its
    round takes every node's CPU while the priority batch's round runs (bench_priority, 2
    cores: Raft 4.4 -> 3.6 ms mean for the admin submit with bulk held meanwhile)."""

    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=60, **BULK_ROOM_ABOVE_THE_PIPELINE)
        assert sizes(raft) == [1], "bulk proposed behind the priority batch"
        raft.commit(raft.proposals[0])
        await drain()
        assert len(raft.proposals) > 3 and batcher.bulk_in_flight > 6
        # Another priority submit: proposed at once, alone; no bulk behind it until it commits.
        proposed = len(raft.proposals)
        assert batcher.offer(replies.submit("admin", 2), priority=True)
        assert [p.keys for p in raft.proposals[proposed:]] == [[("admin", 2)]]
        for proposal in raft.proposals[:proposed]:
            if not proposal.answered:
                raft.commit(proposal)
                await drain()
                clock.s += 0.001
        assert len(raft.proposals) == proposed + 1, "bulk proposed behind the priority batch"
        raft.commit(raft.proposals[proposed])
        await drain()
        assert len(raft.proposals) > proposed + 1, "bulk still held once the priority batch committed"
        await commit_everything(raft, replies, batcher)
        assert len(replies.got) == 62

    run(story)


def test_a_priority_credential_submitting_without_pause_leaves_bulk_a_batch_every_hold():
    """Bulk waits behind priority batches at most ``PRIORITY_HOLDS_BULK_MAX_S`` in a row."""

    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=200, **BULK_ROOM_ABOVE_THE_PIPELINE)
        step_s = PRIORITY_HOLDS_BULK_MAX_S / 4
        for admin_seq in range(2, 42):
            # Priority batches always in Raft: one proposed before the one before it commits;
            # everything else commits at once.
            assert batcher.offer(replies.submit("admin", admin_seq), priority=True)
            for proposal in [p for p in raft.proposals if not p.answered and ("admin", admin_seq) not in p.keys]:
                raft.commit(proposal)
                await drain()
            clock.s += step_s
        bulk_batches = [p for p in raft.proposals if p.keys[0][0] == "bulk"]
        # 40 steps of a quarter of the hold: about 10 holds, a bulk batch after each.
        assert 8 <= len(bulk_batches) <= 12, f"{len(bulk_batches)} bulk batches"
        await commit_everything(raft, replies, batcher)
        assert len(replies.got) == 200 + 41

    run(story)


def test_a_hold_of_bulk_behind_priority_starts_afresh_after_a_step_down():
    """The 10 ms a bulk batch may wait behind a priority batch count from that batch: a hold
    cut short by a step-down does not let bulk pass the next priority batch at once."""

    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=1, **BULK_ROOM_ABOVE_THE_PIPELINE)
        assert sizes(raft) == [1], "bulk proposed behind the priority batch"
        batcher.stop("not leader")
        clock.s += 1.0
        batcher.start()
        proposed = len(raft.proposals)
        assert batcher.offer(replies.submit("admin", 2), priority=True)
        # A full batch in one frame: it would go beside the priority one at once.
        assert batcher.offer_all([replies.submit("bulk", seq) for seq in range(2, 8)])
        batcher.flush()
        assert [p.keys for p in raft.proposals[proposed:]] == [[("admin", 2)]], "bulk passed the new priority batch"
        raft.commit(raft.proposals[proposed])
        await drain()
        assert [p.keys for p in raft.proposals[proposed + 1 :]] == [[("bulk", seq) for seq in range(2, 8)]]

    run(story)


def test_the_wait_of_bulk_behind_priority_batches_and_the_holds_cut_are_counted():
    """``bulk_held_behind_priority_s`` and ``bulk_holds_capped`` (the metrics
    ``raftseq_bulk_held_behind_priority_seconds_total`` and ``raftseq_bulk_holds_capped_total``):
    the lane's cost to bulk, and priority traffic that leaves bulk a batch per hold only."""

    async def story():
        clock, raft, replies, batcher = after_a_priority_submit(bulk=6, **BULK_ROOM_ABOVE_THE_PIPELINE)
        assert sizes(raft) == [1]
        clock.s += 0.004
        raft.commit(raft.proposals[0])
        await drain()
        assert sizes(raft) == [1, 6], "bulk still held once the priority batch committed"
        assert batcher.bulk_held_behind_priority_s == pytest.approx(0.004)
        assert batcher.bulk_holds_capped == 0
        # A priority batch that stays in Raft past the cap: bulk goes, the hold is counted as cut.
        assert batcher.offer(replies.submit("admin", 2), priority=True)
        assert batcher.offer_all([replies.submit("bulk", seq) for seq in range(7, 13)])
        batcher.flush()
        assert sizes(raft) == [1, 6, 1]
        clock.s += 1.5 * PRIORITY_HOLDS_BULK_MAX_S
        batcher.flush()
        assert sizes(raft) == [1, 6, 1, 6]
        assert batcher.bulk_holds_capped == 1
        assert batcher.bulk_held_behind_priority_s == pytest.approx(0.004 + 1.5 * PRIORITY_HOLDS_BULK_MAX_S)
        await commit_everything(raft, replies, batcher)
        assert len(replies.got) == 14

    run(story)


def test_a_full_bulk_queue_never_refuses_the_priority_lane_and_the_lane_has_its_own_bound():
    async def story():
        payload = bytes(1000)
        cost = PendingSubmit("bulk", 1, payload, lambda *_: None).cost_bytes
        raft, replies, batcher = batcher_on_fakes(
            queue_entries_max=3, held_bytes_max=4 * cost, priority_queue_entries_max=2, in_flight_max=1
        )
        for seq in range(1, 5):
            assert batcher.offer(replies.submit("bulk", seq, payload))
        assert batcher.offer(replies.submit("bulk", 5, payload)) is False, "the bulk queue is full"
        assert not batcher.has_room(cost)
        assert batcher.has_room(cost, priority=True)
        assert batcher.offer(replies.submit("admin", 1, payload), priority=True, propose=False)
        assert batcher.offer_all([replies.submit("admin", 2, payload)], priority=True)
        assert batcher.offer(replies.submit("admin", 3, payload), priority=True) is False, "the lane is bounded"
        assert batcher.offer_all([replies.submit("admin", 3, payload)], priority=True) is False
        batcher.flush()
        raft.commit(raft.proposals[0])  # the pipeline's one slot
        await replies.wait_for(1)
        assert raft.proposals[1].keys[:2] == [("admin", 1), ("admin", 2)]
        await commit_everything(raft, replies, batcher)
        assert batcher.held_bytes == 0 and batcher.queued == 0
        assert sorted((s, c) for s, c, _ in replies.got) == [("admin", 1), ("admin", 2)] + [("bulk", i) for i in range(1, 5)]

    run(story)


def test_stop_answers_the_priority_lane_too():
    async def story():
        raft, replies, batcher = batcher_on_fakes(in_flight_max=1)
        assert batcher.offer(replies.submit("bulk", 1))
        assert batcher.offer(replies.submit("admin", 1), priority=True, propose=False)
        batcher.stop("no longer leader")
        assert len(replies.got) == 2 and all(isinstance(outcome, CommitOutcome) for _, _, outcome in replies.got)
        assert batcher.has_room(1, priority=True) and batcher.queued == 0

    run(story)
