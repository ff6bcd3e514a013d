"""A priority connection's bytes are read between the loop's handles (``cluster.priority_reads``).

On a saturated leader a loop turn is several ms of Raft ticks and bulk reads; an admin frame
arriving meanwhile waited for the turn to end (send -> gateway read 5.5 ms mean under 170k bulk
msg/s, ``bench_priority --stages``; 0.95 ms once read between handles). Here with real loopback
sockets: bytes on a watched socket reach its protocol inside ``take``, within the callback that
calls it, never those of the transport the caller is reading, of a paused transport, or of one
no longer watched; and the gateway watches exactly the connections whose credential has
``priority``, following the credentials file.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl

import msgspec
from test_credentials import make_file
from test_gateway_io import RecordingNode

from raftseq.cluster.certs import LOCAL_NAMES, CertificateAuthority
from raftseq.cluster.credentials import read_credentials, write_credentials
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.metrics import NodeMetrics
from raftseq.cluster.priority_reads import PriorityReads
from raftseq.sequencer import protocol

WAIT_S = 10.0


class Recorded(asyncio.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def wait_readable(sock: socket.socket) -> None:
    """Until the kernel has bytes for `sock` (the loop is not run meanwhile)."""
    readable, _, _ = select.select([sock], [], [], WAIT_S)
    assert readable, "the bytes sent never arrived"


async def tls_pair(tmp_path) -> tuple[asyncio.StreamWriter, asyncio.Transport, Recorded, asyncio.Server]:
    """A TLS client (a stream writer) and the transport and protocol of its other end."""
    ca = CertificateAuthority(str(tmp_path / "ca"))
    server_pair = ca.issue("server", "raftseq-node", names=LOCAL_NAMES)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_pair.cert_file, server_pair.key_file)
    client_context = ssl.create_default_context(cafile=ca.ca_file)
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    protocol_ = Recorded()

    def made() -> Recorded:
        accepted.set_result(None)
        return protocol_

    server = await asyncio.get_running_loop().create_server(made, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="localhost")
    await asyncio.wait_for(accepted, WAIT_S)
    while protocol_.transport is None:  # connection_made comes after the handshake
        await asyncio.sleep(0)
    return writer, protocol_.transport, protocol_, server


async def connected_pair() -> tuple[socket.socket, asyncio.Transport, Recorded]:
    """A client socket, and the transport and protocol of its other end on the running loop."""
    client, server = socket.socketpair()
    protocol_ = Recorded()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol_, server)
    return client, transport, protocol_


def test_bytes_on_a_watched_socket_reach_its_protocol_inside_take():
    async def story() -> None:
        reads = PriorityReads()
        a, a_transport, a_got = await connected_pair()
        b, b_transport, b_got = await connected_pair()
        try:
            assert reads.watch(a_transport) and reads.watch(b_transport) and len(reads) == 2
            reads.take()
            assert a_got.received == [] and reads.reads_taken == 0, "read with nothing sent"
            # All within one callback: the loop never runs between the sends and the checks.
            a.sendall(b"admin 1")
            wait_readable(a_transport.get_extra_info("socket"))
            reads.take()
            assert a_got.received == [b"admin 1"] and reads.reads_taken == 1
            # The transport whose read the caller is handling is never read inside it.
            a.sendall(b"admin 2")
            b.sendall(b"other")
            wait_readable(a_transport.get_extra_info("socket"))
            wait_readable(b_transport.get_extra_info("socket"))
            reads.take(reading=a_transport)
            assert a_got.received == [b"admin 1"] and b_got.received == [b"other"]
            # A paused transport is left to the loop, which reads it once resumed.
            a_transport.pause_reading()
            reads.take()
            assert a_got.received == [b"admin 1"]
            a_transport.resume_reading()
            reads.take()
            assert a_got.received == [b"admin 1", b"admin 2"]
            # The loop's own read of a socket drained here finds nothing: nothing twice.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert a_got.received == [b"admin 1", b"admin 2"] and b_got.received == [b"other"]
            # No longer watched: the loop's turn reads it, as any socket.
            reads.unwatch(a_transport)
            a.sendall(b"bulk now")
            wait_readable(a_transport.get_extra_info("socket"))
            reads.take()
            assert a_got.received == [b"admin 1", b"admin 2"] and len(reads) == 1
            while len(a_got.received) < 3:
                await asyncio.sleep(0)
            assert a_got.received[2] == b"bulk now"
        finally:
            for sock, transport in ((a, a_transport), (b, b_transport)):
                transport.close()
                sock.close()
            await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


def test_under_tls_the_socket_beneath_the_tls_layer_is_read_and_decrypted_inside_take(tmp_path):
    async def story() -> None:
        writer, transport, got, server = await tls_pair(tmp_path)
        reads = PriorityReads()
        try:
            assert reads.watch(transport)
            writer.write(b"admin over tls")
            await writer.drain()
            # No turn of the loop from here to the check: only ``take`` can read it.
            wait_readable(transport.get_extra_info("socket"))
            reads.take()
            assert got.received == [b"admin over tls"] and reads.reads_taken == 1
        finally:
            writer.close()
            transport.close()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


def test_a_closed_sockets_number_taken_by_a_new_socket_reads_the_new_one():
    """A socket's number is reused once it is closed: the new socket is watched (and read)
    in its place, never the transport that is gone; a transport closing is dropped."""

    async def story() -> None:
        reads = PriorityReads()
        old, old_transport, old_got = await connected_pair()
        assert reads.watch(old_transport)
        number = old_transport.get_extra_info("socket").fileno()
        old_transport.close()
        old.close()
        await asyncio.sleep(0)  # the transport's socket is closed on the loop's next turn
        await asyncio.sleep(0)
        new, new_transport, new_got = await connected_pair()
        try:
            if new_transport.get_extra_info("socket").fileno() == number:
                assert reads.watch(new_transport)
                assert len(reads) == 1, "the closed transport is still watched"
            else:  # the number went elsewhere: the closing transport is dropped at the next take
                assert reads.watch(new_transport)
                reads.take()
                assert len(reads) == 1, "the closed transport is still watched"
            new.sendall(b"admin")
            wait_readable(new_transport.get_extra_info("socket"))
            reads.take()
            assert new_got.received == [b"admin"] and old_got.received == []
        finally:
            new_transport.close()
            new.close()
            await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


class HelloNode(RecordingNode):
    """What the gateway asks of its node for a hello and a status request."""

    role = protocol.Role.LEADER

    def leader_client_address(self) -> str:
        return ""

    def last_client_seq(self, session: str) -> int:
        return 0


def test_the_gateway_reads_the_connections_of_priority_credentials_between_handles(tmp_path):
    """Watched from the hello on while the credential has priority (the credentials file is
    followed: priority taken away, the connection is read on the loop's turns again); the
    status request of a watched connection is handled inside ``take``."""
    path = tmp_path / "credentials.json"
    tokens = make_file(path, ("admin", ["submit", "admin"], [], {"priority": True}), ("bulk", ["submit"], [], {}))
    config = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides={"credentials_file": str(path)})[0]
    status = protocol.encode_frame(protocol.StatusRequest())

    async def story() -> None:
        node = HelloNode()
        gateway = Gateway(config, node, batcher=None, journal=None, publication=None, metrics=NodeMetrics())
        await gateway.start()
        clients = []
        try:
            host, port = config.client_address.rsplit(":", 1)
            for name in ("admin", "bulk"):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(protocol.encode_frame(protocol.Hello(f"{name}-1", tokens[name], protocol.PROTOCOL_VERSION)))
                framer = protocol.FrameReader("node")
                welcome = None
                while welcome is None:
                    frames = framer.feed(await asyncio.wait_for(reader.read(65536), WAIT_S))
                    welcome = next((f for f in frames if isinstance(f, protocol.Welcome)), None)
                clients.append((reader, writer))
            assert len(gateway.priority_reads) == 1, "only the priority credential's connection is watched"
            admin_conn = next(c for c in gateway.connections if c.session == "admin-1")
            bulk_conn = next(c for c in gateway.connections if c.session == "bulk-1")
            for _, writer in clients:
                writer.write(status)
                await writer.drain()
            # No turn of the loop from here to the checks: only ``take`` can read them.
            wait_readable(admin_conn.writer.transport.get_extra_info("socket"))
            wait_readable(bulk_conn.writer.transport.get_extra_info("socket"))
            gateway.priority_reads.take()
            assert node.asked == ["status"], "the priority connection's request was not handled inside take"
            await asyncio.wait_for(wait_asked(node, 2), WAIT_S)
            # Priority taken away (the file is read again): the connection is no longer watched.
            credentials = read_credentials(str(path))
            credentials["admin"] = msgspec.structs.replace(credentials["admin"], priority=False)
            write_credentials(str(path), list(credentials.values()))
            gateway._credentials_changed(gateway.access.reload_if_changed())
            assert len(gateway.priority_reads) == 0
            admin_conn.close()
            assert len(gateway.priority_reads) == 0
        finally:
            for _, writer in clients:
                writer.close()
            await gateway.stop()

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


async def wait_asked(node: RecordingNode, count: int) -> None:
    while len(node.asked) < count:
        await asyncio.sleep(0)
