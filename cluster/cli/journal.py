"""``raftseq journal verify|dump DIR``: inspect a journal directory."""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

import msgspec

from raftseq.cluster.cli.args import command_group, non_negative, positive
from raftseq.sequencer.journal import Journal, JournalError, verify_journal

_json = msgspec.json.Encoder()


def cmd_journal_verify(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        print(f"raftseq journal verify: journal directory {args.dir} does not exist", file=sys.stderr)
        return 2
    started = time.monotonic()

    def progress(segments: int, records: int) -> None:
        if not args.quiet:
            print(f"  checked {segments} segments, {records} records", file=sys.stderr, flush=True)

    report = verify_journal(args.dir, progress=progress)
    elapsed = time.monotonic() - started
    if args.json:
        print(_json.encode({**msgspec.structs.asdict(report), "ok": report.ok}).decode())
    if report.ok:
        if not args.json:
            span = f"{report.first_seq}..{report.last_seq}" if report.records else "empty"
            print(f"ok: {report.records} records ({span}) in {report.segments} segments, {report.bytes} bytes, {elapsed:.2f} s")
        return 0
    if not args.json:
        where = f" ({report.path} offset {report.offset})" if report.path else ""
        print(f"FAILED at seq {report.first_bad_seq}: {report.problem}{where}")
        print(f"first bad sequence number: {report.first_bad_seq}")
    return 1


def cmd_journal_dump(args: argparse.Namespace) -> int:
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
    verify = jsub.add_parser(
        "verify",
        help="check every record (checksums, gaps, order)",
        description="Read every record of the journal in DIR and check checksums, gapless numbering, "
        "log time order and per-session client_seq order. Exits 0 when all is well, 1 with the first "
        "bad sequence number otherwise.",
    )
    verify.add_argument("dir", metavar="DIR", help="journal directory")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    verify.set_defaults(func=cmd_journal_verify)

    dump = jsub.add_parser(
        "dump",
        help="print records as JSON lines",
        description="Print records of the journal in DIR as JSON lines "
        "(seq, log_time_ns, session, client_seq, payload_b64). The journal is opened read-only.",
    )
    dump.add_argument("dir", metavar="DIR", help="journal directory")
    dump.add_argument("--from", dest="from_seq", type=positive, default=1, metavar="N", help="first sequence number (default 1)")
    dump.add_argument("--limit", type=non_negative, default=0, metavar="K", help="at most K records (default 0: all)")
    dump.add_argument("--text", action="store_true", help="print payloads as UTF-8 text ('payload') instead of base64")
    dump.set_defaults(func=cmd_journal_dump)
