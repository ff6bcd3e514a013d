"""The grammar every ``raftseq`` command shares: exit codes, number types with clear errors,
``--endpoints`` and ``--token`` (defaults from ``$RAFTSEQ_ENDPOINTS`` and ``$RAFTSEQ_TOKEN``) for
every command that talks to a cluster, and ``-o/--output table|json`` where output is structured."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable

from raftseq.clients.endpoints import DEFAULT_ENDPOINTS, ENDPOINTS_ENV, TOKEN_ENV, endpoint_addresses, token_from_env
from raftseq.clients.errors import AuthenticationError, TokenRequired
from raftseq.clients.tls import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TLS_SERVER_NAME_ENV, TlsError, TlsOptions

#: Exit codes of every command: all well; a failed check or a cluster that cannot be used; a
#: usage error (argparse's own code); interrupted with Ctrl-C.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: What Ctrl-C raises out of a command. asyncio.run turns SIGINT into a cancel of its main task
#: and re-raises it as KeyboardInterrupt, except when the task was being cancelled already (a
#: timeout expiring at that moment): then the CancelledError itself comes out.
INTERRUPTED = (KeyboardInterrupt, asyncio.CancelledError)


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (and <= `maximum`), with a clear error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected a number <= {maximum}, got {value}")
        return value

    return parse


#: A sequence number or a count of at least one; a count where 0 means "no limit".
positive = whole_number(1)
non_negative = whole_number(0)


def non_negative_rate(text: str) -> float:
    """An argparse type: a finite number >= 0 (a rate; 0 usually means no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def endpoints_default() -> str:
    """``$RAFTSEQ_ENDPOINTS``, else the local cluster's endpoints."""
    return os.environ.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS)


def split_endpoints(values: Iterable[str]) -> list[str]:
    """``HOST:PORT`` endpoints from `values`, each one endpoint or a comma-separated list of
    them (the forms of ``clients.endpoints``). Raises ``ValueError`` naming the first bad one."""
    return endpoint_addresses(",".join(values))


def endpoint_list(text: str) -> list[str]:
    """An argparse type: a comma-separated list of ``HOST:PORT`` endpoints (at least one)."""
    try:
        return split_endpoints([text])
    except ValueError as exc:
        source = f" (from ${ENDPOINTS_ENV})" if text == os.environ.get(ENDPOINTS_ENV) else ""
        raise argparse.ArgumentTypeError(f"{exc}{source}") from None


def describe_error(exc: BaseException) -> str:
    """A client error as a command tells it: a missing token and a wrong one are different
    mistakes with different fixes, and each says its fix."""
    if isinstance(exc, TokenRequired):
        return f"{exc}: pass --token or set ${TOKEN_ENV}"
    if isinstance(exc, AuthenticationError):
        return f"{exc}: check --token or ${TOKEN_ENV} (raftseq cluster up prints the token)"
    if isinstance(exc, TlsError):
        return f"{exc}: check --tls-ca/--tls-cert/--tls-key or ${TLS_CA_ENV} (raftseq cluster up --tls prints them)"
    return f"{type(exc).__name__}: {exc}"


ENDPOINTS_HELP = f"comma-separated HOST:PORT client endpoints (default ${ENDPOINTS_ENV}, else the local cluster {DEFAULT_ENDPOINTS})"
TOKEN_HELP = f"client token (default ${TOKEN_ENV}; none when unset)"


def add_cluster_options(parser: argparse.ArgumentParser, *, tls: bool = True) -> None:
    """``--endpoints``, ``--token`` and the TLS options: how every command that talks to a
    cluster reaches it. ``args.endpoints`` is a list of ``HOST:PORT`` strings; ``cluster_tls(args)``
    the TLS options (None: plaintext). `tls` False: a command that cannot speak TLS yet does not
    offer the options (rather than take and ignore them)."""
    parser.add_argument("--endpoints", type=endpoint_list, default=endpoints_default(), metavar="HOST:PORT,...", help=ENDPOINTS_HELP)
    parser.add_argument("--token", default=token_from_env(), help=TOKEN_HELP)
    if tls:
        add_tls_options(parser)


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name`` (defaults from
    ``$RAFTSEQ_TLS_CA`` … as ``clients.tls.tls_from_env``; ``raftseq cluster up --tls`` prints
    them). Any of them set: the command reaches the nodes over TLS."""
    environ = os.environ
    group = parser.add_argument_group("TLS (nodes whose client ports speak TLS)")
    group.add_argument(
        "--tls-ca", default=environ.get(TLS_CA_ENV, ""), metavar="FILE", help=f"CA of the nodes' certificates (default ${TLS_CA_ENV})"
    )
    group.add_argument(
        "--tls-cert",
        default=environ.get(TLS_CERT_ENV, ""),
        metavar="FILE",
        help=f"client certificate, mutual TLS (default ${TLS_CERT_ENV})",
    )
    group.add_argument("--tls-key", default=environ.get(TLS_KEY_ENV, ""), metavar="FILE", help=f"its key (default ${TLS_KEY_ENV})")
    group.add_argument(
        "--tls-server-name",
        default=environ.get(TLS_SERVER_NAME_ENV, ""),
        metavar="NAME",
        help="name the nodes' certificates must hold (default: the endpoint's host)",
    )


def cluster_tls(args: argparse.Namespace) -> TlsOptions | None:
    """The TLS options of `args` (``add_tls_options``); None when none is given."""
    values = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return TlsOptions(*values) if any(values) else None


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """``-o/--output table|json`` (``args.output``); ``--json`` stays as a hidden alias of ``-o json``."""
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table for people (default) or one JSON object")
    parser.add_argument("--json", dest="output", action="store_const", const="json", help=argparse.SUPPRESS)


def add_legacy_endpoints(parser: argparse.ArgumentParser) -> None:
    """Endpoints given as positional arguments, as ``status`` and ``top`` took them before
    ``--endpoints``: still accepted, with a warning (see ``cluster_endpoints``)."""
    parser.add_argument("legacy_endpoints", nargs="*", metavar="ENDPOINT", help=argparse.SUPPRESS)


def cluster_endpoints(args: argparse.Namespace, command: str) -> list[str]:
    """``args.endpoints``, or the positional endpoints of ``add_legacy_endpoints`` (with a
    deprecation warning on stderr; exit 2 when one is not ``HOST:PORT``)."""
    legacy = getattr(args, "legacy_endpoints", None)
    if not legacy:
        return args.endpoints
    print(f"{command}: endpoints as arguments are deprecated; use --endpoints {','.join(legacy)}", file=sys.stderr)
    try:
        return split_endpoints(legacy)
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def command_group(sub: argparse._SubParsersAction, name: str, *, help: str, description: str) -> argparse._SubParsersAction:
    """``raftseq NAME SUBCOMMAND``: the group's parser, returning its (required) subcommands,
    named in ``args.NAME_command``."""
    group = sub.add_parser(name, help=help, description=description)
    commands = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    commands.required = True
    return commands


def add_command(
    sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], *, help: str, description: str = ""
) -> argparse.ArgumentParser:
    """``raftseq ... NAME``: its parser, which runs ``func(args)`` (returning the exit code).
    The ``--help`` description is `description`, else the docstring of `func` (or of the
    function it wraps): each command says what it does where it is written."""
    doc = inspect.getdoc(getattr(func, "__wrapped__", func)) or ""
    parser = sub.add_parser(name, help=help, description=description or " ".join(doc.split()))
    parser.set_defaults(func=func)
    return parser
