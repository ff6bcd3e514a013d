"""The node's metrics port: a small HTTP/1.0 server on the node's asyncio loop.

prometheus_client's ``start_http_server`` starts one thread per connection with no cap and no
timeout: 300 half-sent requests held 302 threads. Here every connection is a coroutine, at most
``METRICS_CONNECTIONS_MAX`` are open (a new one pushes out the oldest, so half-open sockets
cannot keep a real scrape out), a request head must arrive whole within
``METRICS_REQUEST_TIMEOUT_S`` and ``METRICS_REQUEST_HEAD_BYTES_MAX``, and pages are written by
one worker thread (the collector reads the node as on a scrape thread), reused for
``METRICS_PAGE_REUSE_S`` so that tight scrapers cost the node one page per interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from raftseq.cluster.config import (
    METRICS_CONNECTIONS_MAX,
    METRICS_PAGE_REUSE_S,
    METRICS_REQUEST_HEAD_BYTES_MAX,
    METRICS_REQUEST_TIMEOUT_S,
)
from raftseq.cluster.metrics import PAGE_CONTENT_TYPE

log = logging.getLogger("raftseq.metrics")

#: Paths that answer the metrics page (prometheus_client's server answered every path).
METRICS_PATHS = ("/metrics", "/")


class MetricsServer:
    """Serves the page `make_page` writes (``metrics.page_maker``), called on one worker thread."""

    def __init__(self, address: str, make_page: Callable[[], bytes]) -> None:
        self.address = address
        self.make_page = make_page
        #: Open connections, oldest first.
        self.connections: dict[asyncio.StreamWriter, None] = {}
        self.pushed_out = 0
        self._server: asyncio.base_events.Server | None = None
        self._pages = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-page")
        self._page = b""
        self._page_made = float("-inf")
        self._page_lock = asyncio.Lock()

    async def start(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self._server = await asyncio.start_server(self._serve, host, int(port), limit=METRICS_REQUEST_HEAD_BYTES_MAX)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self.connections):
            writer.close()
        self._pages.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        try:
            async with asyncio.timeout(METRICS_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body = await self._answer(head)
                writer.write(_response(status, body))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one scrape must not take the node down
            log.exception("metrics request failed")
        finally:
            self.connections.pop(writer, None)
            writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Count a new connection in; at the cap, close the oldest one."""
        if len(self.connections) >= METRICS_CONNECTIONS_MAX:
            oldest = next(iter(self.connections))
            del self.connections[oldest]
            oldest.close()
            self.pushed_out += 1
        self.connections[writer] = None

    async def _answer(self, head: bytes) -> tuple[str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] != b"GET":
            return "400 Bad Request", b"GET /metrics\n"
        path = parts[1].split(b"?", 1)[0].decode("ascii", "replace")
        if path not in METRICS_PATHS:
            return "404 Not Found", b"GET /metrics\n"
        return "200 OK", await self._metrics_page()

    async def _metrics_page(self) -> bytes:
        """The page, made on the worker thread, or the last one if it is fresh enough."""
        async with self._page_lock:
            if time.monotonic() - self._page_made >= METRICS_PAGE_REUSE_S:
                loop = asyncio.get_running_loop()
                self._page = await loop.run_in_executor(self._pages, self.make_page)
                self._page_made = time.monotonic()
            return self._page


def _response(status: str, body: bytes) -> bytes:
    content_type = PAGE_CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    head = f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + body
