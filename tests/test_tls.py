"""TLS on a client port (``cluster.tls``, ``clients.tls``), driven against a relay in this
process: its gateway is the node's, and it serves hello, status and refusals without a cluster
(its upstream is a closed port, so it follows nothing).

The stories: a TLS client is welcomed; a plaintext client on a TLS port and a TLS client on a
plaintext port each get a typed error naming the cause while the node logs one line, counts it
and keeps serving; certificates the other side does not trust fail as ``TlsHandshakeFailed``;
mutual TLS maps a client certificate's CN to a credential; a flood of half-open handshakes is
bounded by the gateway's limits for connections without a hello; a new certificate is served
to new connections without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import time
import tomllib
from collections.abc import AsyncIterator
from types import SimpleNamespace

import msgspec
import pytest
from test_credentials import make_file

from raftseq.clients.connection import open_connection
from raftseq.clients.errors import AuthenticationError
from raftseq.clients.tls import TlsHandshakeFailed, TlsNotOffered, TlsOptions, TlsRequired
from raftseq.cluster.certs import LOCAL_NAMES, CertificateAuthority
from raftseq.cluster.config import TLS_POLL_INTERVAL_S, ConfigError, TlsConfig, parse_config, to_toml
from raftseq.cluster.local import local_configs
from raftseq.cluster.node_exit import NodeCannotRun
from raftseq.cluster.relay import Relay
from raftseq.cluster.relay_config import relay_config
from raftseq.cluster.tls import (
    REFUSED_HANDSHAKE,
    REFUSED_NO_CERTIFICATE,
    REFUSED_PLAINTEXT,
    REFUSED_TIMEOUT,
    REFUSED_TLS_CLIENT,
    node_client_tls,
    server_tls,
)
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

#: Bound on every wait of these tests, in seconds.
WAIT_S = 10.0
CONNECT_S = 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA with a server certificate (localhost, 127.0.0.1) and client certificates named
    ``reader`` and ``nobody``; another CA with a ``reader`` certificate of its own."""
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(str(root / "ca"))
    other = CertificateAuthority(str(root / "other"), name="another CA")
    return SimpleNamespace(
        ca=ca,
        server=ca.issue("server", "raftseq-node", names=LOCAL_NAMES),
        reader=ca.issue("reader", "reader", server=False),
        nobody=ca.issue("nobody", "nobody", server=False),
        stranger=other.issue("stranger", "reader", server=False),
        other_server=other.issue("server", "raftseq-node", names=LOCAL_NAMES),
        other_ca=other,
    )


def server_settings(pki, *, mutual: bool = False) -> dict:
    settings = {"cert_file": pki.server.cert_file, "key_file": pki.server.key_file}
    if mutual:
        settings["client_ca_file"] = pki.ca.ca_file
    return settings


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.asynccontextmanager
async def serving(tmp_path, *, tls: dict | None, credentials_file: str = "", gateway: dict | None = None) -> AsyncIterator[Relay]:
    """A relay serving on loopback with `tls` (``[tls]`` settings; None: plaintext). Its
    upstream is a port that accepts and never answers: the relay follows nothing. (Not a closed
    port: a refusal at the moment the relay is stopped can lose the cancel in Python 3.11's
    ``asyncio.wait_for``, and the relay's follower then never ends.)"""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    config = relay_config(
        data_dir=str(tmp_path / "relay"),
        upstream=["127.0.0.1:%d" % silent.getsockname()[1]],
        listen=free_address(),
        relay_id="relay-tls",
        insecure=True,
        tls=tls,
        gateway=gateway,
    )
    if credentials_file:
        config = msgspec.structs.replace(config, credentials_file=credentials_file)
    relay = Relay(config)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async with asyncio.timeout(WAIT_S):
            while relay.gateway is None or relay.gateway._server is None:
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
        yield relay
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, WAIT_S)
        finally:
            silent.close()


async def hello(address: str, *, tls=None, token: str = "", session: str = "t-1"):
    return await open_connection(address, session=session, token=token, timeout_s=CONNECT_S, tls=tls)


def client_options(pki, pair=None, **options) -> TlsOptions:
    cert, key = pair if pair is not None else ("", "")
    return TlsOptions(ca_file=pki.ca.ca_file, cert_file=cert, key_file=key, **options)


async def until(condition, what: str) -> None:
    """Wait (at most ``WAIT_S``) for `condition()` to hold: a state the node reaches on its own."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.02)


def peer_common_name(link) -> str:
    subject = link.writer.get_extra_info("peercert")["subject"]
    return dict(rdn[0] for rdn in subject)["commonName"]


# --- a TLS client, and the two mismatches ---------------------------------------------------------


def test_a_tls_client_is_welcomed_over_tls_1_3_and_asks_for_status(tmp_path, pki):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki)) as relay:
            address = relay.config.client_address
            link = await hello(address, tls=client_options(pki))
            try:
                assert link.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
                assert link.welcome.node_id == "relay-tls"
                status = await link.status(CONNECT_S)
                assert status.node_id == "relay-tls"
            finally:
                link.close()
            assert sum(relay.metrics.tls_refusals.values()) == 0

    asyncio.run(run())


def test_a_plaintext_client_on_a_tls_port_is_told_so_and_the_node_counts_it_and_serves_on(tmp_path, pki, caplog):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki)) as relay:
            address = relay.config.client_address
            with caplog.at_level(logging.WARNING, logger="raftseq.gateway"):
                with pytest.raises(TlsRequired, match="speaks TLS"):
                    await hello(address)
            assert relay.metrics.tls_refusals[REFUSED_PLAINTEXT] == 1
            lines = [r.getMessage() for r in caplog.records if REFUSED_PLAINTEXT in r.getMessage()]
            assert len(lines) == 1, lines
            link = await hello(address, tls=client_options(pki))  # the node serves on
            link.close()

    asyncio.run(run())


def test_a_tls_client_on_a_plaintext_port_gets_tls_not_offered_and_the_node_counts_it(tmp_path, pki, caplog):
    async def run() -> None:
        async with serving(tmp_path, tls=None) as relay:
            address = relay.config.client_address
            with caplog.at_level(logging.WARNING, logger="raftseq.gateway"):
                with pytest.raises(TlsNotOffered, match="does not speak TLS"):
                    await hello(address, tls=client_options(pki))
            await until(lambda: relay.metrics.tls_refusals[REFUSED_TLS_CLIENT] == 1, "the node counts the TLS client")
            assert len([r for r in caplog.records if REFUSED_TLS_CLIENT in r.getMessage()]) == 1
            link = await hello(address)  # plaintext clients are served as ever
            link.close()

    asyncio.run(run())


def test_garbage_inside_an_established_tls_connection_closes_it_quietly_and_the_node_serves_on(tmp_path, pki, caplog):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki)) as relay:
            host, port = relay.config.client_address.split(":")
            context = client_options(pki).context()

            def send_garbage_after_the_handshake() -> bytes:
                with socket.create_connection((host, int(port)), timeout=CONNECT_S) as raw:
                    with context.wrap_socket(raw, server_hostname=host) as secured:
                        os.write(secured.fileno(), b"\x17\x03\x03\x00\x10" + b"\x00" * 16)  # a record no key made
                        try:
                            return secured.recv(100)
                        except (ssl.SSLError, OSError):
                            return b""

            with caplog.at_level(logging.INFO, logger="raftseq.gateway"):
                assert await asyncio.to_thread(send_garbage_after_the_handshake) == b""
                await until(lambda: relay.metrics.clients_awaiting_hello == 0, "the connection is gone")
            assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's bad record"
            link = await hello(relay.config.client_address, tls=client_options(pki))
            link.close()

    asyncio.run(run())


# --- certificates either side refuses ---------------------------------------------------------------


def test_a_server_certificate_from_another_ca_or_for_another_name_fails_the_handshake(tmp_path, pki):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki)) as relay:
            address = relay.config.client_address
            with pytest.raises(TlsHandshakeFailed, match="certificate was not accepted"):
                await hello(address, tls=TlsOptions(ca_file=pki.other_ca.ca_file))
            with pytest.raises(TlsHandshakeFailed, match="certificate was not accepted"):
                await hello(address, tls=client_options(pki, server_hostname="sequencer.example"))
            await until(lambda: relay.metrics.tls_refusals[REFUSED_HANDSHAKE] == 2, "the node counts both handshakes")

    asyncio.run(run())


def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_one_of_another_ca(tmp_path, pki):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki, mutual=True)) as relay:
            address = relay.config.client_address
            with pytest.raises(TlsHandshakeFailed, match="requires a client certificate"):
                await hello(address, tls=client_options(pki))
            assert relay.metrics.tls_refusals[REFUSED_NO_CERTIFICATE] == 1
            # Refused in the handshake: the node closes without an alert (asyncio sends none),
            # so the client can only say what it may mean; it tries again like after any close.
            with pytest.raises(ConnectionError, match="perhaps it refused this client's certificate"):
                await hello(address, tls=client_options(pki, pki.stranger))
            await until(lambda: relay.metrics.tls_refusals[REFUSED_HANDSHAKE] == 1, "the node counts the handshake")
            link = await hello(address, tls=client_options(pki, pki.reader))
            link.close()

    asyncio.run(run())


def test_a_client_certificate_names_its_credential_whose_roles_and_prefixes_apply(tmp_path, pki):
    path = tmp_path / "credentials.json"
    tokens = make_file(path, ("reader", ["subscribe"], ["r-"], {}))

    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki, mutual=True), credentials_file=str(path)) as relay:
            address = relay.config.client_address
            reader = client_options(pki, pki.reader)
            link = await hello(address, tls=reader, session="r-1")  # no token: the certificate's CN
            try:
                link.send(protocol.Submit(1, b"x"))
                frames = await link.receive(CONNECT_S)
                assert [(f.reason, f.detail) for f in frames] == [
                    (RejectReason.AUTH_FAILED, "credential 'reader' has no submit role (roles: subscribe)")
                ]
            finally:
                link.close()
            with pytest.raises(AuthenticationError, match="may not use session 'w-1'"):
                await hello(address, tls=reader, session="w-1")
            with pytest.raises(AuthenticationError, match="names credential 'nobody', which the credentials file does not hold"):
                await hello(address, tls=client_options(pki, pki.nobody), session="r-2")
            # A token, when given, is what authenticates (the certificate let the connection in).
            link = await hello(address, tls=client_options(pki, pki.nobody), token=tokens["reader"], session="r-3")
            link.close()

    asyncio.run(run())


def test_without_a_credentials_file_a_verified_client_certificate_is_trusted_as_the_shared_token(tmp_path, pki):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki, mutual=True)) as relay:
            link = await hello(relay.config.client_address, tls=client_options(pki, pki.nobody), session="any")
            assert link.welcome.node_id == "relay-tls"
            link.close()

    asyncio.run(run())


# --- half-open handshakes are bounded by the gateway's limits for connections without a hello -----


def test_a_flood_of_half_open_handshakes_is_pushed_out_and_timed_out_and_a_client_still_gets_in(tmp_path, pki):
    preauth_max, hello_timeout_ms = 4, 600

    async def run() -> None:
        gateway = {"preauth_connections_max": preauth_max, "hello_timeout_ms": hello_timeout_ms}
        async with serving(tmp_path, tls=server_settings(pki), gateway=gateway) as relay:
            host, port = relay.config.client_address.split(":")
            flood = []
            for _ in range(3 * preauth_max):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
                flood.append((reader, writer))
            await until(lambda: relay.metrics.clients_awaiting_hello <= preauth_max, "the table holds its bound")
            link = await hello(relay.config.client_address, tls=client_options(pki))
            link.close()
            # Every half-open handshake ends: pushed out at once, or at the hello timeout.
            async with asyncio.timeout(WAIT_S):
                for reader, writer in flood:
                    assert await reader.read() == b""  # closed by the node, nothing written in plaintext
                    writer.close()
            assert relay.metrics.clients_awaiting_hello == 0
            assert relay.metrics.tls_refusals[REFUSED_TIMEOUT] >= 1
            assert relay.metrics.tls_refusals[REFUSED_TIMEOUT] <= preauth_max

    asyncio.run(run())


def test_a_silent_connection_on_a_tls_port_is_closed_at_the_hello_timeout(tmp_path, pki):
    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki), gateway={"hello_timeout_ms": 300}) as relay:
            host, port = relay.config.client_address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
            assert time.monotonic() - started < 3
            writer.close()
            assert relay.metrics.tls_refusals[REFUSED_TIMEOUT] == 1

    asyncio.run(run())


def test_a_node_reaches_its_peers_mutual_tls_ports_with_its_own_certificate(tmp_path, pki):
    """Catch-up, retention's peer status and a relay's upstream connect with ``node_client_tls``."""
    node = TlsConfig(cert_file=pki.server.cert_file, key_file=pki.server.key_file, client_ca_file=pki.ca.ca_file, ca_file=pki.ca.ca_file)
    assert node_client_tls(node) == TlsOptions(pki.ca.ca_file, pki.server.cert_file, pki.server.key_file)
    assert node_client_tls(TlsConfig(ca_file=pki.ca.ca_file)) == TlsOptions(pki.ca.ca_file)  # a plaintext relay of a TLS cluster
    assert node_client_tls(TlsConfig()) is None

    async def run() -> None:
        async with serving(tmp_path, tls=server_settings(pki, mutual=True)) as relay:
            link = await hello(relay.config.client_address, tls=node_client_tls(node), session="catchup.n2")
            link.close()

    asyncio.run(run())


# --- certificates reload without a restart ----------------------------------------------------------


def test_a_new_certificate_serves_new_connections_while_open_ones_keep_theirs(tmp_path, pki):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "cert.pem"), str(live / "key.pem")
    shutil.copy(pki.server.cert_file, cert)
    shutil.copy(pki.server.key_file, key)
    renewed = pki.ca.issue("renewed", "raftseq-node-renewed", names=LOCAL_NAMES)

    async def run() -> None:
        async with serving(tmp_path, tls={"cert_file": cert, "key_file": key}) as relay:
            address = relay.config.client_address
            before = await hello(address, tls=client_options(pki))
            assert peer_common_name(before) == "raftseq-node"
            # Replaced as an operator would: each file renamed over the old one.
            for source, target in ((renewed.key_file, key), (renewed.cert_file, cert)):
                shutil.copy(source, target + ".new")
                os.replace(target + ".new", target)
            await until(lambda: relay.gateway.tls.reloads == 1, f"the files are read again within {TLS_POLL_INTERVAL_S} s")
            after = await hello(address, tls=client_options(pki))
            assert peer_common_name(after) == "raftseq-node-renewed"
            assert (await before.status(CONNECT_S)).node_id == "relay-tls"  # the open one goes on
            before.close()
            after.close()

    asyncio.run(run())


def test_a_bad_certificate_file_on_reload_keeps_the_one_read_before(tmp_path, pki, caplog):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "cert.pem"), str(live / "key.pem")
    shutil.copy(pki.server.cert_file, cert)
    shutil.copy(pki.server.key_file, key)
    tls = server_tls(TlsConfig(cert_file=cert, key_file=key))
    context = tls.context
    with open(cert, "w") as f:
        f.write("not a certificate\n")
    with caplog.at_level(logging.ERROR, logger="raftseq.tls"):
        assert tls.reload_if_changed() is False
    assert tls.context is context
    assert "keep the certificate read before" in caplog.text


# --- configuration -----------------------------------------------------------------------------------


def test_tls_settings_are_checked_with_clear_errors(tmp_path, pki):
    missing = str(tmp_path / "missing.pem")
    assert TlsConfig().problems() == []
    assert TlsConfig(cert_file=pki.server.cert_file).problems() == ["tls.key_file is required with tls.cert_file"]
    assert TlsConfig(client_ca_file=pki.ca.ca_file).problems() == [
        "tls.cert_file is required when tls.key_file or tls.client_ca_file is set"
    ]
    assert TlsConfig(cert_file=pki.server.cert_file, key_file=missing).problems() == [f"tls.key_file {missing}: no such file"]
    with pytest.raises(ConfigError, match="tls.key_file .*: no such file"):
        parse_config(
            {
                "id": "n1",
                "data_dir": str(tmp_path / "n1"),
                "raft_address": "127.0.0.1:1",
                "client_address": "127.0.0.1:2",
                "peers": [],
                "insecure": True,
                "tls": {"cert_file": pki.server.cert_file, "key_file": missing},
            }
        )
    # A key that is not the certificate's stops the node before it serves (invalid config).
    with pytest.raises(NodeCannotRun, match="tls.cert_file .* with tls.key_file"):
        server_tls(TlsConfig(cert_file=pki.server.cert_file, key_file=pki.reader.key_file))


def test_a_config_without_tls_is_written_without_a_tls_table_so_the_release_before_reads_it(tmp_path, pki):
    [config, *_] = local_configs(str(tmp_path), 30000, insecure=True)
    assert "[tls]" not in to_toml(config)
    with_tls = msgspec.structs.replace(config, tls=TlsConfig(cert_file=pki.server.cert_file, key_file=pki.server.key_file))
    written = to_toml(with_tls)
    assert "[tls]" in written
    assert parse_config({**tomllib.loads(written), "insecure": True}).tls == with_tls.tls


def test_the_client_offers_tls_1_3_only_and_builds_a_context_again_only_when_its_files_change(tmp_path, pki):
    context = client_options(pki).context()
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    cert, key = str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem")
    shutil.copy(pki.reader.cert_file, cert)
    shutil.copy(pki.reader.key_file, key)
    options = client_options(pki, (cert, key))
    first = options.context()
    assert options.context() is first
    renewed = pki.ca.issue("reader-renewed", "reader", server=False)
    for source, target in ((renewed.cert_file, cert), (renewed.key_file, key)):
        shutil.copy(source, target + ".new")
        os.replace(target + ".new", target)
    assert options.context() is not first
