"""Abuse probes: damaged sealed journal segments on a real cluster (a flipped bit, a truncated
segment, a missing middle segment, the same record damaged on every node).

A node must never exit on damage while it serves: a subscriber over the damaged range is
refused (``from_seq_unavailable``) and reads it from another node; catch-up repairs the
segment from a peer, after which the node serves it byte for byte as its peers do. When no
peer has the range, the node stops once with one line and exit code 7 (``JOURNAL_DAMAGED``).
Each probe prints what it measured: the damaged node's RSS, a legitimate client's latency,
the time to repair.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from abuse_probes import describe_latencies, percentile, rss_bytes, submit_latencies
from cluster_harness import ClusterHarness, StreamRecorder, pipeline, running_cluster  # noqa: F401

from raftseq.clients import SequencerClient
from raftseq.cluster.node_exit import NodeExit
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import INDEX_SUFFIX, SEGMENT_SUFFIX, list_segment_files

#: Small segments: a few thousand messages make several sealed ones.
SMALL_SEGMENTS = {"journal": {"segment_bytes_max": limits.SEGMENT_BYTES_MIN * 4}}
#: No scrub: damage is found by the reader that meets it.
SMALL_SEGMENTS_NO_SCRUB = {"journal": {"segment_bytes_max": limits.SEGMENT_BYTES_MIN * 4, "scrub_bytes_per_s": 0}}
#: Gives up on a damaged range sooner, so that the all-damaged probe ends in seconds.
SMALL_SEGMENTS_QUICK_GIVE_UP = {"journal": {"segment_bytes_max": limits.SEGMENT_BYTES_MIN * 4, "repair_attempts_max": 4}}
MESSAGES = 3000
#: Bounds the probes assert (generous: the CI machine is slow and shared).
RSS_MAX_BYTES = 300 * limits.MIB
LEGIT_P99_MAX_S = 0.5
REPAIR_TIMEOUT_S = 30.0


def followers_of(h: ClusterHarness) -> list[str]:
    leader = h.wait_for_leader()
    return [n for n in h.node_ids if n != leader["id"]]


def fill_cluster(h: ClusterHarness, count: int = MESSAGES) -> dict[bytes, int]:
    payloads = [b"m-%d" % n for n in range(count)]

    async def run() -> list[int]:
        async with SequencerClient(h.endpoints, session="writer", token=h.token, in_flight_max=64) as client:
            return await pipeline(client, payloads, timeout_s=60)

    acked = dict(zip(payloads, asyncio.run(run())))
    h.wait_converged(count, timeout_s=30)
    return acked


def sealed_middle(h: ClusterHarness, node_id: str) -> tuple[int, str, int]:
    """First seq, path and first seq of the next segment of a sealed segment in the middle."""
    listed = list_segment_files(h.journal_dir(node_id))
    assert len(listed) >= 4, f"{node_id} has only {len(listed)} segments"
    first, path = listed[len(listed) // 2 - 1]
    return first, path, listed[len(listed) // 2][0]


def record_offsets(path: str) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    offsets, pos = [], 0
    while pos + protocol.HEADER_BYTES <= len(data):
        offsets.append(pos)
        pos += protocol.HEADER_BYTES + protocol.HEADER.unpack_from(data, pos)[0]
    return offsets


def flip_record(path: str, index: int) -> int:
    """Flip the last byte of record `index` of a segment; returns the record's offset."""
    offsets = record_offsets(path)
    start = offsets[index]
    end = offsets[index + 1] if index + 1 < len(offsets) else os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(end - 1)
        byte = f.read(1)[0]
        f.seek(end - 1)
        f.write(bytes([byte ^ 0x5A]))
    return start


def segment_bytes(h: ClusterHarness, node_id: str) -> bytes:
    out = b""
    for _, path in list_segment_files(h.journal_dir(node_id)):
        with open(path, "rb") as f:
            out += f.read()
    return out


def check_stopped_copy_matches_a_peer(h: ClusterHarness, node_id: str, acked: dict[bytes, int]) -> None:
    """Stop the cluster; `node_id`'s segments are byte for byte a peer's, its journal verifies,
    and every acknowledged message is in it under its number."""
    h.stop()
    assert segment_bytes(h, node_id) == segment_bytes(h, [n for n in h.node_ids if n != node_id][0])
    contents = h.read_journal(node_id)
    assert contents.report.ok, contents.report
    records = {r.payload: r.seq for r in contents.records}
    assert all(records.get(p) == s for p, s in acked.items()), "an acknowledged message is lost or renumbered"


def restart_all_expecting_one_exit_7_each(h: ClusterHarness) -> list[str]:
    """Restart every (stopped) node; each must stop on its own within a bound with exit code 7,
    one ``no peer could repair it`` line and no traceback. Returns those lines."""
    sizes = h.log_sizes()
    started = time.monotonic()
    for node in h.node_ids:
        h.restart(node)
    deadline = started + 60
    while any(h.exit_code(n) is None for n in h.node_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = {n: h.exit_code(n) for n in h.node_ids}
    print(f"exit codes {codes} within {time.monotonic() - started:.1f} s")
    assert codes == dict.fromkeys(h.node_ids, NodeExit.JOURNAL_DAMAGED), f"{codes}\n{h.log_tails()}"
    found = []
    for node in h.node_ids:
        text = h.log_text(node, since=sizes[node])
        lines = [line for line in text.splitlines() if "no peer could repair it" in line]
        print(f"{node}: {lines}")
        assert len(lines) == 1 and "Traceback" not in text, text
        found.append(lines[0])
    return found


def read_from(h: ClusterHarness, node_id: str, from_seq: int, last: int, *, others_too: bool = False, timeout_s: float = 20) -> list:
    """Subscribe to `node_id` alone from `from_seq` up to `last`; the messages. `others_too`:
    to every node, preferring `node_id` (the others serve while it refuses)."""
    if others_too:
        endpoints, prefer, session = h.endpoints, h.endpoint(node_id), "probe"
    else:
        endpoints, prefer, session = [h.endpoint(node_id)], "", f"reader-{node_id}"

    async def run() -> list:
        recorder = StreamRecorder(endpoints, token=h.token, from_seq=from_seq, prefer=prefer, session=session).start()
        try:
            await recorder.wait_until(last, timeout_s=timeout_s)
        finally:
            await recorder.stop()
        return recorder.messages

    return asyncio.run(run())


def legit_latencies(h: ClusterHarness) -> list[float]:
    return asyncio.run(submit_latencies(h.endpoints, h.token, count=200, session="legit", timeout_s=40))


def check_alive(h: ClusterHarness, node_id: str) -> int:
    code = h.exit_code(node_id)
    assert code is None, f"{node_id} exited with {code}\n{h.log_tails()}"
    return h.pid(node_id)


@pytest.mark.parametrize(
    ("running_cluster", "when", "found_by"),
    [
        (SMALL_SEGMENTS_NO_SCRUB, "while running", "a read"),
        (SMALL_SEGMENTS, "while running", "the scrub"),
        (SMALL_SEGMENTS, "while stopped", "start"),
    ],
    indirect=["running_cluster"],
    ids=["running-found-by-read", "running-found-by-scrub", "stopped-found-on-start"],
)
def test_a_flipped_bit_in_a_sealed_segment_is_refused_then_repaired_byte_identical(running_cluster, when, found_by):
    h = running_cluster
    acked = fill_cluster(h)
    node = followers_of(h)[0]
    first, path, _ = sealed_middle(h, node)
    if when == "while stopped":
        h.kill(node)
    flip_record(path, 3)
    bad_seq = first + 3
    started = time.monotonic()
    if when == "while stopped":
        h.restart(node)
        h.wait_converged(MESSAGES, timeout_s=30)
    found_text = f"journal damaged, found by {found_by}" if found_by != "start" else "journal damaged, found on start"
    if found_by != "a read":  # found before any reader asks: the subscriber below is refused at once
        h.wait_for_log(node, found_text, timeout_s=REPAIR_TIMEOUT_S)

    # A subscriber that prefers the damaged node, from just before the damaged record: it gets
    # the whole stream (from another node while this one refuses).
    messages = read_from(h, node, bad_seq - 2, MESSAGES, others_too=True, timeout_s=30)
    seqs = [m.seq for m in messages]
    assert seqs[: MESSAGES - bad_seq + 3] == list(range(bad_seq - 2, MESSAGES + 1)), "gap or duplicate around the damage"
    pid = check_alive(h, node)
    found = h.wait_for_log(node, found_text, timeout_s=REPAIR_TIMEOUT_S)
    h.wait_damage_repaired(node, timeout_s=REPAIR_TIMEOUT_S)
    repair_s = time.monotonic() - started
    latencies = legit_latencies(h)
    rss = rss_bytes(pid)
    print(f"{node}: {found}")
    print(
        f"damage {when} at seq {bad_seq}: repaired within {repair_s:.1f} s; {node} RSS {rss / limits.MIB:.0f} MiB; legit {describe_latencies(latencies)}"
    )
    check_alive(h, node)
    assert rss < RSS_MAX_BYTES
    assert percentile(latencies, 0.99) < LEGIT_P99_MAX_S

    # After the repair the node itself serves the range, byte for byte as its peers hold it.
    messages = read_from(h, node, bad_seq - 2, MESSAGES)
    assert [m.seq for m in messages][: MESSAGES - bad_seq + 3] == list(range(bad_seq - 2, MESSAGES + 1))
    total = MESSAGES + len(latencies)
    h.wait_converged(total, timeout_s=30)
    check_stopped_copy_matches_a_peer(h, node, acked)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.parametrize("running_cluster", [SMALL_SEGMENTS], indirect=True, ids=["small-segments"])
def test_a_truncated_or_missing_sealed_segment_is_repaired_from_a_peer(running_cluster, damage):
    h = running_cluster
    acked = fill_cluster(h)
    node = followers_of(h)[0]
    first, path, _ = sealed_middle(h, node)
    h.kill(node)
    if damage == "truncated":
        offsets = record_offsets(path)
        os.truncate(path, offsets[len(offsets) // 2] + 5)
    else:
        os.unlink(path)
        os.unlink(path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX)
    started = time.monotonic()
    h.restart(node)
    h.wait_damage_repaired(node, timeout_s=REPAIR_TIMEOUT_S)
    repair_s = time.monotonic() - started
    pid = check_alive(h, node)
    latencies = legit_latencies(h)
    rss = rss_bytes(pid)
    print(
        f"{damage} segment {os.path.basename(path)}: repaired {repair_s:.1f} s after restart; {node} RSS {rss / limits.MIB:.0f} MiB; legit {describe_latencies(latencies)}"
    )
    assert rss < RSS_MAX_BYTES
    assert percentile(latencies, 0.99) < LEGIT_P99_MAX_S
    messages = read_from(h, node, first, MESSAGES)
    assert [m.seq for m in messages][: MESSAGES - first + 1] == list(range(first, MESSAGES + 1))
    total = MESSAGES + len(latencies)
    h.wait_converged(total, timeout_s=30)
    check_alive(h, node)
    check_stopped_copy_matches_a_peer(h, node, acked)


@pytest.mark.parametrize("running_cluster", [SMALL_SEGMENTS_QUICK_GIVE_UP], indirect=True, ids=["small-segments"])
def test_the_same_record_damaged_on_every_node_stops_each_once_with_one_line_and_exit_7(running_cluster):
    h = running_cluster
    fill_cluster(h)
    h.stop()
    first, path, _ = sealed_middle(h, h.node_ids[0])
    bad_seq = first + 3
    for node in h.node_ids:
        listed = dict(list_segment_files(h.journal_dir(node)))
        assert first in listed, f"{node}'s segments differ: {sorted(listed)}"
        flip_record(listed[first], 3)
    for line in restart_all_expecting_one_exit_7_each(h):
        assert f"seq {bad_seq}.." in line and os.path.basename(path) in line


# --- the unsealed tail segment, damaged while the node runs -----------------------------

#: Messages of the tail probes: all of them in the one (unsealed) tail segment.
TAIL_MESSAGES = 600
#: The tail probes read through the damaged node only after this many more submits.
TAIL_MORE_MESSAGES = 200
#: No scrub (it reads sealed segments only; the tail probes must not depend on it).
NO_SCRUB = {"journal": {"scrub_bytes_per_s": 0}}


def tail_segment(h: ClusterHarness, node_id: str) -> tuple[int, str]:
    listed = list_segment_files(h.journal_dir(node_id))
    assert len(listed) == 1, f"{node_id} has {len(listed)} segments; the probe wants all in the tail"
    return listed[0]


def submit_more(h: ClusterHarness, first: int, count: int) -> dict[bytes, int]:
    payloads = [b"more-%d" % n for n in range(first, first + count)]

    async def run() -> list[int]:
        async with SequencerClient(h.endpoints, session="more", token=h.token, in_flight_max=64) as client:
            return await pipeline(client, payloads, timeout_s=30)

    return dict(zip(payloads, asyncio.run(run())))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "removed", "truncated on the leader"])
@pytest.mark.parametrize("running_cluster", [NO_SCRUB], indirect=True, ids=["no-scrub"])
def test_damage_to_the_running_tail_segment_is_refused_then_repaired_and_the_node_keeps_serving(running_cluster, damage):
    """A flipped bit in a committed record of the tail, the tail file cut at a record boundary,
    or the tail file removed, under a running follower: it keeps running, never serves wrong
    records, writes nothing after the damage, and repairs the tail from a peer."""
    h = running_cluster
    acked = fill_cluster(h, TAIL_MESSAGES)
    node = h.wait_for_leader()["id"] if damage.endswith("on the leader") else followers_of(h)[0]
    damage = damage.removesuffix(" on the leader")
    first, path = tail_segment(h, node)
    assert first == 1
    bad_seq = 301
    if damage == "flipped":
        flip_record(path, bad_seq - 1)
    elif damage == "truncated":
        os.truncate(path, record_offsets(path)[bad_seq - 1])
    else:
        os.unlink(path)
        bad_seq = 1
    started = time.monotonic()
    # The follower appends more after the damage (its append path meets a cut or removed file).
    acked |= submit_more(h, TAIL_MESSAGES, TAIL_MORE_MESSAGES)
    total = TAIL_MESSAGES + TAIL_MORE_MESSAGES
    h.wait_converged(total, timeout_s=30)

    # A subscriber that prefers the damaged node, from just before the damage: the whole stream,
    # right records only (from another node while this one refuses).
    from_seq = max(1, bad_seq - 2)
    messages = read_from(h, node, from_seq, total, others_too=True, timeout_s=30)
    assert [m.seq for m in messages][: total - from_seq + 1] == list(range(from_seq, total + 1)), "gap or duplicate"
    by_seq = {s: p for p, s in acked.items()}
    assert all(by_seq[m.seq] == m.payload for m in messages if m.seq in by_seq), "a wrong record was served"
    check_alive(h, node)
    h.wait_damage_repaired(node, timeout_s=REPAIR_TIMEOUT_S)
    print(f"{damage} tail at seq {bad_seq}: repaired ({time.monotonic() - started:.1f} s)")
    messages = read_from(h, node, from_seq, total)
    assert [(m.seq, m.payload) for m in messages][: total - from_seq + 1] == [(s, by_seq[s]) for s in range(from_seq, total + 1)]
    check_alive(h, node)
    check_stopped_copy_matches_a_peer(h, node, acked)


# --- the first segment file missing --------------------------------------------------------


@pytest.mark.parametrize("running_cluster", [SMALL_SEGMENTS], indirect=True, ids=["small-segments"])
def test_a_missing_first_segment_is_found_on_start_and_fetched_from_a_peer(running_cluster):
    h = running_cluster
    acked = fill_cluster(h)
    node = followers_of(h)[0]
    listed = list_segment_files(h.journal_dir(node))
    assert listed[0][0] == 1 and len(listed) >= 3
    h.kill(node)
    path = listed[0][1]
    os.unlink(path)
    os.unlink(path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX)
    started = time.monotonic()
    h.restart(node)
    found = h.wait_for_log(node, f"journal lacks its first records 1..{listed[1][0] - 1}", timeout_s=REPAIR_TIMEOUT_S)
    filled = h.wait_hole_filled(node, timeout_s=REPAIR_TIMEOUT_S)
    print(
        f"{node}: {found}\n{node}: {filled['raftseq_catchup_fetched_records_total']:.0f} records fetched\n"
        f"repaired {time.monotonic() - started:.1f} s after restart"
    )
    messages = read_from(h, node, 1, MESSAGES)
    assert [m.seq for m in messages][:MESSAGES] == list(range(1, MESSAGES + 1))
    check_alive(h, node)
    check_stopped_copy_matches_a_peer(h, node, acked)  # its journal verifies: it starts at 1 again


@pytest.mark.parametrize("running_cluster", [SMALL_SEGMENTS_QUICK_GIVE_UP], indirect=True, ids=["small-segments"])
def test_the_first_segment_missing_on_every_node_stops_each_once_with_one_line_and_exit_7(running_cluster):
    h = running_cluster
    fill_cluster(h)
    h.stop()
    second = list_segment_files(h.journal_dir(h.node_ids[0]))[1][0]
    for node in h.node_ids:
        [(first, path), (next_first, _), *_] = list_segment_files(h.journal_dir(node))
        assert (first, next_first) == (1, second), f"{node}'s segments differ"
        os.unlink(path)
        os.unlink(path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX)
    for line in restart_all_expecting_one_exit_7_each(h):
        assert f"seq 1..{second - 1} (missing here)" in line
