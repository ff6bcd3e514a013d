"""TLS on a node's or relay's client port (``[tls]`` of its config, docs/operating.md "TLS").

The port accepts TCP as before and the connection joins the gateway's table of connections
waiting for their hello at once, so a flood of half-open handshakes is bounded by the same
``gateway.preauth_connections_max`` (the oldest is pushed out) and ``gateway.hello_timeout_ms``
(the handshake must end within it) as a flood of silent sockets. The gateway then calls
``ServerTls.handshake``, which looks at the first byte the client sent without reading it:

* a TLS handshake record: the connection is upgraded in place (TLS 1.3 only), and a client
  certificate, when ``client_ca_file`` asks for one, is verified; its subject CN is
  ``certificate_name`` (the credential a hello without a token is granted);
* anything else: a plaintext client. It is told, in plaintext, ``Rejected(auth_failed)`` with
  ``clients.tls.TLS_REQUIRED_DETAIL`` (a refusal every client release takes as final; this
  release raises ``TlsRequired``), and closed.

The reverse mistake, a TLS client on a plaintext port, is seen by the gateway as a first frame
starting with the TLS handshake byte (``is_tls_hello``). Either side logs one line and counts
``raftseq_tls_refusals_total{reason}``.

Certificates are reloaded without a restart: ``watch`` checks the files' inode, size and mtime
every ``TLS_POLL_INTERVAL_S`` and builds a new context; new connections get it, open ones keep
theirs. A bad file keeps the context last built, and says so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

from raftseq.clients.tls import TLS_HANDSHAKE_RECORD, TlsOptions
from raftseq.cluster.config import TLS_POLL_INTERVAL_S, TlsConfig
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit

log = logging.getLogger("raftseq.tls")

#: Why a connection did not get to its hello (``raftseq_tls_refusals_total{reason}``): a
#: plaintext client on a TLS port, a TLS client on a plaintext port, a handshake that failed (a
#: certificate refused, garbage) and one that did not end within the hello timeout.
REFUSED_PLAINTEXT = "plaintext_client"
REFUSED_TLS_CLIENT = "tls_client_on_plaintext_port"
REFUSED_HANDSHAKE = "handshake_failed"
REFUSED_TIMEOUT = "handshake_timeout"
#: Mutual TLS: a client that presented no certificate (told so, over TLS).
REFUSED_NO_CERTIFICATE = "no_client_certificate"
TLS_REFUSALS = (REFUSED_PLAINTEXT, REFUSED_TLS_CLIENT, REFUSED_HANDSHAKE, REFUSED_TIMEOUT, REFUSED_NO_CERTIFICATE)


class TlsConfigError(Exception):
    """Certificate, key or CA files that cannot be used (one line naming the file)."""


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """A TLS 1.3 server context from `config`'s files; ``TlsConfigError`` naming what is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"tls.cert_file {config.cert_file} with tls.key_file {config.key_file}: {_why(exc)}") from None
    if config.client_ca_file:
        try:
            context.load_verify_locations(cafile=config.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"tls.client_ca_file {config.client_ca_file}: {_why(exc)}") from None
        # Optional at the TLS layer, required by the gateway (``ServerTls.handshake``): a client
        # without a certificate is then told why in a frame. A certificate that fails
        # verification still fails the handshake (asyncio sends no alert: the client sees
        # the connection closed).
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _why(exc: OSError | ssl.SSLError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


def node_client_tls(config: TlsConfig) -> TlsOptions | None:
    """How this node (or relay) reaches other client ports as a client (catch-up, retention's
    peer status, a relay's upstream): None on a plaintext cluster; else its ``ca_file``, and its
    own certificate when the cluster asks clients for one (``client_ca_file``). A config with a
    ``ca_file`` and no certificate of its own (a relay serving plaintext) reaches TLS ports."""
    if not config.enabled:
        return TlsOptions(config.ca_file) if config.ca_file else None
    if config.client_ca_file:
        return TlsOptions(config.ca_file, config.cert_file, config.key_file)
    return TlsOptions(config.ca_file)


def is_tls_hello(data: bytes) -> bool:
    """Whether the first bytes a client sent are a TLS handshake record (a ClientHello)."""
    return len(data) >= 2 and data[0] == TLS_HANDSHAKE_RECORD and data[1] == 3


def certificate_name(writer: asyncio.StreamWriter) -> str:
    """The subject CN of the client certificate of a TLS connection ("": none)."""
    certificate = writer.get_extra_info("peercert")
    if not certificate:
        return ""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


class ServerTls:
    """A port's TLS: the current server context, rebuilt when its files change."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.context = server_context(config)
        self._identity = self._files_identity()
        #: Contexts built after the first (each also logged).
        self.reloads = 0

    def _files_identity(self) -> tuple:
        found = []
        for path in (self.config.cert_file, self.config.key_file, self.config.client_ca_file):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            found.append((st.st_ino, st.st_size, st.st_mtime_ns) if st else None)
        return tuple(found)

    def reload_if_changed(self) -> bool:
        """Build a new context if a file changed since the last; True when one was built."""
        identity = self._files_identity()
        if identity == self._identity:
            return False
        self._identity = identity  # a bad file is logged once per change
        try:
            context = server_context(self.config)
        except TlsConfigError as exc:
            log.error("%s; new connections keep the certificate read before", exc)
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificate %s read again: new connections use it", self.config.cert_file)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(TLS_POLL_INTERVAL_S)
            self.reload_if_changed()

    async def handshake(self, writer: asyncio.StreamWriter, timeout_s: float) -> tuple[str, str]:
        """Upgrade a new connection (accepted with reading paused, ``start_server``) to TLS
        within `timeout_s`. Returns ``("", "")`` when it speaks TLS now, else why not and a
        detail for the log: ``REFUSED_PLAINTEXT`` (reading resumed: the caller answers it in
        plaintext), ``REFUSED_NO_CERTIFICATE`` (mutual TLS; the caller tells it so over TLS),
        ``REFUSED_HANDSHAKE``, ``REFUSED_TIMEOUT``, or ``"closed"`` (it left first)."""
        transport = writer.transport
        try:
            async with asyncio.timeout(timeout_s):
                first = await _peek(transport.get_extra_info("socket"))
                if not first:
                    return "closed", ""
                if first[0] != TLS_HANDSHAKE_RECORD:
                    transport.resume_reading()
                    return REFUSED_PLAINTEXT, f"first byte 0x{first[0]:02x}, not a TLS handshake"
                await writer.start_tls(self.context, ssl_handshake_timeout=timeout_s)
            if self.config.client_ca_file and not writer.get_extra_info("peercert"):
                return REFUSED_NO_CERTIFICATE, "no client certificate (mutual TLS)"
        except TimeoutError:
            return REFUSED_TIMEOUT, f"no TLS handshake within {timeout_s:g} s"
        except ssl.SSLError as exc:
            return REFUSED_HANDSHAKE, exc.reason or str(exc)
        except (OSError, ConnectionError) as exc:
            return REFUSED_HANDSHAKE, str(exc) or type(exc).__name__
        return "", ""


def server_tls(config: TlsConfig) -> ServerTls | None:
    """The port's TLS, or None when `config` has none; files that cannot be used stop the
    node (or relay) before it serves: ``NodeCannotRun`` (invalid config)."""
    if not config.enabled:
        return None
    try:
        return ServerTls(config)
    except TlsConfigError as exc:
        raise NodeCannotRun(NodeExit.INVALID_CONFIG, str(exc)) from None


async def _peek(sock: object) -> bytes:
    """The first byte waiting on `sock` (a transport's socket, reading paused), left unread;
    b"" when the peer closed the connection."""
    loop = asyncio.get_running_loop()
    duplicate = sock.dup()  # its own descriptor: the loop watches it apart from the transport's
    ready = loop.create_future()
    try:
        loop.add_reader(duplicate.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(duplicate.fileno())
        try:
            return duplicate.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return await _peek(sock)
        except OSError:
            return b""
    finally:
        duplicate.close()


class _PausedStreamProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol whose transport reads nothing until told (``ServerTls.handshake``):
    the first bytes of a TLS connection must reach the TLS layer, not the stream."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()
        super().connection_made(transport)


async def start_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    *,
    limit: int,
    backlog: int,
    tls: ServerTls | None,
    reader: type[asyncio.StreamReader] = asyncio.StreamReader,
) -> asyncio.base_events.Server:
    """``asyncio.start_server`` (each connection's stream a `reader`); with `tls`, each
    connection starts with reading paused."""
    loop = asyncio.get_running_loop()
    stream_protocol = asyncio.StreamReaderProtocol if tls is None else _PausedStreamProtocol

    def protocol() -> asyncio.StreamReaderProtocol:
        return stream_protocol(reader(limit=limit, loop=loop), serve, loop=loop)

    return await loop.create_server(protocol, host, port, backlog=backlog)


__all__ = [
    "REFUSED_HANDSHAKE",
    "REFUSED_NO_CERTIFICATE",
    "REFUSED_PLAINTEXT",
    "REFUSED_TIMEOUT",
    "REFUSED_TLS_CLIENT",
    "TLS_REFUSALS",
    "ServerTls",
    "TlsConfigError",
    "certificate_name",
    "is_tls_hello",
    "node_client_tls",
    "server_context",
    "server_tls",
    "start_server",
]
