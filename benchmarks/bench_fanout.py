"""Fan-out through relays: many subscribers through relays while submits run at a steady rate.

    python -m benchmarks.bench_fanout [--subscribers 200] [--relays 2] [--rate 1000] [--seconds 5]

One local three-node cluster with ``--relays`` relays (``LocalCluster.start_relays``). The same
steady load (``load.SteadyLoad``, latency from the intended send time to the ack) runs twice:
first with no subscriber, then with ``--subscribers`` subscribers spread over the relays (in a
process of their own: ``subscriber_process``), each from the number after the first run. Then:
did every subscriber get every message of the second run, gapless (records counted by
their headers, undecoded: ``bench_stream.RawCounter``; as many as the numbers they span); the ack p99 with subscribers against
without (goal: within 10%); records delivered per second by the relays (their
``raftseq_relay_delivered_records_total``); CPU of each process and the load average.

The issue's figure is ``--subscribers 1000 --rate 2000 --seconds 20``; the defaults keep a run
short (about a minute) on a shared two-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
import urllib.request

from benchmarks.figures import cpu_text, latency_line, latency_summary
from benchmarks.bench_stream import RawCounter
from benchmarks.harness import BenchCluster
from benchmarks.load import SteadyLoad, run_precise
from benchmarks.machine import cpu_used, load_average
from benchmarks.options import add_numbers, add_report_options, positive_float, positive_int, run_reported
from raftseq.clients.connection import open_connection
from raftseq.cluster.relay_local import wait_relay_serving
from raftseq.sequencer import protocol

GOAL_P99_RATIO = 1.10
WARMUP_S = 1.0
#: How long subscribers may take to reach the last number after the load ends.
DRAIN_TIMEOUT_S = 60.0
RELAY_START_TIMEOUT_S = 30.0
SUBSCRIBER_SILENCE_S = 10.0
SUBSCRIBER_CONNECT_TIMEOUT_S = 30.0
#: Subscribers connecting at once (below the relays' ``gateway.preauth_connections_max``).
CONNECTS_AT_ONCE = 32


async def _subscriber(
    address: str,
    token: str,
    index: int,
    from_seq: int,
    counters: list[RawCounter],
    connecting: asyncio.Semaphore,
    errors: list[str],
    started: list[int],
    resumes: list[int],
) -> None:
    """Reads the stream from `from_seq` undecoded, counting records (``bench_stream.RawCounter``);
    when the relay closes the connection it resumes from the next number, as a client does.
    Connects at most ``CONNECTS_AT_ONCE`` at a time (a relay, like a node, takes only
    ``gateway.preauth_connections_max`` connections waiting for their hello), and again on a
    refusal, for ``SUBSCRIBER_CONNECT_TIMEOUT_S``."""
    counter = counters[index]
    first = True
    while True:
        deadline = time.monotonic() + SUBSCRIBER_CONNECT_TIMEOUT_S
        while True:
            try:
                async with connecting:
                    link = await open_connection(address, session=f"fan-{index}", token=token, timeout_s=SUBSCRIBER_CONNECT_TIMEOUT_S)
                break
            except (OSError, ConnectionError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    errors[index] = f"connect: {exc or type(exc).__name__}"
                    started[0] += first
                    return
                await asyncio.sleep(0.05)
        try:
            link.send(protocol.Subscribe(counter.last_seq + 1 if counter.records else from_seq))
            started[0] += first
            first = False
            counter.buffer = b""  # a frame cut by the close is read again
            while True:
                counter.feed(await link.receive_bytes(SUBSCRIBER_SILENCE_S))
        except (OSError, ConnectionError, TimeoutError) as exc:
            errors[index] = f"read: {exc or type(exc).__name__}"
            resumes[index] += 1
        finally:
            link.close()


def subscriber_process(addresses: list[str], token: str, count: int, from_seq: int, conn) -> None:  # noqa: ANN001 - a Pipe end
    """In a child process: `count` subscribers over `addresses` (round robin) from `from_seq`;
    sends "ready" once all are connected, then, told the last number, waits for every one to
    reach it (or the deadline) and sends (records each, gap each, last error of each that did not
    finish, resumes)."""

    async def main() -> None:
        counters = [RawCounter() for _ in range(count)]
        errors = [""] * count
        connecting = asyncio.Semaphore(CONNECTS_AT_ONCE)
        started = [0]  # subscribed, or given up connecting
        resumes = [0] * count
        tasks = [
            asyncio.create_task(
                _subscriber(addresses[i % len(addresses)], token, i, from_seq, counters, connecting, errors, started, resumes)
            )
            for i in range(count)
        ]
        while started[0] < count:
            await asyncio.sleep(0.05)
        conn.send("ready")
        last_seq = await asyncio.to_thread(conn.recv)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline and min(c.last_seq for c in counters) < last_seq and not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Gapless: as many records as numbers from the first to the last one received.
        gaps = [bool(c.records) and c.records != c.last_seq - from_seq + 1 for c in counters]
        conn.send(
            (
                [c.records for c in counters],
                gaps,
                [e if not c.records or c.last_seq < last_seq else "" for c, e in zip(counters, errors)],
                sum(resumes),
            )
        )

    asyncio.run(main())


def relay_delivered(metrics_address: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("raftseq_relay_delivered_records_total{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(opts: argparse.Namespace, root: str) -> tuple[dict, int]:
    payload = b"x" * opts.payload_bytes
    report: dict = {"options": vars(opts).copy(), "load_average_start": load_average()}
    with BenchCluster.start_in(root, "fanout", insecure=False, overrides=None) as bc:
        relays = bc.start_relays(opts.relays)
        for relay in relays:
            wait_relay_serving(relay, 0, timeout_s=RELAY_START_TIMEOUT_S)

        async def steady(session: str, extra_pids: tuple[int, ...] = ()) -> tuple[dict, list[int], dict]:
            client = await bc.client(session, in_flight_max=10_000)
            try:
                load = SteadyLoad(client, rate_per_s=opts.rate, payload=payload)
                pids = [r.process.pid for r in relays] + list(extra_pids)
                before, started = bc.cpu_times(pids), time.monotonic()
                await load.run(duration_s=WARMUP_S + opts.seconds)
                cpu = cpu_used(before, bc.cpu_times(pids), time.monotonic() - started)
                seqs, _, _ = await load.checked_seqs(session, seqs_what=session)
                return latency_summary(load.latencies_ms(first_index=int(WARMUP_S * opts.rate))), seqs, cpu
            finally:
                await client.close()

        alone, seqs, cpu_alone = run_precise(steady("alone"))
        print(f"without subscribers ({opts.rate:,} msg/s, {opts.seconds:.0f} s, load avg {load_average()}):")
        print(latency_line("intended -> ack", alone))
        print(f"  {'':<18} cpu {cpu_text(cpu_alone)} (client1..: the relays)")
        from_seq = max(seqs) + 1

        parent, child = multiprocessing.Pipe()
        addresses = [r.client_address for r in relays]
        process = multiprocessing.Process(target=subscriber_process, args=(addresses, bc.token, opts.subscribers, from_seq, child))
        process.start()
        try:
            if not parent.poll(DRAIN_TIMEOUT_S):
                raise RuntimeError("the subscribers did not connect in time")
            parent.recv()
            delivered_before = sum(relay_delivered(r.metrics_address) for r in relays)
            started = time.monotonic()
            loaded, seqs, cpu_loaded = run_precise(steady("with-subscribers", (process.pid,)))
            parent.send(max(seqs))
            if not parent.poll(DRAIN_TIMEOUT_S + 30):
                raise RuntimeError("the subscriber process did not report")
            counts, gaps, errors, resumed = parent.recv()
            elapsed = time.monotonic() - started
            delivered = sum(relay_delivered(r.metrics_address) for r in relays) - delivered_before
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        want = max(seqs) - from_seq + 1
        complete = sum(1 for c, g in zip(counts, gaps, strict=True) if c == want and not g)
        failed = sum(1 for e in errors if e)
        reasons = sorted({e for e in errors if e})[:3]
        ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("inf")
        print(f"with {opts.subscribers:,} subscribers through {opts.relays} relays (load avg {load_average()}):")
        print(latency_line("intended -> ack", loaded))
        print(f"  {'':<18} cpu {cpu_text(cpu_loaded)} (client1..: the relays, then the subscribers' process)")
        print(
            f"  every message, gapless: {complete:,} of {opts.subscribers:,} subscribers ({want:,} messages each; "
            f"{sum(1 for g in gaps if g)} saw a gap, {failed} failed{': ' + '; '.join(reasons) if reasons else ''}; {resumed} resumes)"
        )
        print(f"  relays delivered {delivered:,.0f} records in {elapsed:.1f} s: {delivered / elapsed:,.0f} msg/s")
        met = ratio <= GOAL_P99_RATIO
        print(f"  ack p99 with/without subscribers: {ratio:.2f} (goal <= {GOAL_P99_RATIO:.2f}: {'met' if met else 'MISSED'})")
        report.update(
            {
                "without_subscribers": {"latency": alone, "cpu": cpu_alone},
                "with_subscribers": {"latency": loaded, "cpu": cpu_loaded},
                "subscribers_complete": complete,
                "subscribers_with_gaps": sum(1 for g in gaps if g),
                "subscribers_failed": failed,
                "subscriber_resumes": resumed,
                "messages_each": want,
                "delivered_per_s": delivered / elapsed,
                "p99_ratio": ratio,
                "goal_met": met,
                "load_average_end": load_average(),
            }
        )
    return report, 0 if complete == opts.subscribers else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fanout", description=__doc__.split("\n\n")[0])
    add_numbers(
        parser,
        ("--subscribers", positive_int, 200, "subscribers, spread over the relays"),
        ("--relays", positive_int, 2, "relays following the cluster"),
        ("--rate", positive_int, 1000, "submits per second, both runs"),
        ("--seconds", positive_float, 5.0, "seconds of each run (after a 1 s warm-up)"),
        ("--payload-bytes", positive_int, 100, "bytes per message"),
    )
    add_report_options(parser)
    opts = parser.parse_args(argv)
    return run_reported(opts, measure, prefix="raftseq-fanout-", stopped="cluster, relays and subscribers stopped")


if __name__ == "__main__":
    sys.exit(main())
