"""The metrics port (``cluster.metrics_http``): bounded connections, a deadline and a size
bound on the request head, one page per reuse interval."""

from __future__ import annotations

import asyncio
import socket

import pytest

from raftseq.cluster import metrics_http
from raftseq.cluster.config import METRICS_CONNECTIONS_MAX, METRICS_REQUEST_HEAD_BYTES_MAX
from raftseq.cluster.metrics_http import MetricsServer

WAIT_S = 10.0


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Pages:
    def __init__(self) -> None:
        self.made = 0

    def __call__(self) -> bytes:
        self.made += 1
        return b"raftseq_role 1\n"


async def get(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()


def serving(story):
    async def run() -> None:
        pages = Pages()
        server = MetricsServer(free_address(), pages)
        await server.start()
        try:
            await story(server, pages)
        finally:
            await server.stop()

    asyncio.run(run())


def test_a_scrape_gets_the_page_and_other_paths_get_404():
    async def story(server: MetricsServer, pages: Pages) -> None:
        answer = await get(server.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nraftseq_role 1\n")
        assert (await get(server.address, b"GET /secret HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await get(server.address, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 400")

    serving(story)


def test_tight_scrapers_share_one_page_per_reuse_interval(monkeypatch):
    monkeypatch.setattr(metrics_http, "METRICS_PAGE_REUSE_S", 60.0)

    async def story(server: MetricsServer, pages: Pages) -> None:
        for _ in range(5):
            assert (await get(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
        assert pages.made == 1

    serving(story)


def test_an_oversized_request_head_is_closed_without_an_answer():
    async def story(server: MetricsServer, pages: Pages) -> None:
        answer = await get(server.address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * METRICS_REQUEST_HEAD_BYTES_MAX + b"\r\n\r\n")
        assert answer == b"" and pages.made == 0

    serving(story)


@pytest.mark.parametrize("extra", [METRICS_CONNECTIONS_MAX * 3])
def test_half_open_connections_are_pushed_out_by_newer_ones(extra):
    async def story(server: MetricsServer, pages: Pages) -> None:
        host, port = server.address.rsplit(":", 1)
        held = [await asyncio.open_connection(host, int(port)) for _ in range(extra)]
        try:
            for _, writer in held:
                writer.write(b"GET /metrics HTTP/1.1\r\n")  # never finished
            answer = await get(server.address, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.0 200")
            assert len(server.connections) <= METRICS_CONNECTIONS_MAX
            assert server.pushed_out >= extra - METRICS_CONNECTIONS_MAX
        finally:
            for _, writer in held:
                writer.close()

    serving(story)
