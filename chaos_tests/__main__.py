"""``python -m chaos_tests`` (also ``raftseq chaos`` from a source checkout).

    python -m chaos_tests run [NAME ...] [--seed N] [--rounds N | --duration S] [--dir DIR] [--keep]
    python -m chaos_tests check HISTORY.jsonl [--json]
    python -m chaos_tests list

``run`` with no names runs every scenario. ``--duration`` turns it into a soak: the seconds are
shared among the chosen scenarios, each repeating its round until its share is used. Each
scenario gets its own seed, derived from ``--seed`` and printed, so one can be replayed alone.
A run's directory (cluster data, node logs, history) is removed when the scenario passes,
unless ``--keep``; a failed scenario's directory is always kept and named.

Exit status: 0 when every scenario passed (``check``: the history holds every invariant),
1 when one failed, 2 on bad usage or an unreadable history.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

from chaos_tests import checker
from chaos_tests.scenarios import SCENARIOS, ScenarioFailed, run_scenario


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftseq chaos", description="Seeded fault injection against a local three-node cluster, checked against the guarantees.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run scenarios (the default command)", description="Run chaos scenarios and check each run's history.")
    run.add_argument("names", nargs="*", metavar="NAME", help="scenarios to run (default: all; see `list`)")
    run.add_argument("--seed", type=int, help="master seed (default: random, printed); each scenario's seed derives from it")
    how_long = run.add_mutually_exclusive_group()
    how_long.add_argument("--rounds", type=int, help="fault rounds per scenario (default: the scenario's own, 1-3)")
    how_long.add_argument("--duration", type=float, metavar="SECONDS", help="soak: total seconds, shared among the scenarios")
    run.add_argument("--dir", help="parent directory of the runs (default: the system's temp dir)")
    run.add_argument("--keep", action="store_true", help="keep the directories of passing runs too")
    check = sub.add_parser("check", help="check a recorded history", description="Check a history file against the invariants.")
    check.add_argument("history", help="a history.jsonl written by a run")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("list", help="list the scenarios", description="List the scenarios with what each does.")
    return parser


def _run(args: argparse.Namespace) -> int:
    names = args.names or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("--duration must be positive", file=sys.stderr)
        return 2
    master = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    seeds = random.Random(master)
    share = args.duration / len(names) if args.duration else None
    print(f"chaos: {len(names)} scenario(s), master seed {master}" + (f", {share:.0f} s each" if share else ""), flush=True)
    failed: list[tuple[str, int, str]] = []
    started = time.monotonic()
    for index, name in enumerate(names, 1):
        seed = args.seed if args.seed is not None and len(names) == 1 else seeds.randrange(1, 2**31)
        directory = tempfile.mkdtemp(prefix=f"raftseq-chaos-{name}-", dir=args.dir)
        print(f"[{index}/{len(names)}] {name}", flush=True)
        ok = False
        try:
            result = run_scenario(name, seed=seed, directory=directory, rounds=args.rounds, duration_s=share, say=lambda line: print(line, flush=True))
            ok = result.ok
        except ScenarioFailed as exc:
            print(f"chaos {name}: FAILED (seed {seed}): {exc}", flush=True)
        except AssertionError as exc:
            print(f"chaos {name}: FAILED (seed {seed}): {exc}", flush=True)
        if ok and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"  run directory kept: {directory}", flush=True)
        if not ok:
            failed.append((name, seed, directory))
    minutes = (time.monotonic() - started) / 60
    if failed:
        print(f"chaos: {len(failed)} of {len(names)} FAILED in {minutes:.1f} min:")
        for name, seed, directory in failed:
            print(f"  {name}: replay with  raftseq chaos run {name} --seed {seed}   (directory {directory})")
        return 1
    print(f"chaos: all {len(names)} passed in {minutes:.1f} min (master seed {master})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "check", "list", "-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    if args.command == "list":
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:20} {scenario.description}")
        return 0
    if args.command == "check":
        return checker.main([args.history, *(["--json"] if args.json else [])])
    return _run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
