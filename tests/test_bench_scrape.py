"""A metrics read of ``LocalCluster`` (what the tests and benchmarks use, e.g. the benchmarks'
Raft log fsync counts) reads a fresh page each time although a node reuses its page for
``METRICS_PAGE_REUSE_S``, and the benchmarks wait for a node still opening its metrics port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

from benchmarks import throughput
from raftseq.cluster import local
from raftseq.cluster.local import ClusterTimeout, LocalCluster, local_configs
from raftseq.cluster.metrics_http import MetricsServer

#: How long the first page takes to make: a node on a busy machine dates its page well after
#: the request was sent.
SLOW_PAGE_S = 0.2
WAIT_S = 10.0


class SlowFirstPage:
    def __init__(self) -> None:
        self.made = 0
        self.slow = threading.Event()
        self.slow.set()

    def __call__(self) -> bytes:
        if self.slow.is_set():
            self.slow.clear()
            time.sleep(SLOW_PAGE_S)
        self.made += 1
        return f"raftseq_pages_made {self.made}\nraftseq_raft_log_fsyncs_total {self.made}\n".encode()


@pytest.fixture
def served() -> Iterator[tuple[str, SlowFirstPage]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    pages = SlowFirstPage()
    server = MetricsServer(address, pages)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(WAIT_S)
    try:
        yield address, pages
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def cluster_serving_at(tmp_path, address: str) -> LocalCluster:
    """A cluster (not started) whose node n1 serves its metrics at `address`."""
    configs = local_configs(str(tmp_path), 40_000, insecure=True)
    configs[0] = msgspec.structs.replace(configs[0], metrics_address=address)
    return LocalCluster(str(tmp_path), 40_000, insecure=True, restart=False, configs=configs)


def test_the_next_read_gets_a_page_made_after_the_last_one_arrived(tmp_path, served: tuple[str, SlowFirstPage]) -> None:
    """The first page is made 0.2 s after its request; the next read must still get a new
    page, not the reused one (counting the interval from the request read the same page twice,
    and a quick benchmark run counted 0 fsyncs)."""
    address, pages = served
    cluster = cluster_serving_at(tmp_path, address)
    first = cluster.metrics("n1")
    second = cluster.metrics("n1")
    assert first["raftseq_pages_made"] == 1.0, first
    assert second["raftseq_pages_made"] == 2.0, (first, second)


def test_raft_log_fsync_counts_wait_for_a_node_still_opening_its_metrics_port(tmp_path, monkeypatch) -> None:
    """A node opens its metrics port after its client port: on a loaded machine the first scrape
    of a just-started cluster was refused and crashed the whole throughput and latency runs
    (``URLError: Connection refused``). The count waits for the port, and names the node when
    it never answers."""
    import io
    import urllib.error

    page = b"raftseq_raft_log_fsyncs_total 7.0\nraftseq_raft_log_fsync_entries_sum 21.0\n"
    refusals = {"127.0.0.1:1": 2}

    def urlopen(url: str, timeout: float):
        address = url.split("/")[2]
        if address == "127.0.0.1:3" or refusals.get(address, 0):
            refusals[address] = refusals.get(address, 0) - 1
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return io.BytesIO(page)

    monkeypatch.setattr(local.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(local, "POLL_INTERVAL_S", 0.0)
    monkeypatch.setattr(local, "METRICS_PAGE_REUSE_S", 0.0)
    served = cluster_serving_at(tmp_path / "a", "127.0.0.1:1")
    served.nodes = served.nodes[:1]
    assert throughput.raft_log_syncs(served) == {"n1": (7.0, 21.0)}
    assert refusals == {"127.0.0.1:1": 0}
    silent = cluster_serving_at(tmp_path / "b", "127.0.0.1:3")
    silent.nodes = silent.nodes[:1]
    monkeypatch.setattr(throughput, "METRICS_SERVED_TIMEOUT_S", 0.2)
    with pytest.raises(ClusterTimeout, match="n1: serves its metrics"):
        throughput.raft_log_syncs(silent)
