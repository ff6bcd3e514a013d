"""The ``raftseq`` command."""

from __future__ import annotations

import argparse
import base64
import sys
import time

import msgspec

from sequencer import limits
from sequencer.journal import Journal, JournalError, verify_journal

_json = msgspec.json.Encoder()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


# --- raftseq journal ----------------------------------------------------------------------


def cmd_journal_verify(args: argparse.Namespace) -> int:
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
            if args.text:
                row["payload"] = record.payload.decode("utf-8", errors="replace")
            else:
                row["payload_b64"] = base64.b64encode(record.payload).decode()
            out.write(_json.encode(row).decode())
            out.write("\n")
    except JournalError as exc:
        print(f"raftseq journal dump: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


# --- raftseq demo -------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftseq",
        description="raftseq: a highly available sequencer. One global, gapless sequence number per message.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    journal = sub.add_parser("journal", help="inspect a journal directory", description="Inspect a journal directory.")
    jsub = journal.add_subparsers(dest="journal_command", metavar="SUBCOMMAND")
    jsub.required = True
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
    dump.add_argument("--from", dest="from_seq", type=_positive, default=1, metavar="N", help="first sequence number (default 1)")
    dump.add_argument("--limit", type=_non_negative, default=0, metavar="K", help="at most K records (default 0: all)")
    dump.add_argument("--text", action="store_true", help="print payloads as UTF-8 text ('payload') instead of base64")
    dump.set_defaults(func=cmd_journal_dump)

    demo = sub.add_parser(
        "demo",
        help="sequence demo traffic through the core (machine + journal) in one process",
        description="Run demo traffic from several sessions (with retries and duplicates) through the "
        "state machine and a journal in DIR, print the sequenced stream as it grows, then verify the journal.",
    )
    demo.add_argument("--dir", default="", help="journal directory (default: a new temporary directory)")
    demo.add_argument("--messages", type=_positive, default=10_000, help="messages to sequence (default 10000)")
    demo.add_argument("--sessions", type=_positive, default=4, help="client sessions (default 4)")
    demo.add_argument("--batch", type=_positive, default=100, help=f"entries per batch, at most {limits.BATCH_ENTRIES_MAX} (default 100)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
