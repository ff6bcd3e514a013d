"""The state-machine runner against an in-memory stream: routing, exactly once across runs and
restarts, what stops it (each error naming what and where), behaviour activation, checkpoints.

The stream here is a list with the subscription's contract (numbers from ``from_seq``, no gap,
no repeat); ``tests/test_sm_cluster.py`` runs the same runner against real nodes.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import msgspec
import pytest

from raftseq.clients import Message
from raftseq.clients.sm import (
    ApplyError,
    DivergenceError,
    MessageTypes,
    SmMessage,
    StateMachine,
    StateMachineRunner,
    StreamError,
    UnknownMessageType,
    UnsupportedBehaviourVersion,
    UnsupportedMessageVersion,
    activate,
    encode_message,
)
from raftseq.clients.sm import formats

# --- two small state machines ---------------------------------------------------------------

KV = MessageTypes("kv")


@KV.message
class Put(SmMessage):
    TYPE = "kv.put"
    VERSION = 1
    key: str
    value: int


@KV.message
class Delete(SmMessage):
    TYPE = "kv.delete"
    VERSION = 1
    key: str


class Recording(StateMachine):
    """Base of the two machines below: notes what this instance applied, with the behaviour in
    effect (instrumentation, not state: snapshots leave it out), then ``change``s its state."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, int]] = []

    def apply(self, message, seq, log_time_ns):
        self.applied.append((seq, self.active_version))
        self.change(message)

    def change(self, message) -> None:
        raise NotImplementedError


class KvStore(Recording):
    """Behaviour 1: a put sets the value. Behaviour 2: a put adds to it."""

    TYPE = "kv"
    MESSAGES = KV
    BEHAVIOUR_VERSIONS = (1, 2)

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, int] = {}

    def change(self, message) -> None:
        if type(message) is Put:
            self.data[message.key] = message.value if self.active_version == 1 else self.data.get(message.key, 0) + message.value
        else:
            self.data.pop(message.key, None)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(sorted(self.data.items()))

    def restore(self, data: bytes) -> None:
        self.data = dict(msgspec.msgpack.decode(data, type=list[tuple[str, int]]))


CTR = MessageTypes("ctr")


@CTR.message
class Add(SmMessage):
    TYPE = "ctr.add"
    VERSION = 1
    amount: int


class Counter(Recording):
    TYPE = "counter"
    MESSAGES = CTR

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def change(self, message) -> None:
        self.total += message.amount

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.total)

    def restore(self, data: bytes) -> None:
        self.total = msgspec.msgpack.decode(data, type=int)


class KvStoreV1Only(KvStore):
    BEHAVIOUR_VERSIONS = (1,)


# --- the in-memory stream ---------------------------------------------------------------------


class Stream:
    """Sequenced messages in a list; ``subscribe`` has ``clients.subscribe``'s signature."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.subscriptions = 0

    def append(self, payload: bytes, session: str = "writer") -> int:
        seq = len(self.messages) + 1
        self.messages.append(Message(seq, 1_000 * seq, session, seq, payload))
        return seq

    def put(self, key: str, value: int) -> int:
        return self.append(encode_message(Put(key, value)))

    async def subscribe(self, endpoints, *, from_seq: int = 1, **options):
        self.subscriptions += 1
        index = from_seq - 1
        while index < len(self.messages):
            yield self.messages[index]
            index += 1
            await asyncio.sleep(0)
        await asyncio.Event().wait()  # a live stream: nothing more for now


def runner(stream: Stream, machines, **options) -> StateMachineRunner:
    return StateMachineRunner(["127.0.0.1:1"], machines, subscribe_fn=stream.subscribe, **options)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def mixed_stream() -> Stream:
    s = Stream()
    s.put("a", 1)  # 1
    s.append(encode_message(Add(5)))  # 2
    s.append(b"not a state-machine message")  # 3
    s.append(formats.encode_sm_message("other.team_thing", 7, b"\x80"))  # 4: another namespace
    s.put("b", 2)  # 5
    s.append(encode_message(Delete("a")))  # 6
    s.append(encode_message(Add(-2)))  # 7
    return s


# --- routing and exactly once ---------------------------------------------------------------


def test_several_machines_share_one_subscription_each_seeing_only_its_types():
    stream = mixed_stream()
    kv, ctr = KvStore(), Counter()
    r = runner(stream, [kv, ctr])
    assert run(r.run(until_seq=7)) == 7
    assert stream.subscriptions == 1
    assert [seq for seq, _ in kv.applied] == [1, 5, 6] and kv.data == {"b": 2}
    assert [seq for seq, _ in ctr.applied] == [2, 7] and ctr.total == 3
    assert r.covered_seq("kv") == r.covered_seq("counter") == 7


def test_each_run_resumes_after_the_last_number_applied():
    stream = mixed_stream()
    kv, ctr = KvStore(), Counter()
    r = runner(stream, [kv, ctr])

    async def scenario():
        await r.run(until_seq=2)
        await r.run(until_seq=2)  # nothing new
        await r.run(stop_when=lambda seq: seq >= 6)
        await r.run(until_seq=7)

    run(scenario())
    assert [seq for seq, _ in kv.applied] == [1, 5, 6] and [seq for seq, _ in ctr.applied] == [2, 7]
    assert stream.subscriptions == 3


def test_a_repeated_or_skipped_number_is_refused_not_applied():
    stream = mixed_stream()
    stream.messages[4] = stream.messages[3]  # seq 4 delivered twice
    kv = KvStore()
    with pytest.raises(StreamError, match="seq 4 after 4"):
        run(runner(stream, [kv]).run(until_seq=7))
    assert [seq for seq, _ in kv.applied] == [1]


def test_a_restarted_process_resumes_from_its_saved_state_and_applies_nothing_twice(tmp_path):
    stream = Stream()
    for i in range(100):
        stream.put(f"k{i % 7}", i)
    reference = KvStore()
    run(runner(stream, [reference]).run(until_seq=100))

    state_dir = str(tmp_path / "state")
    first = KvStore()
    r1 = runner(stream, [first], state_dir=state_dir, save_every=20)
    run(r1.run(until_seq=50))  # then the process dies: the last save covers 40
    second = KvStore()
    r2 = runner(stream, [second], state_dir=state_dir, save_every=20)
    run(r2.run(until_seq=70))
    assert [seq for seq, _ in second.applied] == list(range(41, 71))
    run(r2.close())  # a clean stop saves at 70
    third = KvStore()
    r3 = runner(stream, [third], state_dir=state_dir)
    run(r3.run(until_seq=100))
    assert [seq for seq, _ in third.applied] == list(range(71, 101))
    assert r3.digest("kv") == runner(stream, [reference]).digest("kv")
    assert third.data == reference.data


def test_saved_state_that_does_not_verify_is_not_used(tmp_path):
    stream = Stream()
    for i in range(30):
        stream.put("k", i)
    state_dir = str(tmp_path / "state")
    r1 = runner(stream, [KvStore()], state_dir=state_dir)
    run(r1.run(until_seq=20))
    run(r1.close())
    path = os.path.join(state_dir, "kv.sm")
    saved = msgspec.msgpack.decode(open(path, "rb").read())
    saved[4] = "00" * 32  # the digest no longer matches the bytes
    open(path, "wb").write(msgspec.msgpack.encode(saved))
    kv = KvStore()
    r2 = runner(stream, [kv], state_dir=state_dir)
    run(r2.run(until_seq=30))
    assert [seq for seq, _ in kv.applied] == list(range(1, 31))  # replayed from the start
    [error] = r2.snapshot_errors
    assert "'kv' covering seq 20" in str(error) and "digest after restore" in str(error) and path in str(error)


# --- what stops the runner ------------------------------------------------------------------


def test_an_unknown_type_in_a_machines_namespace_stops_it_before_applying():
    stream = mixed_stream()
    stream.append(formats.encode_sm_message("kv.rename", 1, msgspec.msgpack.encode({"key": "b"})))  # 8
    stream.put("c", 3)  # 9
    kv = KvStore()
    r = runner(stream, [kv])
    with pytest.raises(UnknownMessageType, match=r"seq 8: message type 'kv.rename' version 1 is in namespace 'kv'"):
        run(r.run(until_seq=9))
    assert r.last_seq == 7 and kv.data == {"b": 2}
    with pytest.raises(UnknownMessageType):  # and it stays stopped
        run(r.run(until_seq=9))


def test_a_version_the_reader_cannot_read_stops_it_naming_type_version_and_seq():
    stream = mixed_stream()
    stream.append(formats.encode_sm_message("kv.put", 2, msgspec.msgpack.encode({"key": "b", "value": 9})))  # 8
    kv, ctr = KvStore(), Counter()
    r = runner(stream, [kv, ctr])
    with pytest.raises(UnsupportedMessageVersion) as caught:
        run(r.run(until_seq=8))
    assert (caught.value.type_name, caught.value.version, caught.value.seq) == ("kv.put", 2, 8)
    assert r.last_seq == 7 and kv.data == {"b": 2}


def test_an_apply_that_raises_stops_the_runner_for_good():
    class Fragile(KvStore):
        def apply(self, message, seq, log_time_ns):
            if seq == 5:
                raise KeyError("boom")
            super().apply(message, seq, log_time_ns)

    r = runner(mixed_stream(), [Fragile()])
    with pytest.raises(ApplyError, match=r"'kv': apply of 'kv.put' at seq 5 raised KeyError"):
        run(r.run(until_seq=7))
    with pytest.raises(ApplyError):
        run(r.run(until_seq=7))


# --- behaviour versions -----------------------------------------------------------------------


def activation_stream() -> tuple[Stream, int]:
    """Puts 1..20 with "kv behaves as version 2 from seq 15" sequenced at seq 8."""
    s = Stream()
    for i in range(1, 21):
        if i == 8:
            s.append(activate("kv", 2, 15))
        else:
            s.put("x", 1)
    return s, 15


def test_an_activation_switches_every_replica_at_the_same_number(tmp_path):
    stream, at = activation_stream()
    from_start = KvStore()
    r1 = runner(stream, [from_start], state_dir=str(tmp_path / "a"))
    run(r1.run(until_seq=11))
    run(r1.close())  # saved at 11: the activation is pending in the state
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run(r1.run(until_seq=20))
    late = KvStore()
    r2 = runner(stream, [late], state_dir=str(tmp_path / "b"))
    run(r2.run(until_seq=20))
    for machine in (from_start, late):
        assert [v for seq, v in machine.applied if seq < at] == [1] * len([s for s, _ in machine.applied if s < at])
        assert [v for seq, v in machine.applied if seq >= at] == [2] * 6
    assert from_start.data == late.data == {"x": 7}  # set to 1 at seq 14, then six adds of 1 from seq 15
    assert r1.digest("kv") == r2.digest("kv")


def test_a_replica_that_cannot_run_the_activated_version_stops_just_before_it():
    stream, at = activation_stream()
    old = KvStoreV1Only()
    r = runner(stream, [old])
    with pytest.raises(UnsupportedBehaviourVersion) as caught:
        run(r.run(until_seq=20))
    text = str(caught.value)
    assert "'kv'" in text and "behaviour version 2" in text and f"from seq {at}" in text and "seq 8" in text
    assert r.last_seq == at - 1 and max(seq for seq, _ in old.applied) == at - 1


def test_the_behaviour_version_is_part_of_the_digest():
    stream, at = activation_stream()
    before, after = KvStore(), KvStore()
    ra, rb = runner(stream, [before]), runner(stream, [after])
    run(ra.run(until_seq=7))
    run(rb.run(until_seq=8))  # the same data, an activation pending
    assert before.data == after.data and ra.digest("kv") != rb.digest("kv")


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoints_in_the_stream_reveal_a_copy_that_diverged():
    stream = Stream()
    for i in range(10):
        stream.put("k", i)
    reference = runner(stream, [KvStore()], checkpoint_every=10)
    run(reference.run(until_seq=10))
    stream.append(formats.encode_checkpoint(formats.Checkpoint("kv", 10, reference.digest("kv"), "oms-2")))  # 11
    for i in range(9):
        stream.put("k", 100 + i)  # 12..20
    stream.append(formats.encode_checkpoint(formats.Checkpoint("kv", 20, "ba" * 32, "oms-2")))  # 21: oms-2 went wrong
    stream.put("k", 0)

    logged: list[formats.Divergence] = []
    tolerant = runner(stream, [KvStore()], checkpoint_every=10, on_divergence=logged.append, replica="oms-1", publish_checkpoints=False)
    run(tolerant.run(until_seq=22))
    assert len(logged) == 1

    strict = runner(stream, [KvStore()], checkpoint_every=10, replica="oms-1", publish_checkpoints=False)
    with pytest.raises(DivergenceError) as caught:
        run(strict.run(until_seq=22))
    d = caught.value.divergence
    assert (d.sm_type, d.seq, d.last_agreed_seq) == ("kv", 20, 10)
    assert d.digests == {"oms-1": strict.digest("kv"), "oms-2": "ba" * 32}
    assert "'kv'" in str(caught.value) and "after seq 10, at or before seq 20" in str(caught.value)
    assert strict.last_seq == 20  # stopped on the checkpoint message at 21


def test_the_ledger_names_the_lowest_disagreeing_checkpoint_whatever_the_order_seen():
    ledger = formats.CheckpointLedger()
    for seq in (100, 200, 300):
        ledger.add("kv", seq, "a", f"{seq:x}")
    assert ledger.add("kv", 300, "b", "bad") is not None
    assert ledger.add("kv", 100, "b", f"{100:x}") is None
    assert ledger.add("kv", 200, "b", "bad2") is not None
    ledger.add("kv", 200, "c", f"{200:x}")
    first = ledger.first_divergence()
    assert (first.seq, first.last_agreed_seq) == (200, 100)
    assert first.groups() == [("c8", ["a", "c"]), ("bad2", ["b"])]
    assert ledger.summary()["kv"]["replicas"] == ["a", "b", "c"]
    # One replica that reports two different states for the same number is caught too.
    assert ledger.add("kv", 100, "a", "other") is not None
