"""Where a cluster is: endpoint parsing, the environment variables and the local defaults.

Every program that takes endpoints (the client library, the ``raftseq`` commands) reads them
here, so each accepts the same forms:

* a comma-separated string, ``"10.0.0.1:7001,10.0.0.2:7001"`` (spaces around items ignored);
* a list of ``"HOST:PORT"`` strings, ``["10.0.0.1:7001", "10.0.0.2:7001"]``;
* a list of ``(host, port)`` pairs, ``[("10.0.0.1", 7001), ("10.0.0.2", 7001)]``.

An IPv6 host is written in brackets, ``[::1]:7001``. Anything else is a ``ValueError`` that
names the bad endpoint.

``$RAFTSEQ_ENDPOINTS`` (the same comma-separated form) and ``$RAFTSEQ_TOKEN`` say where the
cluster is and what token it wants; without them, the local cluster (``raftseq cluster up``)
on its default ports and no token.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

#: Environment variables naming the cluster's client endpoints and its client token.
ENDPOINTS_ENV = "RAFTSEQ_ENDPOINTS"
TOKEN_ENV = "RAFTSEQ_TOKEN"

#: The client endpoints of the local cluster (``raftseq cluster up`` with its default base port).
DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"

#: TCP ports are 16-bit and port 0 cannot be connected to.
PORT_MIN = 1
PORT_MAX = 65535


def _port(endpoint: object, value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not PORT_MIN <= value <= PORT_MAX:
        raise ValueError(f"endpoint {endpoint!r}: the port must be a number from {PORT_MIN} to {PORT_MAX}")
    return value


def parse_endpoint(endpoint: str | tuple[str, int]) -> tuple[str, int]:
    """One endpoint, ``"HOST:PORT"`` (``"[v6]:PORT"``) or ``(host, port)``, as ``(host, port)``."""
    if isinstance(endpoint, tuple):
        if len(endpoint) != 2 or not isinstance(endpoint[0], str) or not endpoint[0].strip():
            raise ValueError(f"endpoint {endpoint!r} is not a (host, port) pair")
        host = endpoint[0].strip()
        return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), _port(endpoint, endpoint[1])
    if not isinstance(endpoint, str):
        raise ValueError(f"endpoint {endpoint!r} is neither a 'HOST:PORT' string nor a (host, port) pair")
    text = endpoint.strip()
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"endpoint {endpoint!r}: write an IPv6 host in brackets, [HOST]:PORT")
    if not colon or not host or "," in text or any(c.isspace() for c in text):
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return host, _port(endpoint, port)


def parse_endpoints(value: str | Iterable[str | tuple[str, int]]) -> list[tuple[str, int]]:
    """Endpoints in any of the forms this module accepts, as ``(host, port)`` pairs in the
    order given. Raises ``ValueError`` naming the first bad endpoint, or when there is none."""
    if isinstance(value, str):
        items = value.split(",")
        if not value.strip():
            raise ValueError("no endpoints given (expected HOST:PORT,HOST:PORT,...)")
        if any(not item.strip() for item in items):
            raise ValueError(f"an empty endpoint in {value!r} (expected HOST:PORT,HOST:PORT,...)")
    elif isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"endpoints {value!r}: expected 'HOST:PORT,...', a list of 'HOST:PORT' or a list of (host, port)")
    else:
        items = list(value)
        if not items:
            raise ValueError("no endpoints given")
    return [parse_endpoint(item) for item in items]


def format_endpoint(host: str, port: int) -> str:
    """``"HOST:PORT"`` (an IPv6 host in brackets): the form nodes and the client use."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_addresses(value: str | Iterable[str | tuple[str, int]]) -> list[str]:
    """``parse_endpoints(value)`` written back as ``"HOST:PORT"`` strings."""
    return [format_endpoint(host, port) for host, port in parse_endpoints(value)]


def endpoints_from_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
    """The endpoints in ``$RAFTSEQ_ENDPOINTS`` (`environ`, default ``os.environ``), else the
    local cluster's (``DEFAULT_ENDPOINTS``). A malformed value, an empty one included, is a
    ``ValueError`` that names the variable."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENDPOINTS_ENV)
    if value is None:
        return parse_endpoints(DEFAULT_ENDPOINTS)
    try:
        return parse_endpoints(value)
    except ValueError as exc:
        raise ValueError(f"${ENDPOINTS_ENV}: {exc}") from None


def token_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The client token in ``$RAFTSEQ_TOKEN`` (`environ`, default ``os.environ``); "" when unset."""
    environ = os.environ if environ is None else environ
    return environ.get(TOKEN_ENV, "")


__all__ = [
    "DEFAULT_ENDPOINTS",
    "ENDPOINTS_ENV",
    "PORT_MAX",
    "PORT_MIN",
    "TOKEN_ENV",
    "endpoint_addresses",
    "endpoints_from_env",
    "format_endpoint",
    "parse_endpoint",
    "parse_endpoints",
    "token_from_env",
]
