"""``python -m chaos_tests`` (also ``raftseq chaos`` from a source checkout).

    raftseq chaos [--scenario NAME|all|ops] [--duration 10m] [--seed N] [--report DIR]
    raftseq chaos run [NAME ...] [--seed N] [--rounds N | --duration D] [--durability crash|power] [--tls] [--report DIR] [--dir DIR] [--keep]
    raftseq chaos check HISTORY.jsonl [--json]
    raftseq chaos list
    raftseq chaos fuzz [--duration 10m] [--seed N] [--target client|raft|both] [--replay TARGET:INDEX]

The soak: ``--scenario all --duration 20m`` runs one cluster for that long with faults drawn
from the whole catalogue, one round after another, then heals, reads every node and checks
the history. ``--scenario ops --duration 60m`` is a week of operations compressed (steady
load of ~5,000 msg/s, retention, a membership replace, rolling and upgrade restarts, leader
transfers and faults; disk and RSS sampled each minute; pass criteria checked at the end:
``chaos_tests/ops.py``). ``--scenario NAME`` repeats one scenario's round instead. ``run NAME ...`` runs
scenarios each on its own cluster (no names: every scenario, each its own number of rounds, as
the test suite does; with ``--duration`` the time is shared among them). Each scenario gets its
own seed, derived from ``--seed`` and printed, so one can be replayed alone. ``--report DIR``
writes ``report.json`` and ``timeline.png`` (per scenario when several run), and for a failed
run also its history and node logs. A run's own directory (cluster data, logs, history) is
removed at the end — passed, failed or interrupted with Ctrl-C — unless ``--keep``; every node,
proxy and tmpfs it started is stopped first.

``fuzz`` starts a local cluster and throws seeded mutations of valid frames at its client ports
and at its authenticated Raft links (``chaos_tests/fuzz.py``) for ``--duration``, checking that
no node crashes or hangs and nothing acknowledged is lost; ``--replay TARGET:INDEX`` sends one
case of a seed alone and says what became of the node.

Exit status: 0 when every scenario passed (``fuzz``: nothing found) (``check``: the history holds every invariant),
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

from chaos_tests import checker, fuzz
from chaos_tests.report import write_report
from chaos_tests.scenarios import SCENARIOS, SOAKS, ScenarioFailed, run_scenario
from raftseq.cluster.cli.args import INTERRUPTED
from raftseq.cluster.local import LocalCluster

_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """``600``, ``600s``, ``10m``, ``1.5h`` -> seconds."""
    raw = text.strip().lower()
    scale = _UNITS.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 600, 600s, 10m or 1h, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return value


SOAKS_HELP = """\
the soaks (`raftseq chaos` alone means `raftseq chaos run`):
  --scenario all --duration 20m   faults drawn from the whole catalogue, one cluster
  --scenario ops --duration 60m   a week of operations compressed: ~5,200 msg/s from 4 pipelined
                                  clients, subscribers on n1 and n3, retention on every node (1 MiB
                                  segments, 12 MiB bound, an archive each); on a seeded schedule n2
                                  replaced by a new node (member replace), rolling restarts (leader
                                  drained), upgrade-shaped restarts, leader transfers, and kills,
                                  pauses, isolation and splits. Disk and RSS of every process are
                                  sampled each minute into report.json and timeline.png. Fails
                                  (exit 1, naming the criterion and its figure) unless: 0 invariant
                                  violations; every journal within the retention bound + 2
                                  segments; RSS growth <= 10% from minute 10 to the end (a third of
                                  a run under 15 min); no subscriber fell behind retention.
                                  See chaos_tests/README.md, "A week in an hour".
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftseq chaos",
        description="Seeded fault injection against a local three-node cluster, checked against the guarantees.",
        epilog=SOAKS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser(
        "run",
        help="run scenarios or the soak (the default command)",
        description="Run chaos scenarios (or the soak) and check each run's history.",
    )
    run.add_argument("names", nargs="*", metavar="NAME", help="scenarios to run, each on its own cluster (default: all; see `list`)")
    run.add_argument(
        "--scenario",
        metavar="NAME|all|ops",
        help="one run: NAME's round repeated, or `all`: faults drawn from the whole catalogue (the soak), or `ops`: a week of "
        "operations compressed — ~5,000 msg/s, retention on, n2 replaced, rolling and upgrade restarts, leader transfers, faults; "
        "disk and RSS sampled each minute into the report; fails unless 0 invariant violations, every journal within retention "
        "+ 2 segments and RSS growth <= 10%% from minute 10 (a third of a run under 15 min) to the end",
    )
    run.add_argument("--report", metavar="DIR", help="write report.json and timeline.png there (a directory per scenario when several run)")
    run.add_argument("--seed", type=int, help="master seed (default: random, printed); each scenario's seed derives from it")
    how_long = run.add_mutually_exclusive_group()
    how_long.add_argument("--rounds", type=int, help="fault rounds per scenario (default: the scenario's own, 1-3)")
    how_long.add_argument(
        "--duration", type=duration, metavar="D", help="soak length: 600, 600s, 10m, 1h (shared among the scenarios of a `run NAME ...`)"
    )
    run.add_argument(
        "--durability",
        choices=("crash", "power"),
        help="the nodes' durability setting (default: the scenario's, crash); with crash, the power-cut scenarios report "
        "what a cut lost instead of failing",
    )
    run.add_argument(
        "--tls",
        action="store_true",
        help="the nodes' client ports speak mutual TLS (certificates made as by `raftseq cluster up --tls --tls-mutual`); the "
        "workload, its subscribers, the final reads and the operations reach them over it",
    )
    run.add_argument("--dir", help="parent directory of the runs (default: the system's temp dir)")
    run.add_argument("--keep", action="store_true", help="keep the directories of passing runs too")
    check = sub.add_parser("check", help="check a recorded history", description="Check a history file against the invariants.")
    check.add_argument("history", help="a history.jsonl written by a run")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("list", help="list the scenarios", description="List the scenarios with what each does.")
    fuzz = sub.add_parser(
        "fuzz",
        help="fuzz the client ports and the authenticated Raft links of a local cluster",
        description="Start a local three-node cluster and send it seeded mutations of valid frames: on the client ports "
        "(hello, submit, subscribe, status, heartbeat, snapshot queries; bit flips, truncation, lying lengths, swapped field "
        "types, huge numbers, random msgpack) and on the Raft links, encrypted with the cluster's own link cipher (mutated "
        "pysyncobj messages and pickles, damaged ciphertext, canary pickles that would run code). Every few seconds, and at "
        "the end, checks that every node is alive, answers status and acknowledges a legitimate submit, and that no "
        "acknowledged message was lost. Prints its seed, progress and every finding with the cases that led to it.",
    )
    fuzz.add_argument("--duration", type=duration, default=60.0, metavar="D", help="how long to fuzz: 600, 600s, 10m, 1h (default 60 s)")
    fuzz.add_argument("--seed", type=int, help="seed of the cases (default: random, printed)")
    fuzz.add_argument("--target", choices=("client", "raft", "both"), default="both", help="what to fuzz (default both)")
    fuzz.add_argument("--no-canaries", action="store_true", help="leave out the pickles that would run code in a node")
    fuzz.add_argument(
        "--impersonate",
        action="store_true",
        help="let Raft cases also claim to be another member of the cluster (what any holder of the password can do today)",
    )
    fuzz.add_argument("--replay", metavar="TARGET:INDEX", help="send only case INDEX of TARGET (client or raft) of --seed, then check")
    fuzz.add_argument("--dir", help="parent directory of the cluster's data (default: the system's temp dir)")
    fuzz.add_argument("--keep", action="store_true", help="keep the cluster's directory (data, node logs)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.scenario is not None:
        if args.names:
            print("give scenarios either as names or with --scenario, not both", file=sys.stderr)
            return 2
        names = [args.scenario]
        known = [*SCENARIOS, *SOAKS]
    else:
        names = args.names or list(SCENARIOS)
        known = list(SCENARIOS)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
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
        report_dir = None
        if args.report:
            report_dir = args.report if len(names) == 1 else os.path.join(args.report, name)
        print(f"[{index}/{len(names)}] {name}", flush=True)
        ok = False
        interrupted = False
        try:
            result = run_scenario(
                name,
                seed=seed,
                directory=directory,
                rounds=args.rounds,
                duration_s=share,
                report_dir=report_dir,
                say=lambda line: print(line, flush=True),
                durability=args.durability,
                tls=args.tls,
            )
            ok = result.ok
        except (ScenarioFailed, AssertionError) as exc:
            print(f"chaos {name}: FAILED (seed {seed}): {exc}", flush=True)
            _check_what_was_recorded(directory, report_dir, {"scenario": name, "seed": seed, "failure": str(exc)[:2000]})
        except INTERRUPTED:
            interrupted = True
        finally:
            # run_scenario has stopped the cluster, the proxy and any tmpfs holder; the run's
            # directory goes too unless asked for (its evidence goes to --report DIR).
            if not ok and report_dir is not None:
                _keep_evidence(directory, report_dir)
            if args.keep:
                print(f"  run directory kept: {directory}", flush=True)
            else:
                shutil.rmtree(directory, ignore_errors=True)
        if interrupted:
            print(f"chaos: interrupted during {name} (seed {seed}); everything it started is stopped", flush=True)
            return 130
        if not ok:
            if report_dir is None and not args.keep:
                print("  (the run's history and node logs are gone: rerun with --report DIR or --keep to keep them)", flush=True)
            failed.append((name, seed, report_dir or (directory if args.keep else "")))
    minutes = (time.monotonic() - started) / 60
    if failed:
        print(f"chaos: {len(failed)} of {len(names)} FAILED in {minutes:.1f} min:")
        for name, seed, directory in failed:
            print(f"  {name}: replay with  raftseq chaos run {name} --seed {seed}" + (f"   (evidence in {directory})" if directory else ""))
        return 1
    print(f"chaos: all {len(names)} passed in {minutes:.1f} min (master seed {master})")
    return 0


def _fuzz(args: argparse.Namespace) -> int:
    targets = fuzz.TARGETS if args.target == "both" else (args.target,)
    replay = None
    if args.replay is not None:
        target, _, index = args.replay.partition(":")
        if target not in fuzz.TARGETS or not index.isdigit() or args.seed is None:
            print("--replay takes TARGET:INDEX (client:12 or raft:7) and needs --seed", file=sys.stderr)
            return 2
        replay = (target, int(index))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    directory = tempfile.mkdtemp(prefix="raftseq-fuzz-", dir=args.dir)
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        with LocalCluster.started(os.path.join(directory, "cluster"), rng=random.Random(seed), insecure=False, restart=False) as cluster:
            say(f"fuzz: cluster up at {', '.join(cluster.endpoints)} (data in {directory})")
            if replay is not None:
                case = fuzz.replay(
                    cluster,
                    seed=seed,
                    target=replay[0],
                    index=replay[1],
                    marker_dir=directory,
                    canaries=not args.no_canaries,
                    impersonate=args.impersonate,
                )
                say(f"sent {case.describe()}")
                report = fuzz.run_fuzz(
                    cluster, seed=seed, duration_s=0, targets=(), canaries=not args.no_canaries, marker_dir=directory, say=say
                )
            else:
                report = fuzz.run_fuzz(
                    cluster,
                    seed=seed,
                    duration_s=args.duration,
                    targets=targets,
                    canaries=not args.no_canaries,
                    impersonate=args.impersonate,
                    marker_dir=directory,
                    say=say,
                )
            if not report.ok:
                for node in cluster.nodes:
                    say(f"--- {node.id} log tail ---\n{cluster.log_text(node.id)[-3000:]}")
    except INTERRUPTED:
        say(f"fuzz: interrupted (seed {seed}); the cluster is stopped")
        return 130
    finally:
        if args.keep:
            say(f"  fuzz directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0 if report.ok else 1


def _check_what_was_recorded(run_directory: str, report_dir: str | None, run: dict) -> None:
    """A run that failed before its end still has a history: check it (without final reads)
    and, with --report, write its report too."""
    history = os.path.join(run_directory, "history.jsonl")
    if not os.path.isfile(history):
        return
    try:
        report = checker.check_file(history)
    except Exception as exc:  # noqa: BLE001 - a torn history: say so, the failure is reported already
        print(f"  the history recorded so far cannot be checked: {exc}", flush=True)
        return
    print("  the history recorded so far:\n" + report.format(), flush=True)
    if report_dir is not None:
        write_report(report_dir, history, report, run)


def _keep_evidence(run_directory: str, report_dir: str) -> None:
    """Copy a failed run's history and node logs into its report directory."""
    os.makedirs(report_dir, exist_ok=True)
    for root, _, files in os.walk(run_directory):
        for name in files:
            if name == "history.jsonl" or name.endswith(".log"):
                shutil.copy2(os.path.join(root, name), os.path.join(report_dir, name))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "check", "list", "fuzz", "-h", "--help"):
        # `raftseq chaos --scenario all --duration 20m`: the run command is the default
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    if args.command == "list":
        for scenario in [*SCENARIOS.values(), *SOAKS.values()]:
            print(f"{scenario.name:20} {scenario.description}")
        return 0
    if args.command == "check":
        return checker.main([args.history, *(["--json"] if args.json else [])])
    if args.command == "fuzz":
        return _fuzz(args)
    return _run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
