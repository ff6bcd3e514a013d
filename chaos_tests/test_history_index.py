"""The checker's compact index: messages that match no invoke are kept in full, op ids and seqs
in any order, a history read as it streams, and a footprint per op that an hour's soak fits in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chaos_tests import synth
from chaos_tests.checker import check, check_file
from chaos_tests.history import Complete, FinalRead, HistoryError, Invoke, iter_history
from chaos_tests.history_index import Positions
from chaos_tests.test_checker import NODES, World, names, run_clean


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path / "history.jsonl")


def test_a_final_read_record_under_another_client_seq_is_kept_and_reported(world):
    run_clean(world, 5)
    session, _, payload = world.stream[2]
    forged = world.records()
    forged[2] = (3, session, 99, payload)
    report = check(world.finish({node: forged for node in NODES}))
    assert names(report) == {"one-record-per-seq": 1, "submitted-only": 1}
    submitted = next(v for v in report.violations if v.name == "submitted-only")
    assert submitted.seqs == [3] and "client_seq 99" in submitted.message and payload in submitted.message


def test_a_delivery_under_another_session_is_kept_and_reported(world):
    run_clean(world, 4)
    world.rec.sub_connect("s1", "n2", 1)
    world.deliver("s1", "n2", 1, 1)
    _, client_seq, payload = world.stream[1]
    world.rec.deliver("s1", "n2", 2, "s-forged", client_seq, payload)
    world.deliver("s1", "n2", 3, 4)
    report = check(world.finish())
    assert names(report) == {"one-record-per-seq": 1}
    assert report.first_violation.seqs == [2]
    assert "s-forged" in report.first_violation.message and "the delivery to s1 from n2" in report.first_violation.message


def test_a_delivery_of_an_unknown_payload_is_kept_and_reported(world):
    run_clean(world, 3)
    world.rec.sub_connect("s1", "n1", 1)
    world.deliver("s1", "n1", 1, 3)
    world.rec.deliver("s1", "n1", 4, "s-ghost", 1, "ghost-000001")
    report = check(world.finish())
    assert names(report) == {"one-record-per-seq": 1}
    assert "ghost-000001" in report.first_violation.message and "vanished" in report.first_violation.message


def test_a_delivery_recorded_before_its_invoke_is_the_same_message(world):
    # Kept in full (no invoke yet), it still equals the op's message once the invoke is known.
    world.rec.sub_connect("s1", "n1", 1)
    world.rec.deliver("s1", "n1", 1, "s-c1", 1, "c1-000001")
    world.ok(world.submit("c1"))
    report = check(world.finish())
    assert report.ok and report.counts.deliveries == 1


def test_op_ids_and_seqs_in_any_order():
    events = [
        Invoke(1, 10, "c1", "s1", 1, "a"),
        Invoke(2, 4, "c1", "s1", 2, "b"),
        Invoke(3, 7, "c2", "s2", 1, "c"),
        Complete(4, 4, "ok", 2),
        Complete(5, 10, "ok", 1),
        Complete(6, 7, "fail", reason="rejected"),
    ]
    reads = {"n1": [(1, "s1", 1, "a"), (2, "s1", 2, "b")], "n2": [(2, "s1", 2, "b"), (1, "s1", 1, "a")]}
    events += [FinalRead(7, node, 0, 1, records) for node, records in reads.items()]
    report = check(events)
    assert names(report) == {"final-reads-prefix": 2}
    assert (report.counts.ops, report.counts.ok, report.counts.fail, report.counts.stream_length) == (3, 2, 1, 2)
    assert "seq 2 comes first" in report.violations[0].message


def test_positions_keep_dense_and_sparse_keys():
    positions = Positions()
    for key in (1, 2, 3, 10, 4, 7):
        positions.add(key)
    assert [positions.get(key) for key in (1, 2, 3, 10, 4, 7, 5, 0)] == [0, 1, 2, 3, 4, 5, None, None]
    assert [positions.key(position) for position in range(6)] == [1, 2, 3, 10, 4, 7]


def test_a_history_is_checked_as_it_streams(world):
    run_clean(world, 3)
    world.finish()
    with open(world.path, "a") as file:
        file.write('{"kind":"note","t":1')  # torn
    events = iter_history(world.path)
    assert type(next(events)) is Invoke  # read before the torn line is reached
    with pytest.raises(HistoryError, match=":10: not a valid history event"):
        list(events)
    with pytest.raises(HistoryError, match="not a valid history event"):
        check_file(str(world.path))


def test_the_synthetic_soak_history_is_clean(tmp_path):
    path = str(tmp_path / "synth.jsonl")
    synth.write_history(path, 5_000)
    report = check_file(path)
    assert report.ok, report.format()
    c = report.counts
    fail = {n for n in range(5_000) if n % synth.FAIL_EVERY == synth.FAIL_EVERY - 1}
    unknown = {n for n in range(5_000) if n % synth.UNKNOWN_EVERY == synth.UNKNOWN_EVERY - 1} - fail
    never = {n for n in range(5_000) if n % synth.UNKNOWN_EVERY == synth.UNKNOWN_EVERY // 2}
    assert (c.ops, c.fail, c.subscribers, len(c.final_reads)) == (5_000, len(fail), 2, 3)
    assert (c.unknown, c.never_completed, c.unknown_in_stream) == (len(unknown) + len(never), len(never), len(unknown))
    assert c.stream_length == c.ok + c.unknown_in_stream and c.deliveries == 2 * c.stream_length
    assert len(report.faults) == synth.FAULTS and all(f.recovery_s is not None for f in report.faults if f.leader)


#: What checking an op of the synthetic soak may cost, all included (its payload, ack, two
#: deliveries, three final-read records): an hour's 18M ops in well under 8 GB.
CHECK_BYTES_PER_OP_MAX = 420


def _peak_rss_bytes(path: str) -> int:
    code = "import resource, sys; from chaos_tests.checker import check_file; check_file(sys.argv[1]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, path], check=True, capture_output=True, text=True, cwd=here, timeout=300)
    return int(out.stdout) * 1024


def test_checking_costs_few_bytes_per_op(tmp_path):
    small, large = str(tmp_path / "small.jsonl"), str(tmp_path / "large.jsonl")
    ops = 100_000
    synth.write_history(small, 100)
    synth.write_history(large, ops)
    per_op = (_peak_rss_bytes(large) - _peak_rss_bytes(small)) / ops
    assert per_op <= CHECK_BYTES_PER_OP_MAX, f"{per_op:.0f} bytes per op"
