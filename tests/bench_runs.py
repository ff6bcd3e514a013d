"""Running a benchmark module end to end from a test, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def run_module(module: str, args: Sequence[str], report_path: Path, *, timeout_s: float) -> tuple[dict, str]:
    """``python -m module ARGS --json REPORT`` from the repository: its report and its output.
    It must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(report_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return json.loads(report_path.read_text()), output


def run_benchmark(module: str, args: Sequence[str], tmp_path: Path, *, timeout_s: float) -> tuple[dict, str]:
    """``python -m module ARGS --dir SCRATCH --json REPORT``: its report and its output. It must
    exit 0 and leave nothing behind in its scratch directory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report, output = run_module(module, [*args, "--dir", str(scratch)], tmp_path / "report.json", timeout_s=timeout_s)
    assert list(scratch.iterdir()) == [], "the benchmark left files behind"
    return report, output
