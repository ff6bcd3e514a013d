"""The Raft links' guard (``cluster.raft.link_guard``, ``cluster.raft.safe_pickle``).

One loop-driven ``RaftMember`` runs in this process on a loopback port; the tests speak to its
Raft port as a stranger and as a peer holding the password (the link cipher and pysyncobj's
random-key handshake): a huge length prefix drops the link at once, strangers are bounded in
count and time, a malicious pickle runs nothing, and the listener survives EMFILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
import resource
import socket
import struct
import sys
import time

import pysyncobj.pickle
import pytest
from pysyncobj import SyncObjConf, replicated

from raftseq.cluster import raft
from raftseq.cluster.config import RAFT_LINK_STRANGER_DEADLINE_S, RAFT_LINK_STRANGERS_MAX
from raftseq.cluster.raft import RaftMember, link_guard
from raftseq.cluster.raft.link_cipher import LinkCipher, LinkHandshake, LinkPassword, NodeIdentity, new_node_key

PASSWORD = "correct horse battery staple, link guard"
WAIT_S = 10.0  # upper bound on waiting for something that should happen within a second
PREFIX = struct.Struct("i")


@pytest.fixture(autouse=True)
def installed() -> None:
    raft.install()


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def run(story) -> None:
    asyncio.run(asyncio.wait_for(story(), 60))


@contextlib.asynccontextmanager
async def lone_member(password: str | None = PASSWORD, *, address: str = "", peer: str = ""):
    """A loop-driven member (with the password), its one peer never started."""
    address = address or free_address()
    conf = SyncObjConf(password=password, bindAddress=address, dynamicMembershipChange=False, connectionTimeout=60.0)
    member = RaftMember(address, [peer or free_address()], conf, loop=asyncio.get_running_loop())
    try:
        yield member, address
    finally:
        member.destroy()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = WAIT_S) -> bool:
    """Whether the other side closes (or resets) the connection within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


class Peer:
    """A client of the Raft port holding the password: pysyncobj's handshake by hand (with
    `identity`, the handshake of node keys, link version 4)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: NodeIdentity | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.cipher = LinkCipher(LinkPassword(PASSWORD, b"", identity))
        self.identity = identity
        self.node_key = b""

    def send_pickle(self, data: bytes) -> None:
        frame = self.cipher.encrypt_at_time(data, int(time.monotonic()))
        self.writer.write(PREFIX.pack(len(frame)) + frame)

    async def receive(self) -> object:
        (length,) = PREFIX.unpack(await self.reader.readexactly(PREFIX.size))
        return pickle.loads(self.cipher.decrypt(await self.reader.readexactly(length)))

    async def handshake(self) -> None:
        """pysyncobj's key exchange under the cluster key; after it, this peer speaks under
        the link's own key (``LinkCipher.for_link``), as a member does."""
        my_key = os.urandom(32)
        self.send_pickle(pickle.dumps(my_key, 5))
        echoed, self.node_key = await asyncio.wait_for(self.receive(), WAIT_S)
        assert echoed == my_key
        self.cipher = self.cipher.for_link(my_key, self.node_key)

    async def signed_handshake(self, member: str) -> LinkHandshake:
        """The handshake of node keys with `member` (whose answer must carry its signature),
        up to the claim, which the caller sends (``LinkHandshake.claim``, or anything else)."""
        assert self.identity is not None
        handshake = LinkHandshake(self.identity, peer=member)
        self.send_pickle(pickle.dumps(handshake.key, 5))
        echoed, answer = await asyncio.wait_for(self.receive(), WAIT_S)
        assert echoed == handshake.key
        self.node_key = handshake.take_answer(answer)
        self.cipher = self.cipher.for_link(handshake.key, self.node_key, handshake.shared)
        return handshake

    def send_wrapped(self, message: object) -> None:
        self.send_pickle(pickle.dumps((self.node_key, message), 5))


def keys_of(addresses: list[str]) -> dict[str, tuple[bytes, bytes]]:
    """A node key (seed, public key) per address."""
    return {address: new_node_key() for address in addresses}


def identity_of(address: str, keys: dict[str, tuple[bytes, bytes]], seed: bytes | None = None) -> NodeIdentity:
    """`address`'s identity among the members of `keys` (with another `seed`: an impostor's,
    whose public key it claims is the member's own)."""
    members = {member: public for member, (_, public) in keys.items()}
    if seed is not None:
        members[address] = NodeIdentity(address, seed, {}).public_key
    return NodeIdentity(address, seed or keys[address][0], members)


class RunsCommand:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_huge_length_prefix_from_a_stranger_drops_the_link_at_once():
    async def story():
        async with lone_member() as (member, address):
            reader, writer = await connect(address)
            writer.write(PREFIX.pack(2**31 - 1) + b"\0" * 65536)
            started = time.monotonic()
            assert await closed_by_peer(reader), "the link stays open, buffering the frame"
            print(f"link dropped {1e3 * (time.monotonic() - started):.1f} ms after the prefix")
            assert member.counters().get("link_frames_refused", 0) == 1
            writer.close()

    run(story)


def test_an_authenticated_link_is_refused_a_frame_over_the_maximum():
    async def story():
        async with lone_member() as (member, address):
            peer = Peer(*await connect(address))
            await peer.handshake()
            limit = member._link_guard.limits.frame_bytes_max
            peer.writer.write(PREFIX.pack(limit + 1) + b"\0" * 4096)
            assert await closed_by_peer(peer.reader)
            assert member.counters().get("link_frames_refused", 0) == 1
            peer.writer.close()

    run(story)


def test_strangers_are_bounded_in_count_and_time():
    async def story():
        async with lone_member() as (member, address):
            extra = 4
            links = [await connect(address) for _ in range(RAFT_LINK_STRANGERS_MAX + extra)]
            try:
                # The oldest ones go at once (the newest are kept) ...
                for reader, _ in links[:extra]:
                    assert await closed_by_peer(reader, timeout_s=RAFT_LINK_STRANGER_DEADLINE_S / 2)
                # ... and the others at their deadline.
                started = time.monotonic()
                for reader, _ in links[extra:]:
                    assert await closed_by_peer(reader, timeout_s=RAFT_LINK_STRANGER_DEADLINE_S + WAIT_S)
                print(f"the last strangers dropped {time.monotonic() - started:.2f} s later")
                assert member.counters().get("link_strangers_dropped", 0) == len(links)
            finally:
                for _, writer in links:
                    writer.close()

    run(story)


def test_a_malicious_pickle_through_an_authenticated_link_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    async def story():
        async with lone_member() as (member, address):
            refused_before = member.counters().get("link_pickles_refused", 0)
            peer = Peer(*await connect(address))
            await peer.handshake()
            peer.send_pickle(pickle.dumps((peer.node_key, RunsCommand(f"touch {marker}")), 5))
            assert await closed_by_peer(peer.reader), "the link took the message"
            assert not marker.exists(), "a peer's pickle ran a command"
            assert member.counters().get("link_pickles_refused", 0) == refused_before + 1
            # The member goes on: a new peer completes the handshake.
            second = Peer(*await connect(address))
            await second.handshake()
            for writer in (peer.writer, second.writer):
                writer.close()

    run(story)
    assert not marker.exists()


def test_after_the_key_exchange_a_message_under_the_cluster_key_drops_the_link():
    """Each link has a key of its own from the two random keys its ends exchanged: the cluster
    key encrypts nothing after them, so a message captured on one link (or made by a holder of
    the password who did not take part in the exchange) is refused on another."""

    async def story():
        async with lone_member() as (member, address):
            peer = Peer(*await connect(address))
            cluster_key = LinkCipher(PASSWORD)
            await peer.handshake()
            frame = cluster_key.encrypt_at_time(pickle.dumps((peer.node_key, "readonly"), 5), 0)
            peer.writer.write(PREFIX.pack(len(frame)) + frame)
            assert await closed_by_peer(peer.reader), "a message under the cluster key was taken after the key exchange"
            # Under the link's key the same message is taken (the link stays open).
            second = Peer(*await connect(address))
            await second.handshake()
            second.send_pickle(pickle.dumps((second.node_key, "readonly"), 5))
            assert not await closed_by_peer(second.reader, timeout_s=1.0), "the link's own key was refused"
            for writer in (peer.writer, second.writer):
                writer.close()

    run(story)


def test_a_replayed_link_message_drops_the_link():
    """Each message on a link must come after the last one: the same encrypted frame sent
    twice (a replay) used to be taken twice when both fell in the same second."""

    async def story():
        async with lone_member() as (member, address):
            peer = Peer(*await connect(address))
            await peer.handshake()
            peer.send_pickle(pickle.dumps((peer.node_key, "readonly"), 5))
            message = pickle.dumps((peer.node_key, {"type": "request_vote", "term": 1, "last_log_index": 0, "last_log_term": 0}), 5)
            frame = peer.cipher.encrypt_at_time(message, int(time.monotonic()))
            peer.writer.write(PREFIX.pack(len(frame)) + frame)
            refused = member.counters()["raftseq_peer_messages_refused"]
            deadline = time.monotonic() + WAIT_S
            while member.counters()["raftseq_peer_messages_refused"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert member.counters()["raftseq_peer_messages_refused"] == 1, "the first message was not taken"
            peer.writer.write(PREFIX.pack(len(frame)) + frame)
            assert await closed_by_peer(peer.reader), "the replayed message was taken"
            assert member.counters()["raftseq_peer_messages_refused"] == 1, refused
            peer.writer.close()

    run(story)


@pytest.mark.parametrize("claim", ["a member this node connects to", "an unhashable value"])
def test_a_link_that_claims_what_no_member_would_is_dropped(claim):
    """pysyncobj links two members over the connection the greater address opens: a link that
    claims a member with a smaller address than this node's is not that member. One that claims
    a dict broke pysyncobj's table lookup (a traceback on every such link)."""

    async def story():
        # This node has the greatest address: it connects to both others, which never connect here.
        *others, address = sorted(free_address() for _ in range(3))
        conf = SyncObjConf(password=PASSWORD, bindAddress=address, dynamicMembershipChange=False, connectionTimeout=60.0)
        member = RaftMember(address, others, conf, loop=asyncio.get_running_loop())
        try:
            identity: object = others[0] if claim == "a member this node connects to" else {"not": "an address"}
            peer = Peer(*await connect(address))
            await peer.handshake()
            peer.send_pickle(pickle.dumps((peer.node_key, identity), 5))
            assert await closed_by_peer(peer.reader), f"the link that claimed {identity!r} stays open"
            peer.writer.close()
        finally:
            member.destroy()

    run(story)


def test_pysyncobj_loads_its_pickles_with_the_allow_list(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError):
        pysyncobj.pickle.loads(pickle.dumps(RunsCommand(f"touch {marker}"), 2))
    assert not marker.exists()
    # What pysyncobj sends still loads: protocol 5, and protocol 2 (bytes as latin-1 text).
    message = {"type": "append_entries", "term": 3, "entries": [(b"\x00\xff batch", 7, 3)], "commit_index": None, "ok": True}
    for protocol in (2, 5):
        assert pysyncobj.pickle.loads(pickle.dumps(message, protocol)) == message
    with pytest.raises(pickle.UnpicklingError):
        pysyncobj.pickle.loads(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00rot13\x86R.")


#: A memo index far above any pickle below: CPython's unpickler would grow its memo to twice
#: it at once (16 MiB here; a fuzzed 9-byte pickle named ~2**31, GiBs, and stalled a node 21 s).
MEMO_INDEX = 2**20


@pytest.mark.parametrize(
    "bomb",
    [
        b"\x80\x05N" + b"r" + MEMO_INDEX.to_bytes(4, "little") + b".",  # LONG_BINPUT (protocol 5 header)
        b"\x80\x02]" + b"r" + MEMO_INDEX.to_bytes(4, "little") + b".",  # LONG_BINPUT (protocol 2)
        b"(lp" + str(MEMO_INDEX).encode() + b"\n.",  # PUT (protocol 0)
        b"(lp" + b"9" * 5000 + b"\n.",  # PUT with an index of 5,000 digits
    ],
    ids=["long-binput-5", "long-binput-2", "put", "put-5000-digits"],
)
def test_a_pickle_naming_a_memo_index_beyond_its_length_is_refused(bomb):
    refused = raft.safe_pickle.refused_count()
    with pytest.raises(pickle.UnpicklingError, match="memo index"):
        pysyncobj.pickle.loads(bomb)
    assert raft.safe_pickle.refused_count() == refused + 1


def test_pickles_with_many_memo_entries_still_load():
    """Protocol 2 names memo slots with BINPUT up to 255, LONG_BINPUT beyond: every index a
    writer names is below the pickle's length."""
    many = [(bytes([i % 256]) * 3, i, [i]) for i in range(2000)]
    for protocol in (0, 2, 5):
        data = pickle.dumps(many, protocol)
        assert pysyncobj.pickle.loads(data) == many
        assert raft.safe_pickle.load(io.BytesIO(data)) == many


def test_the_raft_log_loader_refuses_a_memo_bomb_and_reads_one_pickle_at_a_time():
    bomb = b"\x80\x02]" + b"r" + MEMO_INDEX.to_bytes(4, "little") + b"."
    with pytest.raises(pickle.UnpicklingError, match="memo index"):
        pysyncobj.pickle.load(io.BytesIO(bomb))
    file = io.BytesIO(pickle.dumps({"a": 1}, 2) + pickle.dumps([2], 5))
    assert pysyncobj.pickle.load(file) == {"a": 1}
    assert pysyncobj.pickle.load(file) == [2]


def test_the_listener_backs_off_on_emfile_and_accepts_again():
    async def story():
        async with lone_member() as (member, address):
            host, port = address.rsplit(":", 1)
            first = socket.socket()
            first.setblocking(False)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1, hard))
            fillers = []
            try:
                with contextlib.suppress(OSError):  # EMFILE: every descriptor is taken
                    for _ in range(soft):
                        fillers.append(os.dup(0))
                with contextlib.suppress(BlockingIOError):
                    first.connect((host, int(port)))
                deadline = time.monotonic() + WAIT_S
                while member.counters().get("link_accept_errors", 0) == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            # Descriptors back: the listener accepts again (the waiting link, then a new one).
            try:
                reader, writer = await connect(address)
            except ConnectionRefusedError:
                pytest.fail("the listener closed for good after the accept error")
            writer.write(PREFIX.pack(2**31 - 1))
            assert await closed_by_peer(reader), "the listener no longer accepts"
            errors = member.counters().get("link_accept_errors", 0)
            assert errors >= 1, "no accept failed"
            assert member.counters().get("link_frames_refused", 0) == 1
            print(f"{errors} accept errors, then accepting again")
            first.close()
            writer.close()

    run(story)


def test_without_a_password_a_first_frame_is_not_held_to_the_handshake_bound():
    async def story():
        async with lone_member(password=None) as (member, address):
            reader, writer = await connect(address)
            message = pickle.dumps("x" * 4096, 5)  # no node of that name: the link is dropped
            writer.write(PREFIX.pack(len(message)) + message)
            assert await closed_by_peer(reader)
            assert member.counters().get("link_frames_refused", 0) == 0
            writer.close()

    run(story)


# --- large frames between a loop-driven member and one on pysyncobj's own threads -------------

#: A member on pysyncobj's own threads (not driven by a loop) with raftseq's link layer
#: (``raft.install()``: protocol 5 pickles, the link cipher and keys, no zlib, the guard).
#: Nodes of the previous release (link version 2) are refused by version (``test_link_cipher``).
THREADED_MEMBER = """
import sys, time
from pysyncobj import SyncObj, SyncObjConf, replicated
from raftseq.cluster import raft

raft.install()

class Store(SyncObj):
    def __init__(self, address, partners, conf):
        super().__init__(address, partners, conf)
        self.items = []

    @replicated
    def add(self, item):
        self.items.append(item)

address, partner, count, password = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
conf = SyncObjConf(password=password, bindAddress=address, dynamicMembershipChange=False, connectionTimeout=60.0)
store = Store(address, [partner], conf)
deadline = time.monotonic() + 40
while len(store.items) < count and time.monotonic() < deadline:
    time.sleep(0.05)
print("items", len(store.items), sum(map(len, store.items)), flush=True)
time.sleep(1.0)  # let the other member hear the last commit index
store.destroy()
"""


class GuardedStore(RaftMember):
    items: list

    @replicated
    def add(self, item):
        self.items.append(item)


@contextlib.asynccontextmanager
async def two_stores(*, node_keys: bool = False):
    """Two loop-driven ``GuardedStore`` members of one cluster (with `node_keys`, each with its
    own), destroyed at the end."""
    addresses = [free_address(), free_address()]
    keys = keys_of(addresses) if node_keys else {}
    members = []
    try:
        for mine, theirs in (addresses, addresses[::-1]):
            conf = SyncObjConf(
                password=LinkPassword(PASSWORD, b"", identity_of(mine, keys)) if keys else PASSWORD,
                bindAddress=mine,
                dynamicMembershipChange=False,
                connectionTimeout=60.0,
                connectionRetryTime=0.05,
            )
            member = GuardedStore(mine, [theirs], conf, loop=asyncio.get_running_loop())
            member.items = []
            member.self_address = mine
            members.append(member)
        yield members
    finally:
        for member in members:
            member.destroy()


async def replicate(members: list, count: int, *, spread: bool = False) -> None:
    """`count` entries proposed to the leader (`spread` over many AppendEntries), then held by
    every member, in order."""
    async with asyncio.timeout(45):
        while not any(m._isLeader() for m in members):
            await asyncio.sleep(0.05)
        leader = next(m for m in members if m._isLeader())
        for i in range(count):
            leader.add(i.to_bytes(4, "big"), callback=lambda result, error: None)
            if spread and i % 10 == 9:
                await asyncio.sleep(0.01)
        while any(len(m.items) < count for m in members):
            await asyncio.sleep(0.05)
    assert all(m.items == [i.to_bytes(4, "big") for i in range(count)] for m in members)


def test_a_loop_driven_member_and_a_threaded_member_replicate_large_entries_under_link_keys():
    count, item_bytes = 24, 48 * 1024  # several entries of most of a batch each: large frames

    async def story():
        mine, theirs = free_address(), free_address()
        previous = await asyncio.create_subprocess_exec(
            sys.executable, "-c", THREADED_MEMBER, theirs, mine, str(count), PASSWORD, stdout=asyncio.subprocess.PIPE
        )
        conf = SyncObjConf(password=PASSWORD, bindAddress=mine, dynamicMembershipChange=False, connectionTimeout=60.0)
        member = GuardedStore(mine, [theirs], conf, loop=asyncio.get_running_loop())
        member.items = []
        try:
            for i in range(count):
                member.add(bytes([i]) * item_bytes, callback=lambda result, error: None)
            async with asyncio.timeout(45):
                while len(member.items) < count:
                    await asyncio.sleep(0.05)
                out, _ = await previous.communicate()
            assert out.split() == [b"items", str(count).encode(), str(count * item_bytes).encode()], out
            assert [item[:1] for item in member.items] == [bytes([i]) for i in range(count)]
            assert member.counters().get("link_frames_refused", 0) == 0
        finally:
            member.destroy()
            if previous.returncode is None:
                previous.kill()
                await previous.wait()

    run(story)


def test_a_link_reconnects_with_new_keys_after_its_message_budget(monkeypatch, caplog):
    """A link's key encrypts at most ``RAFT_LINK_MESSAGES_MAX`` messages (2**30 in a node; 6
    here): then the link reconnects, with new random keys and so a new key, and replication
    goes on."""
    monkeypatch.setattr(link_guard, "RAFT_LINK_MESSAGES_MAX", 6)
    count = 100

    async def story():
        async with two_stores() as members:
            await replicate(members, count, spread=True)

    with caplog.at_level("INFO", logger="raftseq.raft_link"):
        run(story)
    assert any("reconnects for new keys" in r.getMessage() for r in caplog.records), "no link ran out of its budget"


# --- node keys (link version 4) ---------------------------------------------------------------


def member_and_peer_addresses() -> tuple[str, str]:
    """(a member's address, its peer's): the peer's is the greater, so the peer connects to the
    member, and a link that claims the peer is one the member must judge."""
    first, second = sorted(free_address() for _ in range(2))
    return first, second


def test_members_with_node_keys_replicate_and_refuse_a_peer_without_them():
    count = 30

    async def story():
        async with two_stores(node_keys=True) as members:
            await replicate(members, count)
            # A peer without node keys (link version 3) is refused at its first message.
            plain = Peer(*await connect(members[0].self_address))
            plain.send_pickle(pickle.dumps(os.urandom(32), 5))
            assert await closed_by_peer(plain.reader), "a link of version 3 was taken by a node with node keys"
            plain.writer.close()

    run(story)


async def request_vote_answered(peer: Peer) -> bool:
    """Whether the member answers a vote request of `peer` (it took `peer` as a member)."""
    peer.send_wrapped({"type": "request_vote", "term": 1, "last_log_index": 100, "last_log_term": 0})
    try:
        async with asyncio.timeout(WAIT_S):
            _, answer = await peer.receive()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return False
    return isinstance(answer, dict) and answer.get("type") == "response_vote"


def test_a_password_holder_without_the_node_key_cannot_join_as_that_member():
    """Anyone holding the password could claim to be any member connecting to a node, and was
    taken as that member (its votes counted, its AppendEntries applied). With node keys the claim
    carries the member's signature of both ends' fresh keys: without the member's private key
    the link is dropped; with it (the control) the member is taken and answered."""

    async def story():
        mine, impersonated = member_and_peer_addresses()
        keys = keys_of([mine, impersonated])
        async with lone_member(LinkPassword(PASSWORD, b"", identity_of(mine, keys)), address=mine, peer=impersonated) as (member, _):
            impostor = Peer(*await connect(mine), identity=identity_of(impersonated, keys, seed=new_node_key()[0]))
            await impostor.signed_handshake(mine)  # the member's answer checks out: it is who it says
            impostor.send_wrapped(impersonated)  # a bare claim, as pysyncobj sends it
            assert await closed_by_peer(impostor.reader), "a claim without a signature was taken"
            impostor = Peer(*await connect(mine), identity=identity_of(impersonated, keys, seed=new_node_key()[0]))
            handshake = await impostor.signed_handshake(mine)
            impostor.send_wrapped(handshake.claim())  # signed, by a key that is not the member's
            assert await closed_by_peer(impostor.reader), "a claim signed by another key was taken"
            real = Peer(*await connect(mine), identity=identity_of(impersonated, keys))
            handshake = await real.signed_handshake(mine)
            real.send_wrapped(handshake.claim())
            assert await request_vote_answered(real), "the member itself was not taken"
            for peer in (impostor, real):
                peer.writer.close()

    run(story)


def test_a_recorded_handshake_replayed_is_refused():
    """A recorded handshake of the member: its frames sent again on a new link (the claim is
    under the old link's key), and its signed claim sent inside a fresh handshake (the
    signature covers the old random keys): both dropped."""

    async def story():
        mine, recorded = member_and_peer_addresses()
        keys = keys_of([mine, recorded])
        async with lone_member(LinkPassword(PASSWORD, b"", identity_of(mine, keys)), address=mine, peer=recorded) as (member, _):
            real = Peer(*await connect(mine), identity=identity_of(recorded, keys))
            frames = []
            send_pickle = real.send_pickle

            def recording(data: bytes) -> None:
                frames.append(real.cipher.encrypt_at_time(data, 0))
                real.writer.write(PREFIX.pack(len(frames[-1])) + frames[-1])

            real.send_pickle = recording
            handshake = await real.signed_handshake(mine)
            claim = handshake.claim()
            real.send_wrapped(claim)
            real.send_pickle = send_pickle
            assert await request_vote_answered(real), "the recorded handshake was not a good one"
            real.writer.close()
            replay = Peer(*await connect(mine))
            for frame in frames:
                replay.writer.write(PREFIX.pack(len(frame)) + frame)
            assert await closed_by_peer(replay.reader), "replayed handshake frames were taken"
            # Whoever could read the recorded claim still cannot use it on a link of its own.
            replay = Peer(*await connect(mine), identity=identity_of(recorded, keys, seed=new_node_key()[0]))
            await replay.signed_handshake(mine)
            replay.send_wrapped(claim)
            assert await closed_by_peer(replay.reader), "a recorded claim was taken on a new link"
            replay.writer.close()

    run(story)
