"""Argument helpers shared by every ``raftseq`` command: number types with clear errors, the
cluster's client endpoints (default, parsing) and the client token option."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable

#: The client endpoints of the local cluster (`raftseq cluster up` with its default base port).
DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
#: Environment variables that override the endpoint and token defaults.
ENDPOINTS_ENV = "RAFTSEQ_ENDPOINTS"
TOKEN_ENV = "RAFTSEQ_TOKEN"


def whole_number(minimum: int) -> Callable[[str], int]:
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


#: A sequence number or a count of at least one; a count where 0 means "no limit".
positive = whole_number(1)
non_negative = whole_number(0)


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


def token_default() -> str:
    return os.environ.get(TOKEN_ENV, "")


def split_endpoints(values: Iterable[str]) -> list[str]:
    """``HOST:PORT`` endpoints from `values`, each one endpoint or a comma-separated list of
    them. Raises ``ValueError`` naming the first that is not ``HOST:PORT``."""
    found = []
    for value in values:
        found.extend(v.strip() for v in value.split(",") if v.strip())
    for endpoint in found:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return found


def endpoints_or_exit(values: Iterable[str], command: str) -> list[str]:
    """``split_endpoints``, exiting with ``COMMAND: endpoint ... is not HOST:PORT``."""
    try:
        return split_endpoints(values)
    except ValueError as exc:
        raise SystemExit(f"{command}: {exc}") from None


def add_endpoints_option(
    parser: argparse.ArgumentParser, help: str = "comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)"
) -> None:
    """``--endpoints HOST:PORT,...`` (default ``$RAFTSEQ_ENDPOINTS`` or the local cluster)."""
    parser.add_argument("--endpoints", default=endpoints_default(), help=help)


def add_token_option(parser: argparse.ArgumentParser) -> None:
    """``--token`` (default ``$RAFTSEQ_TOKEN``)."""
    parser.add_argument("--token", default=token_default(), help="client token (default $RAFTSEQ_TOKEN)")


def add_cluster_options(
    parser: argparse.ArgumentParser, endpoints_help: str = "comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)"
) -> None:
    """``--endpoints`` and ``--token``: how a command reaches the cluster."""
    add_endpoints_option(parser, endpoints_help)
    add_token_option(parser)


def command_group(sub: argparse._SubParsersAction, name: str, *, help: str, description: str) -> argparse._SubParsersAction:
    """``raftseq NAME SUBCOMMAND``: the group's parser, returning its (required) subcommands,
    named in ``args.NAME_command``."""
    group = sub.add_parser(name, help=help, description=description)
    commands = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    commands.required = True
    return commands
