"""What ``raftseq top`` measures: each node's ``Status`` over the client protocol
(``cluster.status``) and, from the node's metrics endpoint (``Status.metrics_address``), the
cumulative buckets of ``raftseq_ack_latency_seconds``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from raftseq.clients.tls import ClientTls
from raftseq.cluster.status import answered, node_status
from raftseq.sequencer import limits
from raftseq.cluster.top.model import Buckets, NodeSample, Sample

#: Largest metrics page read from a node (a node's page is a few KiB).
METRICS_BYTES_MAX = limits.METRICS_PAGE_BYTES_MAX
#: Session name in the hello of every status request.
SESSION = "top"
ACK_LATENCY_METRIC = "raftseq_ack_latency_seconds"


def parse_ack_buckets(text: str) -> Buckets | None:
    """``raftseq_ack_latency_seconds`` buckets from a Prometheus text page (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name != ACK_LATENCY_METRIC:
            continue
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in family.samples if s.name == f"{ACK_LATENCY_METRIC}_bucket" and "le" in s.labels
        )
        return tuple(buckets) or None
    return None


async def fetch_metrics_page(address: str, *, timeout_s: float) -> str:
    """GET http://address/metrics (loopback or wherever the node serves it), at most
    ``METRICS_BYTES_MAX`` bytes. Raises OSError, TimeoutError or ValueError."""
    host, port = address.rsplit(":", 1)

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {address}\r\nAccept: text/plain\r\n\r\n".encode("ascii"))
            data = await reader.read(METRICS_BYTES_MAX + 1)
            while data and len(data) <= METRICS_BYTES_MAX:
                more = await reader.read(METRICS_BYTES_MAX + 1 - len(data))
                if not more:
                    break
                data += more
            return data
        finally:
            writer.close()

    async with asyncio.timeout(timeout_s):
        data = await get()
    if len(data) > METRICS_BYTES_MAX:
        raise ValueError(f"metrics page of {address} exceeds {METRICS_BYTES_MAX} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1:2] != [b"200"]:
        raise ValueError(f"unexpected answer from {address}: {head[:80]!r}")
    return body.decode("utf-8")


async def _ack_buckets(address: str, timeout_s: float) -> Buckets | None:
    if not address:
        return None
    try:
        return parse_ack_buckets(await fetch_metrics_page(address, timeout_s=timeout_s))
    except (OSError, TimeoutError, ValueError, UnicodeDecodeError):
        return None


async def take_sample(
    endpoints: Sequence[str], *, token: str, timeout_s: float, clock: Callable[[], float] = time.monotonic, tls: ClientTls = None
) -> Sample:
    """Ask every node for its status, then scrape the metrics of those that answered."""
    statuses = await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s, session=SESSION, tls=tls) for e in endpoints))
    at_s = clock()
    buckets = await asyncio.gather(*(_ack_buckets(s.get("metrics_address", ""), timeout_s) if answered(s) else _none() for s in statuses))
    nodes = []
    for endpoint, status, ack in zip(endpoints, statuses, buckets):
        if not answered(status):
            nodes.append(NodeSample(endpoint, False, error=status["error"]))
            continue
        nodes.append(
            NodeSample(
                endpoint,
                True,
                node_id=status["id"],
                pid=status["pid"],
                role=status["role"],
                term=status["term"],
                last_seq=status["last_seq"],
                ack_buckets=ack,
            )
        )
    return Sample(at_s, tuple(nodes))


async def _none() -> None:
    return None
