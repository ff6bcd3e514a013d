"""Fan-out through relays: many subscribers through relays while submits run at a steady rate.

    python -m benchmarks.bench_fanout [--subscribers 200] [--relays 2] [--rate 1000] [--seconds 5]
        [--pin off|on|both] [--pin-cores 0:1] [--vs nats] [--stalled-subscriber-s 60]

One local three-node cluster with ``--relays`` relays (``LocalCluster.start_relays``). The same
steady load (``load.SteadyLoad``, latency from the intended send time to the ack) runs twice:
first with no subscriber, then with ``--subscribers`` subscribers spread over the relays (in a
process of their own: ``subscriber_process``), each from the number after the first run. Then:
did every subscriber get every message of the second run, gapless (records counted by
their headers, undecoded: ``bench_stream.RawCounter``; as many as the numbers they span); the ack p99 with subscribers against
without (goal: within 10%); records delivered per second by the relays (their
``raftseq_relay_delivered_records_total``); the subscribers' delivery latency (intended send
time to the read that brought the record, sampled on ``LATENCY_SAMPLED_MAX`` subscribers); CPU
of each process, each node's CPU per submit, and the load average.

``--pin on`` pins the processes (``os.sched_setaffinity`` on every thread of each): the nodes
and the publishing benchmark on the first cores of ``--pin-cores``, the relays and the
subscribers' process on the second, for both runs, so the subscribers cannot take CPU from the
nodes; ``--pin both`` measures unpinned and pinned (``benchmarks/README_fanout.md`` says what
that shows).

``--vs nats`` runs the same shape on NATS JetStream (``peers.nats_jetstream.fanout_beside``: an
R3 stream, ``--subscribers`` push consumers read undecoded (``RawConsumers``) or by nats-py,
each must get every message) and prints both in one table.

``--stalled-subscriber-s S`` is another run: subscriber 0 stops reading for S seconds while the
load runs ``--stall-margin-s`` before and after; the relay it reads from is sampled for RSS
(against the other relay and against the bound its settings give: ``stall_bound``), and the
other subscribers' delivery latency is compared before, during and after the stall.

The issue's figure is ``--subscribers 1000 --rate 2000 --pin both --vs nats``; the defaults
keep a run short (about a minute) on a shared two-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
import urllib.request
from array import array
from collections import Counter

from benchmarks.bench_stream import RawCounter
from benchmarks.figures import cpu_text, latency_line, latency_summary
from benchmarks.harness import BenchCluster
from benchmarks.load import SteadyLoad, run_precise
from benchmarks.machine import cpu_used, load_average
from benchmarks.options import add_numbers, add_report_options, positive_float, positive_int, run_reported
from raftseq.clients.connection import open_connection
from raftseq.cluster.relay_config import RELAY_SUBSCRIBER_LAG_MAX_RECORDS
from raftseq.cluster.relay_local import wait_relay_serving
from raftseq.sequencer import limits, protocol

GOAL_P99_RATIO = 1.10
WARMUP_S = 1.0
#: Seconds of unmeasured load before each pass (after its warm-up second).
SETTLE_S = 1.0
#: How long subscribers may take to reach the last number after the load ends, unless
#: ``--drain-s`` says otherwise (NATS's consumers get as long); also how long they may take to connect.
DRAIN_TIMEOUT_S = 60.0
RELAY_START_TIMEOUT_S = 30.0
SUBSCRIBER_SILENCE_S = 10.0
SUBSCRIBER_CONNECT_TIMEOUT_S = 30.0
#: Subscribers connecting at once (below the relays' ``gateway.preauth_connections_max``).
CONNECTS_AT_ONCE = 32
#: Subscribers whose reads are timed for the delivery latency (the first ones after the stalled
#: one): enough for a p99, few enough that timing costs the subscribers' process nothing.
LATENCY_SAMPLED_MAX = 50
#: The relay's RSS is read this often during a stall run, in seconds.
RSS_INTERVAL_S = 0.5
#: What asyncio lets a transport hold before ``drain`` waits (its default high-water mark,
#: which the gateway keeps): a subscription writes its next block only below it.
ASYNCIO_WRITE_HIGH_WATER_BYTES = 64 * limits.KIB


# --- pinning ------------------------------------------------------------------------------------


def parse_cores(text: str) -> tuple[set[int], set[int]]:
    """``--pin-cores NODES:FANOUT`` (each a comma list: ``0:1``, ``0,1:2,3``): the cores of the
    nodes and the publisher, and of the relays and subscribers; disjoint (whether this machine
    has them is checked only when pinning: ``cores_missing``)."""
    nodes_text, sep, fanout_text = text.partition(":")
    try:
        nodes = {int(c) for c in nodes_text.split(",")}
        fanout = {int(c) for c in fanout_text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NODES:FANOUT core lists such as 0:1, got {text!r}") from None
    if not sep or nodes & fanout:
        raise argparse.ArgumentTypeError(f"expected two disjoint core lists such as 0:1, got {text!r}")
    return nodes, fanout


def cores_missing(cores: tuple[set[int], set[int]]) -> str:
    """What is wrong with pinning to `cores` here ("" when nothing)."""
    available = os.sched_getaffinity(0)
    missing = (cores[0] | cores[1]) - available
    return f"--pin-cores: cores {sorted(missing)} are not available here (have {sorted(available)})" if missing else ""


class Pinning:
    """Which cores each group of processes may run on: ``groups`` maps a group ("nodes",
    "fanout") to its cores, or is empty (unpinned: every core this benchmark started with).
    ``pin`` sets every thread of each process (``/proc/PID/task``; threads made later inherit
    it) and records what ``/proc`` then says (``applied``), which the report shows."""

    def __init__(self, groups: dict[str, set[int]], all_cores: set[int]) -> None:
        self.groups = groups
        self.all_cores = all_cores
        self.applied: dict[str, str] = {}

    @property
    def label(self) -> str:
        if not self.groups:
            return "unpinned"
        return "pinned " + ", ".join(f"{g} on {','.join(map(str, sorted(c)))}" for g, c in self.groups.items())

    def start(self, pids: list[int]) -> None:
        """A new run: forget what was pinned; the nodes' group gets `pids` (nodes or servers)
        and this process, the publisher."""
        self.applied = {}
        self.pin("nodes", [*pids, os.getpid()])

    def pin(self, group: str, pids: list[int]) -> None:
        cores = self.groups.get(group, self.all_cores)
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue  # exited
            for tid in tids:
                try:
                    os.sched_setaffinity(int(tid), cores)
                except ProcessLookupError:
                    pass
            self.applied[f"{group} {pid}"] = allowed_cores(pid)

    def release_self(self) -> None:
        """This process back on every core (a later unpinned run, or the end)."""
        Pinning({}, self.all_cores).pin("bench", [os.getpid()])


def allowed_cores(pid: int) -> str:
    """``Cpus_allowed_list`` of `pid` as ``/proc`` says ("" when it exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return ""


def pinnings(opts: argparse.Namespace) -> list[Pinning]:
    all_cores = os.sched_getaffinity(0)
    nodes, fanout = opts.pin_cores
    pinned = Pinning({"nodes": nodes, "fanout": fanout}, all_cores)
    return {"off": [Pinning({}, all_cores)], "on": [pinned], "both": [Pinning({}, all_cores), pinned]}[opts.pin]


# --- the subscribers' process ---------------------------------------------------------------


class Stall:
    """Subscriber 0's reads of a stall run: held while ``reading`` is clear; when its
    connection ended and why (the relay cuts a subscriber that stopped reading)."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.reading.set()
        self.ended_at = 0.0
        self.ended_by = ""


async def _subscriber(
    address: str,
    token: str,
    index: int,
    from_seq: int,
    counters: list[RawCounter],
    connecting: asyncio.Semaphore,
    errors: list[str],
    started: list[int],
    resumes: Counter[str],
    reads: array | None,
    stall: Stall | None,
) -> None:
    """Reads the stream from `from_seq` undecoded, counting records (``bench_stream.RawCounter``);
    when the relay closes the connection it resumes from the next number, as a client does.
    Connects at most ``CONNECTS_AT_ONCE`` at a time (a relay, like a node, takes only
    ``gateway.preauth_connections_max`` connections waiting for their hello), and again on a
    refusal, for ``SUBSCRIBER_CONNECT_TIMEOUT_S``. With `reads`, appends (time, last number)
    after each read; with `stall`, reads only while ``stall.reading`` is set."""
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
                if stall is not None and not stall.reading.is_set():
                    await stall.reading.wait()
                counter.feed(await link.receive_bytes(SUBSCRIBER_SILENCE_S))
                if reads is not None:
                    reads.append(time.monotonic())
                    reads.append(counter.last_seq)
        except (OSError, ConnectionError, TimeoutError) as exc:
            errors[index] = f"read: {exc or type(exc).__name__}"
            resumes[errors[index].replace(address, "the relay")] += 1
            if stall is not None and not stall.ended_at:
                stall.ended_at, stall.ended_by = time.monotonic(), errors[index]
        finally:
            link.close()


def delivery_latencies(reads: list[array], first_seq: int, intended: array) -> array:
    """Pairs (read time, delivery latency in ms) of every timed read that brought a record of the
    load: from the record's intended send time (``intended[seq - first_seq]``) to the read."""
    out = array("d")
    for pairs in reads:
        for k in range(0, len(pairs), 2):
            i = int(pairs[k + 1]) - first_seq
            if 0 <= i < len(intended):
                out.append(pairs[k])
                out.append((pairs[k] - intended[i]) * 1000)
    return out


def subscriber_process(addresses: list[str], token: str, count: int, from_seq: int, conn, stalled: bool, drain_s: float) -> None:  # noqa: ANN001 - a Pipe end
    """In a child process: `count` subscribers over `addresses` (round robin) from `from_seq`;
    sends "ready" once all are connected. Then takes from `conn`: "stall" and "resume"
    (subscriber 0 stops and starts reading; `stalled` runs only), and at the end (last number,
    first number of the load, the load's intended send times as an ``array("d")`` by number):
    waits for every one to reach the last number (or the deadline) and sends (records each, gap
    each, last error of each that did not finish, resumes by reason, delivery latency pairs by
    the index of the relay read from, the stall)."""

    async def main() -> None:
        counters = [RawCounter() for _ in range(count)]
        errors = [""] * count
        connecting = asyncio.Semaphore(CONNECTS_AT_ONCE)
        started = [0]  # subscribed, or given up connecting
        resumes: Counter[str] = Counter()  # by reason
        stall = Stall() if stalled else None
        timed = range(1, min(count, LATENCY_SAMPLED_MAX + 1)) if count > 1 else range(1)
        reads = {i: array("d") for i in timed}
        tasks = [
            asyncio.create_task(
                _subscriber(
                    addresses[i % len(addresses)],
                    token,
                    i,
                    from_seq,
                    counters,
                    connecting,
                    errors,
                    started,
                    resumes,
                    reads.get(i),
                    stall if i == 0 else None,
                )
            )
            for i in range(count)
        ]
        while started[0] < count:
            await asyncio.sleep(0.05)
        conn.send("ready")
        while True:
            message = await asyncio.to_thread(conn.recv)
            if message == "stall":
                stall.reading.clear()
            elif message == "resume":
                stall.reading.set()
            else:
                break
        last_seq, first_seq, intended = message
        deadline = time.monotonic() + drain_s
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
                dict(resumes),
                {
                    r: delivery_latencies([v for i, v in reads.items() if i % len(addresses) == r], first_seq, intended)
                    for r in range(len(addresses))
                },
                (stall.ended_at, stall.ended_by) if stall else None,
            )
        )

    asyncio.run(main())


class Subscribers:
    """The subscribers' process of one run (``subscriber_process``), stopped on leaving."""

    def __init__(self, addresses: list[str], token: str, count: int, from_seq: int, *, drain_s: float, stalled: bool = False) -> None:
        self.drain_s = drain_s
        self.parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=subscriber_process, args=(addresses, token, count, from_seq, child, stalled, drain_s))

    def __enter__(self) -> Subscribers:
        self.process.start()
        if not self.parent.poll(DRAIN_TIMEOUT_S):
            self.__exit__()
            raise RuntimeError("the subscribers did not connect in time")
        self.parent.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def send(self, message: object) -> None:
        self.parent.send(message)

    def outcome(self, load: SteadyLoad) -> tuple:
        """Tell the subscribers the load's numbers and intended send times; their outcome."""
        seqs = list(load.seqs)
        first = seqs[0]
        intended = array("d", [0.0]) * (seqs[-1] - first + 1)
        for seq, at in zip(seqs, load.intended):
            intended[seq - first] = at
        self.parent.send((max(seqs), first, intended))
        if not self.parent.poll(self.drain_s + 30):
            raise RuntimeError("the subscriber process did not report")
        return self.parent.recv()


def relay_metric(metrics_address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def relays_total(relays: list, name: str) -> float:
    """The sum of counter `name` over `relays`."""
    return sum(relay_metric(r.metrics_address, name) for r in relays)


DELIVERED = "raftseq_relay_delivered_records_total"
LAG_DISCONNECTS = "raftseq_relay_subscriber_lag_disconnects_total"
SUBSCRIBERS = "raftseq_relay_subscribers"


def resumes_text(resumed: dict[str, int], lag_disconnects: float) -> str:
    """Resumes in all, the relays' lag disconnects among the causes, the commonest reasons."""
    top = sorted(resumed.items(), key=lambda kv: -kv[1])[:2]
    reasons = "; ".join(f"{n}x {reason}" for reason, n in top)
    return f"{sum(resumed.values())} resumes ({lag_disconnects:.0f} lag disconnects by the relays{'; ' + reasons if reasons else ''})"


def memory_bytes(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of `pid` (``RssAnon``, ``RssFile``; 0 once gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    found[line.split(":")[0]] = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return found.get("RssAnon", 0), found.get("RssFile", 0)


def tcp_wmem_max_bytes() -> int:
    """The kernel's largest send buffer of an autotuned TCP socket (``net.ipv4.tcp_wmem``)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 0


def stall_bound(rate: int, lag_max_records: int) -> dict:
    """What one subscriber that stops reading may cost a relay, from its settings: in the
    relay's memory the transport's buffer (written only below ``ASYNCIO_WRITE_HIGH_WATER_BYTES``,
    then one journal block of ``limits.SUBSCRIBER_BLOCK_BYTES``) and the block being read; in
    the kernel, outside the relay's RSS, the socket's send buffer (``net.ipv4.tcp_wmem``'s
    maximum). It is cut after ``subscriber_lag_max_records`` at the offered rate."""
    return {
        "rss_bytes": ASYNCIO_WRITE_HIGH_WATER_BYTES + 2 * limits.SUBSCRIBER_BLOCK_BYTES,
        "kernel_send_buffer_bytes": tcp_wmem_max_bytes(),
        "subscriber_lag_max_records": lag_max_records,
        "cut_after_s": lag_max_records / rate if lag_max_records else float("inf"),
    }


# --- runs ---------------------------------------------------------------------------------------


async def steady(bc: BenchCluster, opts: argparse.Namespace, session: str, seconds: float, cpu_pids: list[int], during=None) -> tuple:  # noqa: ANN001
    """``opts.rate`` submits/s for `WARMUP_S` + `seconds`; (ack latency summary, the load, cpu
    share of the nodes and `cpu_pids`, each node's CPU microseconds per submit). `during(load)`:
    a coroutine run beside the load. CPU per submit is what the preamble's A/B asks for: unlike
    the p99 it hardly moves with what else runs on the machine."""
    client = await bc.client(session, in_flight_max=10_000)
    try:
        load = SteadyLoad(client, rate_per_s=opts.rate, payload=b"x" * opts.payload_bytes)
        before, started = bc.cpu_times(cpu_pids), time.monotonic()
        beside = asyncio.create_task(during(load)) if during else None
        try:
            await load.run(duration_s=WARMUP_S + seconds)
        finally:
            if beside is not None:
                await beside
        after = bc.cpu_times(cpu_pids)
        cpu = cpu_used(before, after, time.monotonic() - started)
        per_submit = {n: round((after[n] - before[n]) / max(1, load.submitted) * 1e6, 1) for n in bc.pids}
        await load.checked_seqs(session, seqs_what=session)
        return latency_summary(load.latencies_ms(first_index=int(WARMUP_S * opts.rate))), load, cpu, per_submit
    finally:
        await client.close()


def _latency_of(pairs: array, start: float = float("-inf"), end: float = float("inf")) -> dict:
    """The delivery latency of the (read time, latency) `pairs` read from `start` to `end`."""
    return latency_summary(sorted(pairs[k + 1] for k in range(0, len(pairs), 2) if start <= pairs[k] < end))


def delivery_line(label: str, summary: dict) -> str:
    """``figures.latency_line`` of a delivery latency: it counts reads, not acks."""
    return latency_line(label, summary).replace(" acks)", " reads)")


def fanout_run(bc: BenchCluster, relays: list, opts: argparse.Namespace, pinning: Pinning) -> dict:
    """One pass: the load alone, then with the subscribers, every process pinned by `pinning`."""
    relay_pids = [r.process.pid for r in relays]
    pinning.start(list(bc.pids.values()))
    pinning.pin("fanout", relay_pids)
    print(f"\n{pinning.label}")
    # An unmeasured second of load first: connections, the relays' catch-up and first-use costs
    # would otherwise count against the run without subscribers.
    run_precise(steady(bc, opts, f"settle-{time.monotonic_ns()}", SETTLE_S, []))
    leader = bc.wait_for_leader()["node"]
    alone, load, cpu_alone, us_alone = run_precise(steady(bc, opts, f"alone-{time.monotonic_ns()}", opts.seconds, relay_pids))
    print(f"without subscribers ({opts.rate:,} msg/s, {opts.seconds:g} s, load avg {load_average()}):")
    print(latency_line("intended -> ack", alone))
    print(f"  {'':<18} cpu {cpu_text(cpu_alone)} (client1..: the relays)")
    from_seq = max(load.seqs) + 1
    with Subscribers([r.client_address for r in relays], bc.token, opts.subscribers, from_seq, drain_s=opts.drain_s) as subscribers:
        pinning.pin("fanout", [subscribers.process.pid])
        delivered_before, lag_before = relays_total(relays, DELIVERED), relays_total(relays, LAG_DISCONNECTS)
        started = time.monotonic()
        loaded, load, cpu_loaded, us_loaded = run_precise(
            steady(bc, opts, f"with-subscribers-{time.monotonic_ns()}", opts.seconds, relay_pids + [subscribers.process.pid])
        )
        counts, gaps, errors, resumed, delivery, _ = subscribers.outcome(load)
        elapsed = time.monotonic() - started
        delivered = relays_total(relays, DELIVERED) - delivered_before
        lag_disconnects = relays_total(relays, LAG_DISCONNECTS) - lag_before
    want = max(load.seqs) - from_seq + 1
    complete = sum(1 for c, g in zip(counts, gaps, strict=True) if c == want and not g)
    failed = sum(1 for e in errors if e)
    reasons = sorted({e for e in errors if e})[:3]
    ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("inf")
    delivery_latency = _latency_of(sum(delivery.values(), array("d")))
    print(f"with {opts.subscribers:,} subscribers through {len(relays)} relays (load avg {load_average()}):")
    print(latency_line("intended -> ack", loaded))
    print(delivery_line("intended -> read", delivery_latency) + f" of {min(opts.subscribers, LATENCY_SAMPLED_MAX)} subscribers")
    print(f"  {'':<18} cpu {cpu_text(cpu_loaded)} (client1..: the relays, then the subscribers' process)")
    print(
        "  node CPU per submit without -> with subscribers: "
        + ", ".join(f"{n}{' (leader)' if n == leader else ''} {us_alone[n]:.0f} -> {us_loaded[n]:.0f} us" for n in us_alone)
    )
    print(
        f"  every message, gapless: {complete:,} of {opts.subscribers:,} subscribers ({want:,} messages each; "
        f"{sum(1 for g in gaps if g)} saw a gap, {failed} failed{': ' + '; '.join(reasons) if reasons else ''}; {resumes_text(resumed, lag_disconnects)})"
    )
    print(f"  relays delivered {delivered:,.0f} records in {elapsed:.1f} s: {delivered / elapsed:,.0f} msg/s")
    met = ratio <= GOAL_P99_RATIO
    print(f"  ack p99 with/without subscribers: {ratio:.2f} (goal <= {GOAL_P99_RATIO:.2f}: {'met' if met else 'MISSED'})")
    return {
        "pinning": pinning.label,
        "affinity": dict(pinning.applied),
        "leader": leader,
        "without_subscribers": {"latency": alone, "cpu": cpu_alone, "cpu_us_per_submit": us_alone},
        "with_subscribers": {"latency": loaded, "cpu": cpu_loaded, "cpu_us_per_submit": us_loaded, "delivery_latency": delivery_latency},
        "subscribers": opts.subscribers,
        "subscribers_complete": complete,
        "subscribers_with_gaps": sum(1 for g in gaps if g),
        "subscribers_failed": failed,
        "subscriber_resumes": resumed,
        "lag_disconnects": lag_disconnects,
        "messages_each": want,
        "delivered_per_s": delivered / elapsed,
        "p99_ratio": ratio,
        "goal_met": met,
        "load_average_end": load_average(),
    }


def stall_run(bc: BenchCluster, relays: list, opts: argparse.Namespace, pinning: Pinning) -> dict:
    """Subscriber 0 stops reading for ``opts.stalled_subscriber_s`` in the middle of a load of
    ``stall_margin_s`` + stall + ``stall_margin_s``: RSS of its relay (and of the others), the
    other subscribers' delivery latency before, during and after, and how the stall ended."""
    stall_s, margin_s = opts.stalled_subscriber_s, opts.stall_margin_s
    relay_pids = [r.process.pid for r in relays]
    pinning.start(list(bc.pids.values()))
    pinning.pin("fanout", relay_pids)
    lag_max = relays[0].subscriber_lag_max or RELAY_SUBSCRIBER_LAG_MAX_RECORDS
    bound = stall_bound(opts.rate, lag_max)
    #: (time, per relay (anonymous, file-backed) resident bytes, relay 0's subscribers)
    samples: list[tuple[float, list[tuple[int, int]], float]] = []
    marks: dict[str, float] = {}
    from_seq = bc.wait_converged() + 1
    lag_before = relays_total(relays, LAG_DISCONNECTS)
    print(f"\nstalled subscriber: 1 of {opts.subscribers:,} stops reading for {stall_s:g} s ({pinning.label})")
    with Subscribers(
        [r.client_address for r in relays], bc.token, opts.subscribers, from_seq, drain_s=opts.drain_s, stalled=True
    ) as subscribers:
        pinning.pin("fanout", [subscribers.process.pid])

        async def drive(load: SteadyLoad) -> None:
            start = time.monotonic()
            for name, at in (("stall", WARMUP_S + margin_s), ("resume", WARMUP_S + margin_s + stall_s)):
                while time.monotonic() < start + at:
                    served = await asyncio.to_thread(relay_metric, relays[0].metrics_address, SUBSCRIBERS)
                    samples.append((time.monotonic(), [memory_bytes(pid) for pid in relay_pids], served))
                    await asyncio.sleep(RSS_INTERVAL_S)
                subscribers.send(name)
                marks[name] = time.monotonic()

        _, load, cpu, _ = run_precise(
            steady(bc, opts, f"stall-{time.monotonic_ns()}", 2 * margin_s + stall_s, relay_pids + [subscribers.process.pid], drive)
        )
        counts, gaps, errors, resumed, delivery, (ended_at, ended_by) = subscribers.outcome(load)
        disconnects = relays_total(relays, LAG_DISCONNECTS) - lag_before
    want = max(load.seqs) - from_seq + 1
    before = [m for t, m, _ in samples if t < marks["stall"]]
    during = [m for t, m, _ in samples if t >= marks["stall"]]
    # Per relay and kind (anonymous, file-backed): highest during the stall minus highest before.
    growth = (
        [[max(m[k][j] for m in during) - max(m[k][j] for m in before) for j in (0, 1)] for k in range(len(relays))]
        if before and during
        else []
    )
    served_before = max((n for t, _, n in samples if t < marks["stall"]), default=0)
    cut = next((t - marks["stall"] for t, _, n in samples if t >= marks["stall"] and n < served_before), None)
    phases = {
        f"{name} r{r + 1}": _latency_of(pairs, start, end)
        for name, start, end in (
            ("before", marks["stall"] - margin_s, marks["stall"]),
            ("during", marks["stall"], marks["resume"]),
            ("after", marks["resume"], marks["resume"] + margin_s),
        )
        for r, pairs in sorted(delivery.items())
    }
    complete = [c == want and not g for c, g in zip(counts, gaps, strict=True)]
    print(
        f"  bound from the relay's settings: RSS <= {bound['rss_bytes'] / limits.MIB:.2f} MiB "
        f"(asyncio high water {ASYNCIO_WRITE_HIGH_WATER_BYTES // limits.KIB} KiB + 2 x {limits.SUBSCRIBER_BLOCK_BYTES // limits.KIB} KiB "
        f"blocks), kernel send buffer <= {bound['kernel_send_buffer_bytes'] / limits.MIB:.1f} MiB (tcp_wmem max), "
        f"cut after {lag_max:,} records = {bound['cut_after_s']:.0f} s at {opts.rate:,} msg/s"
    )
    if growth:
        print(
            "  relay RSS, highest during the stall minus highest before (anonymous / file-backed): "
            + ", ".join(
                f"r{k + 1} {anon / limits.MIB:+.2f} / {file / limits.MIB:+.2f} MiB{' (the stalled one reads here)' if k == 0 else ''}"
                for k, (anon, file) in enumerate(growth)
            )
        )
    print(
        f"  r1 served {served_before:.0f} subscribers before the stall; "
        + (f"one fewer {cut:.1f} s into it (the stalled one cut)" if cut is not None else "as many all through it")
        + "; the stalled one saw its connection end "
        + (f"{ended_at - marks['stall']:.1f} s into the stall ({ended_by})" if ended_at else "never")
    )
    print(f"  {resumes_text(resumed, disconnects)}")
    for name, summary in phases.items():
        print(delivery_line(f"others {name}", summary))
    print(
        f"  every message, gapless: {sum(complete):,} of {opts.subscribers:,} ({want:,} each; the stalled one "
        f"{'too' if complete[0] else 'NOT: ' + (errors[0] or f'{counts[0]:,} records')}); cpu {cpu_text(cpu)}"
    )
    return {
        "pinning": pinning.label,
        "affinity": dict(pinning.applied),
        "stall_s": stall_s,
        "bound": bound,
        "relay_rss_growth_bytes": growth,
        "relay_cut_after_s": cut,
        "stalled_saw_end_after_s": ended_at - marks["stall"] if ended_at else None,
        "stalled_ended_by": ended_by,
        "lag_disconnects": disconnects,
        "resumes": resumed,
        "others_delivery_latency": phases,
        "subscribers_complete": sum(complete),
        "stalled_complete": complete[0],
        "messages_each": want,
        "cpu": cpu,
        "load_average_end": load_average(),
    }


def nats_runs(opts: argparse.Namespace, root: str, runs: list[Pinning]) -> list[dict]:
    """``fanout_beside`` under each pinning; a pass that fails is a row that says why."""
    from benchmarks.figures import BenchError
    from benchmarks.peers import nats_jetstream

    results = []
    for pinning in runs:
        print(f"\nNATS JetStream, {pinning.label}", flush=True)
        try:
            result = nats_jetstream.fanout_beside(
                root,
                subscribers=opts.subscribers,
                processes=opts.nats_processes,
                rate=opts.rate,
                seconds=opts.seconds,
                warmup_s=WARMUP_S,
                drain_s=opts.drain_s,
                payload_bytes=opts.payload_bytes,
                pin=lambda group, pids, p=pinning: p.start(pids) if group == "servers" else p.pin("fanout", pids),
                raw=opts.nats_consumers == "raw",
            )
        except BenchError as exc:
            print(f"  FAILED: {exc}", flush=True)
            result = {"error": str(exc), "subscribers": opts.subscribers, "subscribers_complete": 0}
        results.append({**result, "pinning": pinning.label, "affinity": dict(pinning.applied)})
    return results


def print_table(raftseq: list[dict], nats: list[dict], opts: argparse.Namespace) -> None:
    print(f"\nfan-out: {opts.subscribers:,} subscribers, {opts.rate:,} msg/s for {opts.seconds:g} s (+{WARMUP_S:g} s warm-up)")
    print(
        f"  {'system':<22} {'cores':<9} {'delivered msg/s':>15} {'every message, gapless':>23} {'ack p99 alone':>14} "
        f"{'with subs':>10} {'ratio':>6}  leader CPU/msg alone -> with"
    )
    for name, rows in ((f"raftseq, {opts.relays} relays", raftseq), ("NATS JetStream R3", nats)):
        for r in rows:
            cores = "pinned" if r["pinning"].startswith("pinned") else "unpinned"
            if "error" in r:
                print(f"  {name:<22} {cores:<9} FAILED: {r['error']}")
                continue
            alone = r["without_subscribers"]["latency"]["p99_ms"]
            loaded = r["with_subscribers"]["latency"]["p99_ms"]
            leader = r["leader"]
            print(
                f"  {name:<22} {cores:<9} {r['delivered_per_s']:>15,.0f} {r['subscribers_complete']:>11,} of {r['subscribers']:<8,}"
                f" {alone:>11.2f} ms {loaded:>7.2f} ms {r['p99_ratio']:>6.2f}  "
                f"{r['without_subscribers']['cpu_us_per_submit'][leader]:.0f} -> {r['with_subscribers']['cpu_us_per_submit'][leader]:.0f} us"
            )


def measure(opts: argparse.Namespace, root: str) -> tuple[dict, int]:
    report: dict = {"options": {k: v for k, v in vars(opts).items() if k != "pin_cores"}, "load_average_start": load_average()}
    report["options"]["pin_cores"] = [sorted(c) for c in opts.pin_cores]
    runs = pinnings(opts)
    ok = True
    try:
        if not opts.skip_raftseq:
            with BenchCluster.start_in(root, "fanout", insecure=False, overrides=None) as bc:
                relays = bc.start_relays(opts.relays)
                for relay in relays:
                    wait_relay_serving(relay, 0, timeout_s=RELAY_START_TIMEOUT_S)
                report["runs"] = [fanout_run(bc, relays, opts, pinning) for pinning in runs]
                ok = all(r["subscribers_complete"] == opts.subscribers for r in report["runs"])
                if opts.stalled_subscriber_s:
                    report["stall"] = stall_run(bc, relays, opts, runs[-1])
                    ok = ok and report["stall"]["subscribers_complete"] == opts.subscribers
        if opts.vs == "nats":
            report["nats"] = nats_runs(opts, root, runs)
            ok = ok and all(r["subscribers_complete"] == opts.subscribers for r in report["nats"])
    finally:
        runs[0].release_self()
    print_table(report.get("runs", []), report.get("nats", []), opts)
    report["load_average_end"] = load_average()
    return report, 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fanout", description=__doc__.split("\n\n")[0])
    add_numbers(
        parser,
        ("--subscribers", positive_int, 200, "subscribers, spread over the relays"),
        ("--relays", positive_int, 2, "relays following the cluster"),
        ("--rate", positive_int, 1000, "submits per second, both runs"),
        ("--seconds", positive_float, 5.0, "seconds of each run (after a 1 s warm-up)"),
        ("--payload-bytes", positive_int, 100, "bytes per message"),
        ("--nats-processes", positive_int, 4, "--vs nats: processes the consumers run in"),
        ("--stalled-subscriber-s", positive_float, None, "also a run in which one subscriber stops reading this long"),
        ("--stall-margin-s", positive_float, 10.0, "seconds of load before and after the stall"),
        ("--drain-s", positive_float, DRAIN_TIMEOUT_S, "seconds subscribers (and NATS consumers) may take to get the rest after the load"),
    )
    parser.add_argument("--pin", choices=("off", "on", "both"), default="off", help="pin nodes and fan-out to separate cores (default off)")
    parser.add_argument(
        "--pin-cores",
        type=parse_cores,
        default="0:1",
        metavar="NODES:FANOUT",
        help="cores of the nodes and publisher : of relays and subscribers",
    )
    parser.add_argument("--vs", choices=("nats",), default="", help="the same run on NATS JetStream, in one table")
    parser.add_argument("--skip-raftseq", action="store_true", help="with --vs nats: NATS's runs only")
    parser.add_argument(
        "--nats-consumers",
        choices=("raw", "nats-py"),
        default="raw",
        help="--vs nats: push consumers read by hand and counted undecoded, as raftseq's subscribers (raw, the default), "
        "or nats-py's ordered consumers",
    )
    add_report_options(parser)
    opts = parser.parse_args(argv)
    if opts.skip_raftseq and not opts.vs:
        parser.error("--skip-raftseq measures the --vs system only: give --vs nats")
    if opts.pin != "off" and cores_missing(opts.pin_cores):
        parser.error(cores_missing(opts.pin_cores))
    return run_reported(opts, measure, prefix="raftseq-fanout-", stopped="cluster, relays, subscribers (and NATS servers) stopped")


if __name__ == "__main__":
    sys.exit(main())
