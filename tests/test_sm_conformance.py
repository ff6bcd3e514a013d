"""The conformance kit (``clients.sm.conformance``, ``raftseq sm record|verify``): a slice of a
real cluster's reference-data stream recorded with the reference's digest after each message;
the reference verifies against it, a second implementation with one bug is caught at the exact
first message it gets wrong, one that cannot read a message version stops with the SDK's error,
and a damaged recording is refused before anything is replayed.

One three-node cluster serves the whole module: the admin's day is submitted once (listing,
updates, an activation of behaviour version 2 that takes effect on a message of another team,
foreign payloads, the end of day), a reference copy publishes a snapshot half way, and each
test records or verifies its own slice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from cluster_harness import ClusterHarness, pipeline, run_seed  # noqa: E402

from raftseq.clients import SequencerClient  # noqa: E402
from raftseq.clients.sm import MessageTypes, StateMachineRunner, activate, encode_message, full_digest  # noqa: E402
from raftseq.clients.sm import conformance  # noqa: E402
from raftseq.cluster import cli  # noqa: E402
from raftseq.cluster.local import LEADER_TIMEOUT_S, free_base_port  # noqa: E402
from examples.refdata.admin import listing, updates  # noqa: E402
from examples.refdata.machine import ReferenceData  # noqa: E402
from examples.refdata import messages as refdata  # noqa: E402

REFERENCE = "examples.refdata.machine:ReferenceData"
STEP_TIMEOUT_S = 60
INSTRUMENTS = 40
FOREIGN = b"another team's payload"


# --- second implementations, each wrong in one way ----------------------------------------------


class ReasonlessHalts(ReferenceData):
    """A second implementation with one bug: a halted instrument loses its halt reason."""

    def _halted(self, m, seq):
        super()._halted(m, seq)
        if m.symbol in self.instruments:
            self.instruments[m.symbol].halt_reason = ""


CURRENT_ONLY = MessageTypes("refdata")
for _cls in (
    refdata.InstrumentAdded,
    refdata.InstrumentUpdated,
    refdata.InstrumentHalted,
    refdata.InstrumentResumed,
    refdata.TradingParametersSet,
    refdata.EndOfDay,
):
    CURRENT_ONLY.add(_cls)


class CurrentVersionsOnly(ReferenceData):
    """A second implementation that never learned version 1 of ``refdata.instrument_added``."""

    MESSAGES = CURRENT_ONLY


class BehaviourOneOnly(ReferenceData):
    """A build that cannot run behaviour version 2."""

    BEHAVIOUR_VERSIONS = (1,)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__qualname__}"


# --- the day on the cluster ---------------------------------------------------------------------


class Day:
    """What was sequenced: ``seq_of[i]`` is the number of ``messages[i]`` (an ``SmMessage``, or
    raw bytes for another team's payload or the activation)."""

    def __init__(self) -> None:
        self.messages: list = []
        self.seqs: list[int] = []
        self.activate_seq = 0
        self.activation_at = 0
        self.snapshot_covered = 0
        self.last_seq = 0

    def first_seq(self, predicate, *, after: int = 0) -> int:
        return next(s for m, s in zip(self.messages, self.seqs) if s > after and predicate(m))


def listed_halt(m) -> bool:
    return isinstance(m, refdata.InstrumentHalted) and int(m.symbol[3:]) < INSTRUMENTS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    seed = run_seed()
    base_port = free_base_port(random.Random(seed))
    h = ClusterHarness(str(tmp_path_factory.mktemp("conformance") / "c"), base_port, seed=seed)
    print(f"cluster: seed {seed}, base port {base_port}, data {h.data_dir}", flush=True)
    try:
        h.start(leader_timeout_s=LEADER_TIMEOUT_S)
        yield h
    finally:
        h.stop()


async def _sequence_day(h: ClusterHarness, day: Day) -> None:
    rng = random.Random(7)
    first = listing(INSTRUMENTS, rng) + updates(500, INSTRUMENTS, rng)
    for i in range(0, len(first), 97):
        first.insert(i, FOREIGN)
    second = updates(700, INSTRUMENTS, rng) + [refdata.EndOfDay("2026-11-26")]
    second.insert(30, FOREIGN)  # behaviour version 2 takes effect on this one
    async with SequencerClient(h.endpoints, session="refdata-admin", token=h.token, in_flight_max=1000) as client:
        encoded = [m if isinstance(m, bytes) else encode_message(m) for m in first]
        seqs = await pipeline(client, encoded, timeout_s=STEP_TIMEOUT_S)
        # One writer: the numbers are contiguous, so the activation point is known in advance.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        day.activate_seq = seqs[-1] + 1
        day.activation_at = day.activate_seq + 1 + 30
        payload = activate("refdata", 2, day.activation_at)
        [act] = await pipeline(client, [payload], timeout_s=STEP_TIMEOUT_S)
        assert act == day.activate_seq
        rest = await pipeline(client, [m if isinstance(m, bytes) else encode_message(m) for m in second], timeout_s=STEP_TIMEOUT_S)
        assert rest[30] == day.activation_at
    day.messages = [*first, payload, *second]
    day.seqs = [*seqs, act, *rest]
    # A reference copy publishes a snapshot of the state after the middle of the day.
    publisher = StateMachineRunner(h.endpoints, [ReferenceData()], token=h.token, replica="pub")
    try:
        day.snapshot_covered = await publisher.run(until_seq=day.seqs[len(day.seqs) // 2])
        [info] = await publisher.publish_snapshot("refdata")
        assert info.covered_seq == day.snapshot_covered
    finally:
        await publisher.close()
    day.last_seq = await conformance.last_seq_of(h.endpoints, token=h.token)
    assert day.last_seq > day.seqs[-1]  # the snapshot's chunks came after the day


@pytest.fixture(scope="module")
def day(cluster) -> Day:
    result = Day()
    asyncio.run(asyncio.wait_for(_sequence_day(cluster, result), 2 * STEP_TIMEOUT_S))
    return result


def sm(argv: list[str]) -> int:
    """``raftseq sm ...`` in this process."""
    return cli.main(["sm", *argv])


@pytest.fixture(scope="module")
def recording(cluster, day, tmp_path_factory) -> Path:
    """The whole stream, recorded through the in-process entry point."""
    out = tmp_path_factory.mktemp("rec") / "day.smc"
    code = sm(
        [
            "record",
            "--machine",
            REFERENCE,
            "--out",
            str(out),
            "--endpoints",
            ",".join(cluster.endpoints),
            "--token",
            cluster.token,
            "--quiet",
        ]
    )
    assert code == 0
    return out


def verify(path, machine: str, capsys) -> tuple[int, dict]:
    code = sm(["verify", str(path), "--machine", machine, "--json", "--quiet"])
    return code, json.loads(capsys.readouterr().out)


# --- record and verify --------------------------------------------------------------------------


def test_the_recording_describes_itself_and_keeps_what_can_change_the_machine(recording, day):
    summary = conformance.scan_file(str(recording))
    h = summary.header
    assert (h.sm_type, h.machine, h.namespace, h.from_seq, h.to_seq) == ("refdata", REFERENCE, "refdata", 1, day.last_seq)
    assert h.message_versions["refdata.instrument_added"] == [1, 2] and h.behaviour_versions == [1, 2]
    assert (h.start_snapshot_bytes, h.start_from, h.all_messages) == (0, "fresh machine", False)
    assert h.start_digest == full_digest(ReferenceData())
    with open(recording, "rb") as f:
        f.read(len(conformance.MAGIC))
        entries = [r for _, _, r in conformance.frames(f, str(recording)) if isinstance(r, conformance.Entry)]
    kept = {e.seq for e in entries}
    refdata_seqs = {s for m, s in zip(day.messages, day.seqs) if not isinstance(m, bytes) and type(m).TYPE.startswith("refdata.")}
    foreign = {
        s for m, s in zip(day.messages, day.seqs) if m == FOREIGN or (not isinstance(m, bytes) and type(m).TYPE.startswith("venues."))
    }
    # Every reference-data message; the activation and the foreign payload on which it took
    # effect (the digest changed there); no other team's message, no snapshot chunk.
    assert refdata_seqs <= kept
    assert {day.activate_seq, day.activation_at} <= kept
    assert not (kept - refdata_seqs - {day.activate_seq, day.activation_at})
    assert foreign - {day.activation_at} and not (foreign - {day.activation_at}) & kept
    assert summary.entries == len(entries) and summary.footer.final_digest == entries[-1].digest
    by_seq = {e.seq: e for e in entries}
    first_v1 = by_seq[day.first_seq(lambda m: isinstance(m, refdata.InstrumentAddedV1))]
    assert (first_v1.type, first_v1.version, first_v1.session) == ("refdata.instrument_added", 1, "refdata-admin")
    assert by_seq[day.activation_at].payload == FOREIGN


def test_the_reference_verifies_against_its_recording(recording, day, capsys):
    code, report = verify(recording, REFERENCE, capsys)
    assert code == 0 and report["ok"], report
    assert report["checked"] == conformance.scan_file(str(recording)).entries
    assert report["last_seq"] == day.last_seq and report["mismatch"] is None and report["error"] is None


def test_a_second_implementation_with_one_bug_is_caught_at_its_first_wrong_message(recording, day, capsys):
    code, report = verify(recording, spec(ReasonlessHalts), capsys)
    expected_seq = day.first_seq(listed_halt)
    assert code == 1 and not report["ok"]
    m = report["mismatch"]
    assert (m["seq"], m["type"], m["version"], m["session"]) == (expected_seq, "refdata.instrument_halted", 1, "refdata-admin")
    assert m["expected"] != m["actual"] and len(m["actual"]) == 64
    assert m["last_matching_seq"] < expected_seq and "InstrumentHalted" in m["message"]
    # The text report names the same.
    assert sm(["verify", str(recording), "--machine", spec(ReasonlessHalts), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH after seq {expected_seq} ('refdata.instrument_halted' version 1" in out and m["expected"] in out


def test_a_message_version_the_implementation_cannot_read_stops_it_with_the_sdk_error(recording, day, capsys):
    code, report = verify(recording, spec(CurrentVersionsOnly), capsys)
    first_v1 = day.first_seq(lambda m: isinstance(m, refdata.InstrumentAddedV1))
    assert code == 1 and report["mismatch"] is None
    assert report["error_seq"] == first_v1
    assert f"seq {first_v1}: message type 'refdata.instrument_added' version 1 cannot be read" in report["error"]
    code, report = verify(recording, spec(BehaviourOneOnly), capsys)
    assert code == 1 and report["error_seq"] == day.activation_at
    assert f"behaviour version 2, activated from seq {day.activation_at} by the message at seq {day.activate_seq}" in report["error"]


def test_a_slice_from_the_middle_starts_from_a_cluster_snapshot_or_a_replay(cluster, day, tmp_path, capsys):
    start = day.snapshot_covered + 11
    end = start + 400
    common = ["--endpoints", ",".join(cluster.endpoints), "--token", cluster.token, "--from", str(start), "--to", str(end), "--quiet"]
    from_snapshot, replayed = tmp_path / "snap.smc", tmp_path / "replay.smc"
    assert sm(["record", "--machine", REFERENCE, "--out", str(from_snapshot), "--all-messages", *common]) == 0
    assert sm(["record", "--machine", REFERENCE, "--out", str(replayed), "--no-snapshot", *common]) == 0
    a, b = conformance.scan_file(str(from_snapshot)), conformance.scan_file(str(replayed))
    assert a.header.start_from.startswith(f"cluster snapshot covering seq {day.snapshot_covered} (published by @snap/refdata/pub")
    assert a.header.start_from.endswith(f"then replayed {day.snapshot_covered + 1}..{start - 1}")
    assert b.header.start_from == f"replayed 1..{start - 1}"
    # Two routes to the same state: same start, same digests after every message.
    assert a.header.start_digest == b.header.start_digest and a.header.start_snapshot_bytes > 0
    assert a.footer.final_digest == b.footer.final_digest
    assert a.entries == end - start + 1 and b.entries < a.entries  # every message vs the ones that matter
    capsys.readouterr()
    for path in (from_snapshot, replayed):
        code, report = verify(path, REFERENCE, capsys)
        assert code == 0 and report["last_seq"] == end, report
        # The buggy copy restores the reference's snapshot fine and goes wrong at its first halt in the slice.
        code, report = verify(path, spec(ReasonlessHalts), capsys)
        assert code == 1 and report["mismatch"]["seq"] == day.first_seq(listed_halt, after=start - 1)


# --- damaged recordings and unusable machines ---------------------------------------------------


def test_a_damaged_recording_is_refused_with_exit_2_before_anything_is_replayed(recording, tmp_path, capsys):
    data = recording.read_bytes()
    footer_at = data.rindex(b"\xa4kind\xa3end") - 1 - 8  # the footer frame: length, crc32, {"kind": "end", ...}
    cases = {
        "truncated": (data[:-20], "truncated"),
        "no-footer": (data[:footer_at], "truncated: no footer"),
        "garbled": (data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x40]) + data[len(data) // 2 + 1 :], "fails its checksum"),
        "empty": (b"", "empty"),
        "foreign": (b"PK\x03\x04 a zip file, say", "not a conformance recording"),
        "trailing": (data + data[footer_at:], "after the footer"),
    }
    for name, (body, reason) in cases.items():
        path = tmp_path / f"{name}.smc"
        path.write_bytes(body)
        code = sm(["verify", str(path), "--machine", REFERENCE, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and str(path) in err, (name, code, err)
    code = sm(["verify", str(tmp_path / "absent.smc"), "--machine", REFERENCE])
    assert code == 2 and "cannot open" in capsys.readouterr().err


def test_a_machine_that_cannot_be_loaded_gives_exit_2(recording, capsys):
    for machine, reason in [
        ("no_such_module_here:Machine", "cannot import 'no_such_module_here'"),
        ("examples.refdata.machine:NoSuchClass", "has no 'NoSuchClass'"),
        ("examples.refdata.messages:EndOfDay", "is not a clients.sm.StateMachine subclass"),
        ("examples.refdata.machine", "expected MODULE:CLASS"),
        ("examples.refdata.venues:VenueStatus", "its TYPE is 'venues'"),
    ]:
        code = sm(["verify", str(recording), "--machine", machine])
        err = capsys.readouterr().err
        assert code == 2 and reason in err, (machine, err)


def test_record_refuses_an_empty_slice_and_a_stream_that_stops(cluster, day, tmp_path, capsys):
    common = ["record", "--machine", REFERENCE, "--endpoints", ",".join(cluster.endpoints), "--token", cluster.token, "--quiet"]
    out = tmp_path / "x.smc"
    assert sm([*common, "--out", str(out), "--from", str(day.last_seq + 5), "--to", str(day.last_seq + 1)]) == 1
    assert "is empty" in capsys.readouterr().err
    started = time.monotonic()
    code = sm([*common, "--out", str(out), "--from", str(day.last_seq - 2), "--to", str(day.last_seq + 50), "--idle-timeout", "1"])
    assert code == 1 and "no message for 1 s after seq" in capsys.readouterr().err
    assert time.monotonic() - started < 15
    assert not out.exists() and not Path(f"{out}.tmp").exists()


# --- raftseq sm record|verify|show ---------------------------------------------------------------


def raftseq(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])))
    return subprocess.run(
        [sys.executable, "-m", "raftseq.cluster.cli", "sm", *args], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )  # fmt: skip


def test_raftseq_sm_record_verify_and_show_end_to_end(cluster, day, tmp_path):
    out = tmp_path / "cli.smc"
    to = day.seqs[len(day.seqs) // 3]
    done = raftseq(
        "record",
        "--machine",
        REFERENCE,
        "--out",
        str(out),
        "--to",
        str(to),
        "--endpoints",
        ",".join(cluster.endpoints),
        "--token",
        cluster.token,
    )
    assert done.returncode == 0, done.stderr
    assert f"recorded 'refdata' seq 1..{to}" in done.stdout
    done = raftseq("verify", str(out), "--machine", REFERENCE)
    assert done.returncode == 0 and done.stdout.startswith(f"OK: {REFERENCE} matches {REFERENCE}"), done.stdout + done.stderr
    done = raftseq("verify", str(out), "--machine", spec(ReasonlessHalts))
    assert done.returncode == 1 and f"MISMATCH after seq {day.first_seq(listed_halt)} " in done.stdout, done.stdout + done.stderr
    done = raftseq("show", str(out))
    assert done.returncode == 0 and json.loads(done.stdout)["header"]["to_seq"] == to
    out.write_bytes(out.read_bytes()[:-5])
    done = raftseq("verify", str(out), "--machine", REFERENCE)
    assert done.returncode == 2 and "truncated" in done.stderr


def test_raftseq_sm_record_verify_and_show_take_the_conformance_options():
    def options(parser) -> dict[str, set[str]]:
        [sub] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        return {name: {s for a in p._actions for s in (a.option_strings or [a.dest])} for name, p in sub.choices.items()}

    [sm_parser] = [a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    ours = options(sm_parser.choices["sm"])
    assert ours["record"] == {
        "-h", "--help", "--machine", "--out", "--from", "--to", "--all-messages", "--no-snapshot", "--idle-timeout", "--quiet", "--endpoints", "--token",
        "--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name",
    }  # fmt: skip
    assert ours["verify"] == {"-h", "--help", "file", "--machine", "-o", "--output", "--json", "--quiet"}
    assert ours["show"] == {"-h", "--help", "file"}


def test_raftseq_sm_imports_the_machine_from_the_working_directory(tmp_path):
    # The installed `raftseq` script does not put the working directory on sys.path (as
    # `python -P` does not); the conformance commands still load MODULE:CLASS from there.
    (tmp_path / "theirmachine.py").write_text(
        "from raftseq.clients.sm import MessageTypes, StateMachine\n\n\n"
        "class Theirs(StateMachine):\n    TYPE = 'theirs'\n    MESSAGES = MessageTypes('theirs')\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-m", "raftseq.cluster.cli", "sm", "verify", "absent.smc", "--machine", "theirmachine:Theirs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 2 and "absent.smc: cannot open" in done.stderr, done.stderr
