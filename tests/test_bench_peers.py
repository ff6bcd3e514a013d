"""``python -m benchmarks`` (``raftseq bench``) runs its peer baselines at smoke size: NATS
JetStream (installed by the benchmark's own setup when missing) and plain pysyncobj produce
positive figures, the JSON report parses, and nothing is left behind.

Only that the figures exist is checked, never their size: that depends on the machine. A NATS
that cannot be installed fails the test with the benchmark's message; it is never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def _bench(args: list[str], *, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{name}: {cmdline}")
    return found


def test_peers_quick_run_gives_positive_figures_and_cleans_up(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = _bench(
        [
            "throughput", "latency",
            "--vs", "nats,pysyncobj", "--skip-raftseq", "--quick",
            "--messages", "2000", "--rates", "1000", "--latency-seconds", "0.5",
            "--dir", str(scratch), "--json", str(report_path),
        ],
        timeout_s=150,
    )
    output = done.stdout + done.stderr
    assert "SETUP FAILED" not in output, f"the benchmark could not set up a peer:\n{output}"
    assert done.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["failures"] == {}, output
    assert report["peers_setup"]["nats"]["nats_server"].startswith("nats-server"), report["peers_setup"]

    systems = report["workloads"]["throughput"]["payloads"]["100"]["systems"]
    assert set(systems) == {"nats", "pysyncobj"}, output
    assert set(systems["nats"]) == {"1 client", "4 processes"}, systems["nats"].keys()
    assert set(systems["pysyncobj"]) == {"1 client"}, systems["pysyncobj"].keys()
    for system, variants in systems.items():
        for variant, figure in variants.items():
            assert figure["median"] > 0, f"{system} {variant}: {figure}"

    rate = report["workloads"]["latency"]["rates"]["1000"]["systems"]
    assert set(rate) == {"nats", "pysyncobj"}, output
    for system, figure in rate.items():
        assert 0 < figure["p50_ms"] <= figure["p99_ms"] <= figure["max_ms"], f"{system}: {figure}"
        assert figure["count"] > 0 and figure["achieved_per_s"] > 0, f"{system}: {figure}"

    assert "throughput, 100-byte payloads" in done.stdout and "latency from the intended send time" in done.stdout, output
    assert list(scratch.iterdir()) == [], "the benchmark left files behind"
    assert _processes_mentioning(str(scratch)) == [], "the benchmark left processes running"


def test_a_workload_not_implemented_yet_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    done = _bench(["recovery", "--dir", str(tmp_path)], timeout_s=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "not implemented yet" in done.stdout.lower(), done.stdout


def test_every_option_has_help() -> None:
    done = _bench(["--help"], timeout_s=60)
    assert done.returncode == 0, done.stderr
    for option in ("--vs", "--quick", "--runs", "--json", "--skip-raftseq", "--window", "--nats-window", "--rates", "--kills"):
        assert option in done.stdout, option
    bad = _bench(["--vs", "etcd"], timeout_s=60)
    assert bad.returncode == 2 and "unknown peer" in bad.stderr, bad.stderr
