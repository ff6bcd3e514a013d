"""State-machine snapshots in the cluster: publish, find, fetch.

How they are stored and served (``sequencer.machine`` has the other half):

* **Publish.** A snapshot (``clients.sm.machine.capture``: the machine's bytes in the SDK's
  wrapper, the sequence number it covers, its full digest) is cut into chunks of at most
  ``protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX`` bytes, each the payload of one ordinary message
  (``protocol.SnapshotChunk``, header repeated in every chunk) submitted by a session named
  ``@snap/<sm_type>/<replica>`` (``protocol.SNAPSHOT_SESSION_PREFIX``). They are sequenced,
  replicated and journaled like everything else, exactly once per session.
* **Index.** Every node's machine keeps, in its replicated state, the latest few complete
  uploads per (type, schema version): header, publishing session, first and last chunk number.
* **Find.** ``SnapshotQuery(sm_type)`` to any node (followers included) answers ``SnapshotList``
  from that index (``query_snapshots``).
* **Fetch.** The chunks are read with an ordinary subscription from ``first_seq`` to
  ``last_seq`` (any node serves journal reads), keeping the publishing session's messages
  (``fetch_snapshot``); the bytes are checked against the header's length and SHA-256, and,
  after ``restore``, the state against the digest (``clients.sm.machine.load``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raftseq.clients.client import SequencerClient, subscribe
from raftseq.clients.tls import ClientTls
from raftseq.clients.connection import request_once
from raftseq.clients.sm.errors import SnapshotPublishError, SnapshotVerifyError
from raftseq.sequencer import protocol

log = logging.getLogger("raftseq.sm.snapshots")


@dataclass(frozen=True)
class CapturedSnapshot:
    """A snapshot taken, ready to publish."""

    sm_type: str
    schema_version: int
    covered_seq: int
    digest: str
    data: bytes

    @property
    def bytes_sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def snapshot_session(sm_type: str, replica: str) -> str:
    """The session that publishes `replica`'s snapshots of `sm_type`."""
    name = f"{protocol.SNAPSHOT_SESSION_PREFIX}{sm_type}/{replica}"
    if not protocol.is_session_name(name):
        raise ValueError(f"{name!r} is not a valid session name (replica names use [A-Za-z0-9._:@+-])")
    return name


def chunk_payloads(snapshot: CapturedSnapshot, *, chunk_bytes: int = protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX) -> list[bytes]:
    """The payloads that publish `snapshot`, in order."""
    if not 1 <= chunk_bytes <= protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX:
        raise ValueError(f"chunk_bytes must be 1..{protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX}")
    data = snapshot.data
    count = max(1, -(-len(data) // chunk_bytes))
    if count > protocol.SNAPSHOT_CHUNKS_MAX:
        raise ValueError(f"a snapshot of {len(data)} bytes needs {count} chunks, more than {protocol.SNAPSHOT_CHUNKS_MAX}")
    sha = snapshot.bytes_sha256
    return [
        protocol.encode_snapshot_chunk(
            protocol.SnapshotChunk(
                snapshot.sm_type,
                snapshot.schema_version,
                snapshot.covered_seq,
                snapshot.digest,
                sha,
                len(data),
                count,
                i,
                data[i * chunk_bytes : (i + 1) * chunk_bytes],
            )  # fmt: skip
        )
        for i in range(count)
    ]


async def upload_snapshot(
    client: SequencerClient, snapshot: CapturedSnapshot, *, chunk_bytes: int = protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX
) -> tuple[int, int]:
    """Submit `snapshot`'s chunks through `client` (a snapshot session); returns the sequence
    numbers of the first and the last chunk. The client is made with ``snapshot_publisher=True``
    (a node refuses ``@snap/`` sessions to other clients: ``reserved_session``)."""
    if not client.session.startswith(protocol.SNAPSHOT_SESSION_PREFIX):
        raise ValueError(f"session {client.session!r} is not a snapshot session ({protocol.SNAPSHOT_SESSION_PREFIX}...)")
    if not client.snapshot_publisher:
        raise ValueError("a snapshot session's client must say it publishes snapshots: SequencerClient(..., snapshot_publisher=True)")
    payloads = chunk_payloads(snapshot, chunk_bytes=chunk_bytes)
    step = max(1, min(client.in_flight_max, 256))
    seqs: list[int] = []
    for start in range(0, len(payloads), step):
        seqs += await client.submit_batch(payloads[start : start + step])
    return seqs[0], seqs[-1]


async def query_snapshots(
    endpoints: Sequence[str],
    sm_type: str,
    *,
    token: str = "",
    session: str = "sm-query",
    timeout_s: float = 2.0,
    prefer: str = "",
    tls: ClientTls = None,
) -> list[protocol.SnapshotInfo]:
    """The snapshots of `sm_type` the cluster holds, newest first, from the first node that
    answers (`prefer` first, then the others in random order). Raises ``ConnectionError`` when
    none does."""
    order = random.sample(list(endpoints), len(endpoints))
    if prefer in order:
        order.remove(prefer)
        order.insert(0, prefer)
    problems = []
    for address in order:
        try:
            # A node that predates snapshot queries answers Rejected(bad_frame): ConnectionError.
            answer = await request_once(
                address, protocol.SnapshotQuery(sm_type), protocol.SnapshotList, session=session, token=token, timeout_s=timeout_s, tls=tls
            )
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc or type(exc).__name__}")
            continue
        return list(answer.snapshots)
    raise ConnectionError(f"no node answered a snapshot query for {sm_type!r}: {'; '.join(problems)}")


async def wait_indexed(
    endpoints: Sequence[str],
    sm_type: str,
    first_seq: int,
    *,
    token: str = "",
    timeout_s: float = 10.0,
    session: str = "sm-query",
    tls: ClientTls = None,
) -> protocol.SnapshotInfo:
    """The index entry of the upload whose first chunk is `first_seq`, once a node lists it.
    Raises ``SnapshotPublishError`` if none does within `timeout_s` (the chunks were sequenced
    but the machine did not accept the upload, or it was already evicted by newer ones)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    seen: list[protocol.SnapshotInfo] = []
    while True:
        try:
            seen = await query_snapshots(endpoints, sm_type, token=token, session=session, timeout_s=min(2.0, timeout_s), tls=tls)
        except ConnectionError:
            seen = []
        for info in seen:
            if info.first_seq == first_seq:
                return info
        if time.monotonic() >= deadline:
            raise SnapshotPublishError(
                f"snapshot of {sm_type!r} with chunks from seq {first_seq}: not in the cluster's index after {timeout_s} s "
                f"(index holds {[(i.covered_seq, i.first_seq) for i in seen]})"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def fetch_snapshot(
    endpoints: Sequence[str],
    info: protocol.SnapshotInfo,
    *,
    token: str = "",
    session: str = "sm-fetch",
    prefer: str = "",
    subscribe_fn: Callable | None = None,
    timeout_s: float = 60.0,
) -> bytes:
    """The bytes of the snapshot `info` describes, read from the journal through an ordinary
    subscription; their length and SHA-256 are checked (``SnapshotVerifyError``)."""
    subscribe_fn = subscribe_fn or subscribe
    parts: list[bytes] = []
    where = f"chunks {info.first_seq}..{info.last_seq} of session {info.session}"

    async def read() -> None:
        stream = subscribe_fn(endpoints, from_seq=info.first_seq, token=token, session=session, prefer=prefer)
        try:
            async for m in stream:
                if m.session == info.session:
                    try:
                        chunk = protocol.decode_snapshot_chunk(m.payload)
                    except protocol.SmFormatError as exc:
                        raise SnapshotVerifyError(info.sm_type, info.covered_seq, f"seq {m.seq}: {exc}", where=where) from None
                    header = (chunk.sm_type, chunk.schema_version, chunk.covered_seq, chunk.digest, chunk.bytes_sha256, chunk.chunk_count)
                    expected = (info.sm_type, info.schema_version, info.covered_seq, info.digest, info.bytes_sha256, info.chunk_count)
                    if header != expected or chunk.chunk_index != len(parts):
                        raise SnapshotVerifyError(
                            info.sm_type,
                            info.covered_seq,
                            f"seq {m.seq} holds chunk {chunk.chunk_index} of {header}, expected chunk {len(parts)}",
                            where=where,
                        )
                    parts.append(chunk.data)
                if m.seq >= info.last_seq:
                    return
        finally:
            await stream.aclose()

    async with asyncio.timeout(timeout_s):  # wait_for (3.11) could lose a cancel that came as the read ended
        await read()
    data = b"".join(parts)
    if len(parts) != info.chunk_count or len(data) != info.total_bytes:
        raise SnapshotVerifyError(
            info.sm_type,
            info.covered_seq,
            f"{len(parts)} chunks, {len(data)} bytes; the index says {info.chunk_count}, {info.total_bytes}",
            where=where,
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != info.bytes_sha256:
        raise SnapshotVerifyError(
            info.sm_type, info.covered_seq, f"bytes have SHA-256 {sha}, the index says {info.bytes_sha256}", where=where
        )
    return data


__all__ = [
    "CapturedSnapshot",
    "chunk_payloads",
    "fetch_snapshot",
    "query_snapshots",
    "snapshot_session",
    "upload_snapshot",
    "wait_indexed",
]
