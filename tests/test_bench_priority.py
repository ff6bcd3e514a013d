"""``benchmarks.bench_priority`` end to end, briefly: it runs, alternates the lane on and off,
measures admin submits in both modes, joins them with the leader's stage probe, and its bulk
processes got every number once. Its figures mean little this short; the README's come from
``--phase-s 5 --phases 4``."""

from __future__ import annotations

from bench_runs import run_module

TIMEOUT_S = 180


def test_a_short_run_measures_both_modes_and_joins_the_stage_probe(tmp_path) -> None:
    report, output = run_module(
        "benchmarks.bench_priority",
        ["--phase-s", "1", "--phases", "2", "--processes", "1", "--admin-rate", "20", "--stages"],
        tmp_path / "report.json",
        timeout_s=TIMEOUT_S,
    )
    on, off = report["phases"]
    assert on["lane"] and not off["lane"]
    for phase in (on, off):
        assert phase["admin_submits"] >= 5, phase
        assert phase["bulk_per_s"] > 0, phase
        assert phase["stages"]["joined"] == phase["admin_submits"], phase["stages"]
    (bulk,) = report["bulk_processes"]
    assert bulk["acked"] == bulk["unique"] > 0
    assert report["client_ports"] == "plaintext"
    assert "admin p99 with the lane" in output


def test_with_tls_every_client_reaches_the_nodes_over_tls(tmp_path) -> None:
    """``--tls``: the nodes speak only TLS on their client ports, so a run that measures
    anything had every client (the bulk processes, the admin client, its status connection)
    connect with the cluster's certificates."""
    report, output = run_module(
        "benchmarks.bench_priority",
        ["--phase-s", "1", "--phases", "2", "--processes", "1", "--admin-rate", "20", "--tls"],
        tmp_path / "report.json",
        timeout_s=TIMEOUT_S,
    )
    assert report["client_ports"] == "TLS"
    on, off = report["phases"]
    assert on["admin_submits"] >= 5 and off["admin_submits"] >= 5, report["phases"]
    (bulk,) = report["bulk_processes"]
    assert bulk["acked"] == bulk["unique"] > 0
