"""Load on a local cluster, as an application makes it through ``SequencerClient``: as fast as
the client's window allows (one client, or several client processes: ``python -m
benchmarks.load --worker SPEC``), or at a steady offered rate with send times scheduled in
advance (``SteadyLoad``, coordinated-omission safe). Every acknowledged sequence number is
checked: unique, and one gapless run per cluster (the benchmark is its only writer)."""

from __future__ import annotations

import asyncio
import json
import selectors
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass

from benchmarks.figures import BenchError, check_seqs, describe_ranges, expect, merge_ranges, seq_ranges
from benchmarks.harness import LEADER_TIMEOUT_S, BenchCluster
from benchmarks.machine import cpu_used
from benchmarks.peers.common import read_line, start_worker, worker_outcome
from raftseq.clients import SequencerClient
from raftseq.clients.tls import TlsOptions
from raftseq.cluster.processes import wait_or_kill

#: After a steady load stops: how long its outstanding submits may take to be acknowledged.
DRAIN_TIMEOUT_S = 30.0
#: The client's window of submits in flight (``SequencerClient`` default).
IN_FLIGHT_MAX_DEFAULT = 10_000


def run_precise(coroutine):
    """Run a load generator on an asyncio loop whose timers keep time to the microsecond.

    The default loop waits in ``epoll``, whose timeout is whole milliseconds, rounded up: a
    sender sleeping until its next intended send time woke up to 1 ms late (0.32 ms median lag
    at 2,000 msg/s, measured here), and that lag counts as latency from the intended time.
    ``select`` takes microseconds; a load generator has only a few sockets to watch."""
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        return runner.run(coroutine)


class SteadyLoad:
    """One client submitting `payload` at `rate_per_s`, send times scheduled in advance
    (``t0 + i / rate``). A sender that falls behind sends at once what is due, so a stall shows
    as latency from the intended time (no coordinated omission). ``hold`` stops sending;
    ``resume`` starts a fresh schedule from now."""

    def __init__(self, client: SequencerClient, *, rate_per_s: float, payload: bytes) -> None:
        self.client = client
        self.rate_per_s = rate_per_s
        self.payload = payload
        #: Per submit, by index: intended send time, actual submit time, ack time (0 until
        #: acknowledged), sequence number (0 until acknowledged). Times are time.monotonic().
        self.intended = array("d")
        self.sent = array("d")
        self.acked_at = array("d")
        self.seqs = array("q")
        self.acked = 0
        self.errors: list[str] = []
        self._running = asyncio.Event()
        self._running.set()
        self._stop = False
        self._t0 = 0.0
        self._i0 = 0
        self._all_acked = asyncio.Event()
        # First ack of a submit with index >= watch_index (failover).
        self.watch_index = -1
        self.watch_acked_at = 0.0
        self._watch_event = asyncio.Event()

    @property
    def submitted(self) -> int:
        return len(self.sent)

    def hold(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._t0 = time.monotonic()
        self._i0 = len(self.sent)
        self._running.set()

    def stop(self) -> None:
        self._stop = True
        self._running.set()

    def watch_from(self, index: int) -> asyncio.Event:
        self.watch_index = index
        self.watch_acked_at = 0.0
        self._watch_event = asyncio.Event()
        return self._watch_event

    async def run(self, *, duration_s: float) -> None:
        """Submit until `duration_s` of schedule passed (time on hold not counted) or ``stop``."""
        client = self.client
        submit = client.submit_nowait
        window = client.in_flight_max
        interval_s = 1.0 / self.rate_per_s
        self._t0 = time.monotonic()
        self._i0 = 0
        scheduled_s = 0.0
        monotonic = time.monotonic
        while not self._stop:
            if not self._running.is_set():
                scheduled_s += (len(self.sent) - self._i0) * interval_s
                await self._running.wait()
                continue
            now = monotonic()
            if scheduled_s + (now - self._t0) >= duration_s:
                break
            due = self._i0 + int((now - self._t0) * self.rate_per_s) + 1
            while len(self.sent) < due and self._running.is_set() and not self._stop:
                if client.in_flight >= window:
                    await asyncio.wait_for(client.wait_for_room(), DRAIN_TIMEOUT_S)
                    continue
                index = len(self.sent)
                self.intended.append(self._t0 + (index - self._i0) * interval_s)
                future = submit(self.payload)
                self.sent.append(monotonic())
                self.acked_at.append(0.0)
                self.seqs.append(0)
                future.add_done_callback(lambda f, i=index: self._done(i, f))
            if not self._running.is_set():
                continue
            next_s = self._t0 + (len(self.sent) - self._i0) * interval_s
            await asyncio.sleep(max(0.0, next_s - monotonic()))

    def _done(self, index: int, future: asyncio.Future) -> None:
        now = time.monotonic()
        if future.cancelled():
            self.errors.append(f"submit {index} cancelled")
            return
        error = future.exception()
        if error is not None:
            self.errors.append(f"submit {index}: {error!r}")
            return
        self.seqs[index] = future.result()
        self.acked_at[index] = now
        self.acked += 1
        if index >= self.watch_index >= 0 and not self.watch_acked_at:
            self.watch_acked_at = now
            self._watch_event.set()
        if self.acked + len(self.errors) >= len(self.sent):
            self._all_acked.set()

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every submit so far has an outcome; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.acked + len(self.errors) < len(self.sent):
            self._all_acked.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._all_acked.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return True

    def latencies_ms(self, *, first_index: int = 0) -> list[float]:
        """Sorted latencies, intended send to ack, of acknowledged submits from `first_index`
        on, in milliseconds."""
        intended, acked_at = self.intended, self.acked_at
        return sorted((acked_at[i] - intended[i]) * 1000 for i in range(first_index, len(self.sent)) if acked_at[i])

    def split_ms(self, *, first_index: int = 0) -> tuple[list[float], list[float]]:
        """Sorted sender lag (intended to actual send) and send-to-ack times, in milliseconds."""
        lag, service = [], []
        for i in range(first_index, len(self.sent)):
            acked_at = self.acked_at[i]
            if acked_at:
                lag.append((self.sent[i] - self.intended[i]) * 1000)
                service.append((acked_at - self.sent[i]) * 1000)
        return sorted(lag), sorted(service)

    def acked_seqs(self) -> list[int]:
        return [s for s in self.seqs if s]

    async def checked_seqs(self, what: str, *, seqs_what: str = "") -> tuple[list[int], int, int]:
        """Once the load stopped: every submit answered within ``DRAIN_TIMEOUT_S``, none failed,
        and the acknowledged sequence numbers one gapless run (`seqs_what` names it, default
        `what`). Returns them, and the run's first and last."""
        drained = await self.drain()
        expect(
            drained,
            f"{what}: {self.submitted - self.acked} of {self.submitted} submits unacknowledged {DRAIN_TIMEOUT_S:.0f} s after the load stopped",
        )
        expect(not self.errors, f"{what}: {len(self.errors)} submits failed, first: {self.errors[:1]}")
        seqs = self.acked_seqs()
        first, last = check_seqs(seqs, seqs_what or what, expected=self.submitted)
        return seqs, first, last


@dataclass
class ThroughputRun:
    messages: int
    seconds: float
    seqs_first: int
    seqs_last: int
    cpu_s: dict[str, float]
    reconnects: int = 0
    resubmits: int = 0

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds


async def submit_all(client: SequencerClient, payload: bytes, *, messages: int, batch: int, deadline: float) -> list[asyncio.Future]:
    """Submit `messages` copies of `payload` as fast as the client's window allows: per message
    (``batch`` 1, ``submit_nowait``) or ``batch`` at a time (``submit_batch_nowait``). Returns
    the futures of the acks (of lists of sequence numbers when batched)."""
    window = client.in_flight_max
    futures = []
    if batch == 1:
        submit = client.submit_nowait
        for _ in range(messages):
            if client.in_flight >= window:
                await asyncio.wait_for(client.wait_for_room(), max(0.0, deadline - time.monotonic()))
            futures.append(submit(payload))
        return futures
    payloads = [payload] * batch
    sent = 0
    while sent < messages:
        count = min(batch, messages - sent)
        chunk = payloads if count == batch else payloads[:count]
        if client.in_flight + count > window:
            await asyncio.wait_for(client.wait_for_room(count), max(0.0, deadline - time.monotonic()))
        futures.append(client.submit_batch_nowait(chunk))
        sent += count
    return futures


async def pipelined_run(
    bc: BenchCluster, session: str, payload: bytes, *, messages: int, batch: int, in_flight_max: int, timeout_s: float
) -> tuple[float, list[int], SequencerClient]:
    """``submit_all`` on a new client of `bc`. Returns the seconds from the first submit to the
    last ack, the sequence numbers, and the client (to close)."""
    client = await bc.client(session, in_flight_max=in_flight_max)
    try:
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()
        futures = await submit_all(client, payload, messages=messages, batch=batch, deadline=deadline)
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            done = sum(1 for f in futures if f.done())
            raise BenchError(
                f"{session}: stuck: {done} of {len(futures)} submit futures done after {timeout_s:.0f} s "
                f"(in flight {client.in_flight}, reconnects {client.reconnects})"
            ) from None
        seconds = time.perf_counter() - started
    except BaseException:
        await client.close()
        raise
    seqs = results if batch == 1 else [s for group in results for s in group]
    return seconds, seqs, client


async def one_client_run(
    bc: BenchCluster, session: str, payload: bytes, *, messages: int, batch: int, in_flight_max: int, timeout_s: float
) -> ThroughputRun:
    before = bc.cpu_times()
    seconds, seqs, client = await pipelined_run(
        bc, session, payload, messages=messages, batch=batch, in_flight_max=in_flight_max, timeout_s=timeout_s
    )
    after = bc.cpu_times()
    try:
        first, last = check_seqs(seqs, session, expected=messages)
        return ThroughputRun(messages, seconds, first, last, cpu_used(before, after, seconds), client.reconnects, client.resubmits)
    finally:
        await client.close()


async def worker_client(spec: dict) -> SequencerClient:
    """A client process's client (``spec``: endpoints, session, token, in_flight_max, and tls:
    the fields of ``TlsOptions`` or None), connected; then ``ready`` on stdout for the benchmark."""
    tls = TlsOptions(**spec["tls"]) if spec.get("tls") else None
    client = SequencerClient(spec["endpoints"], session=spec["session"], token=spec["token"], in_flight_max=spec["in_flight_max"], tls=tls)
    await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
    print("ready", flush=True)
    return client


async def told_to_go(timeout_s: float) -> bool:
    """Whether the benchmark's next line on stdin, within `timeout_s`, is ``go``."""
    line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), timeout_s)
    return line.strip() == "go"


def worker_main(spec_json: str) -> int:
    """A client process of the multi-process throughput run: connect, say ``ready``, wait for a
    ``go`` line on stdin, submit in batches, print one JSON line with the outcome."""
    spec = json.loads(spec_json)

    async def work() -> dict:
        client = await worker_client(spec)
        try:
            if not await told_to_go(spec["timeout_s"]):
                return {"error": "no go from the benchmark"}
            started = time.monotonic()
            deadline = started + spec["timeout_s"]
            payload = b"x" * spec["payload_bytes"]
            futures = await submit_all(client, payload, messages=spec["messages"], batch=spec["batch"], deadline=deadline)
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
            finished = time.monotonic()
            seqs = [s for group in results for s in group]
            ranges, duplicates = seq_ranges(seqs)
            return {
                "started": started,
                "finished": finished,
                "count": len(seqs),
                "duplicates": duplicates,
                "zeros": sum(1 for s in seqs if s < 1),
                "ranges": ranges,
                "reconnects": client.reconnects,
                "resubmits": client.resubmits,
            }
        finally:
            await client.close()

    return worker_outcome(work)


def multi_client_run(
    bc: BenchCluster, label: str, *, processes: int, messages: int, batch: int, payload_bytes: int, in_flight_max: int, timeout_s: float
) -> ThroughputRun:
    """`processes` client processes, `messages` between them, each in batches of `batch`."""
    per_worker = [messages // processes + (1 if k < messages % processes else 0) for k in range(processes)]
    workers: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s + LEADER_TIMEOUT_S
    try:
        for k in range(processes):
            spec = {
                "endpoints": bc.endpoints,
                "token": bc.token,
                "session": f"{label}-{k + 1}",
                "messages": per_worker[k],
                "batch": batch,
                "payload_bytes": payload_bytes,
                "in_flight_max": in_flight_max,
                "timeout_s": timeout_s,
            }
            workers.append(start_worker("benchmarks.load", "--worker", spec, stdin=True, stderr=True))
        for k, worker in enumerate(workers):
            line = read_line(worker, deadline)
            if line.strip() != "ready":
                raise BenchError(f"client process {k + 1} did not connect: {line.strip() or 'no answer'}")
        before = bc.cpu_times([w.pid for w in workers])
        for worker in workers:
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
        outcomes = []
        for k, worker in enumerate(workers):
            line = read_line(worker, deadline)
            if not line:
                raise BenchError(f"client process {k + 1}: no outcome within {timeout_s:.0f} s (stuck)")
            outcomes.append(json.loads(line))
        after = bc.cpu_times([w.pid for w in workers])
    finally:
        for worker in workers:
            if worker.poll() is None:
                try:
                    worker.stdin.close()
                except OSError:
                    pass
                wait_or_kill(worker, 5)
    for k, outcome in enumerate(outcomes):
        expect("error" not in outcome, f"client process {k + 1}: {outcome.get('error')}")
        expect(outcome["count"] == per_worker[k], f"client process {k + 1}: {outcome['count']} numbers for {per_worker[k]} submits")
        expect(not outcome["zeros"], f"client process {k + 1}: {outcome['zeros']} acks without a sequence number")
        expect(not outcome["duplicates"], f"client process {k + 1}: {outcome['duplicates']} duplicate sequence numbers")
    merged = merge_ranges([r for o in outcomes for r in o["ranges"]], label)
    expect(len(merged) == 1, f"{label}: sequence numbers of the {processes} clients are not one gapless run: {describe_ranges(merged)}")
    seconds = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    return ThroughputRun(
        messages,
        seconds,
        merged[0][0],
        merged[0][1],
        cpu_used(before, after, seconds),
        sum(o["reconnects"] for o in outcomes),
        sum(o["resubmits"] for o in outcomes),
    )


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[sys.argv.index("--worker") + 1]))
