"""``raftseq status [ENDPOINT ...]``: each node's role, term, commit index and last sequence
number (``cluster.status`` asks them)."""

from __future__ import annotations

import argparse

import msgspec

from raftseq.cluster.cli.args import add_token_option, endpoints_default, endpoints_or_exit

_json = msgspec.json.Encoder()


def cmd_status(args: argparse.Namespace) -> int:
    from raftseq.cluster.status import gather_status, print_status

    endpoints = endpoints_or_exit(args.endpoints or [endpoints_default()], "raftseq")
    report = gather_status(endpoints, token=args.token, timeout_s=args.timeout)
    if args.json:
        print(_json.encode(report).decode())
    else:
        print_status(report)
    return 0 if all(n.get("role") not in (None, "unreachable") for n in report["nodes"]) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status",
        help="print each node's role, term, commit index, last sequence number",
        description="Ask each ENDPOINT (default $RAFTSEQ_ENDPOINTS or the local cluster) for its status.",
    )
    status.add_argument("endpoints", nargs="*", metavar="ENDPOINT", help="HOST:PORT client endpoints")
    status.add_argument("--json", action="store_true", help='print {"leader": ..., "nodes": [...]} as JSON')
    add_token_option(status)
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node (default 2)")
    status.set_defaults(func=cmd_status)
