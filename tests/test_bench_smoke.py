"""The core benchmark runs end to end at smoke size and prints a line for every workload.

Only that it runs is checked here, never its figures: those depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.options import run_reported

REPO_DIR = Path(__file__).resolve().parent.parent

# Written out rather than imported: nothing imports benchmarks.
WORKLOAD_KEYS = [
    "write_never",
    "append_never",
    "write_fsync",
    "append_fsync",
    "read_ceiling",
    "read_crc_ceiling",
    "replay_frames",
    "replay_block",
    "replay_frames_noverify",
    "replay_block_noverify",
    "decode_only",
    "apply_only",
    "apply_append",
]


def test_quick_run_prints_every_workload_and_cleans_up(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_core", "--quick", "--runs", "1", "--dir", str(scratch), "--json", str(report_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=15,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for key in WORKLOAD_KEYS:
        assert re.search(rf"^\s+{key}\s+[\d,]+ msg/s", done.stdout, re.MULTILINE), f"no figure for {key}:\n{output}"
    assert re.search(r"^load avg\s+at start", done.stdout, re.MULTILINE), output
    assert re.search(r"^load avg\s+at end", done.stdout, re.MULTILINE), output
    report = json.loads(report_path.read_text())
    assert sorted(report["workloads"]) == sorted(WORKLOAD_KEYS)
    assert all(w["messages_per_s_median"] > 0 for w in report["workloads"].values())
    assert list(scratch.iterdir()) == [], "the benchmark left files behind"


@pytest.fixture
def signal_handlers_kept():
    """``run_reported`` installs its own SIGTERM and SIGINT handlers: put pytest's back."""
    kept = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, kept[0])
    signal.signal(signal.SIGINT, kept[1])


def test_a_dir_that_does_not_exist_yet_is_made_and_one_that_cannot_be_is_a_clear_error(
    tmp_path: Path, capsys, signal_handlers_kept
) -> None:
    # `raftseq bench --dir /tmp/new` once died with a FileNotFoundError traceback.
    seen = []

    def measure(opts, root):
        seen.append(root)
        return {}, 0

    nested = tmp_path / "a" / "b"
    assert run_reported(argparse.Namespace(dir=str(nested), json=""), measure, prefix="t-", stopped="nothing") == 0
    assert seen and Path(seen[0]).parent == nested and not Path(seen[0]).exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_reported(argparse.Namespace(dir=str(blocker / "x"), json=""), measure, prefix="t-", stopped="nothing") == 2
    assert len(seen) == 1
    assert "cannot make the benchmark's directory" in capsys.readouterr().err
