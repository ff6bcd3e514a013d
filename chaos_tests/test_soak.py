"""The soak command (``raftseq chaos --scenario all``): its report, and what it leaves behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _chaos(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chaos_tests", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def _our_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (read from /proc; nothing is signalled)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_short_soak_writes_a_report_and_a_timeline(tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "report"
    runs.mkdir()
    process = _chaos("--scenario", "all", "--duration", "12s", "--seed", "11", "--report", str(report), "--dir", str(runs))
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out[-3000:]
    assert "seed 11" in out
    document = json.loads((report / "report.json").read_text())
    assert document["ok"] is True and document["run"]["seed"] == 11 and document["run"]["scenario"] == "all"
    assert set(document["invariants"].values()) == {"held"} and len(document["invariants"]) == 9
    assert document["faults"] >= 1 and document["run"]["acknowledged"] > 0
    assert sum(document["timeline"]["acks"]) == document["checker"]["counts"]["ok"]
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(runs.iterdir()) == [], "the run's directory is removed after a pass"


def test_ctrl_c_leaves_no_process_and_no_directory(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    process = _chaos("run", "kill-follower", "--rounds", "20", "--dir", str(runs))
    lines = []
    deadline = time.monotonic() + 120
    try:
        for line in process.stdout:  # wait until faults are being applied
            lines.append(line)
            if "round 2" in line or time.monotonic() > deadline:
                break
        assert any("round 2" in line for line in lines), "".join(lines)[-2000:]
        assert _our_processes(str(runs)), "the nodes run from the run directory"
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out[-2000:]
    assert "interrupted" in out
    deadline = time.monotonic() + 10
    while _our_processes(str(runs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _our_processes(str(runs)) == []
    assert list(runs.iterdir()) == []
