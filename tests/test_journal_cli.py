"""``raftseq journal verify|dump DIR``: run in-process through ``cluster.cli.main``, and once
through the installed console script."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from raftseq.cluster import cli
from raftseq.sequencer import journal as journal_mod
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.journal import Journal
from raftseq.sequencer.machine import SequencerMachine

MESSAGES = 300


# --- helpers ------------------------------------------------------------------------------


def build(directory, messages: int = MESSAGES) -> list[tuple[str, int, bytes]]:
    """A journal of `messages` records from two sessions, through machine + journal, in small
    segments. Returns ``(session, client_seq, payload)`` of each seq (index seq - 1)."""
    journal = Journal.open(str(directory), segment_bytes_max=limits.SEGMENT_BYTES_MIN)
    core = SequencedStream(SequencerMachine(), journal)
    sent = []
    next_client_seq = {"desk-a": 1, "desk-b": 1}
    t = 1_700_000_000_000_000_000
    while len(sent) < messages:
        entries = []
        for _ in range(min(5, messages - len(sent))):
            session = "desk-a" if len(sent) % 3 else "desk-b"
            client_seq = next_client_seq[session]
            next_client_seq[session] += 1
            # Text, plus bytes that are not UTF-8 on every seventh message.
            payload = f"order {session}#{client_seq} qty={len(sent) % 50}".encode()
            if len(sent) % 7 == 0:
                payload += b"\xff\x00"
            entries.append(protocol.Entry(session, client_seq, payload))
            sent.append((session, client_seq, payload))
        t += 1_000_000
        core.apply(protocol.encode_batch(t, entries))
    assert journal.last_seq == messages
    assert messages < MESSAGES or journal.segment_count >= 3
    journal.close()
    return sent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``raftseq argv…`` in-process: exit code, stdout, stderr (argparse errors exit too)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def segments(directory) -> list[tuple[int, str]]:
    return journal_mod.list_segment_files(str(directory))


def record_start(path: str, index: int) -> tuple[int, int]:
    """Start and end offset of the `index`-th record of a segment file."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for _ in range(index):
        pos += protocol.HEADER_BYTES + protocol.HEADER.unpack_from(data, pos)[0]
    return pos, pos + protocol.HEADER_BYTES + protocol.HEADER.unpack_from(data, pos)[0]


def flip_in_sealed_segment(directory) -> int:
    """Flip the last byte of the 6th record of the second segment; return its seq."""
    first_seq, path = segments(directory)[1]
    _, end = record_start(path, 5)
    with open(path, "r+b") as f:
        f.seek(end - 1)
        byte = f.read(1)[0]
        f.seek(end - 1)
        f.write(bytes([byte ^ 0x20]))
    return first_seq + 5


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# --- verify -------------------------------------------------------------------------------


def test_verify_good_journal(tmp_path, capsys):
    build(tmp_path)
    code, out, err = run(capsys, "journal", "verify", str(tmp_path))
    assert code == 0
    assert out.startswith("ok:")
    assert f"{MESSAGES} records (1..{MESSAGES})" in out
    assert f"in {len(segments(tmp_path))} segments" in out
    assert "checked" in err  # progress on stderr
    code, out, err = run(capsys, "journal", "verify", "-q", str(tmp_path))
    assert code == 0 and out.startswith("ok:") and err == ""


def test_verify_names_the_first_bad_seq(tmp_path, capsys):
    build(tmp_path)
    bad_seq = flip_in_sealed_segment(tmp_path)
    code, out, _ = run(capsys, "journal", "verify", "-q", str(tmp_path))
    assert code == 1
    assert f"first bad sequence number: {bad_seq}\n" in out
    assert f"FAILED at seq {bad_seq}:" in out
    assert "checksum" in out


def test_verify_names_the_file_offset_and_seq_of_every_damage(tmp_path, capsys):
    build(tmp_path)
    listed = segments(tmp_path)
    assert len(listed) >= 4
    first_bad = flip_in_sealed_segment(tmp_path)
    first_path = listed[1][1]
    first_offset, _ = record_start(first_path, 5)
    second_first, second_path = listed[2]
    second_offset = record_start(second_path, 3)[0]
    os.truncate(second_path, second_offset + 2)
    code, out, _ = run(capsys, "journal", "verify", "-q", str(tmp_path))
    assert code == 1
    assert f"FAILED at seq {first_bad}: checksum mismatch ({first_path} offset {first_offset})" in out
    assert f"also damaged at seq {second_first + 3}: torn record" in out
    assert f"({second_path} offset {second_offset})" in out


def test_verify_json(tmp_path, capsys):
    build(tmp_path)
    code, out, _ = run(capsys, "journal", "verify", "--json", "-q", str(tmp_path))
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["first_bad_seq"] == 0
    assert (report["records"], report["first_seq"], report["last_seq"]) == (MESSAGES, 1, MESSAGES)
    bad_seq = flip_in_sealed_segment(tmp_path)
    code, out, _ = run(capsys, "journal", "verify", "--json", "-q", str(tmp_path))
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["first_bad_seq"] == bad_seq
    assert report["path"] == segments(tmp_path)[1][1]
    assert "checksum" in report["problem"]


def test_verify_torn_tail_fails(tmp_path, capsys):
    build(tmp_path)
    os.truncate(segments(tmp_path)[-1][1], os.path.getsize(segments(tmp_path)[-1][1]) - 2)
    code, out, _ = run(capsys, "journal", "verify", "-q", str(tmp_path))
    assert code == 1
    assert f"first bad sequence number: {MESSAGES}\n" in out


def test_verify_missing_directory(tmp_path, capsys):
    missing = str(tmp_path / "no-such-journal")
    code, out, err = run(capsys, "journal", "verify", missing)
    assert code != 0
    assert missing in out + err  # the error names what is missing


# --- dump ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "limit"), [(1, 1), (1, 10), (150, 25), (MESSAGES - 4, 5), (MESSAGES, 1)])
def test_dump_from_limit(tmp_path, capsys, start, limit):
    sent = build(tmp_path)
    code, out, err = run(capsys, "journal", "dump", str(tmp_path), "--from", str(start), "--limit", str(limit))
    assert code == 0 and err == ""
    got = rows(out)
    assert [row["seq"] for row in got] == list(range(start, start + limit))
    for row in got:
        session, client_seq, payload = sent[row["seq"] - 1]
        assert (row["session"], row["client_seq"]) == (session, client_seq)
        assert base64.b64decode(row["payload_b64"], validate=True) == payload
        assert row["log_time_ns"] > 0
        assert "payload" not in row


def test_dump_across_every_segment_boundary(tmp_path, capsys):
    sent = build(tmp_path)
    for first_seq, _ in segments(tmp_path)[1:]:
        code, out, _ = run(capsys, "journal", "dump", str(tmp_path), "--from", str(first_seq - 2), "--limit", "4")
        assert code == 0
        got = rows(out)
        assert [row["seq"] for row in got] == list(range(first_seq - 2, first_seq + 2))
        assert [base64.b64decode(row["payload_b64"]) for row in got] == [p for _, _, p in sent[first_seq - 3 : first_seq + 1]]


def test_dump_all_and_text(tmp_path, capsys):
    sent = build(tmp_path)
    code, out, _ = run(capsys, "journal", "dump", str(tmp_path))
    assert code == 0
    assert [row["seq"] for row in rows(out)] == list(range(1, MESSAGES + 1))
    code, out, _ = run(capsys, "journal", "dump", str(tmp_path), "--text", "--from", "20", "--limit", "3")
    assert code == 0
    got = rows(out)
    assert [row["seq"] for row in got] == [20, 21, 22]
    for row in got:
        assert "payload_b64" not in row
        assert row["payload"] == sent[row["seq"] - 1][2].decode("utf-8", errors="replace")


def test_dump_of_a_torn_tail_warns_and_stops_at_the_last_good_record(tmp_path, capsys):
    build(tmp_path)
    tail = segments(tmp_path)[-1][1]
    size = os.path.getsize(tail)
    os.truncate(tail, size - 3)
    code, out, err = run(capsys, "journal", "dump", str(tmp_path), "--from", str(MESSAGES - 5))
    assert code == 0
    assert [row["seq"] for row in rows(out)] == list(range(MESSAGES - 5, MESSAGES))
    assert "warning" in err and str(MESSAGES - 1) in err
    assert os.path.getsize(tail) == size - 3  # dump opens read-only: nothing is cut


def test_dump_of_a_damaged_sealed_record_stops_with_an_error(tmp_path, capsys):
    build(tmp_path)
    bad_seq = flip_in_sealed_segment(tmp_path)
    code, out, err = run(capsys, "journal", "dump", str(tmp_path))
    assert code == 1
    # Records before the damage may be printed (the cursor reads in blocks); none at or past it.
    seqs = [row["seq"] for row in rows(out)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < bad_seq
    assert f"seq {bad_seq}" in err


def test_dump_of_a_journal_that_starts_later(tmp_path, capsys):
    journal = Journal.open(str(tmp_path))
    journal.append(b"".join(protocol.encode_delivered(s, s, "s", s - 99, b"x") for s in range(100, 105)), 100, 104)
    journal.close()
    code, out, err = run(capsys, "journal", "dump", str(tmp_path), "--limit", "2")
    assert code == 0
    assert [row["seq"] for row in rows(out)] == [100, 101]
    assert "starts at seq 100" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "0"], ">= 1"),
        (["--from", "-3"], ">= 1"),
        (["--from", "x"], "whole number"),
        (["--limit", "-1"], ">= 0"),
        (["--limit", "2.5"], "whole number"),
    ],
)
def test_dump_bad_arguments(tmp_path, capsys, args, message):
    build(tmp_path, 20)
    code, out, err = run(capsys, "journal", "dump", str(tmp_path), *args)
    assert code == 2
    assert out == ""
    assert message in err and args[0] in err
    assert err.startswith("usage:")


def test_dump_missing_directory(tmp_path, capsys):
    missing = str(tmp_path / "no-such-journal")
    code, out, err = run(capsys, "journal", "dump", missing)
    assert code == 2 and out == ""
    assert missing in err and "does not exist" in err
    assert not os.path.exists(missing)


def test_journal_needs_a_subcommand_and_a_directory(capsys):
    for argv in (["journal"], ["journal", "verify"], ["journal", "dump"], ["journal", "fix", "x"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.startswith("usage:"), argv


# --- the installed console script ---------------------------------------------------------


def test_console_script(tmp_path):
    build(tmp_path, 50)
    script = os.path.join(os.path.dirname(sys.executable), "raftseq")
    assert os.path.exists(script), f"the raftseq console script is not installed next to {sys.executable}"
    done = subprocess.run([script, "journal", "verify", "--json", "-q", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["last_seq"] == 50
