"""``raftseq chaos`` and ``raftseq bench``: every argument goes to a suite of the source checkout
(``python -m chaos_tests``, ``python -m benchmarks``), run as a child process, not imported
(nothing in the product imports the test suites or the benchmarks)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

#: Commands whose arguments all belong to a suite in the source checkout (see run_source_suite).
SOURCE_SUITES = {"chaos": "chaos_tests", "bench": "benchmarks"}
#: The checkout's root: the folder that holds cluster/ (and, in a checkout, the suites).
CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_source_suite(command: str, arguments: list[str]) -> int:
    """``python -m SUITE ARGUMENTS`` in the source checkout for ``raftseq COMMAND``."""
    package = SOURCE_SUITES[command]
    if not os.path.isfile(os.path.join(CHECKOUT_ROOT, package, "__main__.py")):
        print(f"raftseq {command} needs the source checkout: no {package}/ next to {CHECKOUT_ROOT}/cluster", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", package, *arguments], cwd=CHECKOUT_ROOT)


#: Per suite command: its help line, its description and what its arguments are.
SUITE_HELP = {
    "chaos": (
        "seeded fault injection against a local cluster (source checkout only)",
        "Run the chaos scenarios (chaos_tests/) against local three-node clusters and check every run's "
        "history against the guarantees: `raftseq chaos run [NAME ...] [--seed N] [--rounds N | --duration S]`, "
        "`raftseq chaos check HISTORY`, `raftseq chaos list`, and the protocol fuzzer `raftseq chaos fuzz [--duration 10m] [--seed N]` "
        "(client ports and authenticated Raft links; `--replay TARGET:INDEX` sends one case again). Everything after `chaos` goes to `python -m chaos_tests` "
        "in the source checkout (chaos_tests/ is not part of the installed package); `raftseq chaos run --help` shows its options.",
        "run|check|list and their options",
    ),
    "bench": (
        "benchmarks against local clusters, side by side with peers (source checkout only)",
        "Run the benchmarks (benchmarks/) and print their figures: `raftseq bench [WORKLOAD ...] "
        "[--vs nats,pysyncobj] [--quick] [--runs N] [--json FILE]`. Everything after `bench` goes to "
        "`python -m benchmarks` in the source checkout (benchmarks/ is not part of the installed package); "
        "`raftseq bench --help` there lists the workloads.",
        "workloads and their options",
    ),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``raftseq chaos`` and ``raftseq bench`` in the help (``main`` hands their arguments over
    before parsing)."""
    for command, (help, description, arguments) in SUITE_HELP.items():
        suite = sub.add_parser(command, help=help, description=description)
        suite.add_argument(f"{command}_args", nargs=argparse.REMAINDER, help=arguments)
