"""Stream figures of a local three-node cluster: replay, recovery and fanout.

Run from the repository root::

    python -m benchmarks.bench_stream [--workload replay|recovery|fanout|all] [--messages N]
                                      [--quick] [--runs R] [--json FILE]

One cluster (``LocalCluster`` on free loopback ports, a temporary directory) is filled with
``--messages`` acknowledged 100-byte messages (5,000,000 by default; two client processes
submitting in batches), then:

1. ``replay`` — a subscriber reads the whole stream from sequence number 1 on a follower:
   through the client library (``clients.subscribe``: every record decoded into a ``Message``)
   and as raw frames (records counted by walking their headers, nothing decoded: what the node
   can serve). Median of ``--runs``.
2. ``recovery`` — SIGKILL a follower and start it again: time until it answers a status
   request, until a subscriber asking for the last record receives it, and until it has caught
   up with the leader. Median of ``--runs``.
3. ``fanout`` — ``--subscribers`` subscribers (raw frames) spread over the two followers, in
   ``--subscriber-processes`` processes, read live while one client submits at ``--rate`` for
   ``--seconds``: messages delivered per second in total, whether every subscriber got every
   message, and the CPU of each node.

The cluster is always stopped (also on a failure, Ctrl-C or SIGTERM) and the directory removed.
Only processes this benchmark started are signalled, by pid. Exit status 0 when every workload
ran (goal met or not), 1 when one failed.

``python -m benchmarks replay recovery fanout`` (``raftseq bench``) measures raftseq's side
through this module: ``FilledCluster`` (one started, filled cluster; ``measure(name)`` runs one
of the workloads on it) with the options built by ``parse_args``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from benchmarks.figures import BenchError, cpu_text, expect, spread
from benchmarks.harness import LEADER_TIMEOUT_S, BenchCluster
from benchmarks.load import IN_FLIGHT_MAX_DEFAULT, multi_client_run
from benchmarks.machine import code_under_test, cpu_used, load_average, machine_facts, print_load
from benchmarks.options import (
    FANOUT_RATE_DEFAULT,
    FANOUT_SECONDS_DEFAULT,
    add_subscriber_options,
    resolve_sizes,
    add_report_options,
    ScopedDirectory,
    positive_float,
    positive_int,
    terminate,
    write_report,
)
from benchmarks.peers.common import start_worker
from raftseq.clients import SequencerClient, subscribe
from raftseq.clients.connection import open_connection
from raftseq.cluster.processes import kill_process
from raftseq.sequencer import protocol

GOAL_REPLAY_PER_S = 500_000
GOAL_RECOVERY_S = 5.0
MESSAGES_DEFAULT = 5_000_000
MESSAGES_QUICK = 100_000
FILL_PROCESSES = 2
FILL_BATCH = 500
READ_BYTES = 1 << 20
READ_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 120.0
#: After the producer stops: how long subscribers may take to receive the rest.
FANOUT_DRAIN_S = 30.0

_HEADER = protocol.HEADER
_HEADER_BYTES = protocol.HEADER_BYTES


class RawCounter:
    """Counts ``Delivered`` frames in a byte stream by their headers (bodies are not decoded;
    the node computed their checksums, and the library path checks them)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.records = 0
        self.last_seq = 0

    def feed(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos = 0
        end = len(buf)
        unpack = _HEADER.unpack_from
        last_body = -1
        count = 0
        while end - pos >= _HEADER_BYTES:
            length = unpack(buf, pos)[0]
            nxt = pos + _HEADER_BYTES + length
            if nxt > end:
                break
            if length >= 3 and buf[pos + _HEADER_BYTES + 1] == 0xA1 and buf[pos + _HEADER_BYTES + 2] == 0x64:  # tag "d"
                count += 1
                last_body = pos + _HEADER_BYTES
            pos = nxt
        if last_body >= 0:
            self.records += count
            self.last_seq = protocol.delivered_seq(buf, last_body)
        self.buffer = buf[pos:]


async def raw_read(endpoint: str, token: str, session: str, from_seq: int, until_seq: int, timeout_s: float) -> RawCounter:
    """Subscribe at `endpoint` from `from_seq` and count records up to `until_seq` from the
    undecoded stream (``Connection.receive_bytes``, which says Heartbeat as a client must)."""
    connection = await open_connection(
        endpoint, session=session, token=token, timeout_s=READ_TIMEOUT_S, read_chunk_bytes=READ_BYTES, stream_buffer_bytes=READ_BYTES
    )
    counter = RawCounter()
    try:
        connection.send(protocol.Subscribe(from_seq))
        deadline = time.monotonic() + timeout_s
        while counter.last_seq < until_seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"{session} on {endpoint}: {counter.records} records by the deadline, last seq {counter.last_seq}, wanted {until_seq}"
                )
            try:
                data = await connection.receive_bytes(min(remaining, READ_TIMEOUT_S))
            except TimeoutError:
                continue
            except ConnectionError:
                raise BenchError(f"{session} on {endpoint}: connection closed at seq {counter.last_seq}") from None
            counter.feed(data)
    finally:
        connection.close()
    return counter


async def library_read(endpoint: str, token: str, until_seq: int) -> int:
    count = 0
    async for message in subscribe([endpoint], from_seq=1, token=token, session="bench-replay-lib"):
        count += 1
        if message.seq >= until_seq:
            break
    return count


# --- the workloads -----------------------------------------------------------------------


def fill(bench: BenchCluster, messages: int, payload_bytes: int) -> int:
    print(f"  filling: {messages:,} messages of {payload_bytes} B from {FILL_PROCESSES} client processes ...", flush=True)
    run = multi_client_run(
        bench,
        "fill",
        processes=FILL_PROCESSES,
        messages=messages,
        batch=FILL_BATCH,
        payload_bytes=payload_bytes,
        in_flight_max=IN_FLIGHT_MAX_DEFAULT,
        timeout_s=max(120.0, messages / 20_000),
    )
    print(f"  filled in {run.seconds:.1f} s ({run.per_s:,.0f} msg/s); waiting for the followers", flush=True)
    seq = bench.wait_converged(at=run.seqs_last)
    if seq != run.seqs_last:
        raise BenchError(f"followers did not reach {run.seqs_last}: {seq}")
    return seq


def followers(bench: BenchCluster) -> list[str]:
    leader = bench.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)["address"]
    return [e for e in bench.endpoints if e != leader]


def workload_replay(args: argparse.Namespace, bench: BenchCluster, last: int) -> dict:
    endpoint = followers(bench)[0]
    raw_rates, lib_rates = [], []
    for r in range(args.runs):
        started = time.perf_counter()
        counter = asyncio.run(raw_read(endpoint, bench.token, f"bench-replay-raw-{r}", 1, last, timeout_s=max(60.0, last / 50_000)))
        seconds = time.perf_counter() - started
        expect(counter.records == last, f"raw replay: {counter.records} records for 1..{last}")
        raw_rates.append(last / seconds)
        started = time.perf_counter()
        count = asyncio.run(asyncio.wait_for(library_read(endpoint, bench.token, last), max(60.0, last / 20_000)))
        seconds = time.perf_counter() - started
        expect(count == last, f"library replay: {count} messages for 1..{last}")
        lib_rates.append(last / seconds)
        print(
            f"    run {r + 1}: raw frames {raw_rates[-1]:>11,.0f} msg/s   client library {lib_rates[-1]:>11,.0f} msg/s   (load {load_average()[0]:.2f})",
            flush=True,
        )
    raw, lib = spread(raw_rates), spread(lib_rates)
    met = lib["median"] >= GOAL_REPLAY_PER_S
    print(f"  replay of {last:,} messages from a follower ({endpoint})")
    print(f"  raw frames     median {raw['median']:>11,.0f} msg/s  (min {raw['min']:,.0f}, max {raw['max']:,.0f})")
    print(
        f"  client library median {lib['median']:>11,.0f} msg/s  (min {lib['min']:,.0f}, max {lib['max']:,.0f})   goal >= {GOAL_REPLAY_PER_S:,}: {'met' if met else 'MISSED'}"
    )
    return {
        "messages": last,
        "raw_messages_per_s": raw,
        "library_messages_per_s": lib,
        "goal_messages_per_s": GOAL_REPLAY_PER_S,
        "goal_met": met,
    }


def workload_recovery(args: argparse.Namespace, bench: BenchCluster, last: int) -> dict:
    figures: dict[str, list[float]] = {"status_s": [], "serve_s": [], "caught_up_s": []}
    leader_changes = 0
    for r in range(args.runs):
        leader_before = bench.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
        endpoint = followers(bench)[0]
        node_id = bench.node_id_of(endpoint)
        journal_dir = bench.journal_dir(node_id)
        journal_bytes = sum(os.path.getsize(os.path.join(journal_dir, f)) for f in os.listdir(journal_dir))
        bench.kill(node_id)  # SIGKILL, and reaped
        started = time.monotonic()
        bench.restart(node_id)
        deadline = started + RECOVERY_TIMEOUT_S
        status_s = serve_s = None
        while time.monotonic() < deadline and status_s is None:
            entry = bench.status(nodes=[node_id])["nodes"][0]
            if entry.get("role") != "unreachable":
                status_s = time.monotonic() - started
            else:
                time.sleep(0.01)
        expect(status_s is not None, f"{node_id} did not answer within {RECOVERY_TIMEOUT_S:.0f} s")
        asyncio.run(raw_read(endpoint, bench.token, f"bench-recovery-{r}", last, last, timeout_s=RECOVERY_TIMEOUT_S))
        serve_s = time.monotonic() - started
        caught_up_s = None
        while time.monotonic() < deadline:
            if bench.converged_seq() == last:
                caught_up_s = time.monotonic() - started
                break
            time.sleep(0.02)
        expect(caught_up_s is not None, f"{node_id} did not catch up within {RECOVERY_TIMEOUT_S:.0f} s")
        leader_after = bench.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
        kept = (leader_after["address"], leader_after["term"]) == (leader_before["address"], leader_before["term"])
        leader_changes += not kept
        figures["status_s"].append(status_s)
        figures["serve_s"].append(serve_s)
        figures["caught_up_s"].append(caught_up_s)
        print(
            f"    run {r + 1}: {node_id} ({journal_bytes / 1e6:,.0f} MB of journal) answers after {status_s:.2f} s, "
            f"serves seq {last:,} after {serve_s:.2f} s, caught up after {caught_up_s:.2f} s; "
            + ("leader kept" if kept else f"LEADER CHANGED (term {leader_before['term']} -> {leader_after['term']})")
            + f" (load {load_average()[0]:.2f})",
            flush=True,
        )
    out = {key: spread(values) for key, values in figures.items()}
    met = out["serve_s"]["median"] <= GOAL_RECOVERY_S
    print(f"  restart of a follower holding {last:,} messages (SIGKILL, then start)")
    print(f"  answers status    median {out['status_s']['median']:.2f} s  (max {out['status_s']['max']:.2f})")
    print(
        f"  serves its stream median {out['serve_s']['median']:.2f} s  (max {out['serve_s']['max']:.2f})   goal <= {GOAL_RECOVERY_S:.0f} s: {'met' if met else 'MISSED'}"
    )
    print(f"  caught up         median {out['caught_up_s']['median']:.2f} s  (max {out['caught_up_s']['max']:.2f})")
    print(f"  leader changes caused by the restarted follower: {leader_changes} of {args.runs} (should be 0)")
    return {"messages": last, **out, "goal_s": GOAL_RECOVERY_S, "goal_met": met, "leader_changes": leader_changes}


def fanout_worker_main(spec_json: str) -> int:
    """A fanout subscriber process: `subscribers` raw subscriptions to one endpoint."""
    spec = json.loads(spec_json)

    async def work() -> dict:
        cpu_start = time.process_time()
        tasks = [
            raw_read(
                spec["endpoint"], spec["token"], f"bench-fanout-{spec['index']}-{k}", spec["from_seq"], spec["until_seq"], spec["timeout_s"]
            )
            for k in range(spec["subscribers"])
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        counts = [r.records for r in results if not isinstance(r, BaseException)]
        return {"counts": counts, "errors": errors, "finished": time.time(), "cpu_s": time.process_time() - cpu_start}

    print(json.dumps(asyncio.run(work())), flush=True)
    return 0


def workload_fanout(args: argparse.Namespace, bench: BenchCluster, last: int) -> dict:
    ends = followers(bench)
    expected = int(args.rate * args.seconds)
    from_seq, until_seq = last + 1, last + expected
    per_process = [
        args.subscribers // args.subscriber_processes + (1 if k < args.subscribers % args.subscriber_processes else 0)
        for k in range(args.subscriber_processes)
    ]
    workers = []
    try:
        for k, count in enumerate(per_process):
            spec = {
                "endpoint": ends[k % len(ends)],
                "token": bench.token,
                "index": k,
                "subscribers": count,
                "from_seq": from_seq,
                "until_seq": until_seq,
                "timeout_s": args.seconds + FANOUT_DRAIN_S + 30,
            }
            workers.append(start_worker("benchmarks.bench_stream", "--fanout-worker", spec, stdin=False, stderr=True))
        time.sleep(1.0)  # let the subscriptions attach (they start at last + 1 and wait)
        before = bench.cpu_times()  # the nodes (and this process); subscriber processes are gone by the end
        started = time.monotonic()
        started_wall = time.time()

        async def produce() -> None:
            client = SequencerClient(bench.endpoints, session="bench-fanout-producer", token=bench.token)
            await client.connect()
            payloads = [b"x" * args.payload_bytes] * 100
            futures = []
            for i in range(expected // 100):
                due = started + i * 100 / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                futures.append(client.submit_batch_nowait(payloads))
            await asyncio.wait_for(asyncio.gather(*futures), FANOUT_DRAIN_S)
            await client.close()

        asyncio.run(produce())
        outcomes = []
        for worker in workers:
            out, err = worker.communicate(timeout=args.seconds + FANOUT_DRAIN_S + 60)
            expect(worker.returncode == 0 and out.strip(), f"fanout subscriber process failed: {err.decode()[-500:]}")
            outcomes.append(json.loads(out))
        seconds = max(o["finished"] for o in outcomes) - started_wall
        after = bench.cpu_times()
    finally:
        for worker in workers:
            kill_process(worker)
    errors = [e for o in outcomes for e in o["errors"]]
    expect(not errors, f"fanout subscribers failed: {errors[:3]}")
    counts = [c for o in outcomes for c in o["counts"]]
    expect(all(c == expected for c in counts), f"fanout: subscribers got {sorted(set(counts))} messages, expected {expected} each")
    delivered = sum(counts)
    cpu = cpu_used(before, after, seconds)
    cpu["subscribers"] = round(sum(o.get("cpu_s", 0.0) for o in outcomes) / seconds, 2)  # all the subscriber processes together
    leader_id = bench.node_id_of(bench.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)["address"])
    print(f"  {args.subscribers} subscribers on the followers, {expected:,} messages at {args.rate:,}/s offered")
    print(
        f"  delivered {delivered:,} messages in {seconds:.1f} s: {delivered / seconds:,.0f} msg/s in total; every subscriber got all {expected:,}"
    )
    print(f"  cpu (share of one core): {cpu_text(cpu)}; leader {leader_id}")
    return {
        "subscribers": args.subscribers,
        "messages": expected,
        "delivered": delivered,
        "seconds": seconds,
        "delivered_per_s": delivered / seconds,
        "complete": True,
        "offered_per_s": args.rate,
        "subscriber_processes": args.subscriber_processes,
        "cpu": cpu,
        "leader": leader_id,
    }


class FilledCluster(ScopedDirectory):
    """A started three-node cluster below `root` (its own temporary directory, removed on exit)
    filled with ``args.messages`` acknowledged messages: one fill serves every workload.
    ``measure(name)`` runs one workload on it (``WORKLOADS``); fanout appends messages, so
    ``last`` follows the stream. A context manager; ``close`` stops every node it started."""

    def __init__(self, root: str, args: argparse.Namespace) -> None:
        super().__init__(root, "stream-")
        self.args = args
        self.bench: BenchCluster | None = None
        self.filled = 0
        self.last = 0
        self.fill_s = 0.0

    def open(self) -> None:
        self.bench = BenchCluster.start_in(self.make_directory(), "stream", insecure=self.args.insecure, overrides=None)
        started = time.monotonic()
        self.filled = self.last = fill(self.bench, self.args.messages, self.args.payload_bytes)
        self.fill_s = time.monotonic() - started

    def close(self) -> None:
        if self.bench is not None:
            self.bench.stop()
            self.bench = None
        self.remove_directory()

    def measure(self, name: str) -> dict:
        """One workload on the filled stream; its figures plus what the stream held. A failure
        is a ``BenchError`` that carries the tails of the node logs."""
        stream = {"filled": self.filled, "fill_s": round(self.fill_s, 2), "last_seq_before": self.last}
        try:
            return {**WORKLOADS[name][1](self.args, self.bench, self.last), "stream": stream}
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.bench.log_tails()}") from None
        finally:
            self.last = self.bench.converged_seq() or self.last


WORKLOADS = {
    "replay": ("1. replay from sequence number 1 on a follower", workload_replay),
    "recovery": ("2. recovery: a follower restarted after SIGKILL", workload_recovery),
    "fanout": ("3. fanout: live subscribers on the followers", workload_fanout),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Replay, recovery and fanout figures of a local three-node raftseq cluster.")
    add = parser.add_argument
    add("--workload", choices=[*WORKLOADS, "all"], default="all", help="what to measure (default all)")
    add("--quick", action="store_true", help=f"{MESSAGES_QUICK:,} messages, 1 run, short fanout: a smoke run")
    add("--messages", type=positive_int, help=f"messages in the stream (default {MESSAGES_DEFAULT:,}; --quick {MESSAGES_QUICK:,})")
    add("--payload-bytes", type=positive_int, default=100, help="bytes per payload (default 100)")
    add("--runs", type=positive_int, help="runs of replay and recovery; the median is the figure (default 3; --quick 1)")
    add("--rate", type=positive_int, default=FANOUT_RATE_DEFAULT, help=f"fanout: offered messages/s (default {FANOUT_RATE_DEFAULT:,})")
    add("--seconds", type=positive_float, help=f"fanout: seconds of production (default {FANOUT_SECONDS_DEFAULT:.0f}; --quick 2)")
    add_subscriber_options(parser, subscribers="subscribers")
    add("--insecure", action="store_true", help="no Raft password and no client token")
    add_report_options(parser)
    add("--fanout-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_sizes(args, {"messages": (MESSAGES_QUICK, MESSAGES_DEFAULT), "runs": (1, 3), "seconds": (2.0, FANOUT_SECONDS_DEFAULT)})
    args.names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fanout_worker:
        return fanout_worker_main(args.fanout_worker)
    signal.signal(signal.SIGTERM, terminate)
    root = tempfile.mkdtemp(prefix="raftseq-bench-stream-", dir=args.dir or None)
    report: dict = {
        "benchmark": "raftseq stream",
        "code": code_under_test(),
        "machine": machine_facts(),
        "load_average_start": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("fanout_worker", "names", "json")},
        "workloads": {},
        "failures": {},
    }
    failed = False
    print("raftseq stream benchmark")
    print_load("at start")
    try:
        with FilledCluster(root, args) as stream:
            for name in args.names:
                print(f"\n{WORKLOADS[name][0]}", flush=True)
                try:
                    report["workloads"][name] = stream.measure(name)
                except BenchError as exc:
                    failed = True
                    report["failures"][name] = str(exc)
                    print(f"  FAILED: {exc}", flush=True)
    except BenchError as exc:
        failed = True
        report["failures"]["setup"] = str(exc)
        print(f"FAILED: {exc}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    report["load_average_end"] = print_load("at end")
    write_report(args.json, report, indent=1)
    if args.json:
        print(f"report    {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
