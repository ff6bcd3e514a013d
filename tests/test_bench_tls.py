"""``benchmarks.bench_tls`` end to end, briefly: it starts a plaintext and a TLS cluster, runs
one round of each, measures both (throughput and CPU per message), pairs them into the TLS
ratio, measures the TLS work without sockets, and exits 0 when the goal is met and 1 when it is
not. Its figures mean little this short (a single round on a shared machine can fall either
side of the goal); the README's come from ``--messages 100000 --rounds 7``."""

from __future__ import annotations

import json
import subprocess
import sys

from bench_runs import REPO_DIR

TIMEOUT_S = 120
#: Messages per run: enough for a run of a tenth of a second or more, so that the CPU figures
#: (clock ticks of 10 ms, shares rounded to 0.01) are not zero; the README's last loaded row
#: used as many.
MESSAGES = 20_000
VARIANTS = ("plaintext", "tls")
CPU_KEYS = ("nodes_us", "leader_us", "client_us")


def test_one_short_round_measures_both_variants_and_reports_the_ratio(tmp_path) -> None:
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_tls", "--messages", str(MESSAGES), "--rounds", "1", "--json", str(report_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    # The exit status says whether the goal was met, and nothing else went wrong.
    assert done.returncode == (0 if report["goal_met"] else 1), output

    assert report["benchmark"] == "raftseq tls"
    assert report["messages_per_run"] == MESSAGES and report["mutual"] is False
    assert set(report["variants"]) == set(VARIANTS)
    for name in VARIANTS:
        variant = report["variants"][name]
        rates = variant["messages_per_s"]
        assert len(rates["runs"]) == 1 and rates["median"] > 0, (name, variant)
        for key in CPU_KEYS:
            assert len(variant[key]["runs"]) == 1, (name, key, variant[key])
        # The nodes did work for what they acknowledged, and the leader's share is part of it.
        assert variant["nodes_us"]["median"] > 0 and variant["client_us"]["median"] > 0, (name, variant)
        assert 0 < variant["leader_us"]["median"] <= variant["nodes_us"]["median"], (name, variant)

    (ratio,) = report["tls_ratio_per_round"]
    plain, tls = (report["variants"][name]["messages_per_s"]["median"] for name in VARIANTS)
    assert abs(ratio - tls / plain) < 0.001 and report["tls_ratio"] == ratio
    assert report["goal_met"] == (tls / plain >= 0.85)  # one round: its ratio is the median
    work = report["tls_work"]
    assert work["batch_bytes"] == 500 * (100 + 10) and work["us_per_batch"] > 0 and work["us_per_message"] > 0, work

    for line in ("round 1 plaintext", "round 1 tls", "goal      TLS throughput", "TLS work"):
        assert line in output, output
