"""``python -m benchmarks`` -- the ``raftseq bench`` command: raftseq's figures side by side with
its peers, measured in the same run on the same machine.

    python -m benchmarks [WORKLOAD ...] [--vs nats,nats-sync,etcd,pysyncobj] [--durability crash,power] [--quick] [--runs N] [--json FILE]

Workloads: ``throughput``, ``latency``, ``failover`` (the default is these three) and the
stream workloads ``replay``, ``recovery``, ``fanout``.

raftseq is measured once per ``--durability`` setting, each a system of its own (``raftseq``:
crash, the node default; ``raftseq-power``: power). Its throughput, latency and failover come
from the workload functions of ``throughput.py``, ``latency.py`` and ``failover.py`` with
``bench_cluster.py``'s options (a fresh local three-node cluster for each run), its stream
figures from ``bench_stream.py``'s (one cluster filled with ``--stream-messages`` messages
serves every stream workload selected), the peers' from ``benchmarks/peers/`` (NATS: one filled
stream likewise; pysyncobj, etcd and nats-sync are not measured there). raftseq-power, etcd and
nats-sync acknowledge only what a majority has fsynced; the tables add fsyncs per second,
messages and Raft entries per fsync where counted. The systems take turns run by run (raftseq,
nats, pysyncobj, raftseq, ...) so that a change in the machine's load hits all of them; each
figure is the median of ``--runs`` runs (failover: the median and max over ``--kills`` kills).
Each workload ends with a table: absolute figures, raftseq/peer ratios and the benchmark goals;
the run ends with one table of every system's headline figures (``summary_table``). See
``benchmarks/README_peers.md``.

Exit status: 0 when everything selected ran; 1 when a workload or a peer's setup failed (the
others still run); 2 for bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import bench_cluster, bench_stream
from benchmarks.failover import workload_failover
from benchmarks.figures import BenchError, cpu_text, spread
from benchmarks.latency import workload_latency
from benchmarks.machine import code_under_test, load_average, machine_facts, other_raftseq_nodes, print_load
from benchmarks.options import (
    FANOUT_SECONDS_DEFAULT,
    FANOUT_SECONDS_QUICK,
    add_publisher_options,
    add_subscriber_options,
    resolve_sizes,
    add_processes_option,
    add_report_options,
    positive_float,
    positive_int,
    positive_ints,
    run_reported,
)
from benchmarks.peers import etcd_kv as etcd_peer
from benchmarks.peers import nats_jetstream as nats_peer
from benchmarks.peers import plain_pysyncobj as pysyncobj_peer
from benchmarks.peers.common import SetupError, median_of_summaries
from benchmarks.throughput import workload_throughput

DEFAULT_WORKLOADS = ("throughput", "latency", "failover")
#: Served by one filled stream per system, always in this order (fanout appends to the stream).
STREAM_WORKLOADS = ("replay", "recovery", "fanout")
WORKLOADS = DEFAULT_WORKLOADS + STREAM_WORKLOADS
#: Peers without a stream workload: shown as "--" in those tables.
NO_STREAM = {
    "pysyncobj": "not measured: the obvious pysyncobj design keeps no replayable stream",
    "etcd": "not measured: etcd's counterpart (a watch from revision 1) is not wired in",
    "nats-sync": "not measured: measured once, as nats (the stream workloads read; fsync policy barely matters)",
    "raftseq-power": "not measured: measured once, as raftseq (the stream workloads read the journal; durability is about the Raft log)",
}
PEERS = ("nats", "nats-sync", "etcd", "pysyncobj")
PEER_MODULES = {"nats": nats_peer, "nats-sync": nats_peer.SYNC_SIDE, "etcd": etcd_peer, "pysyncobj": pysyncobj_peer}
#: Peers whose every acknowledgement is on disk (fsync before the ack) on a majority.
POWER_SAFE_PEERS = ("nats-sync", "etcd")
#: raftseq's systems by durability (``--durability``): ``raftseq`` is the node default, "crash"
#: (an ack survives kill -9 of every node, not a power cut; the Raft log is never fsynced);
#: ``raftseq-power`` fsyncs each Raft entry on a node before it counts toward the commit there.
RAFTSEQ_SYSTEMS = {"crash": "raftseq", "power": "raftseq-power"}
DURABILITY_DEFAULT = "crash,power"

# The benchmark goals (2-core machine, everything on one box).
GOAL_THROUGHPUT_PER_S = 200_000
GOAL_THROUGHPUT_PAYLOAD_BYTES = 100
#: (raftseq system, peer) -> the best-variant ratio to reach with 100-byte payloads. etcd's 10x
#: is issue 15's goal for the power-safe mode (against etcd's one fdatasync per commit);
#: nats-sync has no goal of its own.
GOAL_RATIO = {("raftseq", "nats"): 4.0, ("raftseq", "pysyncobj"): 8.0, ("raftseq-power", "etcd"): 10.0}
#: Issue 15: power-safe batched throughput, 100 B, absolute and as a share of the default mode's.
GOAL_POWER_THROUGHPUT_PER_S = 150_000
GOAL_POWER_SHARE_OF_CRASH = 0.6
#: Issue 15: 1 KiB messages per second in either mode.
GOAL_KIB_THROUGHPUT_PER_S = 80_000
GOAL_KIB_PAYLOAD_BYTES = 1024
GOAL_LATENCY_RATE = 2000
#: Latency goals, ms: (raftseq system, offered msg/s) -> {percentile: bound}. The default mode's
#: p50 and p99 at 2,000 msg/s are the benchmark's own goals, the p99.9 bounds and the
#: power-safe mode's issue 15's.
GOAL_LATENCY_MS = {
    ("raftseq", 2000): {"p50": 1.0, "p99": 3.0, "p999": 1.5},
    ("raftseq", 10000): {"p999": 4.0},
    ("raftseq-power", 2000): {"p99": 5.0, "p999": 8.0},
}
GOAL_FAILOVER_MEDIAN_S = 0.5
GOAL_FAILOVER_MAX_S = 1.0
GOAL_REPLAY_PER_S = bench_stream.GOAL_REPLAY_PER_S  # to one subscriber on a follower, client library
GOAL_RECOVERY_S = bench_stream.GOAL_RECOVERY_S  # restarted follower serves its stream again

STREAM_MESSAGES_DEFAULT = bench_stream.MESSAGES_DEFAULT
STREAM_MESSAGES_QUICK = 5_000

#: Option (by its ``dest``) -> (its ``--quick`` size, its default size): the one place both
#: stand, for ``resolve`` and for the help texts.
SIZES = {
    "runs": (1, 3),
    "messages": (5_000, 200_000),
    "payloads": ([100], [100, 1024]),
    "rates": ([1000, 2000], [1000, 2000, 10000, 50000]),
    "latency_seconds": (1.0, 10.0),
    "kills": (2, 10),
    "stream_messages": (STREAM_MESSAGES_QUICK, STREAM_MESSAGES_DEFAULT),
    "fanout_seconds": (FANOUT_SECONDS_QUICK, FANOUT_SECONDS_DEFAULT),
}

EXIT_FAILED = 1


# --- raftseq through bench_cluster --------------------------------------------------------


def _raftseq_args(opts: argparse.Namespace, *, payload_bytes: int, durability: str) -> argparse.Namespace:
    """bench_cluster's options for one call of one of its workload functions."""
    parser = bench_cluster.build_parser()
    argv = [
        "--runs",
        "1",
        "--messages",
        str(opts.messages),
        "--batch",
        str(min(opts.batch, opts.window)),
        "--processes",
        str(opts.processes),
        "--payload-bytes",
        str(payload_bytes),
        "--in-flight-max",
        str(opts.window),
        "--rates",
        ",".join(str(r) for r in opts.rates),
        "--latency-seconds",
        str(opts.latency_seconds),
        "--kills",
        str(opts.kills),
        "--failover-rate",
        str(opts.failover_rate),
        "--run-timeout-s",
        str(opts.run_timeout_s),
        "--durability",
        durability,
    ]
    if opts.insecure:
        argv.append("--insecure")
    args = parser.parse_args(argv)
    bench_cluster.resolve(args, parser)
    return args


def _fresh(root: str, name: str) -> str:
    """A new directory below `root` (bench_cluster names its cluster directories by workload)."""
    return tempfile.mkdtemp(prefix=f"{name}-", dir=root)


def raft_log_fsync(per_node: dict[str, dict], *, messages_per_s: float, leader: str | None = None) -> dict | None:
    """One raftseq run's Raft log fsyncs in the peers' shape: the leader's (where the run names
    it, else the node that fsynced most) fsyncs per second, messages and Raft entries (batches)
    per fsync. None when no node fsynced (durability crash)."""
    if not per_node:
        return None
    node = leader if leader in per_node else max(per_node, key=lambda k: per_node[k]["fsyncs_per_s"])
    f = per_node[node]
    if not f["fsyncs_per_s"]:
        return None
    return {
        "node": node,
        "fsyncs_per_s": f["fsyncs_per_s"],
        "messages_per_fsync": messages_per_s / f["fsyncs_per_s"],
        "entries_per_fsync": f["entries_per_fsync"],
    }


class Raftseq:
    """raftseq with one durability setting, in the shape of the peer modules' workload functions."""

    def __init__(self, durability: str) -> None:
        self.durability = durability

    def throughput(self, opts: argparse.Namespace, root: str, *, payload_bytes: int) -> dict:
        args = _raftseq_args(opts, payload_bytes=payload_bytes, durability=self.durability)
        out = workload_throughput(args, _fresh(root, f"raftseq-{self.durability}-tp"))
        names = {
            "per_message": "1 client",
            "batched": "1 client, batched",
            "processes": f"{opts.processes} processes, batched",
        }
        variants = {}
        for key, v in out["variants"].items():
            per_s = v["messages_per_s"]["median"]
            variants[names[key]] = {
                "messages_per_s": per_s,
                "title": v["title"],
                "cpu_share": v["cpu_share_runs"][0] if v["cpu_share_runs"] else {},
                "fsync": raft_log_fsync(v["raft_log_fsync_runs"][0], messages_per_s=per_s) if v.get("raft_log_fsync_runs") else None,
            }
        return {"variants": variants}

    def latency(self, opts: argparse.Namespace, root: str) -> dict:
        args = _raftseq_args(opts, payload_bytes=opts.payload_bytes, durability=self.durability)
        out = workload_latency(args, _fresh(root, f"raftseq-{self.durability}-lat"))
        for v in out["rates"].values():
            v["fsync"] = raft_log_fsync(v.get("raft_log_fsync", {}), messages_per_s=v["achieved_per_s"], leader=v.get("leader"))
        return {"rates": out["rates"]}

    def failover(self, opts: argparse.Namespace, root: str) -> dict:
        args = _raftseq_args(opts, payload_bytes=opts.payload_bytes, durability=self.durability)
        return workload_failover(args, _fresh(root, f"raftseq-{self.durability}-fo"))

    def stream(self, opts: argparse.Namespace, root: str) -> bench_stream.FilledCluster:
        """A cluster filled with ``opts.stream_messages`` messages; ``measure(name)`` runs one
        of bench_stream.py's workloads on it."""
        argv = [
            "--messages",
            str(opts.stream_messages),
            "--payload-bytes",
            str(opts.payload_bytes),
            "--runs",
            str(opts.runs),
            "--rate",
            str(opts.fanout_rate),
            "--seconds",
            str(opts.fanout_seconds),
            "--subscribers",
            str(opts.subscribers),
            "--subscriber-processes",
            str(opts.subscriber_processes),
        ]
        if opts.insecure:
            argv.append("--insecure")
        return bench_stream.FilledCluster(root, bench_stream.parse_args(argv))


class Nats:
    """NATS's stream side in the same shape (its other workloads are the module's functions)."""

    @staticmethod
    def stream(opts: argparse.Namespace, root: str) -> nats_peer.StreamCluster:
        return nats_peer.StreamCluster(opts, root, messages=opts.stream_messages)


RAFTSEQ_SIDES = {system: Raftseq(durability) for durability, system in RAFTSEQ_SYSTEMS.items()}
STREAM_SIDES = {"raftseq": RAFTSEQ_SIDES["raftseq"], "nats": Nats}


# --- running --------------------------------------------------------------------------------


class Session:
    """One ``bench`` run: the systems, the report, the failures, progress output."""

    def __init__(self, opts: argparse.Namespace, root: str) -> None:
        self.opts = opts
        self.root = root
        self.systems = ([] if opts.skip_raftseq else [RAFTSEQ_SYSTEMS[d] for d in opts.durability]) + opts.vs
        self.failures: dict[str, str] = {}
        self.started = time.monotonic()
        self.setup_failed: dict[str, str] = {}

    def side(self, system: str):
        return RAFTSEQ_SIDES.get(system) or PEER_MODULES[system]

    def active(self) -> list[str]:
        """The systems still to measure (not those whose setup failed)."""
        return [s for s in self.systems if s not in self.setup_failed]

    def progress(self, text: str) -> None:
        load = load_average()
        elapsed = time.monotonic() - self.started
        print(f"\n== {text}   [+{elapsed:.0f} s, load avg {load[0] if load else '-'}]", flush=True)

    def attempt(self, key: str, function, *args, **kwargs):
        """Run one measurement; a failure is recorded under `key` and None returned."""
        system = key.split("/")[1]
        if system in self.setup_failed:
            return None
        try:
            return function(*args, **kwargs)
        except SetupError as exc:
            self.setup_failed[system] = str(exc)
            self.failures[key] = f"setup: {exc}"
            print(f"  SETUP FAILED ({system}): {exc}", flush=True)
        except BenchError as exc:
            self.failures[key] = str(exc)
            print(f"  FAILED ({key}): {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one system's crash must not hide the others
            self.failures[key] = f"{type(exc).__name__}: {exc}"
            print(f"  CRASHED ({key}): {type(exc).__name__}: {exc}\n{traceback.format_exc()}", flush=True)
        return None

    # --- throughput ---------------------------------------------------------------------------

    def throughput(self) -> dict:
        opts = self.opts
        runs: dict = {p: {s: {} for s in self.systems} for p in opts.payloads}
        loads: list = []
        for r in range(opts.runs):
            for payload in opts.payloads:
                for system in self.active():
                    self.progress(f"throughput, {payload}-byte payloads, {system}, run {r + 1} of {opts.runs}")
                    loads.append(load_average())
                    out = self.attempt(
                        f"throughput/{system}/{payload}", self.side(system).throughput, opts, self.root, payload_bytes=payload
                    )
                    if out is None:
                        continue
                    for variant, v in out["variants"].items():
                        runs[payload][system].setdefault(variant, []).append(v)
                        if system not in RAFTSEQ_SIDES:  # bench_cluster prints its own lines
                            print(
                                f"    {system} {variant:<24} {v['messages_per_s']:>10,.0f} msg/s  ({v['messages']:,} in {v['seconds']:.2f} s; "
                                f"cpu {cpu_text(v.get('cpu_share', {}))}){_pysyncobj_notes(v)}",
                                flush=True,
                            )
        result: dict = {"payloads": {}, "load_averages": loads}
        for payload in opts.payloads:
            systems = {}
            for system, variants in runs[payload].items():
                systems[system] = {}
                for variant, vs in variants.items():
                    rates = [v["messages_per_s"] for v in vs]
                    systems[system][variant] = {
                        **spread(rates),
                        "title": vs[0].get("title", ""),
                        "cpu_share_runs": [v.get("cpu_share", {}) for v in vs],
                        "run_details": [{k: x for k, x in v.items() if k not in ("title", "cpu_share")} for v in vs],
                    }
            result["payloads"][str(payload)] = {"systems": systems, **throughput_ratios(systems, payload)}
        return result

    # --- latency ------------------------------------------------------------------------------

    def latency(self) -> dict:
        opts = self.opts
        runs: dict = {s: {str(rate): [] for rate in opts.rates} for s in self.systems}
        loads: list = []
        for r in range(opts.runs):
            for system in self.active():
                self.progress(f"latency at {', '.join(f'{x:,}' for x in opts.rates)} msg/s, {system}, run {r + 1} of {opts.runs}")
                loads.append(load_average())
                out = self.attempt(f"latency/{system}", self.side(system).latency, opts, self.root)
                if out is None:
                    continue
                for rate, v in out["rates"].items():
                    runs[system][rate].append(v)
        result: dict = {"rates": {}, "load_averages": loads}
        for rate in (str(x) for x in opts.rates):
            systems = {}
            for system in self.systems:
                vs = runs[system][rate]
                if not vs:
                    continue
                systems[system] = summarize_latency_runs(vs)
            result["rates"][rate] = {"systems": systems, **latency_ratios(systems, int(rate))}
        return result

    # --- failover -----------------------------------------------------------------------------

    def failover(self) -> dict:
        opts = self.opts
        systems: dict = {}
        for system in self.active():
            self.progress(f"failover, {opts.kills} leader kills under {opts.failover_rate:,} msg/s, {system}")
            load_before = load_average()
            out = self.attempt(f"failover/{system}", self.side(system).failover, opts, self.root)
            if out is None:
                continue
            out["load_average_before"] = load_before
            out["load_average_after"] = load_average()
            systems[system] = out
        return {"systems": systems, **failover_ratios(systems)}

    # --- replay, recovery, fanout --------------------------------------------------------------

    def stream(self, names: list[str]) -> dict:
        """The stream workloads `names`, system by system: one filled stream per system serves
        all of them (filling millions of messages is the slow part)."""
        opts = self.opts
        results: dict = {name: {"systems": {}, "not_measured": {}} for name in names}
        for system in self.active():
            if system in NO_STREAM:
                for name in names:
                    results[name]["not_measured"][system] = NO_STREAM[system]
                continue
            self.progress(f"{', '.join(names)}: {system}, filling a stream of {opts.stream_messages:,} messages")
            with contextlib.ExitStack() as stack:
                filled = self.attempt(
                    f"stream/{system}", lambda side=STREAM_SIDES[system]: stack.enter_context(side.stream(opts, self.root))
                )
                if filled is None:
                    continue
                for name in names:
                    self.progress(
                        f"{name}, {system}"
                        + (
                            f", {opts.runs} run(s)"
                            if name != "fanout"
                            else f", {opts.subscribers} subscribers, {opts.fanout_rate:,} msg/s for {opts.fanout_seconds:g} s"
                        )
                    )
                    load_before = load_average()
                    out = self.attempt(f"{name}/{system}", filled.measure, name)
                    if out is None:
                        continue
                    out["load_average_before"] = load_before
                    out["load_average_after"] = load_average()
                    results[name]["systems"][system] = out
        ratio_of = {"replay": replay_ratios, "recovery": recovery_ratios, "fanout": fanout_ratios}
        for name in names:
            results[name].update(ratio_of[name](results[name]["systems"]))
        return results


def _pysyncobj_notes(v: dict) -> str:
    """What the plain pysyncobj design did during a throughput run besides its figure."""
    if "term_changes" not in v:
        return ""
    notes = [
        f"first {min(pysyncobj_peer.FIRST_ACKS, v['messages']):,} acks at {v[f'first_{pysyncobj_peer.FIRST_ACKS}_per_s']:,.0f} msg/s",
        f"{v['term_changes']} term changes",
        f"{v['resubmits']:,} resubmits",
    ]
    if v.get("applied_twice"):
        notes.append(f"{v['applied_twice']:,} applied twice")
    if v.get("acked_missing"):
        notes.append(f"{v['acked_missing']:,} ACKNOWLEDGED MESSAGES LOST")
    if not v.get("finished", True):
        notes.append("DID NOT FINISH")
    return "; " + ", ".join(notes)


#: Why a system's fsyncs are not counted (etcd's are: ``etcd_disk_wal_fsync_duration_seconds_count``).
FSYNCS_NOT_COUNTED = {
    "raftseq": "none: durability crash (the Raft log is never fsynced)",
    "raftseq-power": "not counted: no Raft log fsync seen during the run (too short, or metrics not served)",
    "nats": "not counted: nats-server exposes no fsync counter (sync_interval default: every 2 min)",
    "nats-sync": "not counted: nats-server exposes no fsync counter (sync_interval: always; strace once: ~107 messages per fsync)",
    "pysyncobj": "none: in-memory Raft log",
}


def _entries_per_fsync(f: dict) -> float | None:
    """Raft entries one fsync covered: raftseq's batches, etcd's requests (a put or a transaction)."""
    return f.get("entries_per_fsync", f.get("requests_per_fsync"))


def fsync_summary(details: list[dict]) -> dict | None:
    """The median over runs of the leader's fsyncs per second, messages and Raft entries per
    fsync (runs that counted them), or None."""
    counted = [d["fsync"] for d in details if d.get("fsync") and d["fsync"].get("messages_per_fsync")]
    if not counted:
        return None
    entries = [e for e in (_entries_per_fsync(f) for f in counted) if e is not None]
    return {
        "fsyncs_per_s": statistics.median(f["fsyncs_per_s"] for f in counted),
        "messages_per_fsync": statistics.median(f["messages_per_fsync"] for f in counted),
        "entries_per_fsync": statistics.median(entries) if entries else None,
        "runs": len(counted),
    }


def _fsync_lines(rows: list[tuple[str, str, dict | None]], *, why_not: bool = True) -> list[str]:
    """One line per (system, what, ``fsync_summary``); with `why_not`, systems without counts
    say why, once."""
    lines, said = [], set()
    for system, what, f in rows:
        if f:
            entries = f" and {f['entries_per_fsync']:,.1f} Raft entries" if f.get("entries_per_fsync") is not None else ""
            lines.append(
                f"  fsync {system:<13} {what:<24} leader {f['fsyncs_per_s']:>8,.0f} fsyncs/s  {f['messages_per_fsync']:>9,.1f} messages"
                f"{entries} per fsync"
            )
        elif why_not and system not in said and system in FSYNCS_NOT_COUNTED:
            lines.append(f"  fsync {system:<13} {FSYNCS_NOT_COUNTED[system]}")
        said.add(system)
    return lines


def summarize_latency_runs(runs: list[dict]) -> dict:
    """Each percentile's median over the runs that had acks after the warm-up. A system that
    had none in any run (it fell behind by more than the run) gets None for every percentile."""
    acked = [v for v in runs if v["latency"]["count"]]
    out: dict = {
        "achieved_per_s": statistics.median(v["achieved_per_s"] for v in runs),
        "runs_without_acks": len(runs) - len(acked),
        "runs_detail": [v["latency"] for v in runs],
        "fsync": fsync_summary(runs),
    }
    if not acked:
        out.update({k: None for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "send_to_ack_p50_ms", "sender_lag_p50_ms")})
        out.update({"count": 0, "runs": len(runs)})
        return out
    out.update(median_of_summaries([v["latency"] for v in acked]))
    out["send_to_ack_p50_ms"] = statistics.median(v["service"]["p50_ms"] for v in acked)
    out["sender_lag_p50_ms"] = statistics.median(v["sender_lag"]["p50_ms"] for v in acked)
    return out


# --- ratios and goals ---------------------------------------------------------------------


def _best(variants: dict) -> tuple[str, float]:
    if not variants:
        return "", 0.0
    name = max(variants, key=lambda k: variants[k]["median"])
    return name, variants[name]["median"]


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _raftseq_in(systems: dict) -> list[str]:
    """The raftseq systems (durabilities) measured, in ``RAFTSEQ_SYSTEMS`` order."""
    return [name for name in RAFTSEQ_SYSTEMS.values() if systems.get(name)]


def throughput_ratios(systems: dict, payload: int) -> dict:
    ratios, goals = {}, []
    bests = {name: _best(systems[name]) for name in _raftseq_in(systems)}
    for name, (raft_name, raft_best) in bests.items():
        raft = systems[name]
        for peer in PEERS:
            if not systems.get(peer):
                continue
            peer_name, peer_best = _best(systems[peer])
            ratio = raft_best / peer_best if peer_best else 0.0
            ratios[f"{name} best / {peer} best"] = {"ratio": ratio, name: raft_name, peer: peer_name}
            for v in (v for v in systems[peer] if v in raft):
                ratios[f"{name} / {peer}, {v}"] = {
                    "ratio": raft[v]["median"] / systems[peer][v]["median"] if systems[peer][v]["median"] else 0.0
                }
            if payload == GOAL_THROUGHPUT_PAYLOAD_BYTES and (name, peer) in GOAL_RATIO:
                goal = GOAL_RATIO[name, peer]
                goals.append({"goal": f"{name} >= {goal:.0f}x {peer}", "value": ratio, "met": ratio >= goal})
    if payload == GOAL_THROUGHPUT_PAYLOAD_BYTES:
        absolute = {"raftseq": GOAL_THROUGHPUT_PER_S, "raftseq-power": GOAL_POWER_THROUGHPUT_PER_S}
        for k, (name, (_, best)) in enumerate(bests.items()):
            goals.insert(k, {"goal": f"{name} >= {absolute[name]:,} msg/s", "value": best, "met": best >= absolute[name]})
        if len(bests) == 2:
            share = bests["raftseq-power"][1] / bests["raftseq"][1] if bests["raftseq"][1] else 0.0
            ratios["raftseq-power best / raftseq best"] = {"ratio": share}
            goals.append(
                {
                    "goal": f"raftseq-power >= {GOAL_POWER_SHARE_OF_CRASH:.1f}x raftseq",
                    "value": share,
                    "met": share >= GOAL_POWER_SHARE_OF_CRASH,
                }
            )
    if payload == GOAL_KIB_PAYLOAD_BYTES:
        for name, (_, best) in bests.items():
            goals.append(
                {"goal": f"{name} >= {GOAL_KIB_THROUGHPUT_PER_S:,} msg/s", "value": best, "met": best >= GOAL_KIB_THROUGHPUT_PER_S}
            )
    return {"ratios": ratios, "goals": goals}


def latency_ratios(systems: dict, rate: int) -> dict:
    ratios, goals = {}, []
    for name in _raftseq_in(systems):
        raft = systems[name]
        if raft["p50_ms"] is not None:
            for peer in PEERS:
                if peer in systems and systems[peer]["p50_ms"]:
                    ratios[f"{name} / {peer}"] = {q: raft[f"{q}_ms"] / systems[peer][f"{q}_ms"] for q in ("p50", "p99", "p999")}
        for q, bound in GOAL_LATENCY_MS.get((name, rate), {}).items():
            value = raft[f"{q}_ms"]
            label = "p99.9" if q == "p999" else q
            goals.append({"goal": f"{name} {label} <= {bound:g} ms", "value": value, "met": value is not None and value <= bound})
    return {"ratios": ratios, "goals": goals}


def failover_ratios(systems: dict) -> dict:
    ratios, goals = {}, []
    for name in _raftseq_in(systems):
        raft = systems[name]["failover_s"]
        for peer in PEERS:
            if peer in systems:
                ratios[f"{name} / {peer}"] = {k: raft[k] / systems[peer]["failover_s"][k] for k in ("median", "max")}
        for k, bound in (("median", GOAL_FAILOVER_MEDIAN_S), ("max", GOAL_FAILOVER_MAX_S)):
            goals.append({"goal": f"{name} failover {k} <= {bound:g} s", "value": raft[k], "met": raft[k] <= bound})
    return {"ratios": ratios, "goals": goals}


def replay_ratios(systems: dict) -> dict:
    ratios, goals = {}, []
    raft, nats = systems.get("raftseq"), systems.get("nats")
    if raft and nats and nats["messages_per_s"]:
        ratios["raftseq client library / nats"] = {"ratio": raft["library_messages_per_s"]["median"] / nats["messages_per_s"]}
        ratios["raftseq raw frames / nats"] = {"ratio": raft["raw_messages_per_s"]["median"] / nats["messages_per_s"]}
    if raft:
        value = raft["library_messages_per_s"]["median"]
        goals.append({"goal": f"raftseq replay >= {GOAL_REPLAY_PER_S:,} msg/s", "value": value, "met": value >= GOAL_REPLAY_PER_S})
    return {"ratios": ratios, "goals": goals}


def recovery_ratios(systems: dict) -> dict:
    ratios, goals = {}, []
    raft, nats = systems.get("raftseq"), systems.get("nats")
    if raft and nats:
        ratios["raftseq answers / nats answers"] = {"ratio": _ratio(raft["status_s"]["median"], nats["answers_s"]["median"])}
        ratios["raftseq caught up / nats replica current"] = {"ratio": _ratio(raft["caught_up_s"]["median"], nats["current_s"]["median"])}
    if raft:
        value = raft["serve_s"]["median"]
        goals.append({"goal": f"raftseq serves again <= {GOAL_RECOVERY_S:g} s", "value": value, "met": value <= GOAL_RECOVERY_S})
    return {"ratios": ratios, "goals": goals}


def fanout_ratios(systems: dict) -> dict:
    ratios = {}
    raft, nats = systems.get("raftseq"), systems.get("nats")
    if raft and nats:
        ratios["raftseq / nats, delivered msg/s"] = {"ratio": _ratio(raft["delivered_per_s"], nats["delivered_per_s"])}
    return {"ratios": ratios, "goals": []}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# --- tables -------------------------------------------------------------------------------


def _goal_lines(goals: list[dict], fmt) -> list[str]:
    return [f"  goal  {g['goal']:<36} {fmt(g['value']) if g['value'] is not None else '-':>12}   {_met(g['met'])}" for g in goals]


def print_throughput(result: dict, runs: int) -> None:
    for payload, p in result["payloads"].items():
        print(f"\nthroughput, {payload}-byte payloads: acknowledged messages/s, median of {runs} run(s) (min - max)")
        print(f"  {'system':<13} {'variant':<24} {'msg/s':>10}   {'min - max':<21}  how")
        for system, variants in p["systems"].items():
            for variant, v in variants.items():
                print(f"  {system:<13} {variant:<24} {v['median']:>10,.0f}   {v['min']:>9,.0f} - {v['max']:<9,.0f}  {v['title']}")
        for line in _fsync_lines(
            [
                (system, variant, fsync_summary(v["run_details"]))
                for system, variants in p["systems"].items()
                for variant, v in variants.items()
            ]
        ):
            print(line)
        for k, detail in enumerate(p["systems"].get("pysyncobj", {}).get("1 client", {}).get("run_details", [])):
            print(f"  pysyncobj run {k + 1}: {detail['messages_per_s']:,.0f} msg/s{_pysyncobj_notes(detail)}")
        for name, r in p["ratios"].items():
            print(f"  ratio {name:<36} {r['ratio']:>11.2f}x")
        for line in _goal_lines(p["goals"], lambda x: f"{x:,.2f}x" if x < 1000 else f"{x:,.0f}"):
            print(line)
    _print_load_range(result)


def _print_load_range(result: dict) -> None:
    loads = [x[0] for x in result["load_averages"] if x]
    if loads:
        print(f"  load avg (1 min) at the start of each measurement: {min(loads):.2f} - {max(loads):.2f}")


def print_latency(result: dict, runs: int) -> None:
    print(f"\nlatency from the intended send time to the ack, ms, median of {runs} run(s) per percentile")
    print(
        f"  {'rate':>7} {'system':<13} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>9}  {'achieved/s':>10}  {'send->ack p50':>13}"
    )
    for rate, r in result["rates"].items():
        for system, s in r["systems"].items():
            if s["p50_ms"] is None:
                print(
                    f"  {int(rate):>7,} {system:<13} no acks after the warm-up in any run (fell behind by more than the run)   "
                    f"{s['achieved_per_s']:>10,.0f}"
                )
                continue
            print(
                f"  {int(rate):>7,} {system:<13} {s['p50_ms']:>8.2f} {s['p90_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['p999_ms']:>8.2f} {s['max_ms']:>9.2f}  "
                f"{s['achieved_per_s']:>10,.0f}  {s['send_to_ack_p50_ms']:>13.2f}"
                + (f"  ({s['runs_without_acks']} run(s) without acks left out)" if s.get("runs_without_acks") else "")
            )
        for name, q in r["ratios"].items():
            print(f"  {'':>7} ratio {name:<28} p50 {q['p50']:.3g}x  p99 {q['p99']:.3g}x  p99.9 {q['p999']:.3g}x  (lower is better)")
        for line in _fsync_lines([(system, f"{int(rate):,} msg/s", s.get("fsync")) for system, s in r["systems"].items()], why_not=False):
            print(line)
        for line in _goal_lines(r["goals"], lambda x: f"{x:.2f} ms"):
            print(line)
    systems = {system for r in result["rates"].values() for system, s in r["systems"].items() if not s.get("fsync")}
    for line in _fsync_lines([(system, "", None) for system in sorted(systems)]):
        print(line)
    _print_load_range(result)


def print_failover(result: dict, kills: int) -> None:
    print(f"\nfailover: SIGKILL of the leader under steady load, {kills} kills; seconds")
    print(f"  {'system':<13} {'failover median':>15} {'max':>7} {'ack gap median':>15} {'max':>7}   load avg before -> after")
    for system, s in result["systems"].items():
        print(
            f"  {system:<13} {s['failover_s']['median']:>15.3f} {s['failover_s']['max']:>7.3f} {s['ack_gap_s']['median']:>15.3f} "
            f"{s['ack_gap_s']['max']:>7.3f}   {s['load_average_before'][:1]} -> {s['load_average_after'][:1]}"
        )
    for name, r in result["ratios"].items():
        print(f"  ratio {name:<28} median {r['median']:.3g}x  max {r['max']:.3g}x  (lower is better)")
    for line in _goal_lines(result["goals"], lambda x: f"{x:.3f} s"):
        print(line)
    p = result["systems"].get("pysyncobj")
    if p:
        print(
            f"  pysyncobj: {p['resubmits']:,} resubmits after failed calls, {p['applied_twice']} messages applied twice, "
            f"{p['acked_missing']} acknowledged messages missing, {p['call_timeouts']} calls unanswered after "
            f"{pysyncobj_peer.CALL_TIMEOUT_S:g} s, {p['never_acknowledged']} never acknowledged"
        )
    e = result["systems"].get("etcd")
    if e:
        print(
            f"  etcd: {e['resubmits']:,} resubmits after failed or unanswered puts, {e['applied_again']} puts applied again "
            f"(no dedup; counted from the revisions), {e['ack_seq_duplicates']} revisions acknowledged twice"
        )
    for name in ("nats", "nats-sync"):
        n = result["systems"].get(name)
        if not n:
            continue
        print(
            f"  {name}: {n['resubmits']:,} resubmits (same Nats-Msg-Id), {n['duplicate_acks']} acks flagged duplicate; "
            f"stream holds {n['stream_messages']:,} messages for {n['submitted']:,} distinct publishes"
        )


def _ratio_lines(ratios: dict, note: str) -> list[str]:
    return [
        f"  ratio {name:<44} {r['ratio']:>9.3g}x  ({note})" if r["ratio"] is not None else f"  ratio {name:<44} {'-':>9}"
        for name, r in ratios.items()
    ]


def _not_measured_lines(result: dict) -> list[str]:
    return [f"  {system:<10} --  ({why})" for system, why in result.get("not_measured", {}).items()]


def _print_verdicts(result: dict, note: str, goal_format: Callable[[float], str] | None = None) -> None:
    """A stream workload's last lines: the systems not measured, the raftseq/peer ratios
    (`note` says which way is better), and with `goal_format` the goals."""
    lines = _not_measured_lines(result) + _ratio_lines(result["ratios"], note)
    if goal_format is not None:
        lines += _goal_lines(result["goals"], goal_format)
    for line in lines:
        print(line)


def _loads(s: dict) -> str:
    return f"load avg {s['load_average_before'][:1]} -> {s['load_average_after'][:1]}"


def _replay_rows(result: dict) -> None:
    print(f"  {'system':<10} {'reader':<52} {'messages':>10} {'msg/s':>10}   min - max")
    r = result["systems"].get("raftseq")
    if r:
        for key, how in (
            ("library_messages_per_s", "client library (clients.subscribe, decoded)"),
            ("raw_messages_per_s", "raw frames (headers counted, nothing decoded)"),
        ):
            v = r[key]
            print(
                f"  {'raftseq':<10} {how:<52} {r['messages']:>10,} {v['median']:>10,.0f}   {v['min']:,.0f} - {v['max']:,.0f}   {_loads(r)}"
            )
    n = result["systems"].get("nats")
    if n:
        where = f"ordered push consumer via {n['reader_server']} (consumer on {', '.join(sorted(set(n['consumer_on'])))})"
        print(
            f"  {'nats':<10} {where:<52} {n['messages']:>10,} {n['messages_per_s']:>10,.0f}   {n['min']:,.0f} - {n['max']:,.0f}   {_loads(n)}"
        )


def _recovery_rows(result: dict) -> None:
    rows = {
        "raftseq": (
            ("status_s", "answers a status request"),
            ("serve_s", "serves the stream's last message"),
            ("caught_up_s", "caught up with the leader"),
        ),
        "nats": (
            ("answers_s", "answers its monitoring endpoint (/varz)"),
            ("healthy_s", "/healthz says ok"),
            ("current_s", "stream replica current (leader's view)"),
        ),
    }
    print(f"  {'system':<10} {'messages':>10}  {'restarted node':<40} {'median':>7} {'max':>7}")
    for system, s in result["systems"].items():
        for key, what in rows[system]:
            print(f"  {system:<10} {s['messages']:>10,}  {what:<40} {s[key]['median']:>7.2f} {s[key]['max']:>7.2f}")
        if system == "raftseq":
            print(f"  {'':<10} {'':>10}  leader changes caused by the restart: {s['leader_changes']} (should be 0); {_loads(s)}")
        else:
            print(
                f"  {'':<10} {'':>10}  restarted: {', '.join(x['server'] + (' (meta leader)' if x['was_meta_leader'] else '') for x in s['runs'])}; {_loads(s)}"
            )


def _fanout_rows(result: dict) -> None:
    print(
        f"  {'system':<10} {'delivered msg/s':>15} {'delivered':>11} {'seconds':>8}  {'every subscriber got every message':<36} cpu (100% = one core)"
    )
    for system, s in result["systems"].items():
        complete = (
            "yes"
            if s["complete"]
            else f"NO: {s.get('subscribers_complete', 0)} of {s['subscribers']}, fewest {s.get('fewest_received', 0):,}"
        )
        print(
            f"  {system:<10} {s['delivered_per_s']:>15,.0f} {s['delivered']:>11,} {s['seconds']:>8.1f}  {complete:<36} {cpu_text(s['cpu'])}"
        )
        if system == "nats":
            print(
                f"  {'':<10} consumers placed on {s['consumer_placement']}, {s['slow_consumer_errors']} slow-consumer errors; {_loads(s)}"
                + (f"\n  {'':<10} first nats-py errors: {s['client_errors'][:2]}" if s.get("client_errors") else "")
            )
        else:
            print(f"  {'':<10} leader {s['leader']}; {_loads(s)}")


@dataclass(frozen=True)
class StreamTable:
    """How one stream workload is printed: its heading (from the options), its rows, then the
    systems not measured, the ratios (`note` says which way is better) and, with
    `goal_format`, the goals."""

    heading: Callable[[argparse.Namespace], str]
    rows: Callable[[dict], None]
    note: str
    goal_format: Callable[[float], str] | None = None


STREAM_TABLES = {
    "replay": StreamTable(
        lambda opts: (
            "\nreplay: messages/s delivered to one subscriber reading the whole stream from its start on a follower; "
            f"median of {opts.runs} read(s) (min - max)"
        ),
        _replay_rows,
        "higher is better",
        lambda x: f"{x:,.0f}",
    ),
    "recovery": StreamTable(
        lambda opts: (
            "\nrecovery: SIGKILL of a follower holding the stream, then start it again; seconds from the start, "
            f"median (max) of {opts.runs} restart(s)"
        ),
        _recovery_rows,
        "lower is better",
        lambda x: f"{x:.2f} s",
    ),
    "fanout": StreamTable(
        lambda opts: (
            f"\nfanout: {opts.subscribers} live subscribers in {opts.subscriber_processes} processes on the two followers "
            f"while one client submits {opts.fanout_rate:,} msg/s for {opts.fanout_seconds:g} s"
        ),
        _fanout_rows,
        "higher is better",
    ),
}


def print_stream(name: str, result: dict, opts: argparse.Namespace) -> None:
    table = STREAM_TABLES[name]
    print(table.heading(opts))
    table.rows(result)
    _print_verdicts(result, table.note, table.goal_format)


def goal_values() -> dict[str, float]:
    """The goals ``plot_results.py`` draws, by name, for the report (the drawing keeps no copy)."""
    at_rate = GOAL_LATENCY_MS["raftseq", GOAL_LATENCY_RATE]
    return {
        "throughput_per_s": GOAL_THROUGHPUT_PER_S,
        "latency_rate_per_s": GOAL_LATENCY_RATE,
        "latency_p50_ms": at_rate["p50"],
        "latency_p99_ms": at_rate["p99"],
        "replay_per_s": GOAL_REPLAY_PER_S,
        "recovery_s": GOAL_RECOVERY_S,
        "failover_median_s": GOAL_FAILOVER_MEDIAN_S,
    }


# --- the one table -------------------------------------------------------------------------

#: The summary's latency rows (issue 15 item 5), msg/s offered.
SUMMARY_RATES = (2000, 10000)


def _summary_throughput(result: dict, system: str) -> dict[str, str]:
    """Rows of one system's throughput: per payload, its best and its per-message ("1 client")
    figure, with the best variant's fsyncs."""
    rows = {}
    for payload, p in result["payloads"].items():
        variants = p["systems"].get(system)
        if not variants:
            continue
        name, best = _best(variants)
        rows[f"{payload} B best msg/s (variant)"] = f"{best:,.0f} ({name})"
        one = variants.get("1 client")
        rows[f"{payload} B per message msg/s"] = f"{one['median']:,.0f}" if one else "-"
        f = fsync_summary(variants[name]["run_details"])
        rows[f"{payload} B best: fsyncs/s, msgs / entries per fsync"] = _summary_fsync(f, system)
    return rows


def _summary_fsync(f: dict | None, system: str) -> str:
    if not f:
        return "none" if system in ("raftseq", "nats", "pysyncobj") else "not counted"
    entries = f"{f['entries_per_fsync']:,.1f}" if f.get("entries_per_fsync") is not None else "?"
    return f"{f['fsyncs_per_s']:,.0f}, {f['messages_per_fsync']:,.1f} / {entries}"


def _summary_latency(result: dict, system: str) -> dict[str, str]:
    rows = {}
    for rate in SUMMARY_RATES:
        s = result["rates"].get(str(rate), {}).get("systems", {}).get(system)
        if not s:
            continue
        key = f"{rate:,}/s p50 / p99 / p99.9 ms"
        rows[key] = "no acks" if s["p50_ms"] is None else f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['p999_ms']:.2f}"
        rows[f"{rate:,}/s fsyncs/s, msgs / entries per fsync"] = _summary_fsync(s.get("fsync"), system)
    return rows


def _summary_failover(result: dict, system: str) -> dict[str, str]:
    s = result["systems"].get(system)
    return {"failover median / max s": f"{s['failover_s']['median']:.3f} / {s['failover_s']['max']:.3f}"} if s else {}


SUMMARY_ROWS = {"throughput": _summary_throughput, "latency": _summary_latency, "failover": _summary_failover}


def summary_table(report: dict) -> list[str]:
    """Every system's headline figures in one table (rows: figures, columns: systems), as
    Markdown; fsyncs are the leader's (raftseq's throughput rows: the node that fsynced most)."""
    systems = report["systems"]
    rows: dict[str, dict[str, str]] = {}
    for workload, collect in SUMMARY_ROWS.items():
        result = report["workloads"].get(workload)
        if not result:
            continue
        for system in systems:
            for row, value in collect(result, system).items():
                rows.setdefault(row, {})[system] = value
    if not rows:
        return []
    lines = ["| figure | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    lines += [f"| {row} | " + " | ".join(values.get(system, "-") for system in systems) + " |" for row, values in rows.items()]
    return lines


def print_summary(report: dict) -> None:
    lines = summary_table(report)
    if lines:
        loads = [x[0] for w in report["workloads"].values() for x in w.get("load_averages", []) if x]
        load = f"; load avg (1 min) {min(loads):.2f} - {max(loads):.2f}" if loads else ""
        print(f"\nall systems, one table (medians of {report['settings']['runs']} run(s){load}):")
        print("\n".join(lines))


# --- the command --------------------------------------------------------------------------


def _peers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def _durabilities(text: str) -> list[str]:
    modes = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [m for m in modes if m not in RAFTSEQ_SYSTEMS]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"durability {', '.join(unknown) or '(none)'}; choose from {', '.join(RAFTSEQ_SYSTEMS)}")
    return list(dict.fromkeys(modes))


def _size_text(size: object) -> str:
    if isinstance(size, list):
        return ",".join(str(x) for x in size)
    return f"{size:g}" if isinstance(size, float) else f"{size:,}"


def _add_sized(parser: argparse.ArgumentParser, *flags: str, type: Callable[[str], object], help: str, dest: str = "") -> None:
    """An option whose default is its ``SIZES`` entry (``None`` until ``resolve``), both sizes
    said at the end of `help`."""
    dest = dest or flags[0].removeprefix("--").replace("-", "_")
    quick, default = SIZES[dest]
    help = f"{help} (default {_size_text(default)}; --quick {_size_text(quick)})"
    parser.add_argument(*flags, dest=dest, type=type, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftseq bench",
        description="raftseq's throughput, latency, failover, replay, recovery and fanout on a local three-node cluster, side by "
        "side with NATS JetStream (3 replicas) and plain pysyncobj measured in the same run. Prints a table per workload with "
        "raftseq/peer ratios and the benchmark goals. See benchmarks/README_peers.md.",
    )
    add = parser.add_argument
    add(
        "workloads",
        nargs="*",
        metavar="WORKLOAD",
        help=f"what to measure: {', '.join(WORKLOADS)} (default: {', '.join(DEFAULT_WORKLOADS)}); the stream workloads "
        f"{', '.join(STREAM_WORKLOADS)} share one filled stream per system",
    )
    add(
        "--vs",
        type=_peers,
        default=[],
        metavar="PEERS",
        help="peers to measure in the same run, comma-separated: nats, nats-sync (JetStream sync_interval: always), etcd, "
        "pysyncobj (default: none, raftseq only)",
    )
    add("--skip-raftseq", action="store_true", help="measure only the peers (for checking a peer's setup)")
    add(
        "--durability",
        type=_durabilities,
        default=_durabilities(DURABILITY_DEFAULT),
        metavar="MODES",
        help=f"raftseq's durability settings, comma-separated, each measured as a system of its own: crash (system "
        f"{RAFTSEQ_SYSTEMS['crash']}), power ({RAFTSEQ_SYSTEMS['power']}) (default {DURABILITY_DEFAULT})",
    )
    quick = {dest: _size_text(size) for dest, (size, _) in SIZES.items()}
    add(
        "--quick",
        action="store_true",
        help=f"smoke sizes: {quick['runs']} run, {quick['messages']} messages, {quick['payloads']}-byte payloads only, rates "
        f"{quick['rates']} for {quick['latency_seconds']} s, {quick['kills']} kills, a stream of {quick['stream_messages']} "
        f"messages, fanout for {quick['fanout_seconds']} s; the figures mean little",
    )
    sized = functools.partial(_add_sized, parser)
    sized(
        "--runs",
        type=positive_int,
        help="runs of each throughput and latency measurement, reads of replay, restarts of recovery; figures are medians",
    )
    sized("--messages", type=positive_int, help="messages per throughput run and variant")
    sized("--payloads", type=positive_ints, help="payload sizes of the throughput workload, bytes")
    add("--payload-bytes", type=positive_int, default=100, help="payload size of the latency and failover workloads (default 100)")
    add_processes_option(parser)
    add(
        "--window",
        type=positive_int,
        default=10_000,
        help="messages in flight per client: raftseq's in_flight_max (its client's default) and pysyncobj's callbacks outstanding (default 10,000)",
    )
    add(
        "--nats-window",
        type=positive_int,
        default=nats_peer.NATS_WINDOW_DEFAULT,
        help=f"NATS's publish_async_max_pending, publishes awaiting their ack per client (default {nats_peer.NATS_WINDOW_DEFAULT:,}: "
        "nats-py's default, which did at least as well as 10,000 here)",
    )
    add(
        "--batch",
        type=positive_int,
        default=bench_cluster.BATCH_SIZE_DEFAULT,
        help=f"payloads per submit_batch_nowait call in raftseq's batched variants (default {bench_cluster.BATCH_SIZE_DEFAULT})",
    )
    sized("--rates", type=positive_ints, help="offered rates of the latency workload, msg/s")
    sized("--latency-seconds", type=positive_float, help="measured seconds per rate, after 1 s of warm-up")
    sized("--kills", type=positive_int, help="leader kills of the failover workload per system")
    add("--failover-rate", type=positive_int, default=2000, help="offered rate during the kills, msg/s (default 2000)")
    etcd_peer.add_etcd_options(parser)
    add(
        "--nats-kill",
        choices=["stream", "meta"],
        default="stream",
        help="which NATS leader the failover workload kills (default: the stream leader)",
    )
    sized(
        "--stream-messages",
        "--replay-messages",
        type=positive_int,
        help="messages in each system's stream of the replay, recovery and fanout workloads",
    )
    add_subscriber_options(parser, subscribers="live subscribers (raftseq) and ordered push consumers (NATS)")
    add_publisher_options(parser)
    add("--insecure", action="store_true", help="no Raft password for raftseq and pysyncobj (unencrypted links) and no client token")
    add("--run-timeout-s", type=positive_float, default=120.0, help="a throughput run taking longer counts as stuck (default 120)")
    add_report_options(parser)
    return parser


def resolve(opts: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    unknown = [w for w in opts.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    opts.workloads = list(dict.fromkeys(opts.workloads)) or list(DEFAULT_WORKLOADS)
    if opts.skip_raftseq and not opts.vs:
        parser.error("--skip-raftseq needs --vs")
    resolve_sizes(opts, SIZES)
    if opts.fanout_rate * opts.fanout_seconds < 100:
        parser.error("fanout publishes --fanout-rate x --fanout-seconds messages, in batches of 100 for raftseq: at least 100")
    if any(p > 65536 for p in opts.payloads) or opts.payload_bytes > 65536:
        parser.error("payloads must be at most 65536 bytes")


def run(opts: argparse.Namespace, root: str) -> tuple[dict, int]:
    session = Session(opts, root)
    facts = machine_facts()
    code = code_under_test()
    print("raftseq bench")
    print(f"code      {code['repo_dir']} ({code['git_commit'] or 'no git'}{', with uncommitted changes' if code['dirty'] else ''})")
    print(f"machine   nproc {facts['nproc']}, {facts['cpu_model']}, {facts['python']}")
    print(f"          other raftseq node processes running: {other_raftseq_nodes(set())}")
    load_start = print_load("at start")
    print(
        f"systems   {', '.join(session.systems)}; workloads {', '.join(opts.workloads)}; {opts.runs} run(s)"
        + ("; QUICK: the figures mean little" if opts.quick else ""),
        flush=True,
    )
    report: dict = {
        "benchmark": "raftseq bench",
        "code": code,
        "machine": facts,
        "load_average_start": load_start,
        "settings": {k: v for k, v in vars(opts).items() if k not in ("json",)},
        "systems": session.systems,
        "peers_setup": {},
        "workloads": {},
        "failures": session.failures,
    }
    report["raftseq_durabilities"] = {RAFTSEQ_SYSTEMS[d]: d for d in opts.durability}
    report["goal_values"] = goal_values()
    for peer in ("nats", "nats-sync", "etcd"):
        if peer not in session.systems:
            continue
        try:
            report["peers_setup"][peer] = PEER_MODULES[peer].ensure_setup()
            print(f"{peer:<9} {report['peers_setup'][peer]}", flush=True)
        except SetupError as exc:
            session.setup_failed[peer] = str(exc)
            session.failures[f"setup/{peer}"] = str(exc)
            print(f"SETUP FAILED ({peer}): {exc}", flush=True)
    if "pysyncobj" in session.systems:
        import pysyncobj

        report["peers_setup"]["pysyncobj"] = {
            "version": getattr(pysyncobj, "__version__", "") or _dist_version("pysyncobj"),
            "password": not opts.insecure,
            "settings": "SyncObjConf defaults + bindAddress" + ("" if opts.insecure else " + password"),
        }
    streamed = [w for w in STREAM_WORKLOADS if w in opts.workloads]
    for name in opts.workloads:
        if name in STREAM_WORKLOADS:
            if name == streamed[0]:  # all of them at once, on one filled stream per system
                for w, result in session.stream(streamed).items():
                    report["workloads"][w] = result
                    print_stream(w, result, opts)
        elif name == "throughput":
            report["workloads"][name] = session.throughput()
            print_throughput(report["workloads"][name], opts.runs)
        elif name == "latency":
            report["workloads"][name] = session.latency()
            print_latency(report["workloads"][name], opts.runs)
        else:
            report["workloads"][name] = session.failover()
            print_failover(report["workloads"][name], opts.kills)
    print_summary(report)
    print()
    report["load_average_end"] = print_load("at end")
    report["wall_s"] = round(time.monotonic() - session.started, 1)
    if session.failures:
        print("FAILED    " + "\n          ".join(f"{k}: {v.splitlines()[0] if v else ''}" for k, v in session.failures.items()))
    return report, EXIT_FAILED if session.failures else 0


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    resolve(opts, parser)
    return run_reported(opts, run, prefix="raftseq-bench-", stopped="every server stopped")


if __name__ == "__main__":
    sys.exit(main())
