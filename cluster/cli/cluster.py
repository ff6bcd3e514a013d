"""``raftseq cluster up``: a local three-node cluster in the foreground (``cluster.local``)."""

from __future__ import annotations

import argparse

from raftseq.cluster.cli.args import add_command, command_group, positive, whole_number
from raftseq.cluster.config import DURABILITY_MODES
from raftseq.cluster.relay_local import LOCAL_RELAYS_MAX


def cmd_cluster_up(args: argparse.Namespace) -> int:
    """Start three nodes on 127.0.0.1 as child processes; once they serve, print their client endpoints,
    metrics URLs, the client token and the leader, then a line on every leader change. A node that
    crashes is restarted (unless --no-restart) after a delay that doubles while it keeps failing
    (1 s up to 30 s); one stopped with SIGTERM stays stopped, and so does one whose exit code needs an
    operator (2-10: a port or its data directory in use, a bad config...; see docs/operating.md).
    Ctrl-C stops every node (exit code 130), SIGTERM too (exit 0). Exit code 1, before any banner,
    when a port or the data directory is in use or the cluster cannot start; 1 too when no node is
    left running."""
    from raftseq.cluster.up import run_cluster_up

    return run_cluster_up(args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    csub = command_group(sub, "cluster", help="run a local cluster", description="Run a local cluster.")
    up = add_command(csub, "up", cmd_cluster_up, help="start a local three-node cluster in the foreground")
    up.add_argument("--data-dir", default="raftseq-data", help="where configs, logs, journals live (default ./raftseq-data)")
    up.add_argument("--base-port", type=positive, default=7100, help="clients on P+1..P+3, Raft P+101.., metrics P+201.. (default 7100)")
    up.add_argument("--demo", action="store_true", help="also run demo traffic and print progress every second")
    up.add_argument("--demo-rate", type=positive, default=200, help="demo messages per second per session (default 200)")
    up.add_argument(
        "--relays",
        type=whole_number(0, LOCAL_RELAYS_MAX),
        default=0,
        metavar="N",
        help=f"also start N relays following the nodes (0..{LOCAL_RELAYS_MAX}; clients on P+104.., metrics on P+204..; "
        "with --credentials they check it too; docs/operating.md, Relays)",
    )
    up.add_argument(
        "--credentials",
        metavar="FILE",
        default="",
        help="the nodes check client tokens against this credentials file too (made empty if missing; "
        "raftseq cred add FILE NAME adds one, the nodes read changes within a second); the shared token still works",
    )
    up.add_argument("--no-restart", action="store_true", help="do not restart nodes that die")
    up.add_argument("--insecure", action="store_true", help="no client token and unencrypted Raft links (development only)")
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS on the client ports (nodes and relays): a CA and certificates are made in DATA_DIR/tls (docs/operating.md, TLS)",
    )
    up.add_argument("--tls-mutual", action="store_true", help="with --tls: clients need a certificate from that CA too (mutual TLS)")
    up.add_argument(
        "--durability",
        choices=DURABILITY_MODES,
        default="crash",
        help="crash: acknowledged messages survive a kill of every node (the default); power: also a power cut of every "
        "node (each Raft entry fsynced before it counts toward commit)",
    )
