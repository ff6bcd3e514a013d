"""``raftseq status``: each node's role, term, commit index and last sequence number
(``cluster.status`` asks them)."""

from __future__ import annotations

import argparse

import msgspec

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK
from raftseq.cluster.cli.args import (
    add_cluster_options,
    cluster_tls,
    add_command,
    add_legacy_endpoints,
    add_output_option,
    cluster_endpoints,
)

_json = msgspec.json.Encoder()


def cmd_status(args: argparse.Namespace) -> int:
    """Ask each node of --endpoints for its status. Exit 0 when every node answered, 1 when one could not
    be reached or refused the token."""
    from raftseq.cluster.status import gather_status, print_status

    endpoints = cluster_endpoints(args, "raftseq status")
    report = gather_status(endpoints, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args))
    if args.output == "json":
        print(_json.encode(report).decode())
    else:
        print_status(report)
    return EXIT_OK if all(n["role"] in ("leader", "follower", "candidate") for n in report["nodes"]) else EXIT_FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = add_command(sub, "status", cmd_status, help="print each node's role, term, commit index, last sequence number")
    add_legacy_endpoints(status)
    add_cluster_options(status)
    add_output_option(status)
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node (default 2)")
