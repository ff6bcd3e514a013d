"""``benchmarks/plot_results.py`` draws a ``raftseq bench`` JSON report as a PNG: a small
hand-made report (every workload the plot knows, one with a rate that had no acks) gives a valid
PNG with every panel, and a report without figures is refused.

Run as a command, as a user would: nothing imports ``benchmarks``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PLOT = REPO_DIR / "benchmarks" / "plot_results.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spread(median: float) -> dict:
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "runs": [median]}


def _latency(p50: float | None, p99: float | None) -> dict:
    return {"p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "max_ms": p99, "achieved_per_s": 1000.0}


REPORT = {
    "benchmark": "raftseq bench",
    "systems": ["raftseq", "nats", "pysyncobj"],
    "machine": {"nproc": 2},
    "code": {"git_commit": "abc1234", "dirty": False},
    "load_average_start": [1.5, 1.2, 1.0],
    "settings": {"quick": True},
    "workloads": {
        "throughput": {
            "payloads": {
                "100": {
                    "systems": {
                        "raftseq": {"1 client": _spread(90_000), "1 client, batched": _spread(220_000)},
                        "nats": {"1 client": _spread(28_000), "4 processes": _spread(33_000)},
                        "pysyncobj": {"1 client": _spread(3_700)},
                    }
                },
                "1024": {"systems": {"raftseq": {"1 client, batched": _spread(62_000)}, "nats": {"4 processes": _spread(23_000)}}},
            }
        },
        "latency": {
            "rates": {
                "1000": {"systems": {"raftseq": _latency(1.6, 5.3), "nats": _latency(1.2, 2.3), "pysyncobj": _latency(106.0, 201.0)}},
                "50000": {"systems": {"raftseq": _latency(5.6, 47.0), "nats": _latency(2672.0, 4855.0), "pysyncobj": _latency(None, None)}},
            }
        },
        "failover": {
            "systems": {
                "raftseq": {"failover_s": {"median": 0.34, "max": 0.41}},
                "nats": {"failover_s": {"median": 5.9, "max": 7.8}},
            }
        },
        "replay": {
            "systems": {
                "raftseq": {"messages": 5000, "library_messages_per_s": _spread(320_000), "raw_messages_per_s": _spread(700_000)},
                "nats": {"messages": 5000, "messages_per_s": 150_000.0},
            },
            "not_measured": {"pysyncobj": "no stream"},
        },
        "recovery": {
            "systems": {
                "raftseq": {"status_s": _spread(0.2), "serve_s": _spread(0.2), "caught_up_s": _spread(0.3)},
                "nats": {"answers_s": _spread(0.03), "healthy_s": _spread(1.8), "current_s": _spread(1.8)},
            }
        },
        "fanout": {
            "systems": {
                "raftseq": {"delivered_per_s": 970_000.0, "complete": True},
                "nats": {"delivered_per_s": 180_000.0, "complete": False},
            }
        },
    },
}


def _plot(report_path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PLOT), str(report_path), "--out", str(out)], cwd=REPO_DIR, capture_output=True, text=True, timeout=60
    )


def test_a_report_becomes_a_png_with_a_panel_per_workload(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(REPORT))
    out = tmp_path / "plots" / "results.png"
    done = _plot(report_path, out)
    assert done.returncode == 0, done.stdout + done.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, f"not a PNG: {data[:16]!r} ({len(data)} bytes)"
    assert "throughput, latency, replay, recovery, fanout, failover" in done.stdout, done.stdout


def test_a_report_without_figures_is_refused(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps({"workloads": {"latency": {"rates": {}}}}))
    out = tmp_path / "results.png"
    done = _plot(report_path, out)
    assert done.returncode == 2 and "no throughput" in done.stderr, done.stdout + done.stderr
    assert not out.exists()


def test_the_goal_lines_are_the_reports_own_goals() -> None:
    """The goals drawn come from the report (``goal_values``, written by ``python -m
    benchmarks``), never from a copy in the drawing that can go stale; every goal a panel names
    is one the benchmark writes, and a report without goals is drawn without goal lines."""
    import importlib.util

    from benchmarks.__main__ import goal_values

    spec = importlib.util.spec_from_file_location("plot_results", PLOT)
    plot_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_results)
    goals = goal_values()
    for name, panel in plot_results.BAR_PANELS.items():
        options = plot_results.bar_options(name, goals)
        if "goal" in panel:
            assert options["goal"] == goals[panel["goal"]], (name, options)
            assert str(goals[panel["goal"]]).rstrip("0").rstrip(".") in options["goal_label"].replace(",", ""), options
        assert "goal" not in plot_results.bar_options(name, {}), name
    assert plot_results.bar_options("throughput", {"throughput_per_s": 123_456})["goal_label"] == "goal >= 123,456/s at 100 B"
    assert {"latency_p50_ms", "latency_p99_ms", "latency_rate_per_s"} <= set(goals), goals
