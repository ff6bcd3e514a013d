"""The ``raftseq`` command."""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import time

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.journal import Journal, JournalError, verify_journal
from raftseq.sequencer.version import __version__

_json = msgspec.json.Encoder()


def _at_least(minimum: int):
    """An argparse type: a whole number >= `minimum`, with a clear error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive = _at_least(1)
_non_negative = _at_least(0)


# --- raftseq journal ----------------------------------------------------------------------


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


# --- raftseq node / cluster up ----------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    from raftseq.cluster.config import ConfigError, load_config

    try:
        config = load_config(args.config, insecure=args.insecure)
    except ConfigError as exc:
        print(f"raftseq node: {exc}", file=sys.stderr)
        return 2
    from raftseq.cluster.node import run_node

    return run_node(config, discard_raft_log_first=args.discard_raft_log)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftseq.cluster.local import run_cluster_up

    return run_cluster_up(args)


# --- raftseq status / submit / tail -------------------------------------------------------

DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"


def _endpoints(values: list[str]) -> list[str]:
    found = []
    for value in values:
        found.extend(v.strip() for v in value.split(",") if v.strip())
    for endpoint in found:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"raftseq: endpoint {endpoint!r} is not HOST:PORT")
    return found


def cmd_status(args: argparse.Namespace) -> int:
    from raftseq.cluster.status import gather_status, print_status

    endpoints = _endpoints(args.endpoints or [os.environ.get("RAFTSEQ_ENDPOINTS", DEFAULT_ENDPOINTS)])
    report = gather_status(endpoints, token=args.token, timeout_s=args.timeout)
    if args.json:
        print(_json.encode(report).decode())
    else:
        print_status(report)
    return 0 if all(n.get("role") not in (None, "unreachable") for n in report["nodes"]) else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from raftseq.clients import BlockingSequencerClient, SequencerError

    endpoints = _endpoints([args.endpoints])
    payloads = [p.encode() for p in args.payload] if args.payload else [line.rstrip("\n").encode() for line in sys.stdin]
    try:
        with BlockingSequencerClient(endpoints, session=args.session, token=args.token, outcome_deadline_s=args.timeout) as client:
            for payload, seq in zip(payloads, client.submit_many(payloads)):
                print(f"{seq}\t{payload.decode(errors='replace')}")
    except SequencerError as exc:
        print(f"raftseq submit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from raftseq.clients import BlockingSequencerClient, SequencerError

    endpoints = _endpoints([args.endpoints])
    try:
        with BlockingSequencerClient(endpoints, session=args.session, token=args.token) as client:
            for m in client.subscribe(args.from_seq, limit=args.limit or None, timeout_s=args.idle_exit or None):
                row = {"seq": m.seq, "timestamp_ns": m.timestamp_ns, "session": m.session, "client_seq": m.client_seq}
                if args.text:
                    row["payload"] = m.payload.decode("utf-8", errors="replace")
                else:
                    row["payload_b64"] = base64.b64encode(m.payload).decode()
                print(_json.encode(row).decode(), flush=True)
    except SequencerError as exc:
        print(f"raftseq tail: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0


# --- raftseq demo -------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from raftseq.cluster import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftseq",
        description="raftseq: a highly available sequencer. One global, gapless sequence number per message.",
    )
    parser.add_argument("--version", action="version", version=f"raftseq {__version__}")
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

    node = sub.add_parser("node", help="run one node", description="Run one raftseq node from its TOML config.")
    node.add_argument("--config", required=True, metavar="FILE", help="node configuration (TOML)")
    node.add_argument(
        "--insecure",
        action="store_true",
        help="development only: allow running without raft_password (unencrypted, unauthenticated Raft links) "
        "and without client_token (no client authentication)",
    )
    node.add_argument(
        "--discard-raft-log",
        action="store_true",
        help="move the node's Raft log and snapshot aside (to raft/discarded-*) and rejoin from the leader: "
        "for a Raft log that cannot be read. The journal is kept and caught up from a peer.",
    )
    node.set_defaults(func=cmd_node)

    cluster = sub.add_parser("cluster", help="run a local cluster", description="Run a local cluster.")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    csub.required = True
    up = csub.add_parser(
        "up",
        help="start a local three-node cluster in the foreground",
        description="Start three nodes on 127.0.0.1 as child processes; print their client endpoints, metrics "
        "URLs and the client token; restart a node that dies; stop all of them on Ctrl-C or SIGTERM.",
    )
    up.add_argument("--data-dir", default="raftseq-data", help="where configs, logs, journals live (default ./raftseq-data)")
    up.add_argument("--base-port", type=_positive, default=7100, help="clients on P+1..P+3, Raft P+101.., metrics P+201.. (default 7100)")
    up.add_argument("--demo", action="store_true", help="also run demo traffic and print progress every second")
    up.add_argument("--demo-rate", type=_positive, default=200, help="demo messages per second per session (default 200)")
    up.add_argument("--no-restart", action="store_true", help="do not restart nodes that die")
    up.add_argument("--insecure", action="store_true", help="no client token and unencrypted Raft links (development only)")
    up.set_defaults(func=cmd_cluster_up)

    token_default = os.environ.get("RAFTSEQ_TOKEN", "")
    endpoints_default = os.environ.get("RAFTSEQ_ENDPOINTS", DEFAULT_ENDPOINTS)
    status = sub.add_parser(
        "status",
        help="print each node's role, term, commit index, last sequence number",
        description="Ask each ENDPOINT (default $RAFTSEQ_ENDPOINTS or the local cluster) for its status.",
    )
    status.add_argument("endpoints", nargs="*", metavar="ENDPOINT", help="HOST:PORT client endpoints")
    status.add_argument("--json", action="store_true", help='print {"leader": ..., "nodes": [...]} as JSON')
    status.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node (default 2)")
    status.set_defaults(func=cmd_status)

    from raftseq.cluster.top import add_parser as add_top_parser

    add_top_parser(sub)

    from raftseq.cluster.sm_cli import add_parser as add_sm_parser

    add_sm_parser(sub)

    submit = sub.add_parser(
        "submit",
        help="sequence payloads given as arguments (or lines of stdin)",
        description="Submit each PAYLOAD (or each line of stdin) and print its sequence number.",
    )
    submit.add_argument("payload", nargs="*", help="payloads (default: lines of stdin)")
    submit.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints")
    submit.add_argument("--session", default=f"cli-{os.getpid()}", help="client session name (default cli-PID)")
    submit.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each outcome (default 30)")
    submit.set_defaults(func=cmd_submit)

    tail = sub.add_parser(
        "tail", help="print the stream from a sequence number", description="Print the stream as JSON lines, from --from N on."
    )
    tail.add_argument("--from", dest="from_seq", type=_positive, default=1, metavar="N", help="first sequence number (default 1)")
    tail.add_argument("--limit", type=_non_negative, default=0, help="stop after K messages (default 0: never)")
    tail.add_argument("--idle-exit", type=float, default=0, help="stop after this many seconds without a message (default: never)")
    tail.add_argument("--text", action="store_true", help="print payloads as UTF-8 text")
    tail.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints")
    tail.add_argument("--session", default=f"tail-{os.getpid()}", help="session name used in the hello")
    tail.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    tail.set_defaults(func=cmd_tail)

    chaos = sub.add_parser(
        "chaos",
        help="seeded fault injection against a local cluster (source checkout only)",
        description="Run the chaos scenarios (chaos_tests/) against local three-node clusters and check every run's "
        "history against the guarantees: `raftseq chaos run [NAME ...] [--seed N] [--rounds N | --duration S]`, "
        "`raftseq chaos check HISTORY`, `raftseq chaos list`. Everything after `chaos` goes to `python -m chaos_tests` "
        "in the source checkout (chaos_tests/ is not part of the installed package); `raftseq chaos run --help` shows its options.",
    )
    chaos.add_argument("chaos_args", nargs=argparse.REMAINDER, help="run|check|list and their options")

    bench = sub.add_parser(
        "bench",
        help="benchmarks against local clusters, side by side with peers (source checkout only)",
        description="Run the benchmarks (benchmarks/) and print their figures: `raftseq bench [WORKLOAD ...] "
        "[--vs nats,pysyncobj] [--quick] [--runs N] [--json FILE]`. Everything after `bench` goes to "
        "`python -m benchmarks` in the source checkout (benchmarks/ is not part of the installed package); "
        "`raftseq bench --help` there lists the workloads.",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="workloads and their options")
    return parser


def _run_source_suite(package: str, command: str, arguments: list[str]) -> int:
    """`python -m PACKAGE ARGUMENTS` in the source checkout: a child process, not an import
    (nothing in the product imports the test suites or the benchmarks)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, package, "__main__.py")):
        print(f"raftseq {command} needs the source checkout: no {package}/ next to {root}/cluster", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", package, *arguments], cwd=root)


#: Commands whose arguments all belong to a suite in the source checkout (see _run_source_suite).
SOURCE_SUITES = {"chaos": "chaos_tests", "bench": "benchmarks"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SOURCE_SUITES:
        # Options too (`raftseq chaos --duration 600`, `raftseq bench --help`) go to the suite.
        return _run_source_suite(SOURCE_SUITES[argv[0]], argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
