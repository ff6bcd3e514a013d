"""Figures of a running three-node raftseq cluster on loopback: throughput, latency, failover
and needless elections, measured through ``SequencerClient`` as an application sees them.

Run from the repository root::

    python -m benchmarks.bench_cluster [--workload throughput|latency|failover|elections|metrics|all]
                                       [--quick] [--runs R] [--json FILE]

Each workload starts its own local cluster (``harness.BenchCluster``, the local cluster of
``raftseq.cluster.local``: three nodes as child processes, free ports on 127.0.0.1, a temporary
data directory) and always stops it, also on a failure, Ctrl-C or SIGTERM; the temporary
directory is removed at the end. Only the node processes this benchmark started are ever
signalled (by node id). Every wait has a deadline and every loop a bound.

This module is the command (options, the report's header and goals); the workloads live in
``throughput.py`` (1, 5), ``latency.py`` (2, 4) and ``failover.py`` (3), the load they put on a
cluster in ``load.py``, its figures in ``figures.py``.

Workloads (``benchmarks/README_cluster.md`` says what each figure covers):

1. ``throughput`` — acknowledged 100-byte messages per second from one client process, per
   message (``submit_nowait``) and in batches of 500 (``submit_batch_nowait``), and from four
   client processes in batches; median (min, max) of ``--runs`` runs.
2. ``latency`` — a steady offered rate through one client (``submit_nowait``), send times
   scheduled in advance and latency measured from the *intended* send time to the ack
   (coordinated-omission safe).
3. ``failover`` — SIGKILL of the current leader under steady load, ``--kills`` times: kill to
   the first ack of a submit made after the kill, and the longest gap between acks around it.
4. ``elections`` — steady load for ``--elections-seconds``; leader changes seen in status polls
   and in the node logs ("leader is now ...") after the first election: needless elections.
5. ``metrics`` — batched throughput with every node's metrics served and scraped every
   ``--scrape-interval``, against no metrics server: what metrics cost.

Correctness is checked on the way: every acknowledged sequence number is unique, and since the
benchmark is the only writer of its cluster, the numbers of a cluster form one gapless range
1..N. This is a measurement, not a test: it exits 0 whether or not a goal is met, and 1 when a
workload failed or a check did not hold; with ``--require-goals`` also when a goal is missed
(``--workload elections --elections-seconds 600 --require-goals``: 0 needless elections in 10
minutes of steady pipelined load, or exit 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback

from benchmarks.failover import workload_failover
from benchmarks.figures import BenchError
from benchmarks.latency import GOAL_LATENCY_P99_MS, GOAL_LATENCY_RATE_PER_S, workload_elections, workload_latency
from benchmarks.load import IN_FLIGHT_MAX_DEFAULT, worker_main
from benchmarks.machine import code_under_test, print_code_and_machine, load_average, machine_facts, other_raftseq_nodes, print_load
from benchmarks.options import (
    resolve_sizes,
    add_processes_option,
    add_report_options,
    node_setting,
    positive_float,
    positive_int,
    positive_ints,
    run_reported,
)
from benchmarks.throughput import GOAL_METRICS_COST, GOAL_THROUGHPUT_PER_S, workload_metrics, workload_throughput
from raftseq.cluster.config import DURABILITY_MODES
from raftseq.cluster.local import local_configs

WORKLOAD_NAMES = ("throughput", "latency", "failover", "elections", "metrics")

THROUGHPUT_MESSAGES_DEFAULT = 200_000
THROUGHPUT_MESSAGES_QUICK = 20_000
BATCH_SIZE_DEFAULT = 500
LATENCY_RATES_DEFAULT = "2000,10000"
LATENCY_SECONDS_DEFAULT = 10.0
LATENCY_SECONDS_QUICK = 2.0
FAILOVER_RATE_DEFAULT = 2000
KILLS_DEFAULT = 10
KILLS_QUICK = 2
ELECTIONS_RATE_DEFAULT = 5000
ELECTIONS_SECONDS_DEFAULT = 60.0
ELECTIONS_SECONDS_QUICK = 5.0
#: The longest one throughput run may take before it counts as stuck.
RUN_TIMEOUT_S_DEFAULT = 120.0
#: Largest ``--payload-bytes``: a client frame carries at most one 64 KiB payload.
PAYLOAD_BYTES_MAX = 65536


WORKLOADS = {
    "throughput": ("1. throughput: acknowledged messages per second", workload_throughput),
    "latency": ("2. latency at a steady offered rate (from the intended send time)", workload_latency),
    "failover": ("3. failover: SIGKILL of the leader under steady load", workload_failover),
    "elections": ("4. needless elections under steady load", workload_elections),
    "metrics": ("5. what metrics cost: batched throughput with metrics on (scraped) and off", workload_metrics),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cluster",
        description="Throughput, latency, failover and needless elections of a local three-node raftseq cluster.",
    )
    add = parser.add_argument
    add("--workload", choices=[*WORKLOAD_NAMES, "all"], default="all", help="what to measure (default all)")
    add("--quick", action="store_true", help="short runs for a smoke test (the figures mean little against the goals)")
    add("--runs", type=positive_int, default=None, help="throughput runs of each variant; the median is the figure (default 3; --quick 1)")
    add(
        "--messages",
        type=positive_int,
        default=None,
        help=f"messages per throughput run (default {THROUGHPUT_MESSAGES_DEFAULT:,}; --quick {THROUGHPUT_MESSAGES_QUICK:,})",
    )
    add(
        "--batch",
        type=positive_int,
        default=BATCH_SIZE_DEFAULT,
        help=f"payloads per submit_batch_nowait call (default {BATCH_SIZE_DEFAULT})",
    )
    add_processes_option(parser)
    add("--payload-bytes", type=int, default=100, help="bytes of each payload (default 100)")
    add(
        "--in-flight-max",
        type=positive_int,
        default=IN_FLIGHT_MAX_DEFAULT,
        help=f"each client's window of unacknowledged submits (default {IN_FLIGHT_MAX_DEFAULT:,})",
    )
    add(
        "--run-timeout-s",
        type=positive_float,
        default=RUN_TIMEOUT_S_DEFAULT,
        help=f"a throughput run taking longer is stuck (default {RUN_TIMEOUT_S_DEFAULT:.0f})",
    )
    add(
        "--rates",
        type=positive_ints,
        default=positive_ints(LATENCY_RATES_DEFAULT),
        help=f"offered rates of the latency workload, msg/s (default {LATENCY_RATES_DEFAULT})",
    )
    add(
        "--stages",
        action="store_true",
        help="latency workload: also where each submit's time went, stage by stage (the leader's stage probe, benchmarks/stages.py)",
    )
    add(
        "--latency-seconds",
        type=positive_float,
        default=None,
        help=f"measured seconds per rate (default {LATENCY_SECONDS_DEFAULT:.0f}; --quick {LATENCY_SECONDS_QUICK:.0f})",
    )
    add(
        "--kills",
        type=positive_int,
        default=None,
        help=f"leader kills of the failover workload (default {KILLS_DEFAULT}; --quick {KILLS_QUICK})",
    )
    add(
        "--failover-rate",
        type=positive_int,
        default=FAILOVER_RATE_DEFAULT,
        help=f"offered rate during the kills (default {FAILOVER_RATE_DEFAULT})",
    )
    add(
        "--elections-seconds",
        type=positive_float,
        default=None,
        help=f"seconds of steady load of the elections workload (default {ELECTIONS_SECONDS_DEFAULT:.0f}; --quick "
        f"{ELECTIONS_SECONDS_QUICK:.0f}; the full run: 600)",
    )
    add(
        "--elections-rate",
        type=positive_int,
        default=ELECTIONS_RATE_DEFAULT,
        help=f"offered rate of the elections workload (default {ELECTIONS_RATE_DEFAULT})",
    )
    add(
        "--scrape-interval",
        type=positive_float,
        default=1.0,
        help="seconds between scrapes of every node in the metrics workload (default 1)",
    )
    add(
        "--set",
        dest="sets",
        type=node_setting,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a node setting for every node, e.g. raft.election_timeout_min_s=0.3 (repeatable)",
    )
    add(
        "--require-goals",
        action="store_true",
        help="exit 1 when a goal is missed (e.g. `--workload elections --elections-seconds 600 --require-goals`: "
        "fails on any leader change under steady load without faults)",
    )
    add("--insecure", action="store_true", help="no Raft password and no client token (unencrypted Raft links)")
    add(
        "--durability",
        choices=DURABILITY_MODES,
        default="crash",
        help="the nodes' durability: crash (default) or power (each Raft entry fsynced before it counts toward commit)",
    )
    add_report_options(parser)
    add("--worker", default="", help=argparse.SUPPRESS)
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    resolve_sizes(
        args,
        {
            "runs": (1, 3),
            "messages": (THROUGHPUT_MESSAGES_QUICK, THROUGHPUT_MESSAGES_DEFAULT),
            "latency_seconds": (LATENCY_SECONDS_QUICK, LATENCY_SECONDS_DEFAULT),
            "kills": (KILLS_QUICK, KILLS_DEFAULT),
            "elections_seconds": (ELECTIONS_SECONDS_QUICK, ELECTIONS_SECONDS_DEFAULT),
        },
    )
    if not args.rates:
        parser.error("--rates: at least one rate")
    if args.batch > args.in_flight_max:
        parser.error("--batch must not exceed --in-flight-max")
    if not 0 <= args.payload_bytes <= PAYLOAD_BYTES_MAX:
        parser.error(f"--payload-bytes must be 0..{PAYLOAD_BYTES_MAX}")
    overrides: dict = {}
    for section, key, value in args.sets:
        overrides.setdefault(section, {})[key] = value
    if args.durability != "crash":
        overrides["durability"] = args.durability
    args.overrides = overrides or None
    try:
        with tempfile.TemporaryDirectory() as scratch:  # local_configs writes node keys there
            local_configs(scratch, 20000, insecure=args.insecure, overrides=args.overrides)
    except (ValueError, TypeError, AttributeError) as exc:
        parser.error(f"--set: {exc}")
    args.names = list(WORKLOAD_NAMES) if args.workload == "all" else [args.workload]


def bench(args: argparse.Namespace, root: str) -> tuple[dict, int]:
    facts = machine_facts()
    code = code_under_test()
    print("raftseq cluster benchmark")
    digest = f"sequencer+cluster+clients sha256 {code['source_sha256']}"
    print_code_and_machine(code["repo_dir"], code["git_commit"], code["dirty"], digest, facts, runtime=facts["python"])
    others = other_raftseq_nodes(set())
    print(f"          other raftseq node processes running on this machine: {others}")
    load_start = print_load("at start")
    mode = "insecure (no Raft encryption, no token)" if args.insecure else "secure (Raft password: encrypted links; client token)"
    print(f"cluster   3 local nodes per workload, {mode}; node settings: defaults" + (f" + {args.overrides}" if args.overrides else ""))
    print(
        f"          payload {args.payload_bytes} B, client window {args.in_flight_max:,}"
        + ("; QUICK: figures mean little against the goals" if args.quick else "")
    )
    report: dict = {
        "benchmark": "raftseq cluster",
        "code": code,
        "machine": facts,
        "other_raftseq_nodes_at_start": others,
        "load_average_start": load_start,
        "settings": {k: v for k, v in vars(args).items() if k not in ("sets", "worker", "json", "names")},
        "workloads": {},
        "failures": {},
    }
    failed = False
    for name in args.names:
        title, function = WORKLOADS[name]
        print(f"\n{title}", flush=True)
        load_before = load_average()
        started = time.monotonic()
        try:
            outcome = function(args, root)
        except BenchError as exc:
            failed = True
            print(f"  FAILED: {exc}", flush=True)
            report["failures"][name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one workload's crash must not hide the others
            failed = True
            print(f"  CRASHED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", flush=True)
            report["failures"][name] = f"{type(exc).__name__}: {exc}"
            continue
        outcome["wall_s"] = round(time.monotonic() - started, 1)
        outcome["load_average_before"] = load_before
        outcome["load_average_after"] = load_average()
        report["workloads"][name] = outcome
    print()
    report["load_average_end"] = print_load("at end")
    goals = goal_lines(report)
    print("goals     " + ("\n          ".join(goals) if goals else "-"))
    missed = [line for line in goals if line.endswith(("MISSED", "FAILED"))]
    if args.require_goals and missed:
        print(f"--require-goals: {len(missed)} goal(s) missed or failed")
    return report, 1 if failed or (args.require_goals and missed) else 0


def goal_lines(report: dict) -> list[str]:
    """One line per goal of the workloads run ("... met" or "... MISSED"), and one per failed workload."""
    goals = []
    w = report["workloads"]
    if "throughput" in w:
        best = max(v["messages_per_s"]["median"] for v in w["throughput"]["variants"].values())
        goals.append(
            f"throughput {best:,.0f} msg/s (best median) >= {GOAL_THROUGHPUT_PER_S:,}: {'met' if best >= GOAL_THROUGHPUT_PER_S else 'MISSED'}"
        )
    if "latency" in w and str(GOAL_LATENCY_RATE_PER_S) in w["latency"]["rates"]:
        p99 = w["latency"]["rates"][str(GOAL_LATENCY_RATE_PER_S)]["latency"]["p99_ms"]
        goals.append(
            f"p99 {p99:.2f} ms at {GOAL_LATENCY_RATE_PER_S} msg/s <= {GOAL_LATENCY_P99_MS:.0f}: {'met' if p99 <= GOAL_LATENCY_P99_MS else 'MISSED'}"
        )
    if "failover" in w:
        f = w["failover"]["failover_s"]
        goals.append(f"failover median {f['median']:.3f} s / max {f['max']:.3f} s: {'met' if w['failover']['goal_met'] else 'MISSED'}")
    if "metrics" in w:
        goals.append(
            f"metrics cost {100 * w['metrics']['cost']:.1f}% <= {100 * GOAL_METRICS_COST:.0f}%: {'met' if w['metrics']['goal_met'] else 'MISSED'}"
        )
    if "elections" in w:
        goals.append(f"needless elections {w['elections']['needless_elections']}: {'met' if w['elections']['goal_met'] else 'MISSED'}")
    for name in report["failures"]:
        goals.append(f"{name} FAILED")
    return goals


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    resolve(args, parser)
    return run_reported(args, bench, prefix="raftseq-bench-cluster-", stopped="nodes stopped")


if __name__ == "__main__":
    sys.exit(main())
