"""``raftseq node --config FILE``: run one node (``cluster.local`` starts nodes this way)."""

from __future__ import annotations

import argparse
import sys

from raftseq.cluster.cli.args import EXIT_USAGE
from raftseq.cluster.cli.args import add_cluster_options, cluster_tls, add_command, positive_seconds


def cmd_node(args: argparse.Namespace) -> int:
    """Exit codes: ``cluster.node_exit.NodeExit`` (docs/operating.md): 2 for a configuration
    file that cannot be read or is not TOML, 5 for one that is TOML but cannot be used."""
    from raftseq.cluster.config import ConfigError, ConfigUnreadable, load_config
    from raftseq.cluster.node_exit import NodeExit

    if not args.config:
        print("raftseq node: --config FILE is required (or: raftseq node drain NODE)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config, insecure=args.insecure)
    except ConfigError as exc:
        print(f"raftseq node: {exc}", file=sys.stderr)
        return NodeExit.USAGE if isinstance(exc, ConfigUnreadable) else NodeExit.INVALID_CONFIG
    from raftseq.cluster.node import run_node

    return run_node(config, discard_raft_log_first=args.discard_raft_log, log_file=args.log_file)


def cmd_node_drain(args: argparse.Namespace) -> int:
    """Drain NODE before maintenance: it stops taking clients (subscribers move to other
    nodes, submits are sent to the leader), hands leadership over if it leads, and the command
    waits until every node is current. Exit 0 then; 1 with the reason otherwise."""
    from raftseq.cluster.cli.leader import run_request
    from raftseq.cluster.maintenance import drain_node

    code, summary = run_request(
        "raftseq node drain", drain_node(args.endpoints, args.node_id, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args))
    )
    if summary is not None:
        print(summary)
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:
    node = add_command(sub, "node", cmd_node, help="run one node; drain one", description="Run one raftseq node from its TOML config.")
    actions = node.add_subparsers(dest="node_command", metavar="drain")
    drain = add_command(actions, "drain", cmd_node_drain, help="stop a node taking clients and move leadership off it")
    drain.add_argument("node_id", metavar="NODE", help="the node's id (as raftseq status shows it)")
    add_cluster_options(drain)
    drain.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds for each step (default 10)")
    node.add_argument("--config", metavar="FILE", help="node configuration (TOML)")
    node.add_argument(
        "--insecure",
        action="store_true",
        help="development only: allow running without raft_password (unencrypted, unauthenticated Raft links) "
        "and without client_token (no client authentication)",
    )
    node.add_argument(
        "--log-file",
        default="",
        metavar="FILE",
        help="write the log to FILE, rotated by size (FILE.1 ... are the older ones), with stdout and stderr; "
        "default: the log goes to stderr",
    )
    node.add_argument(
        "--discard-raft-log",
        action="store_true",
        help="move the node's Raft log and snapshot aside (to raft/discarded-*) and rejoin from the leader: "
        "for a Raft log that cannot be read. The journal is kept and caught up from a peer.",
    )
