"""The priority lane under saturating bulk load: an admin submit's latency and the bulk
throughput, with the lane and without it, in the same run on the same cluster.

    python -m benchmarks.bench_priority [--processes 4] [--phases 4] [--phase-s 6]
        [--bulk-in-flight-entries N] [--bulk-messages-per-s R] [--tls] [--stages] [--json FILE]

One local three-node cluster whose nodes name a credentials file: ``bulk`` (submit) and
``admin`` (submit, ``priority``). ``--processes`` client processes submit as ``bulk`` as fast
as their windows allow (batches of ``--batch``, ``--in-flight`` each) for the whole run; this
process submits one admin message at a time, ``--admin-rate`` a second, and times each from
submit to ack. The run alternates phases with the admin credential's priority on and off (the
credentials file rewritten; each phase starts once the leader has read it again and two admin
submits sent since were answered, ``SETTLING_SUBMITS``): the lane's
cost and benefit are measured under the same load on the same machine, phase by phase.

Figures per mode (lane on, lane off): the admin submits' p50, p99 and max latency; the bulk
throughput (the leader's last_seq over the phase, less the admin submits) and the leader's CPU
microseconds per sequenced message. Goals (issue 17): admin p99 <= 10 ms with the lane; bulk
throughput with the lane >= 90% of without. ``--bulk-in-flight-entries`` sets the bound on bulk
entries in Raft while priority traffic is recent (``batcher.priority_bulk_in_flight_entries_max``):
lower, the admin submits wait less and the leader spends more CPU per bulk message (smaller
batches). ``--tls``: the nodes' client ports speak TLS 1.3 (``cluster up --tls``), so that the
priority connections are read beneath the TLS layer. benchmarks/README_cluster.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import msgspec

from benchmarks import stages
from benchmarks.figures import BenchError, percentile
from benchmarks.harness import LEADER_TIMEOUT_S, BenchCluster
from benchmarks.load import told_to_go, worker_client
from benchmarks.machine import code_under_test, print_load
from benchmarks.options import write_report
from benchmarks.peers.common import read_line, start_worker, worker_outcome
from raftseq.clients import SequencerClient
from raftseq.clients.connection import Connection, open_connection
from raftseq.clients.tls import TlsOptions
from raftseq.cluster.certs import local_cluster_tls
from raftseq.cluster.config import CREDENTIALS_POLL_INTERVAL_S
from raftseq.cluster.credentials import Quotas, new_credential, read_credentials, write_credentials
from raftseq.cluster.processes import kill_process

#: The goals of issue 17: admin p99 with the lane, in seconds; bulk throughput with the lane
#: as a fraction of without.
ADMIN_P99_GOAL_S = 0.010
BULK_RATIO_GOAL = 0.90
#: How long the leader may take to read the rewritten credentials file (it polls it).
RELOAD_TIMEOUT_S = 10 * CREDENTIALS_POLL_INTERVAL_S
#: The line a node logs when it read the credentials file again (``cluster.credentials``).
RELOAD_LINE = "read again"
#: A bulk worker's outstanding submits after "stop", and one admin submit, may take this long.
DRAIN_TIMEOUT_S = 60.0
ADMIN_SUBMIT_TIMEOUT_S = 30.0
#: The admin client's session, and where the nodes' stage probe writes (``--stages``), under
#: the run's directory.
ADMIN_SESSION = "admin-probe"
STAGES_DIR = "stages"
#: Admin submits answered after the leader read the file again before a phase starts: the
#: first one sent after a phase without the lane waits for the pipeline that phase filled
#: (up to 16,000 bulk entries, ~90 ms; docs/operating.md, the first priority submit after a
#: quiet second), a cost of switching the lane on, not of the lane; the one in flight at the
#: switch may have been sent before it.
SETTLING_SUBMITS = 2
#: A status request to the saturated leader may take this long.
STATUS_TIMEOUT_S = 10.0


def worker_main(spec_json: str) -> int:
    """A bulk client process: connect, say ``ready``, submit from ``go`` until ``stop`` (lines
    on stdin), then print its outcome as one JSON line."""
    spec = json.loads(spec_json)

    async def work() -> dict:
        client = await worker_client(spec)
        try:
            if not await told_to_go(LEADER_TIMEOUT_S):
                return {"error": "no go from the benchmark"}
            loop = asyncio.get_running_loop()
            stop = loop.run_in_executor(None, sys.stdin.readline)
            payloads = [b"b" * spec["payload_bytes"]] * spec["batch"]
            futures = []
            while not stop.done():
                await client.wait_for_room(spec["batch"])
                futures.append(client.submit_batch_nowait(payloads))
            results = await asyncio.wait_for(asyncio.gather(*futures), DRAIN_TIMEOUT_S)
            seqs = [s for group in results for s in group]
            return {"acked": len(seqs), "unique": len(set(seqs)), "reconnects": client.reconnects}
        finally:
            await client.close()

    return worker_outcome(work)


def set_priority(path: str, on: bool) -> None:
    credentials = read_credentials(path)
    credentials["admin"] = msgspec.structs.replace(credentials["admin"], priority=on)
    write_credentials(path, list(credentials.values()))


def wait_for_reload(bc: BenchCluster, node_id: str, seen: int) -> int:
    """Wait until `node_id` has logged more than `seen` reloads; the new count."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while (count := bc.log_text(node_id).count(RELOAD_LINE)) <= seen:
        if time.monotonic() > deadline:
            raise BenchError(f"{node_id} did not read the credentials file again within {RELOAD_TIMEOUT_S:.0f} s")
        time.sleep(CREDENTIALS_POLL_INTERVAL_S / 10)
    return count


async def leader_seq(bc: BenchCluster, leader: str) -> int:
    """The leader's last_seq (its status, asked on a thread: the loop keeps probing)."""
    entry = (await asyncio.to_thread(bc.status, nodes=[leader], timeout_s=STATUS_TIMEOUT_S))["nodes"][0]
    if "last_seq" not in entry:
        raise BenchError(f"no status from the leader {leader}: {entry}")
    return entry["last_seq"]


class LeaderSeq:
    """The leader's last_seq, asked over a connection of its own (opened again when the node
    closed it: it is silent while an admin submit waits, longer than the idle timeout)."""

    def __init__(self, address: str, token: str, tls: TlsOptions | None) -> None:
        self.address = address
        self.token = token
        self.tls = tls
        self.connection: Connection | None = None

    async def ask(self) -> int:
        for _ in range(2):
            if self.connection is None:
                self.connection = await open_connection(
                    self.address, session="admin-status", token=self.token, timeout_s=STATUS_TIMEOUT_S, tls=self.tls
                )
            try:
                return (await self.connection.status(STATUS_TIMEOUT_S)).last_seq
            except (ConnectionError, OSError):
                self.close()
        raise BenchError(f"the leader {self.address} closed the status connection twice in a row")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class AdminSubmit(NamedTuple):
    """One admin submit: its number, when it was sent and acked (``time.monotonic``), and how
    many messages were sequenced ahead of it: its number less the leader's last_seq asked just
    before it was sent (a figure of order, not time, so the machine's load does not blur it)."""

    seq: int
    sent_s: float
    acked_s: float
    ahead: int

    @property
    def latency_s(self) -> float:
        return self.acked_s - self.sent_s


async def admin_probe(
    client: SequencerClient,
    leader: LeaderSeq,
    rate_per_s: float,
    submits: list[list[AdminSubmit]],
    stop: asyncio.Event,
    answered: asyncio.Event,
) -> None:
    """Submit one admin message at a time, `rate_per_s` a second, each appended to the last
    list of `submits` (the current phase's); `answered` is set at each answer."""
    interval_s = 1 / rate_per_s
    next_at = time.monotonic()
    while not stop.is_set():
        before = await leader.ask()
        started = time.monotonic()
        seq = await asyncio.wait_for(client.submit(b"admin"), ADMIN_SUBMIT_TIMEOUT_S)
        submits[-1].append(AdminSubmit(seq, started, time.monotonic(), seq - before - 1))
        answered.set()
        next_at = max(next_at + interval_s, time.monotonic())
        await asyncio.sleep(next_at - time.monotonic())


async def run_phases(
    bc: BenchCluster, args: argparse.Namespace, path: str, admin_token: str, worker_pids: list[int], probe_dir: str
) -> list[dict]:
    leader = (await bc.leader_soon())["node"]
    reloads = bc.log_text(leader).count(RELOAD_LINE)
    submits: list[list[AdminSubmit]] = [[]]
    stop = asyncio.Event()
    client = SequencerClient(bc.endpoints, session=ADMIN_SESSION, token=admin_token, tls=bc.tls)
    await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
    status = LeaderSeq(bc.endpoint(leader), bc.token, bc.tls)
    answered = asyncio.Event()
    probe = asyncio.create_task(admin_probe(client, status, args.admin_rate, submits, stop, answered))
    phases = []
    try:
        for index in range(args.phases):
            lane = index % 2 == 0
            set_priority(path, lane)
            reloads = await asyncio.to_thread(wait_for_reload, bc, leader, reloads)
            for _ in range(SETTLING_SUBMITS):
                answered.clear()
                await asyncio.wait_for(answered.wait(), ADMIN_SUBMIT_TIMEOUT_S)
            submits.append([])
            before_seq = await leader_seq(bc, leader)
            before_cpu = bc.cpu_times(worker_pids)
            started = time.monotonic()
            await asyncio.sleep(args.phase_s)
            seconds = time.monotonic() - started
            after_cpu = bc.cpu_times(worker_pids)
            after_seq = await leader_seq(bc, leader)
            phase_submits = submits[-1]
            submits.append([])  # what lands between phases counts in neither
            if probe.done():
                probe.result()
            seqs = [before_seq, after_seq]
            bulk = seqs[1] - seqs[0] - len(phase_submits)
            leader_cpu_s = after_cpu[leader] - before_cpu[leader]
            ordered = sorted(submit.latency_s for submit in phase_submits)
            ahead = sorted(submit.ahead for submit in phase_submits)
            phase = {
                "lane": lane,
                "seconds": round(seconds, 2),
                "bulk_per_s": round(bulk / seconds),
                "leader_cpu_us_per_msg": round(1e6 * leader_cpu_s / max(1, seqs[1] - seqs[0]), 1),
                "admin_submits": len(ordered),
                "admin_p50_ms": round(1000 * percentile(ordered, 0.50), 2),
                "admin_p99_ms": round(1000 * percentile(ordered, 0.99), 2),
                "admin_max_ms": round(1000 * (ordered[-1] if ordered else 0), 2),
                "ahead_p50": percentile(ahead, 0.50),
                "ahead_max": ahead[-1] if ahead else 0,
            }
            phases.append(phase)
            print(
                f"phase {index + 1} lane {'on ' if lane else 'off'}: bulk {phase['bulk_per_s']:>7,} msg/s, leader "
                f"{phase['leader_cpu_us_per_msg']:.1f} us CPU/msg; admin {phase['admin_submits']} submits p50 "
                f"{phase['admin_p50_ms']:.2f} ms p99 {phase['admin_p99_ms']:.2f} ms max {phase['admin_max_ms']:.2f} ms; "
                f"sequenced ahead of it p50 {phase['ahead_p50']:,} max {phase['ahead_max']:,}",
                flush=True,
            )
            if args.stages:
                timings = [(submit.seq, submit.sent_s, submit.acked_s) for submit in phase_submits]
                phase["stages"] = await asyncio.to_thread(stages.stage_table, probe_dir, timings)
                print("\n".join(stages.stage_lines(phase["stages"])), flush=True)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(probe, return_exceptions=True), ADMIN_SUBMIT_TIMEOUT_S)
        await client.close()
        status.close()
    return phases


def summary(phases: list[dict]) -> dict:
    """Per mode: the admin latencies over all its phases' submits are not kept, so p99 is the
    worst phase's p99 (conservative) and throughput the median of its phases."""
    result = {}
    for lane in (True, False):
        mine = [p for p in phases if p["lane"] is lane]
        result["on" if lane else "off"] = {
            "bulk_per_s": statistics.median(p["bulk_per_s"] for p in mine),
            "leader_cpu_us_per_msg": statistics.median(p["leader_cpu_us_per_msg"] for p in mine),
            "admin_p50_ms": statistics.median(p["admin_p50_ms"] for p in mine),
            "admin_p99_ms": max(p["admin_p99_ms"] for p in mine),
            "admin_max_ms": max(p["admin_max_ms"] for p in mine),
            "ahead_p50": statistics.median(p["ahead_p50"] for p in mine),
            "ahead_max": max(p["ahead_max"] for p in mine),
        }
    on, off = result["on"], result["off"]
    result["bulk_ratio"] = round(on["bulk_per_s"] / off["bulk_per_s"], 3) if off["bulk_per_s"] else 0.0
    result["goal_admin_p99"] = on["admin_p99_ms"] <= 1000 * ADMIN_P99_GOAL_S
    result["goal_bulk_ratio"] = result["bulk_ratio"] >= BULK_RATIO_GOAL
    return result


def run(args: argparse.Namespace) -> dict:
    load_start = print_load("at start")
    with tempfile.TemporaryDirectory(prefix="bench-priority-") as root:
        path = os.path.join(root, "credentials.json")
        bulk_quotas = Quotas(messages_per_s=args.bulk_messages_per_s)
        bulk, bulk_secret = new_credential("bulk", ["submit"], ["bulk-"], priority=False, quotas=bulk_quotas)
        admin, admin_secret = new_credential("admin", ["admin"], ["admin-"], priority=True, quotas=Quotas())
        write_credentials(path, [bulk, admin])
        workers: list[subprocess.Popen] = []
        batcher = {"in_flight_max": args.batches_in_flight, "priority_bulk_in_flight_entries_max": args.bulk_in_flight_entries}
        overrides = {"credentials_file": path, "batcher": {key: value for key, value in batcher.items() if value}}
        if args.tls:
            overrides["tls"] = local_cluster_tls(os.path.join(root, "tls"))
        probe_dir = os.path.join(root, STAGES_DIR)
        if args.stages:
            stages.enable(probe_dir, sessions=ADMIN_SESSION)
        with BenchCluster.start_in(root, "cluster", insecure=False, overrides=overrides) as bc:
            client_ports = "TLS" if bc.tls is not None else "plaintext"
            deadline = time.monotonic() + LEADER_TIMEOUT_S
            try:
                for k in range(args.processes):
                    spec = {
                        "endpoints": bc.endpoints,
                        "token": f"bulk:{bulk_secret}",
                        "session": f"bulk-{k + 1}",
                        "batch": args.batch,
                        "payload_bytes": args.payload_bytes,
                        "in_flight_max": args.in_flight,
                        "tls": dataclasses.asdict(bc.tls) if bc.tls else None,
                    }
                    workers.append(start_worker("benchmarks.bench_priority", "--worker", spec, stdin=True, stderr=False))
                for k, worker in enumerate(workers):
                    if read_line(worker, deadline).strip() != "ready":
                        raise BenchError(f"bulk process {k + 1} did not connect")
                for worker in workers:
                    worker.stdin.write(b"go\n")
                    worker.stdin.flush()
                phases = asyncio.run(run_phases(bc, args, path, f"admin:{admin_secret}", [w.pid for w in workers], probe_dir))
                for worker in workers:
                    worker.stdin.write(b"stop\n")
                    worker.stdin.flush()
                outcomes = [json.loads(read_line(w, time.monotonic() + DRAIN_TIMEOUT_S) or '{"error": "no outcome"}') for w in workers]
            finally:
                stages.disable()
                for worker in workers:
                    kill_process(worker)
    for k, outcome in enumerate(outcomes):
        if "error" in outcome or outcome["acked"] != outcome["unique"]:
            raise BenchError(f"bulk process {k + 1}: {outcome}")
    load_end = print_load("at end  ")
    result = summary(phases)
    on, off = result["on"], result["off"]
    print(
        f"admin p99 with the lane {on['admin_p99_ms']:.2f} ms (goal <= {1000 * ADMIN_P99_GOAL_S:.0f} ms: "
        f"{'met' if result['goal_admin_p99'] else 'MISSED'}), without {off['admin_p99_ms']:.2f} ms; "
        f"bulk {on['bulk_per_s']:,.0f} msg/s with, {off['bulk_per_s']:,.0f} without: {100 * result['bulk_ratio']:.0f}% "
        f"(goal >= {100 * BULK_RATIO_GOAL:.0f}%: {'met' if result['goal_bulk_ratio'] else 'MISSED'}); leader CPU "
        f"{on['leader_cpu_us_per_msg']:.1f} vs {off['leader_cpu_us_per_msg']:.1f} us/msg; sequenced ahead of an admin "
        f"submit p50 {on['ahead_p50']:,.0f} with the lane, {off['ahead_p50']:,.0f} without",
        flush=True,
    )
    return {
        "options": vars(args),
        "client_ports": client_ports,
        "code": code_under_test(),
        "load_average": {"start": load_start, "end": load_end},
        "phases": phases,
        "bulk_processes": outcomes,
        "summary": result,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4, help="bulk client processes (default 4)")
    parser.add_argument("--phases", type=int, default=4, help="phases, alternating lane on and off (default 4, even)")
    parser.add_argument("--phase-s", type=float, default=6.0, help="seconds each phase is measured (default 6)")
    parser.add_argument("--batch", type=int, default=100, help="submits per SubmitBatch of a bulk client (default 100)")
    parser.add_argument("--in-flight", type=int, default=5000, help="window of each bulk client (default 5000)")
    parser.add_argument("--payload-bytes", type=int, default=100, help="bulk payload size (default 100)")
    parser.add_argument("--admin-rate", type=float, default=50.0, help="admin submits a second, one at a time (default 50)")
    parser.add_argument(
        "--batches-in-flight",
        type=int,
        default=0,
        help="the nodes' batcher.in_flight_max (default 0: the config's): the Raft pipeline a priority batch still queues behind",
    )
    parser.add_argument(
        "--bulk-in-flight-entries",
        type=int,
        default=0,
        help="the nodes' batcher.priority_bulk_in_flight_entries_max (default 0: the config's): bulk entries a priority submit may find ahead of it in Raft",
    )
    parser.add_argument(
        "--bulk-messages-per-s",
        type=float,
        default=0.0,
        help="the bulk credential's quota, messages a second on each node (default 0: none): a leader kept below saturation",
    )
    parser.add_argument(
        "--tls", action="store_true", help="the nodes' client ports speak TLS 1.3 (cluster up --tls), every client with them"
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also where each admin submit's time went, stage by stage, per phase (the leader's stage probe, benchmarks/stages.py)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    if (
        args.phases < 2
        or args.phases % 2
        or args.processes < 1
        or args.phase_s <= 0
        or args.admin_rate <= 0
        or args.bulk_messages_per_s < 0
    ):
        parser.error("--phases must be even and >= 2; --processes, --phase-s and --admin-rate positive; --bulk-messages-per-s not negative")
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench_priority: {exc}", file=sys.stderr)
        return 1
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
