"""``raftseq journal verify|dump DIR``: inspect a journal directory (``verify`` also every node's
journal of a cluster data directory)."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

import msgspec

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_command, add_output_option, command_group, non_negative, positive
from raftseq.sequencer.journal import SEGMENT_SUFFIX, Journal, JournalError, VerifyReport, verify_journal

_json = msgspec.json.Encoder()


def find_journals(directory: str) -> list[str]:
    """The journals in `directory`: itself when it holds segment files, else the journal of
    every node of a cluster data directory (``DIR/NODE/journal``, as ``raftseq cluster up``
    lays them out) and every subdirectory holding segment files. Empty when there is none."""

    def holds_segments(path: str) -> bool:
        return any(name.endswith(SEGMENT_SUFFIX) for name in os.listdir(path))

    if holds_segments(directory):
        return [directory]
    found = []
    for name in sorted(os.listdir(directory)):
        below = os.path.join(directory, name)
        if os.path.isdir(os.path.join(below, "journal")):
            found.append(os.path.join(below, "journal"))
        elif os.path.isdir(below) and holds_segments(below):
            found.append(below)
    return found


def cmd_journal_verify(args: argparse.Namespace) -> int:
    """Read every record of the journal in DIR and check checksums, gapless numbering, log time order and
    per-session client_seq order. DIR is a journal directory, a retention archive (retention.archive_dir:
    whole from its first segment, or from where its first_retained.json says), or a cluster data
    directory (as raftseq cluster up makes it), whose every node's journal is verified. Exits 0 when all is well,
    1 with the first bad sequence number otherwise, 2 when DIR holds no journal."""
    command = "raftseq journal verify"
    if not os.path.isdir(args.dir):
        print(f"{command}: journal directory {args.dir} does not exist", file=sys.stderr)
        return EXIT_USAGE
    journals = find_journals(args.dir)
    if not journals:
        print(
            f"{command}: {args.dir} holds no journal (no {SEGMENT_SUFFIX} segment files, and no NODE/journal "
            "directories of a cluster data directory)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    reports = [_verify_one(path, args, label=len(journals) > 1) for path in journals]
    ok = all(report.ok for report in reports)
    if args.output == "json":
        rows = [{**msgspec.structs.asdict(report), "ok": report.ok} for report in reports]
        print(_json.encode(rows[0] if len(rows) == 1 else {"ok": ok, "journals": rows}).decode())
    return EXIT_OK if ok else EXIT_FAILED


def _verify_one(path: str, args: argparse.Namespace, *, label: bool) -> VerifyReport:
    """Verify the journal in `path`, printing its line (``PATH: `` first with `label`) unless
    the output is JSON."""
    started = time.monotonic()

    def progress(segments: int, records: int) -> None:
        if not args.quiet:
            print(f"  checked {segments} segments, {records} records", file=sys.stderr, flush=True)

    report = verify_journal(path, progress=progress)
    if args.output == "json":
        return report
    prefix = f"{path}: " if label else ""
    if report.ok:
        span = f"{report.first_seq}..{report.last_seq}" if report.records else "empty"
        elapsed = time.monotonic() - started
        print(f"{prefix}ok: {report.records} records ({span}) in {report.segments} segments, {report.bytes} bytes, {elapsed:.2f} s")
    else:
        where = f" ({report.path} offset {report.offset})" if report.path else ""
        print(f"{prefix}FAILED at seq {report.first_bad_seq}: {report.problem}{where}")
        for damage in report.damages[1:]:
            print(f"{prefix}also damaged at seq {damage.seq}: {damage.problem} ({damage.path} offset {damage.offset})")
        print(f"{prefix}first bad sequence number: {report.first_bad_seq}")
    return report


def cmd_journal_dump(args: argparse.Namespace) -> int:
    """Print records of the journal in DIR as JSON lines (seq, log_time_ns, session, client_seq,
    payload_b64). The journal is opened read-only."""
    try:
        journal = Journal.open(args.dir, readonly=True)
    except (JournalError, OSError) as exc:
        print(f"raftseq journal dump: {exc}", file=sys.stderr)
        return 2
    if journal.recovery.bytes_cut:
        print(
            f"raftseq journal dump: warning: the tail of {journal.recovery.segment} is damaged after seq "
            f"{journal.recovery.last_good_seq} ({journal.recovery.reason}); dumping up to there",
            file=sys.stderr,
        )
    if journal.last_seq == 0 or journal.first_seq == 0:
        return 0
    start = max(args.from_seq, journal.first_seq)
    if args.from_seq < journal.first_seq:
        print(f"raftseq journal dump: journal starts at seq {journal.first_seq}", file=sys.stderr)
    end = journal.last_seq if args.limit == 0 else min(journal.last_seq, start + args.limit - 1)
    out = sys.stdout
    try:
        for record in journal.records(start, end) if start <= end else ():
            row = {
                "seq": record.seq,
                "log_time_ns": record.log_time_ns,
                "session": record.session,
                "client_seq": record.client_seq,
            }
            add_payload(row, record.payload, text=args.text)
            out.write(_json.encode(row).decode())
            out.write("\n")
    except JournalError as exc:
        print(f"raftseq journal dump: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


def add_payload(row: dict, payload: bytes, *, text: bool) -> None:
    """A record's payload in a JSON line: UTF-8 ``payload`` with ``--text``, else ``payload_b64``."""
    if text:
        row["payload"] = payload.decode("utf-8", errors="replace")
    else:
        row["payload_b64"] = base64.b64encode(payload).decode()


def add_parser(sub: argparse._SubParsersAction) -> None:
    jsub = command_group(sub, "journal", help="inspect a journal directory", description="Inspect a journal directory.")
    verify = add_command(jsub, "verify", cmd_journal_verify, help="check every record (checksums, gaps, order)")
    verify.add_argument("dir", metavar="DIR", help="journal directory, retention archive directory, or a cluster data directory")
    add_output_option(verify)
    verify.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")

    dump = add_command(jsub, "dump", cmd_journal_dump, help="print records as JSON lines")
    dump.add_argument("dir", metavar="DIR", help="journal directory")
    dump.add_argument("--from", dest="from_seq", type=positive, default=1, metavar="N", help="first sequence number (default 1)")
    dump.add_argument("--limit", type=non_negative, default=0, metavar="K", help="at most K records (default 0: all)")
    dump.add_argument("--text", action="store_true", help="print payloads as UTF-8 text ('payload') instead of base64")
