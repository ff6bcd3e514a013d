"""``raftseq relay --upstream ENDPOINTS --listen ADDR --data-dir DIR``: run one relay."""

from __future__ import annotations

import argparse
import sys

from raftseq.cluster.cli.args import TOKEN_HELP, add_command, endpoint_list, whole_number
from raftseq.clients.endpoints import token_from_env


def cmd_relay(args: argparse.Namespace) -> int:
    """Follow a cluster (or another relay) and serve its stream to subscribers: a non-voting copy of
    the journal that answers subscriptions and snapshot queries like a node, and sends submits on
    to the cluster's leader. Exit codes as for a node (docs/operating.md): 2 bad arguments, 5 an
    upstream that is this relay, refuses its token, or holds other records than its journal."""
    from raftseq.cluster.node_exit import NodeExit
    from raftseq.cluster.relay_config import relay_config, retention_section

    try:
        config = relay_config(
            retention=retention_section(args.retention_from) if args.retention_from else None,
            data_dir=args.data_dir,
            upstream=args.upstream,
            listen=args.listen,
            relay_id=args.id,
            token=args.token,
            metrics_address=args.metrics,
            insecure=args.insecure,
            subscriber_lag_max_records=args.subscriber_lag_max,
            credentials_file=args.credentials,
            tls={"cert_file": args.tls_cert, "key_file": args.tls_key, "client_ca_file": args.tls_client_ca, "ca_file": args.tls_ca},
        )
    except (ValueError, OSError) as exc:
        print(f"raftseq relay: {exc}", file=sys.stderr)
        return NodeExit.USAGE
    from raftseq.cluster.relay import run_relay

    return run_relay(config, log_file=args.log_file)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from raftseq.cluster.relay_config import RELAY_SUBSCRIBER_LAG_MAX_RECORDS

    relay = add_command(sub, "relay", cmd_relay, help="run a relay: a non-voting copy that serves subscribers")
    relay.add_argument(
        "--upstream", required=True, type=endpoint_list, metavar="HOST:PORT,...", help="the cluster's client endpoints, or a relay's"
    )
    relay.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the relay serves clients")
    relay.add_argument("--data-dir", required=True, metavar="DIR", help="the relay's journal and id")
    relay.add_argument("--token", default=token_from_env(), help=TOKEN_HELP + "; sent upstream and required of the relay's clients")
    relay.add_argument(
        "--credentials",
        default="",
        metavar="FILE",
        help="also let in the credentials of FILE (raftseq cred; their roles, session prefixes and quotas apply "
        "as on a node; read again when it changes; default: the token only)",
    )
    relay.add_argument("--id", default="", help="the relay's id (default: the one kept in DIR, made on first start)")
    relay.add_argument("--metrics", default="", metavar="HOST:PORT", help="serve Prometheus metrics there (default: off)")
    relay.add_argument(
        "--subscriber-lag-max",
        type=whole_number(0),
        default=RELAY_SUBSCRIBER_LAG_MAX_RECORDS,
        metavar="RECORDS",
        help=f"disconnect a subscriber that falls this many records behind the head (it resumes; 0: never; default {RELAY_SUBSCRIBER_LAG_MAX_RECORDS})",
    )
    relay.add_argument(
        "--retention-from",
        default="",
        metavar="FILE",
        help="keep the relay's journal within the [retention] settings of FILE (a node's config; default: keep everything)",
    )
    relay.add_argument("--log-file", default="", metavar="FILE", help="write the log to FILE, rotated by size (default: stderr)")
    relay.add_argument("--insecure", action="store_true", help="development only: serve clients without a token")
    tls = relay.add_argument_group("TLS ([tls] of a node's config, docs/operating.md)")
    tls.add_argument("--tls-cert", default="", metavar="FILE", help="serve clients over TLS with this certificate (PEM chain)")
    tls.add_argument("--tls-key", default="", metavar="FILE", help="its private key")
    tls.add_argument("--tls-client-ca", default="", metavar="FILE", help="mutual TLS: clients need a certificate from this CA")
    tls.add_argument("--tls-ca", default="", metavar="FILE", help="reach the upstream over TLS, trusting this CA")
