"""The protocol fuzzer: seeded mutations of valid frames, thrown at a running local cluster.

Two targets, one case at a time, each case on a connection of its own:

* ``client``: a node's client port. A case is a few frames encoded exactly as the client does
  (``protocol.encode_frame``: hello, submit, submit batch, subscribe, status, heartbeat,
  snapshot query), most after a valid hello, some before it or without one, each possibly
  mutated: bit flips (with the checksum fixed up or not), truncation, a changed length prefix,
  a field swapped for a value of another type (huge and negative numbers, strings, lists, maps,
  random msgpack), extra fields, unknown tags, random msgpack bodies; payloads at and over the
  payload limit, batches at the entry limit. Most cases with a valid hello are *numbered*: the
  hello goes first and the submits are numbered after the session's last applied client_seq
  from the ``Welcome``, so that they are sequenced. The bytes go out in random pieces.
* ``raft``: a node's Raft port, through the AUTHENTICATED link: messages encrypted with the
  cluster's link cipher (``cluster.raft.link_cipher``, keyed from the cluster's own password)
  after pysyncobj's handshake (random keys exchanged in the first encrypted messages), carrying
  mutated pickles of pysyncobj's messages (append_entries, request_vote, next_node_idx,
  apply_command, utility messages…), mutated pickle bytes, bit-flipped or truncated ciphertext,
  timestamps going backwards, and bytes before any handshake. A connection names itself
  ``readonly``, an unknown address, nothing, or (``impersonate``) another member.

With ``canaries``, some raft cases carry a pickle that would run code in the node
(``io.open(MARKER, "a")``: harmless, but it creates the marker file): a node that loads a peer's
pickle with plain ``pickle.loads`` creates the marker, and the run reports it as ``code``.

Every case is a function of ``(seed, target, index)`` only (``case_rng``), so a run prints its
seed and any case replays alone (``raftseq chaos fuzz --seed N --replay TARGET:INDEX``). The runner
checks the cluster every ``CHECK_INTERVAL_S`` and at the end: every node process alive (a
``crash`` is a node that exited), every node answers a status request within
``STATUS_BOUND_S`` and a legitimate client's submit is acknowledged within ``LEGIT_ACK_BOUND_S``
(else a ``hang``), and every message the legitimate client got acknowledged is in the stream at
its number (else ``lost``). A finding names the seed, the target, the node and the last cases
sent to it, with the bytes of the client cases and the messages of the raft cases.
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import pickle
import pickletools
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from raftseq.clients import BlockingSequencerClient, SequencerClient, SequencerError
from raftseq.cluster.local import LocalCluster
from raftseq.cluster.raft.link_cipher import (
    LINK_KEY_BYTES,
    VERSION as LINK_VERSION,
    LinkCipher,
    LinkHandshake,
    LinkIdentityError,
    cipher_of,
)
from raftseq.cluster.status import answered
from raftseq.sequencer import protocol

TARGETS = ("client", "raft")
#: Frames in one client case (after the optional hello), messages in one raft case.
CASE_FRAMES_MAX = 6
#: Most pieces the bytes of one case are split into when sent.
CASE_PIECES_MAX = 4
#: Connecting to a node, and each send: a node that does not take a case within this is a hang.
CONNECT_TIMEOUT_S = 2.0
#: How long a case reads the node's answers before closing (answers are read, never needed).
CASE_READ_S = 0.05
#: Bytes of answers a case reads at most (a subscription could stream for ever).
CASE_READ_BYTES_MAX = 256 * 1024
#: Between two checks of the cluster (processes, status, a legitimate submit).
CHECK_INTERVAL_S = 2.0
#: A node that does not answer a status request within this is hung.
STATUS_BOUND_S = 3.0
#: A node that missed the status bound is asked again until this has passed since the first
#: request: answered by then, it stalled (a finding too); not, it hangs.
HANG_CONFIRM_S = 15.0
#: A legitimate client's submit not acknowledged within this: the cluster is hung.
LEGIT_ACK_BOUND_S = 10.0
#: Raft handshake: waiting for the node's random key.
HANDSHAKE_TIMEOUT_S = 2.0
#: Cases remembered per node, to name in a finding.
RECENT_CASES = 8
#: Hex characters of a case's bytes in a finding.
CASE_HEX_CHARS_MAX = 2000
#: Sessions fuzz cases use (a few, reused: the fuzzer must not fill the session table).
FUZZ_SESSIONS = 8
#: Largest memo index a mutated pickle may name to be sent. CPython's unpickler grows its memo
#: array to twice a PUT/LONG_BINPUT index at once (16 bytes per index): a flipped bit made a
#: node allocate gigabytes and stall 21 s. Sending such a pickle could exhaust the memory of
#: the machine the fuzzer shares; the stall is shown by its own bounded test instead
#: (``tests/test_abuse_fuzz.py``), and a run counts the pickles it held back.
MEMO_INDEX_MAX = 2**16
#: The file a code-execution canary creates, in the run's marker directory.
MARKER_NAME = "fuzz-code-ran"

_LENGTH = struct.Struct(">I")
_RAFT_LENGTH = struct.Struct("i")  # pysyncobj's own: native byte order, signed
_encode = msgspec.msgpack.encode


def case_rng(seed: int, target: str, index: int) -> random.Random:
    """The generator of case `index` of `target` in the run seeded `seed` (replayable alone)."""
    return random.Random(f"{seed}/{target}/{index}")


# --- values ---------------------------------------------------------------------------------


def odd_value(rng: random.Random, depth: int = 0) -> object:
    """A value of a random msgpack type, favouring edges (huge, negative, empty, deep)."""
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice((0, -1, 1, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1))
    if kind == 3:
        return rng.randrange(-(2**63), 2**64)
    if kind == 4:
        return rng.choice((0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e308))
    if kind == 5:
        return rng.choice(("", "x", "é", "\u0000", "a" * rng.randrange(1, 300), "hello", "sub", "d"))
    if kind == 6:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 7:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 20)))
    if kind == 8:
        return rng.randrange(-200, 200)
    if kind == 9:
        return [odd_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 10:
        return {str(odd_value(rng, depth + 1))[:20]: odd_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return msgspec.msgpack.Ext(rng.randrange(-128, 128), rng.randbytes(rng.randrange(0, 16)))


def flip_bits(rng: random.Random, data: bytes, start: int = 0) -> bytes:
    """`data` with 1-4 bits flipped at or after `start`."""
    if len(data) <= start:
        return data
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        at = rng.randrange(start, len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def framed(body: bytes) -> bytes:
    """`body` with a correct length and checksum in front (``protocol.encode_frame``'s layout)."""
    return protocol.HEADER.pack(len(body), zlib.crc32(body)) + body


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    """`data` cut at up to ``CASE_PIECES_MAX - 1`` random points (each piece sent on its own)."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(CASE_PIECES_MAX)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# --- client cases ---------------------------------------------------------------------------

#: Tags of the frames a node sends, and a few more: what a confused client might send.
_OTHER_TAGS = ("welcome", "ack", "acks", "busy", "notleader", "unknown", "rejected", "d", "status", "snaps", "", "hello\x00")
#: How a client frame is mutated (``mutate_client_frame``); "valid" twice as likely.
CLIENT_MUTATIONS = ("valid", "valid", "flip", "flip_raw", "truncate", "length", "swap", "swap", "extra", "drop", "tag", "random", "raw")
#: How long a numbered case waits for the node's ``Welcome`` (it numbers its submits from it).
WELCOME_TIMEOUT_S = 2.0


def _payload(rng: random.Random) -> bytes:
    limit = protocol.limits.PAYLOAD_BYTES_MAX
    return rng.choice(
        (b"", rng.randbytes(rng.randrange(1, 200)), rng.randbytes(rng.randrange(1, 200)), b"\x00" * limit, b"x" * (limit + 1))
    )


def _valid_client_frame(rng: random.Random, session: str, token: str, next_seq: int) -> protocol.Frame:
    """A frame as a client sends it. Submits are numbered from `next_seq` (relative to the
    session's last applied number when the case is numbered), sometimes a retry or a gap."""
    seq = rng.choice((next_seq, next_seq, next_seq, max(1, next_seq - 1), next_seq + rng.randrange(1, 5), 2**63 - 1))
    kind = rng.randrange(10)
    if kind == 0:
        return protocol.Hello(session, token, protocol.PROTOCOL_VERSION, rng.choice((0, 1, 2**63 - 1)))
    if kind in (1, 2, 3):
        return protocol.Submit(seq, _payload(rng))
    if kind in (4, 5):
        count = rng.choice((1, 2, rng.randrange(1, 50), protocol.limits.SUBMIT_BATCH_ENTRIES_MAX))
        return protocol.SubmitBatch(seq, [rng.randbytes(rng.randrange(0, 16)) for _ in range(count)])
    if kind == 6:
        return protocol.Subscribe(rng.choice((1, rng.randrange(1, 10_000), 2**40, 2**63 - 1)))
    if kind == 7:
        return protocol.StatusRequest()
    if kind == 8:
        return protocol.Heartbeat(rng.choice((0, 5, 2**63 - 1)))
    return protocol.SnapshotQuery(rng.choice(("refdata", "x", "a" * 64)))


def _frame_fields(frame: protocol.Frame) -> list:
    """The frame as the msgpack array it travels as: ``[tag, field, ...]``."""
    return msgspec.msgpack.decode(_encode(frame))


def mutate_client_frame(rng: random.Random, frame: protocol.Frame, kind: str) -> bytes:
    """`frame`'s wire bytes, mutated as `kind` says (one of ``CLIENT_MUTATIONS``)."""
    wire = protocol.encode_frame(frame)
    body = wire[protocol.HEADER_BYTES :]
    if kind == "valid":
        return wire
    if kind == "flip":
        return framed(flip_bits(rng, body))
    if kind == "flip_raw":
        return flip_bits(rng, wire)
    if kind == "truncate":
        return wire[: rng.randrange(0, len(wire))]
    if kind == "length":
        length = rng.choice(
            (0, len(body) - 1, len(body) + 1, len(body) + rng.randrange(2, 100), 2**31 - 1, 2**32 - 1, protocol.limits.FRAME_BYTES_MAX + 1)
        )
        return _LENGTH.pack(max(0, length)) + wire[4:]
    fields = _frame_fields(frame)
    if kind == "swap":
        fields[rng.randrange(len(fields))] = odd_value(rng)
    elif kind == "extra":
        fields += [odd_value(rng) for _ in range(rng.randrange(1, 4))]
    elif kind == "drop":
        fields = fields[: rng.randrange(0, len(fields))]
    elif kind == "tag":
        fields[0] = rng.choice(_OTHER_TAGS)
    elif kind == "random":
        fields = odd_value(rng)
    else:
        return rng.randbytes(rng.randrange(1, 64))
    return framed(_encode(fields))


@dataclass
class ClientStep:
    """One frame of a client case and its mutation (applied when sent: a numbered case's
    submits get their numbers from the node's ``Welcome`` first)."""

    frame: protocol.Frame
    mutation: str
    mutation_seed: int

    def wire(self, seq_base: int) -> bytes:
        frame = self.frame
        if seq_base and isinstance(frame, protocol.Submit):
            frame = msgspec.structs.replace(frame, client_seq=min(2**63 - 1, frame.client_seq + seq_base))
        elif seq_base and isinstance(frame, protocol.SubmitBatch):
            frame = msgspec.structs.replace(frame, first_client_seq=min(2**63 - 1, frame.first_client_seq + seq_base))
        return mutate_client_frame(random.Random(self.mutation_seed), frame, self.mutation)

    def describe(self) -> str:
        return f"{type(self.frame).__name__}/{self.mutation}"


@dataclass
class ClientPlan:
    """A client case: an opening hello (valid, bad or none), then `steps`. `numbered`: the
    hello is valid and sent alone first, and submits are numbered after the session's last
    applied number (from the ``Welcome``), so that they are sequenced and reach the batcher."""

    hello: ClientStep | None
    steps: list[ClientStep]
    numbered: bool
    pieces_seed: int

    def wire(self, seq_base: int = 0, *, with_hello: bool = True) -> bytes:
        """The bytes of the case (its submits numbered after `seq_base`)."""
        hello = self.hello.wire(0) if with_hello and self.hello is not None else b""
        return hello + b"".join(step.wire(seq_base) for step in self.steps)


@dataclass
class Case:
    """One connection's worth of fuzz: what is sent, to which node, and how it was made."""

    target: str
    index: int
    #: Index of the node in the cluster's node list.
    node: int
    #: The mutations, in order (``hello; Submit/flip; Subscribe/length``).
    summary: str
    client: ClientPlan | None = None
    raft: RaftPlan | None = None
    #: What the last send of this case put on the wire (client cases).
    sent: bytes = b""
    #: Raft messages of the last send held back for their memo index (``MEMO_INDEX_MAX``).
    memo_bombs: int = 0

    def describe(self) -> str:
        sent = self.raft.describe() if self.raft is not None else self.sent.hex() or "(not sent yet)"
        if len(sent) > CASE_HEX_CHARS_MAX:
            sent = sent[:CASE_HEX_CHARS_MAX] + f"... ({len(sent) // 2} bytes)"
        return f"{self.target} case {self.index} to node #{self.node + 1}: {self.summary}\n    {sent}"


def client_case(seed: int, index: int, *, token: str, node_count: int) -> Case:
    """Client case `index` of the run seeded `seed`."""
    rng = case_rng(seed, "client", index)
    session = f"fuzz-{rng.randrange(FUZZ_SESSIONS)}"
    opening = rng.random()
    hello = None
    if opening < 0.7:
        hello = ClientStep(protocol.Hello(session, token, protocol.PROTOCOL_VERSION), "valid", 0)
    elif opening < 0.85:
        bad = rng.choice(
            (
                protocol.Hello(session, token + "x", protocol.PROTOCOL_VERSION),
                protocol.Hello(session, "", protocol.PROTOCOL_VERSION),
                protocol.Hello(session, token, rng.choice((0, 2, 2**31))),
                protocol.Hello("@snap/" + session, token, protocol.PROTOCOL_VERSION),
            )
        )
        hello = ClientStep(bad, rng.choice(CLIENT_MUTATIONS), rng.randrange(2**32))
    numbered = hello is not None and hello.mutation == "valid" and hello.frame.token == token and rng.random() < 0.6
    steps = []
    next_seq = 1
    for _ in range(rng.randrange(1, CASE_FRAMES_MAX + 1)):
        frame = _valid_client_frame(rng, session, token, next_seq if numbered else rng.choice((1, 2, rng.randrange(1, 1000))))
        if isinstance(frame, protocol.Submit):
            next_seq = max(next_seq, frame.client_seq + 1)
        elif isinstance(frame, protocol.SubmitBatch):
            next_seq = max(next_seq, frame.first_client_seq + len(frame.payloads))
        steps.append(ClientStep(frame, rng.choice(CLIENT_MUTATIONS), rng.randrange(2**32)))
    summary = "; ".join(
        [*(["numbered hello"] if numbered else [f"hello/{hello.mutation}"] if hello else []), *(s.describe() for s in steps)]
    )
    plan = ClientPlan(hello, steps, numbered, rng.randrange(2**32))
    return Case("client", index, rng.randrange(node_count), summary, client=plan)


def send_client_case(address: str, case: Case) -> None:
    """Send `case` on a new connection, read answers for ``CASE_READ_S``, close. Raises
    ``OSError`` when the node does not accept the connection."""
    plan = case.client
    assert plan is not None
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as sock:
        try:
            if plan.numbered:
                case.sent = hello = plan.hello.wire(0)
                sock.sendall(hello)
                welcome = _read_frame(sock)
                if not isinstance(welcome, protocol.Welcome):
                    return
                seq_base = welcome.last_client_seq
                data = plan.wire(seq_base, with_hello=False)
                case.sent = hello + data
            else:
                case.sent = data = plan.wire()
            for piece in pieces(random.Random(plan.pieces_seed), data):
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return  # the node closed a connection it found bad: fine
        _drain(sock)


def _read_frame(sock: socket.socket) -> object:
    """The first frame the node sends (heartbeats skipped), or None."""
    reader = protocol.FrameReader("node")
    deadline = time.monotonic() + WELCOME_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            return None
        for frame in reader.feed(data):
            if not isinstance(frame, protocol.Heartbeat):
                return frame
    return None


def _drain(sock: socket.socket) -> None:
    """Read what the node answers for ``CASE_READ_S`` (at most ``CASE_READ_BYTES_MAX``)."""
    deadline = time.monotonic() + CASE_READ_S
    received = 0
    while received < CASE_READ_BYTES_MAX:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return
        if not data:
            return
        received += len(data)


# --- raft cases -----------------------------------------------------------------------------


class Canary:
    """Pickles as a call of ``io.open(path, "a")``: a node that runs it creates `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "a"))


def _raft_message(rng: random.Random) -> object:
    """A message as pysyncobj sends it on a link (mostly with small, stale terms)."""
    term = rng.choice((0, 1, 2, rng.randrange(0, 50)))
    index = rng.choice((0, 1, rng.randrange(0, 1000)))
    kind = rng.randrange(9)
    if kind == 0:
        entries = [(rng.randbytes(rng.randrange(0, 40)), index + i + 1, term) for i in range(rng.randrange(0, 3))]
        return {"type": "append_entries", "term": term, "commit_index": index, "entries": entries, "prevLogIdx": index, "prevLogTerm": term}
    if kind == 1:
        return {"type": "request_vote", "term": term, "last_log_index": index, "last_log_term": term}
    if kind == 2:
        return {"type": "response_vote", "term": term}
    if kind == 3:
        return {"type": "next_node_idx", "next_node_idx": index, "reset": rng.random() < 0.5, "success": rng.random() < 0.5}
    if kind == 4:
        return {"type": "apply_command", "command": rng.randbytes(rng.randrange(0, 40)), "request_id": index}
    if kind == 5:
        return {"type": "apply_command_response", "request_id": index, "log_idx": index, "log_term": term}
    if kind == 6:
        return {"type": "timeout_now", "term": term}
    if kind == 7:
        return [rng.choice(("status", "add", "remove", "set_version", "STATUS")), *[odd_value(rng) for _ in range(rng.randrange(0, 3))]]
    return odd_value(rng)


def mutate_raft_message(rng: random.Random, message: object) -> tuple[str, object]:
    """One structural mutation of a pysyncobj message: ``(its name, the message)``."""
    kind = rng.choice(("valid", "swap", "swap", "drop", "extra", "type", "whole"))
    if kind == "valid":
        return kind, message
    if kind == "whole" or not isinstance(message, (dict, list)) or not message:
        return "whole", odd_value(rng)
    if isinstance(message, list):
        mutated = list(message)
        mutated[rng.randrange(len(mutated))] = odd_value(rng)
        return "swap", mutated
    mutated = dict(message)
    key = rng.choice(sorted(mutated))
    if kind == "swap":
        mutated[key] = odd_value(rng)
    elif kind == "drop":
        del mutated[key]
    elif kind == "extra":
        mutated[str(odd_value(rng))[:20]] = odd_value(rng)
    else:
        mutated["type"] = rng.choice(("append_entries", "request_vote", "next_node_idx", "apply_command", "x", "", None, 7))
    return kind, mutated


@dataclass
class RaftStep:
    """One encrypted message: `message` pickled (wrapped with the node's random key once the
    handshake is done), the pickle bytes mutated (`pickle_mutation`), encrypted at a timestamp
    `timestamp_step` seconds from the previous one, the ciphertext mutated (`cipher_mutation`).
    `mutation_seed` drives the byte mutations (the bytes exist only at send time)."""

    message: object
    pickle_mutation: str
    cipher_mutation: str
    timestamp_step: int
    mutation_seed: int
    wrapped: bool = True

    def describe(self) -> str:
        what = repr(self.message)
        return f"{what[:200]} pickle/{self.pickle_mutation} cipher/{self.cipher_mutation} ts{self.timestamp_step:+d}"


@dataclass
class RaftPlan:
    """A raft case: `preauth` bytes alone (no handshake), or our random key (`first`, maybe
    mutated or a canary) and, once the node answered with its own, `steps`."""

    preauth: bytes = b""
    first: RaftStep | None = None
    steps: list[RaftStep] = field(default_factory=list)

    def describe(self) -> str:
        if self.first is None:
            return f"pre-auth bytes {self.preauth.hex()}"
        return "\n    ".join([f"first: {self.first.describe()}", *(s.describe() for s in self.steps)])


def _step(rng: random.Random, message: object, *, wrapped: bool = True, clean: bool = False) -> RaftStep:
    pickle_mutation = "none" if clean or rng.random() < 0.75 else rng.choice(("flip", "truncate", "append"))
    cipher_mutation = "none" if clean or rng.random() < 0.9 else rng.choice(("flip", "truncate", "version", "short"))
    timestamp_step = 0 if clean or rng.random() < 0.9 else rng.choice((-1, -100, 1, 2**20))
    return RaftStep(message, pickle_mutation, cipher_mutation, timestamp_step, rng.randrange(2**32), wrapped)


def raft_case(seed: int, index: int, *, node_count: int, canary_path: str = "", members: Sequence[str] = ()) -> Case:
    """Raft case `index` of the run seeded `seed`; with `canary_path`, some carry a ``Canary``;
    with `members` (the Raft addresses of the cluster's nodes, in order), some connections
    claim to be another member (impersonation: what any holder of the password can do)."""
    rng = case_rng(seed, "raft", index)
    node = rng.randrange(node_count)
    mode = rng.random()
    if mode < 0.15:
        return Case("raft", index, node, "pre-auth", raft=RaftPlan(preauth=_preauth_bytes(rng)))
    key = rng.randbytes(32)
    canary = canary_path and rng.random() < 0.05
    if mode < 0.3:
        first_how, first = mutate_raft_message(rng, key)
        first_how = "key/" + first_how
    else:
        first_how, first = "key", key
    if canary and rng.random() < 0.5:
        first_how, first = "key/canary", Canary(canary_path)
    # A canary's bytes are never mutated: a flipped bit in its path made a node create a file
    # next to the marker, where the run did not look.
    plan = RaftPlan(first=_step(rng, first, wrapped=False, clean=first_how in ("key", "key/canary")))
    steps = [first_how]
    identity = rng.choice(("readonly", "readonly", "readonly", "127.0.0.1:1", None, "member", "member", "member"))
    if identity == "member":
        others = [i for i in range(len(members)) if i != node]
        identity = members[rng.choice(others)] if others else "readonly"
        steps.append(f"id/member {identity}")
    elif identity is not None:
        steps.append(f"id/{identity}")
    if identity is not None:
        plan.steps.append(_step(rng, identity, clean=True))
    for _ in range(rng.randrange(1, CASE_FRAMES_MAX + 1)):
        how, message = mutate_raft_message(rng, _raft_message(rng))
        if canary and rng.random() < 0.3:
            how, message = "canary", {"type": "apply_command", "command": Canary(canary_path), "request_id": 1}
        step = _step(rng, message, clean=how == "canary")
        plan.steps.append(step)
        steps.append(f"{how}/{step.pickle_mutation}/{step.cipher_mutation}")
    return Case("raft", index, node, "; ".join(steps), raft=plan)


def _preauth_bytes(rng: random.Random) -> bytes:
    """Bytes from someone without the password: lengths that lie, garbage, foreign ciphertext."""
    body = rng.randbytes(rng.randrange(0, 200))
    kind = rng.randrange(4)
    if kind == 0:
        return body
    if kind == 1:  # a length prefix that lies (small bodies: a huge one is another probe's)
        return _RAFT_LENGTH.pack(rng.choice((0, -1, -(2**31), 1, 2**31 - 1, len(body) + 7))) + body
    if kind == 2:  # well-formed, under another key
        foreign = LinkCipher("not the cluster's password").encrypt_at_time(
            pickle.dumps(rng.randbytes(32), protocol=5), int(time.monotonic())
        )
        return _RAFT_LENGTH.pack(len(foreign)) + foreign
    header = struct.pack(">BQ", rng.choice((LINK_VERSION, 1, 255)), rng.randrange(2**64))
    return _RAFT_LENGTH.pack(len(header) + len(body)) + header + body


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def memo_index_max(data: bytes) -> int:
    """The largest memo index a PUT opcode of the pickle `data` names (up to where it breaks)."""
    top = 0
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in _MEMO_PUTS and isinstance(argument, int):
                top = max(top, argument)
    except Exception:  # noqa: BLE001 - a broken pickle: what came before the break counts
        pass
    return top


class _NoGlobals(pickle.Unpickler):
    """Reads the node's handshake answer (bytes in a tuple) and nothing that names code."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class RaftLink:
    """One authenticated connection to a node's Raft port, speaking pysyncobj's link format
    (``i`` length prefix, then a ``LinkCipher`` message holding a pickle). With a cipher of
    node keys (``cipher.identity``: a member's key, as a compromised member holds it) it speaks
    their handshake: its random key is an ephemeral key, the node's answer is signed, and a
    claim of that member's own address goes signed (any other claim as it is: refused)."""

    def __init__(self, address: str, cipher: LinkCipher) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        self.cipher = cipher
        self.handshake = LinkHandshake(cipher.identity, peer=address) if cipher.identity is not None else None
        self.timestamp = int(time.monotonic())
        self.node_key: bytes | None = None
        #: The link's own cipher, once the random keys are exchanged (``LinkCipher.for_link``).
        self.link_cipher: LinkCipher | None = None
        self.buffer = b""
        #: Mutated pickles not sent because of the memo index they name (``MEMO_INDEX_MAX``).
        self.memo_bombs = 0

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> bool:
        """False when the node has closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def send_step(self, step: RaftStep) -> bool:
        rng = random.Random(step.mutation_seed)
        message = step.message
        if self.handshake is not None:
            if not step.wrapped and self.node_key is None and isinstance(message, bytes) and len(message) == LINK_KEY_BYTES:
                message = self.handshake.key  # the random key of node keys: an ephemeral X25519 key
            elif step.wrapped and self.handshake.shared and message == self.handshake.identity.address:
                message = self.handshake.claim()
        message = (self.node_key, message) if step.wrapped and self.node_key is not None else message
        plain = pickle.dumps(message, protocol=5)
        if step.pickle_mutation == "flip":
            plain = flip_bits(rng, plain)
        elif step.pickle_mutation == "truncate":
            plain = plain[: rng.randrange(len(plain))]
        elif step.pickle_mutation == "append":
            plain += rng.randbytes(rng.randrange(1, 16))
        if memo_index_max(plain) > MEMO_INDEX_MAX:
            self.memo_bombs += 1
            return True  # not sent: see MEMO_INDEX_MAX
        self.timestamp = max(0, self.timestamp + step.timestamp_step)
        data = (self.link_cipher or self.cipher).encrypt_at_time(plain, self.timestamp)
        if step.cipher_mutation == "flip":
            data = flip_bits(rng, data)
        elif step.cipher_mutation == "truncate":
            data = data[: rng.randrange(len(data))]
        elif step.cipher_mutation == "version":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        elif step.cipher_mutation == "short":
            data = data[:8]
        return self.send_raw(_RAFT_LENGTH.pack(len(data)) + data)

    def receive_node_key(self, our_key: bytes) -> bytes | None:
        """The node's random key from its handshake answer ``(our_key, its_key)`` (node keys:
        ``(our_key, (its_key, signature))``); None when the node closed the connection or did
        not answer in time."""
        if self.handshake is not None:
            our_key = self.handshake.key
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            if len(self.buffer) >= 4:
                (length,) = _RAFT_LENGTH.unpack_from(self.buffer)
                if 0 < length <= len(self.buffer) - 4:
                    try:
                        answer = _NoGlobals(io.BytesIO(self.cipher.decrypt(self.buffer[4 : 4 + length]))).load()
                    except Exception:  # noqa: BLE001 - an answer this link cannot read holds no key
                        return None
                    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == our_key and self.handshake is not None:
                        try:
                            self.node_key = self.handshake.take_answer(answer[1])
                        except LinkIdentityError:
                            return None
                        self.link_cipher = self.cipher.for_link(our_key, self.node_key, self.handshake.shared)
                        return self.node_key
                    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == our_key and isinstance(answer[1], bytes):
                        self.node_key = answer[1]
                        if len(our_key) == len(self.node_key) == LINK_KEY_BYTES:
                            self.link_cipher = self.cipher.for_link(our_key, self.node_key)
                        return self.node_key
                    return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return None
            if not data:
                return None
            self.buffer += data


def send_raft_case(address: str, cipher: LinkCipher, case: Case) -> bool:
    """Carry out a raft case's plan on a new connection, read answers briefly, close. True
    when the handshake was done (the node answered with its random key)."""
    plan = case.raft
    assert plan is not None
    link = RaftLink(address, cipher)
    shook_hands = False
    case.memo_bombs = 0
    try:
        if plan.first is None:
            link.send_raw(plan.preauth)
        elif link.send_step(plan.first) and isinstance(plan.first.message, bytes) and plan.first.pickle_mutation == "none":
            shook_hands = link.receive_node_key(plan.first.message) is not None
            if shook_hands:
                for step in plan.steps:
                    if not link.send_step(step):
                        break
        _drain(link.sock)
    finally:
        link.close()
        case.memo_bombs = link.memo_bombs
    return shook_hands


# --- the run --------------------------------------------------------------------------------


@dataclass
class Finding:
    """What a run found: ``crash`` (a node exited), ``hang`` (no status or no ack in time),
    ``stall`` (a status answer later than the bound, but within ``HANG_CONFIRM_S``), ``lost``
    (an acknowledged message missing or changed), ``code`` (a canary ran)."""

    kind: str
    detail: str
    #: The cases last sent to the node concerned, oldest first.
    recent: list[Case] = field(default_factory=list)

    def describe(self, seed: int) -> str:
        lines = [f"{self.kind.upper()} (seed {seed}): {self.detail}"]
        if self.recent:
            lines.append(f"  last {len(self.recent)} case(s) sent to that node (replay one: --seed {seed} --replay TARGET:INDEX):")
            lines += [f"  {case.describe()}" for case in self.recent]
        return "\n".join(lines)


@dataclass
class FuzzReport:
    seed: int
    cases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    #: Cases whose connection the node refused or reset before taking the bytes.
    refused: int = 0
    #: Raft cases that got through the handshake (their messages reached pysyncobj).
    handshakes: int = 0
    #: Mutated pickles held back for the memo index they name (``MEMO_INDEX_MAX``).
    memo_bombs: int = 0
    #: The legitimate client's acknowledged messages: sequence number -> payload.
    acked: dict[int, bytes] = field(default_factory=dict)
    legit_latencies_s: list[float] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        worst = max(self.legit_latencies_s, default=0.0)
        counts = ", ".join(f"{n} {t}" for t, n in self.cases.items())
        return (
            f"fuzz seed {self.seed}: {counts} cases in {self.duration_s:.1f} s ({self.refused} refused at connect, "
            f"{self.handshakes} Raft handshakes, {self.memo_bombs} memo bombs held back), "
            f"{len(self.acked)} legitimate acks (slowest {worst * 1e3:.0f} ms), {len(self.findings)} finding(s)"
        )


class LegitClient:
    """A legitimate client on an event loop of its own (kept between calls): one submit per
    check, each bounded in time."""

    def __init__(self, cluster: LocalCluster, session: str) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._make(cluster, session))

    @staticmethod
    async def _make(cluster: LocalCluster, session: str) -> SequencerClient:
        return SequencerClient(cluster.endpoints, session=session, token=cluster.token)

    def submit(self, payload: bytes, timeout_s: float) -> int:
        """The sequence number of `payload`; ``TimeoutError`` after `timeout_s`."""
        return self._runner.run(asyncio.wait_for(self._client.submit(payload), timeout_s))

    def close(self) -> None:
        try:
            self._runner.run(asyncio.wait_for(self._client.close(), LEGIT_ACK_BOUND_S))
        except (TimeoutError, SequencerError, OSError):
            pass
        finally:
            self._runner.close()


def marker_path(marker_dir: str) -> str:
    return os.path.join(marker_dir, MARKER_NAME)


def make_case(target: str, seed: int, index: int, cluster: LocalCluster, canary_path: str, *, impersonate: bool = False) -> Case:
    if target == "client":
        return client_case(seed, index, token=cluster.token, node_count=len(cluster.nodes))
    members = [node.config.raft_address for node in cluster.nodes] if impersonate else []
    return raft_case(seed, index, node_count=len(cluster.nodes), canary_path=canary_path, members=members)


def send_case(cluster: LocalCluster, cipher: LinkCipher, case: Case) -> bool:
    """Send `case` to its node; for a raft case, whether the handshake was done."""
    config = cluster.nodes[case.node].config
    if case.target == "client":
        send_client_case(config.client_address, case)
        return False
    return send_raft_case(config.raft_address, cipher, case)


def run_fuzz(
    cluster: LocalCluster,
    *,
    seed: int,
    duration_s: float,
    targets: tuple[str, ...] = TARGETS,
    canaries: bool = False,
    impersonate: bool = False,
    marker_dir: str,
    say: Callable[[str], None] = print,
    progress_interval_s: float = 10.0,
) -> FuzzReport:
    """Fuzz `targets` of a running `cluster` for `duration_s`, cases alternating between the
    targets; check the cluster every ``CHECK_INTERVAL_S`` and at the end. Stops at the first
    crash or hang. `marker_dir` receives the canaries' marker file (``canaries``). With
    `impersonate`, raft cases also claim to be another member of the cluster (the node has no
    way to tell today; Raft assumes its members honest, so expect findings)."""
    report = FuzzReport(seed)
    cluster.wait_converged()  # every node up and answering before the first case
    cipher = cipher_of(cluster.nodes[0].config)
    canary = marker_path(marker_dir) if canaries else ""
    recent = {i: collections.deque(maxlen=RECENT_CASES) for i in range(len(cluster.nodes))}
    legit = LegitClient(cluster, f"fuzz-legit-{seed}")
    started = time.monotonic()
    next_check = started + CHECK_INTERVAL_S
    next_progress = started + progress_interval_s
    say(f"fuzz: seed {seed}, {duration_s:.0f} s on {', '.join(targets)} (replay: --seed {seed}; one case: --replay TARGET:INDEX)")
    try:
        while time.monotonic() - started < duration_s:
            for target in targets:
                case = make_case(target, seed, report.cases[target], cluster, canary, impersonate=impersonate)
                report.cases[target] += 1
                recent[case.node].append(case)
                try:
                    report.handshakes += send_case(cluster, cipher, case)
                except OSError:
                    report.refused += 1
                report.memo_bombs += case.memo_bombs
            now = time.monotonic()
            if now >= next_check:
                if not _check(cluster, legit, report, recent):
                    break
                next_check = time.monotonic() + CHECK_INTERVAL_S
            if now >= next_progress:
                report.duration_s = now - started
                say(f"  {now - started:5.0f} s: " + report.summary())
                next_progress = now + progress_interval_s
        if report.ok:
            _check(cluster, legit, report, recent)
        if all(f.kind in ("code", "stall") for f in report.findings):
            _check_acked(cluster, report)
    finally:
        legit.close()
        report.duration_s = time.monotonic() - started
    if canary and os.path.exists(canary) and not any(f.kind == "code" for f in report.findings):
        report.findings.append(Finding("code", f"a node ran a canary pickle from a Raft peer: {canary} exists"))
    say(report.summary())
    for finding in report.findings:
        say(finding.describe(seed))
    return report


def _check(cluster: LocalCluster, legit: LegitClient, report: FuzzReport, recent: dict[int, collections.deque]) -> bool:
    """Every node alive and answering, and a legitimate submit acknowledged; False (with a
    finding) when not."""
    for i, node in enumerate(cluster.nodes):
        code = cluster.exit_code(node.id)
        if code is not None or node.process is None:
            report.findings.append(
                Finding("crash", f"{node.id} exited with code {code}: {_last_log_line(cluster, node.id)}", list(recent[i]))
            )
    if report.findings:
        return False
    asked = time.monotonic()
    status = cluster.status(timeout_s=STATUS_BOUND_S)
    for i, entry in enumerate(status["nodes"]):
        if not answered(entry):
            late = _answered_after(cluster, entry["node"], asked)
            kind, what = ("stall", f"answered after {late:.1f} s") if late is not None else ("hang", f"no answer in {HANG_CONFIRM_S:.0f} s")
            last_line = _last_log_line(cluster, entry["node"])
            detail = f"{entry['node']} did not answer status within {STATUS_BOUND_S} s ({what}): {entry}; its last log line: {last_line}"
            report.findings.append(Finding(kind, detail, list(recent[i])))
    if report.findings:
        return False
    payload = b"legit-%d-%d" % (report.seed, len(report.acked))
    began = time.monotonic()
    try:
        seq = legit.submit(payload, LEGIT_ACK_BOUND_S)
    except (TimeoutError, SequencerError) as exc:
        everyone = [case for cases in recent.values() for case in cases]
        report.findings.append(
            Finding("hang", f"a legitimate submit got no ack within {LEGIT_ACK_BOUND_S} s: {exc!r}; status {status}", everyone)
        )
        return False
    report.legit_latencies_s.append(time.monotonic() - began)
    report.acked[seq] = payload
    return True


def _answered_after(cluster: LocalCluster, node_id: str, asked: float) -> float | None:
    """Seconds from `asked` until `node_id` answered a status request (asked again until
    ``HANG_CONFIRM_S`` passed), or None: it is hung, not slow."""
    while time.monotonic() - asked < HANG_CONFIRM_S:
        if answered(cluster.status(nodes=[node_id], timeout_s=STATUS_BOUND_S)["nodes"][0]):
            return time.monotonic() - asked
    return None


def _check_acked(cluster: LocalCluster, report: FuzzReport) -> None:
    """Every acknowledged legitimate message is in the stream at its number."""
    if not report.acked:
        return
    first, last = min(report.acked), max(report.acked)
    seen: dict[int, bytes] = {}
    with BlockingSequencerClient(cluster.endpoints, session=f"fuzz-check-{report.seed}", token=cluster.token) as client:
        for message in client.subscribe(first, limit=last - first + 1, timeout_s=LEGIT_ACK_BOUND_S):
            if message.seq in report.acked:
                seen[message.seq] = message.payload
    wrong = {seq: (payload, seen.get(seq)) for seq, payload in report.acked.items() if seen.get(seq) != payload}
    if wrong:
        report.findings.append(
            Finding(
                "lost", f"{len(wrong)} of {len(report.acked)} acknowledged messages missing or changed: {dict(list(wrong.items())[:5])}"
            )
        )


def _last_log_line(cluster: LocalCluster, node_id: str) -> str:
    lines = cluster.log_text(node_id, since=cluster.node(node_id).log_offset).strip().splitlines()
    return lines[-1].strip() if lines else "(empty log)"


def replay(
    cluster: LocalCluster, *, seed: int, target: str, index: int, marker_dir: str, canaries: bool = True, impersonate: bool = False
) -> Case:
    """Send one case alone (as the run seeded `seed` made it); returns it."""
    cluster.wait_converged()
    case = make_case(target, seed, index, cluster, marker_path(marker_dir) if canaries else "", impersonate=impersonate)
    send_case(cluster, cipher_of(cluster.nodes[0].config), case)
    return case
