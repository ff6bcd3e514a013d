"""TLS for clients: reaching a node's (or relay's) TLS port (docs/operating.md, "TLS").

``SequencerClient(endpoints, session=..., tls=...)`` (and ``open_connection``, ``subscribe``)
take either an ``ssl.SSLContext`` the caller built, or ``TlsOptions``:

* ``ca_file``: PEM CA certificates the node's certificate must chain to ("": the system's);
* ``cert_file``/``key_file``: the client certificate for mutual TLS (its subject CN names the
  credential the node grants when the hello carries no token);
* ``server_hostname``: the name the node's certificate must hold ("": the endpoint's host).

Only TLS 1.3 is offered. Mistakes are typed errors (``TlsError``), never retried on other
nodes (each would answer the same): ``TlsRequired`` (a plaintext client on a TLS port: the node
says so in plaintext), ``TlsNotOffered`` (a TLS client on a plaintext port: the node answered
in plaintext) and ``TlsHandshakeFailed`` (a certificate either side refused). The options can
come from ``$RAFTSEQ_TLS_CA``, ``$RAFTSEQ_TLS_CERT``, ``$RAFTSEQ_TLS_KEY`` and
``$RAFTSEQ_TLS_SERVER_NAME`` (``tls_from_env``), as the token comes from ``$RAFTSEQ_TOKEN``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import ssl
from collections.abc import Mapping

from raftseq.clients.errors import SequencerError

TLS_CA_ENV = "RAFTSEQ_TLS_CA"
TLS_CERT_ENV = "RAFTSEQ_TLS_CERT"
TLS_KEY_ENV = "RAFTSEQ_TLS_KEY"
TLS_SERVER_NAME_ENV = "RAFTSEQ_TLS_SERVER_NAME"

#: How a node's TLS port answers a hello sent in plaintext (``Rejected(auth_failed)``, a reason
#: every client release takes as final, with this detail first): what a client tells its caller.
TLS_REQUIRED_DETAIL = "this port speaks TLS"
#: How a port with mutual TLS answers a hello over TLS without a client certificate.
TLS_CERTIFICATE_REQUIRED_DETAIL = "this port requires a client certificate"
#: The first byte of a TLS record carrying a handshake (a ClientHello); no raftseq frame starts
#: with it (a frame's first byte is the high byte of its length, far below 0x16 << 24).
TLS_HANDSHAKE_RECORD = 0x16


class TlsError(SequencerError):
    """TLS could not be agreed with a node: a configuration mistake on one side (not retried)."""


class TlsRequired(TlsError):
    """A client without TLS reached a TLS port."""


class TlsNotOffered(TlsError):
    """A TLS client reached a port that speaks plaintext."""


class TlsHandshakeFailed(TlsError):
    """The handshake failed: the node's certificate was not trusted (or not for this name), or
    the node refused this client's certificate (or its lack of one)."""


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """What a client needs to reach a TLS port (see the module docstring)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_hostname: str = ""

    def context(self) -> ssl.SSLContext:
        """A TLS 1.3 client context: the node's certificate is verified, against `ca_file` or
        the system's CAs, and so is its name. Raises ``OSError``/``ssl.SSLError`` for files
        that cannot be read or used. Built once per version of the files: a client that
        reconnects after its certificate was renewed presents the new one."""
        files = (self.ca_file, self.cert_file, self.key_file)
        return _context(*files, tuple(_version(path) for path in files))


def _version(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None  # the load that follows says what is wrong
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st else None


@functools.lru_cache(maxsize=16)
def _context(ca_file: str, cert_file: str, key_file: str, versions: tuple) -> ssl.SSLContext:
    # One context per version of the files: a client reconnecting many times loads them once.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


#: What ``tls=`` takes: options, a context of the caller's, or None (plaintext).
ClientTls = TlsOptions | ssl.SSLContext | None


def client_context(tls: ClientTls) -> tuple[ssl.SSLContext | None, str]:
    """The context for `tls` and the server name it asks for ("": the endpoint's host)."""
    if tls is None:
        return None, ""
    if isinstance(tls, ssl.SSLContext):
        return tls, ""
    return tls.context(), tls.server_hostname


def tls_from_env(environ: Mapping[str, str] | None = None) -> TlsOptions | None:
    """``TlsOptions`` from ``$RAFTSEQ_TLS_CA``/``_CERT``/``_KEY``/``_SERVER_NAME`` (`environ`,
    default ``os.environ``); None when none of them is set (plaintext)."""
    environ = os.environ if environ is None else environ
    values = [environ.get(name, "") for name in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TLS_SERVER_NAME_ENV)]
    return TlsOptions(*values) if any(values) else None


def handshake_error(address: str, exc: ssl.SSLError) -> TlsError:
    """The typed error for a failed handshake with `address` (or a read right after it: TLS 1.3
    tells a client that the node refused its certificate only then)."""
    reason = (getattr(exc, "reason", "") or "").upper()
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "UNEXPECTED_RECORD"):
        return TlsNotOffered(f"{address} answered in plaintext: its port does not speak TLS (connect without tls=)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsHandshakeFailed(f"{address}: its certificate was not accepted: {exc.verify_message}")
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return TlsHandshakeFailed(f"{address} refused this client's certificate ({reason.lower()}): check cert_file/key_file")
    return TlsHandshakeFailed(f"{address}: TLS handshake failed: {reason.lower() or exc}")


def tls_required_error(address: str, detail: str) -> TlsError | None:
    """The ``TlsError`` of a refused hello whose detail says TLS is why: ``TlsRequired`` (a
    plaintext hello on a TLS port), ``TlsHandshakeFailed`` (no client certificate, mutual TLS)."""
    if detail.startswith(TLS_REQUIRED_DETAIL):
        return TlsRequired(f"{address}: {detail}")
    if detail.startswith(TLS_CERTIFICATE_REQUIRED_DETAIL):
        return TlsHandshakeFailed(f"{address}: {detail}")
    return None


__all__ = [
    "TLS_CA_ENV",
    "TLS_CERTIFICATE_REQUIRED_DETAIL",
    "TLS_CERT_ENV",
    "TLS_KEY_ENV",
    "TLS_REQUIRED_DETAIL",
    "TLS_SERVER_NAME_ENV",
    "ClientTls",
    "TlsError",
    "TlsHandshakeFailed",
    "TlsNotOffered",
    "TlsOptions",
    "TlsRequired",
    "client_context",
    "handshake_error",
    "tls_from_env",
    "tls_required_error",
]
