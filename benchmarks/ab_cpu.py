"""A/B: CPU per acknowledged message of two checkouts, measured in alternating runs.

Rates swing with whatever else this machine runs; the CPU a node spends per acknowledged
message does not, much. Each round runs the throughput workload of each checkout's own
``benchmarks/bench_cluster.py`` (run as ``python -m benchmarks.bench_cluster`` in the checkout; A then B, then B then A in the next round, and so on), and
reads from its JSON report each node's CPU share and the rate: CPU per message = share / rate.
The leader is the node with the largest share.

    python -m benchmarks.ab_cpu --a /path/to/checkout-at-base --b . --rounds 3

Each checkout must be importable by ``--python`` the way its benchmark expects (this checkout:
``pip install -e .`` into that interpreter's environment; a checkout from before the ``raftseq``
namespace: its own folder on the path, which its benchmark arranges). Two checkouts that are
both ``raftseq`` need an environment each: ``--python-a`` names the one with A installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.options import write_report

RUN_TIMEOUT_S = 900


def one_run(checkout: str, python: str, messages: int, extra: list[str]) -> dict[str, dict[str, float]]:
    """variant -> {"leader_us": ..., "nodes_us": ..., "per_s": ...} for one run of `checkout`."""
    with tempfile.TemporaryDirectory(prefix="raftseq-ab-") as tmp:
        report = os.path.join(tmp, "report.json")
        command = [
            python,
            "-m",
            "benchmarks.bench_cluster",
            "--workload",
            "throughput",
            "--runs",
            "1",
            "--messages",
            str(messages),
            "--json",
            report,
            *extra,
        ]
        done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise SystemExit(f"{checkout}: the benchmark failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        with open(report) as f:
            data = json.load(f)
    variants = data["workloads"]["throughput"]["variants"] if "workloads" in data else data["throughput"]["variants"]
    figures = {}
    for key, variant in variants.items():
        per_s = variant["messages_per_s"]["median"]
        (shares,) = variant["cpu_share_runs"]
        nodes = {k: v for k, v in shares.items() if k.startswith("n")}
        figures[key] = {"leader_us": max(nodes.values()) / per_s * 1e6, "nodes_us": sum(nodes.values()) / per_s * 1e6, "per_s": per_s}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the baseline checkout (a directory)")
    parser.add_argument("--b", required=True, help="the checkout under test (a directory)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for both (default: this one)")
    parser.add_argument(
        "--python-a",
        default="",
        help="interpreter for A only (default --python): an environment with A installed, when both checkouts are raftseq",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs A and B once (default 3)")
    parser.add_argument("--messages", type=int, default=200_000, help="messages per throughput run (default 200000)")
    parser.add_argument("--json", default="", help="also write every run's figures here")
    args, extra = parser.parse_known_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sides = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    pythons = {"A": args.python_a or args.python, "B": args.python}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    print(f"A = {sides['A']}\nB = {sides['B']}\n{args.rounds} rounds of {args.messages:,} messages, alternating", flush=True)
    for r in range(args.rounds):
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            started = time.monotonic()
            figures = one_run(sides[side], pythons[side], args.messages, extra)
            runs[side].append(figures)
            text = "  ".join(
                f"{k} leader {v['leader_us']:.2f} µs/msg nodes {v['nodes_us']:.2f} ({v['per_s']:,.0f}/s)" for k, v in figures.items()
            )
            print(f"round {r + 1} {side}: {text}  [{time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.2f}]", flush=True)
    print("\nmedians (B/A: below 1.00 means B spends less CPU per acknowledged message)")
    for key in runs["A"][0]:
        for figure in ("leader_us", "nodes_us"):
            a = statistics.median(run[key][figure] for run in runs["A"])
            b = statistics.median(run[key][figure] for run in runs["B"])
            print(f"  {key:<12} {figure:<10} A {a:7.2f}  B {b:7.2f}  B/A {b / a:.3f}")
    write_report(args.json, {"sides": sides, "runs": runs}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
