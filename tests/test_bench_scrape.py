"""The benchmarks' metrics scrape (``benchmarks.throughput._scrape``) reads a fresh page each
time although a node reuses its page for ``METRICS_PAGE_REUSE_S``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks import throughput
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
        return f"raftseq_pages_made {self.made}\n".encode()


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


def test_the_next_scrape_reads_a_page_made_after_the_last_one_arrived(served: tuple[str, SlowFirstPage]) -> None:
    """The first page is made 0.2 s after its request; the next scrape must still get a new
    page, not the reused one (counting the interval from the request read the same page twice,
    and a quick benchmark run counted 0 fsyncs)."""
    address, pages = served
    url = f"http://{address}/metrics"
    first = throughput._scrape(url)
    second = throughput._scrape(url)
    assert first["raftseq_pages_made"] == 1.0, first
    assert second["raftseq_pages_made"] == 2.0, (first, second)
