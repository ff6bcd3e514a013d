"""The ``raftseq`` command: its parser, put together from one module per command group."""

from __future__ import annotations

import argparse
import sys

from raftseq.cluster.cli import cluster, cred, demo, journal, keygen, leader, member, node, relay, sm, status, stream, suites, top
from raftseq.cluster.cli.args import EXIT_INTERRUPTED, INTERRUPTED
from raftseq.sequencer.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftseq",
        description="raftseq: a highly available sequencer. One global, gapless sequence number per message.",
    )
    parser.add_argument("--version", action="version", version=f"raftseq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    journal.add_parser(sub)
    demo.add_parser(sub)
    node.add_parser(sub)
    keygen.add_parser(sub)
    cred.add_parser(sub)
    relay.add_parser(sub)
    cluster.add_parser(sub)
    status.add_parser(sub)
    member.add_parser(sub)
    leader.add_parser(sub)
    top.add_parser(sub)
    sm.add_parser(sub)
    stream.add_parsers(sub)
    suites.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in suites.SOURCE_SUITES:
        # Options too (`raftseq chaos --duration 600`, `raftseq bench --help`) go to the suite.
        return suites.run_source_suite(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except INTERRUPTED:
        return EXIT_INTERRUPTED
