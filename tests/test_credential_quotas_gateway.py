"""A credential's quotas and its revocation at a client port, through real sockets and frames
(``cluster.credentials``, ``cluster.gateway``, ``cluster.tls``): a relay serving on loopback
with a credentials file (``test_tls.serving``; its gateway is the node's, and it serves hello,
status and subscriptions without a cluster). The rates need a leader:
``tests/test_credentials_cluster.py``.

The stories: a credential at its subscription bound gets ``Busy`` for one more and subscribes
again once one of its subscriptions ends; one at its connection bound gets ``Busy`` and is
closed, and gets in again once one of its connections closes; a new session over its session
bound is refused so, while another connection on a session it holds is not a new session;
other credentials are never held back, and every refusal is counted in the metrics. A client
offering only TLS 1.2 is refused the handshake; revoking the credential a client certificate
names closes that connection with ``Rejected`` and refuses its next hello.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_credentials import make_file
from test_tls import CONNECT_S, WAIT_S, client_options, pki, server_settings, serving, until  # noqa: F401

from raftseq.cluster.cli.command import main
from raftseq.cluster.config import BUSY_RETRY_AFTER_FULL_MS
from raftseq.cluster.credentials import Quotas
from raftseq.cluster.metrics import page_maker
from raftseq.cluster.quotas import LIMIT_CONNECTIONS, LIMIT_SESSIONS, LIMIT_SUBSCRIPTIONS, REFUSED_REVOKED
from raftseq.cluster.relay import Relay
from raftseq.cluster.tls import REFUSED_HANDSHAKE
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason


class Link:
    """A client connection speaking frames by hand: it sees what ``open_connection`` hides (a
    ``Busy`` answering a hello, then the close)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = protocol.FrameReader("node")
        self.buffered: list = []
        self.closed_by_node = False

    @classmethod
    async def open(cls, address: str, *, context: ssl.SSLContext | None = None) -> Link:
        host, port = address.rsplit(":", 1)
        options = {} if context is None else {"ssl": context, "server_hostname": host, "ssl_handshake_timeout": CONNECT_S}
        async with asyncio.timeout(CONNECT_S):
            reader, writer = await asyncio.open_connection(host, int(port), **options)
        return cls(reader, writer)

    def send(self, frame: object) -> None:
        self.writer.write(protocol.encode_frame(frame))

    async def next_frame(self) -> object | None:
        """The next frame (heartbeats skipped) within ``WAIT_S``; None once the node closed."""
        async with asyncio.timeout(WAIT_S):
            while True:
                while self.buffered:
                    frame = self.buffered.pop(0)
                    if not isinstance(frame, protocol.Heartbeat):
                        return frame
                if self.closed_by_node:
                    return None
                try:
                    data = await self.reader.read(65536)
                except (ConnectionResetError, ssl.SSLError):
                    data = b""
                if not data:
                    self.closed_by_node = True
                for frame in self.framer.feed(data):
                    assert not isinstance(frame, protocol.FrameError), frame
                    self.buffered.append(frame)

    async def hello(self, session: str, token: str = "") -> object:
        """Say hello; the first answer (``Welcome``, ``Busy``, ``Rejected``)."""
        self.send(protocol.Hello(session, token, protocol.PROTOCOL_VERSION))
        answer = await self.next_frame()
        assert answer is not None, "closed without answering the hello"
        return answer

    async def subscribe(self) -> list:
        """Subscribe from the first number; what the node answered before the ``Status`` asked
        right behind it (a connection's frames are handled in order: [] when it took it)."""
        self.send(protocol.Subscribe(1))
        self.send(protocol.StatusRequest())
        answers = []
        while not isinstance(frame := await self.next_frame(), protocol.Status):
            assert frame is not None, f"closed after {answers}"
            answers.append(frame)
        return answers

    async def frames_until_closed(self) -> list:
        frames = []
        while (frame := await self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.writer.close()


#: Bound on one story, in seconds.
STORY_S = 30.0


def play(story: Callable[[list[Link]], Awaitable[None]]) -> None:
    """Run `story` with a list it appends every ``Link`` it opens to, each closed at the end."""

    async def run() -> None:
        opened: list[Link] = []
        try:
            async with asyncio.timeout(STORY_S):
                await story(opened)
        finally:
            for link in opened:
                link.close()

    asyncio.run(run())


async def welcomed(relay: Relay, opened: list[Link], session: str, token: str) -> Link:
    link = await Link.open(relay.config.client_address)
    opened.append(link)
    answer = await link.hello(session, token)
    assert isinstance(answer, protocol.Welcome), answer
    return link


async def busy_and_closed(relay: Relay, opened: list[Link], session: str, token: str) -> protocol.Busy:
    """Say hello expecting ``Busy`` and the close: the ``Busy``."""
    link = await Link.open(relay.config.client_address)
    opened.append(link)
    answer = await link.hello(session, token)
    assert isinstance(answer, protocol.Busy), answer
    assert await link.frames_until_closed() == []
    return answer


async def close_and_wait(relay: Relay, link: Link, connections: int) -> None:
    """Close `link`, and wait for the node to see it: ``connections`` welcomed are left."""
    link.close()
    await until(lambda: relay.metrics.clients_connected == connections, f"{connections} connections left")


def refusals(relay: Relay) -> dict[tuple[str, str], float]:
    """``raftseq_relay_credential_refusals_total`` on the relay's metrics page, by (credential, limit)."""
    text = page_maker(relay.collector())().decode()
    return {
        (s.labels["credential"], s.labels["limit"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "raftseq_relay_credential_refusals_total"
    }


# --- quotas on what a credential holds --------------------------------------------------------------


def test_a_credential_at_its_subscription_bound_gets_busy_and_subscribes_again_once_one_ends(tmp_path):
    path = tmp_path / "credentials.json"
    tokens = make_file(
        path,
        ("feed", ["subscribe"], [], {"quotas": Quotas(subscriptions_max=2)}),
        ("neighbour", ["subscribe"], [], {"quotas": Quotas(subscriptions_max=2)}),
    )
    full = protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, LIMIT_SUBSCRIPTIONS)

    async def story(links: list[Link]) -> None:
        async with serving(tmp_path, tls=None, credentials_file=str(path)) as relay:
            first, second, third = [await welcomed(relay, links, f"feed-{i}", tokens["feed"]) for i in range(3)]
            assert await first.subscribe() == []
            assert await second.subscribe() == []
            assert await third.subscribe() == [full]
            assert await third.subscribe() == [full]  # refused, not closed: it may ask again
            for i in range(2):  # another credential counts its own
                assert await (await welcomed(relay, links, f"neighbour-{i}", tokens["neighbour"])).subscribe() == []
            await close_and_wait(relay, first, 4)  # a subscription ends with its connection
            assert await third.subscribe() == [], "refused after one of its subscriptions ended"
            found = refusals(relay)
            assert found[("feed", LIMIT_SUBSCRIPTIONS)] == 2, found
            assert ("neighbour", LIMIT_SUBSCRIPTIONS) not in found, found

    play(story)


def test_a_credential_at_its_connection_bound_gets_busy_and_is_closed_and_gets_in_once_one_closes(tmp_path):
    path = tmp_path / "credentials.json"
    tokens = make_file(
        path,
        ("pool", ["subscribe"], [], {"quotas": Quotas(connections_max=2)}),
        ("neighbour", ["subscribe"], [], {"quotas": Quotas(connections_max=2)}),
    )

    async def story(links: list[Link]) -> None:
        async with serving(tmp_path, tls=None, credentials_file=str(path)) as relay:
            first = await welcomed(relay, links, "pool-1", tokens["pool"])
            await welcomed(relay, links, "pool-2", tokens["pool"])
            busy = await busy_and_closed(relay, links, "pool-3", tokens["pool"])
            assert busy == protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, LIMIT_CONNECTIONS)
            await welcomed(relay, links, "neighbour-1", tokens["neighbour"])
            await welcomed(relay, links, "neighbour-2", tokens["neighbour"])
            await close_and_wait(relay, first, 3)
            await welcomed(relay, links, "pool-3", tokens["pool"])
            found = refusals(relay)
            assert found[("pool", LIMIT_CONNECTIONS)] == 1, found
            assert ("neighbour", LIMIT_CONNECTIONS) not in found, found

    play(story)


def test_a_new_session_over_the_session_bound_is_refused_while_a_held_one_takes_more_connections(tmp_path):
    path = tmp_path / "credentials.json"
    tokens = make_file(path, ("desk", ["submit", "subscribe"], ["desk-"], {"quotas": Quotas(sessions_max=1)}))

    async def story(links: list[Link]) -> None:
        async with serving(tmp_path, tls=None, credentials_file=str(path)) as relay:
            first = await welcomed(relay, links, "desk-1", tokens["desk"])
            second = await welcomed(relay, links, "desk-1", tokens["desk"])  # a session it holds: not a new one
            busy = await busy_and_closed(relay, links, "desk-2", tokens["desk"])
            assert busy == protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, LIMIT_SESSIONS)
            # desk-1 is held while any of its connections is open.
            await close_and_wait(relay, first, 1)
            await busy_and_closed(relay, links, "desk-2", tokens["desk"])
            await close_and_wait(relay, second, 0)
            await welcomed(relay, links, "desk-2", tokens["desk"])
            assert refusals(relay)[("desk", LIMIT_SESSIONS)] == 2

    play(story)


# --- TLS -----------------------------------------------------------------------------------------------


def tls_client_context(ca_file: str, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client context trusting `ca_file` that offers TLS 1.2 up to `maximum`."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = maximum
    return context


def test_a_client_offering_only_tls_1_2_is_refused_the_handshake(tmp_path, pki, caplog):  # noqa: F811 - the fixture
    async def story(links: list[Link]) -> None:
        async with serving(tmp_path, tls=server_settings(pki)) as relay:
            address = relay.config.client_address
            with caplog.at_level(logging.WARNING, logger="raftseq.gateway"):
                # The node closes without an alert (asyncio sends none): the client sees a reset.
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    links.append(await Link.open(address, context=tls_client_context(pki.ca.ca_file, ssl.TLSVersion.TLSv1_2)))
                await until(lambda: relay.metrics.tls_refusals[REFUSED_HANDSHAKE] == 1, "the node counts the handshake")
            assert [r.getMessage() for r in caplog.records if REFUSED_HANDSHAKE in r.getMessage()][0].endswith("UNSUPPORTED_PROTOCOL")
            # The same client offering TLS 1.3 too is welcomed over it.
            link = await Link.open(address, context=tls_client_context(pki.ca.ca_file, ssl.TLSVersion.TLSv1_3))
            links.append(link)
            assert link.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert isinstance(await link.hello("t-1"), protocol.Welcome)

    play(story)


def test_revoking_the_credential_a_client_certificate_names_closes_its_connection_and_refuses_its_hello(tmp_path, pki):  # noqa: F811
    path = tmp_path / "credentials.json"
    make_file(path, ("reader", ["subscribe"], ["r-"], {}), ("nobody", ["subscribe"], [], {}))
    reader = client_options(pki, (pki.reader.cert_file, pki.reader.key_file)).context()
    nobody = client_options(pki, (pki.nobody.cert_file, pki.nobody.key_file)).context()
    revoked_answer = protocol.Rejected(RejectReason.AUTH_FAILED, "credential 'reader' was revoked")

    async def story(links: list[Link]) -> None:
        async with serving(tmp_path, tls=server_settings(pki, mutual=True), credentials_file=str(path)) as relay:
            address = relay.config.client_address
            revoked = await Link.open(address, context=reader)
            other = await Link.open(address, context=nobody)
            links.extend((revoked, other))
            assert isinstance(await revoked.hello("r-1"), protocol.Welcome)  # no token: the certificate's CN
            assert isinstance(await other.hello("n-1"), protocol.Welcome)
            assert await revoked.subscribe() == []
            assert main(["cred", "revoke", str(path), "reader"]) == 0
            frames = await revoked.frames_until_closed()
            assert frames == [revoked_answer], frames
            assert await other.subscribe() == [], "another certificate's connection was touched"
            again = await Link.open(address, context=reader)
            links.append(again)
            assert await again.hello("r-2") == revoked_answer
            assert await again.frames_until_closed() == []
            assert refusals(relay)[("reader", REFUSED_REVOKED)] == 2

    play(story)
