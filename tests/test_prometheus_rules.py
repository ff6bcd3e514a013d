"""deploy/prometheus: the scrape config matches the ports ``raftseq cluster up`` uses for its
nodes and relays, and the alert rules pass ``promtool check`` and their ``promtool test rules``
unit tests, name only metrics a node or a relay exports, and each has a case where it fires.

promtool comes with Debian's ``prometheus`` package, which .ci/run installs; without it these
tests fail (they do not skip).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from monitoring import (
    ALERTS,
    PROMETHEUS_DIR,
    PROMETHEUS_SERIES,
    metric_names,
    node_sample_names,
    relay_sample_names,
    rule_expressions,
    scrape_config_module,
)

from raftseq.cluster.cli import build_parser
from raftseq.cluster.local import local_configs
from raftseq.cluster.relay_local import LOCAL_RELAYS_MAX, local_relays

#: promtool unit tests of the rules: second-scale cases, and minute/hour-scale ones evaluated
#: at a coarser interval (quicker).
ALERTS_TESTS = (PROMETHEUS_DIR / "alerts_test.yml", PROMETHEUS_DIR / "alerts_test_long.yml")
#: What the issue asks the rules to cover, by the alert that covers it.
REQUIRED_ALERTS = {
    "RaftseqNoLeader",  # no leader for 5 s
    "RaftseqLeadersInDifferentTerms",  # more than one node claiming leadership with different terms
    "RaftseqFollowerLagging",  # a follower lagging beyond a threshold
    "RaftseqAckLatencyHigh",  # acknowledgement latency p99 above a threshold
    "RaftseqDiskNearlyFull",  # disk nearly full
    "RaftseqJournalVerifyFailed",  # journal verify failures
    "RaftseqRelayLagging",  # a relay falling behind its upstream
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install Debian's prometheus package (apt-get install prometheus; .ci/run does it)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


# --- rules ----------------------------------------------------------------------------------


def test_promtool_check_rules():
    result = run_promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass():
    result = run_promtool("test", "rules", *(path.name for path in ALERTS_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_can_fail(tmp_path):
    """The unit tests notice a threshold that moved: copy the rules with the follower-lag
    threshold raised tenfold and expect promtool to report that alert."""
    rules = ALERTS.read_text()
    assert "(raftseq_follower_lag_entries) > 1000" in rules
    (tmp_path / ALERTS.name).write_text(rules.replace("(raftseq_follower_lag_entries) > 1000", "(raftseq_follower_lag_entries) > 10000"))
    shutil.copy(ALERTS_TESTS[0], tmp_path / ALERTS_TESTS[0].name)
    result = subprocess.run(
        [tool("promtool"), "test", "rules", ALERTS_TESTS[0].name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "RaftseqFollowerLagging" in result.stdout + result.stderr


def test_rules_name_only_exported_metrics():
    exported = node_sample_names() | relay_sample_names() | PROMETHEUS_SERIES
    rules = rule_expressions(ALERTS)
    assert REQUIRED_ALERTS <= rules.keys(), f"missing alerts: {REQUIRED_ALERTS - rules.keys()}"
    problems = []
    for alert, expr in rules.items():
        names = metric_names(expr)
        if not names:
            problems.append(f"{alert}: names no metric: {expr}")
        problems += [f"{alert}: {name} is not exported by a node or a relay: {expr}" for name in sorted(names - exported)]
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_case_where_it_fires():
    text = "\n".join(path.read_text() for path in ALERTS_TESTS)
    fires = set()
    for case in re.split(r"\n\s*- eval_time:", text)[1:]:
        alert = re.search(r"alertname:\s*(\S+)", case)
        expected = re.search(r"exp_alerts:\s*(\[\])?", case)
        if alert and expected and not expected.group(1):
            fires.add(alert.group(1))
    missing = set(rule_expressions(ALERTS)) - fires
    assert not missing, f"alerts without a firing unit test: {sorted(missing)}"


def test_every_alert_has_a_row_in_the_readme_and_every_row_an_alert():
    """deploy/prometheus/README.md's table of alerts (four alerts once had no row)."""
    rows = set(re.findall(r"^\| `(Raftseq\w+)` \|", (PROMETHEUS_DIR / "README.md").read_text(), re.MULTILINE))
    alerts = set(rule_expressions(ALERTS))
    assert rows == alerts, f"alerts without a row: {sorted(alerts - rows)}; rows without an alert: {sorted(rows - alerts)}"


# --- the scrape config ----------------------------------------------------------------------


def test_the_scrape_config_matches_cluster_up_defaults(tmp_path):
    module = scrape_config_module()
    default_base_port = build_parser().parse_args(["cluster", "up"]).base_port
    assert module.BASE_PORT_DEFAULT == default_base_port
    for base_port in (default_base_port, 12340):
        expected = [c.metrics_address for c in local_configs(str(tmp_path), base_port, insecure=True)]
        assert module.metrics_targets(base_port) == expected
    committed = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert committed == module.render(), "deploy/prometheus/prometheus.yml is stale: regenerate it with scrape_config.py"
    for target in module.metrics_targets(default_base_port):
        assert f"- {target}\n" in committed


def test_the_scrape_config_scrapes_every_relay_slot_of_cluster_up(tmp_path):
    """Job raftseq-relay: the metrics addresses ``cluster up --relays N`` gives relays r1..rN,
    every slot by default (the committed config), none with ``relays=0``."""
    module = scrape_config_module()
    assert module.RELAYS_MAX == LOCAL_RELAYS_MAX
    for base_port in (module.BASE_PORT_DEFAULT, 12340):
        relays = local_relays(str(tmp_path), base_port, LOCAL_RELAYS_MAX, upstream=[], token="")
        assert module.relay_metrics_targets(base_port) == [relay.metrics_address for relay in relays]
        assert module.relay_metrics_targets(base_port, relays=2) == [relay.metrics_address for relay in relays[:2]]
    committed = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    relay_job = committed.split(f"- job_name: {module.RELAY_JOB_NAME}\n", 1)[1]
    for target in module.relay_metrics_targets(module.BASE_PORT_DEFAULT):
        assert f"- {target}\n" in relay_job
    for target in module.metrics_targets(module.BASE_PORT_DEFAULT):
        assert target not in relay_job, "a node's metrics address in the relay job"
    assert module.RELAY_JOB_NAME not in module.render(relays=0)
    with pytest.raises(ValueError):
        module.render(relays=LOCAL_RELAYS_MAX + 1)


def test_promtool_check_config():
    result = run_promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_config_for_another_port_and_interval(tmp_path):
    out = tmp_path / "prometheus.yml"
    subprocess.run(
        [
            "python3",
            str(PROMETHEUS_DIR / "scrape_config.py"),
            "--base-port",
            "12340",
            "--interval",
            "0.5",
            "--relays",
            "2",
            "--rules",
            str(ALERTS),
            "--out",
            str(out),
        ],
        check=True,
        timeout=30,
    )
    text = out.read_text()
    assert "scrape_interval: 500ms" in text and "- 127.0.0.1:12541\n" in text and f"- {ALERTS}\n" in text
    assert "- 127.0.0.1:12544\n" in text and "- 127.0.0.1:12545\n" in text and "12546" not in text
    result = subprocess.run([tool("promtool"), "check", "config", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    subprocess.run(["bash", "-n", str(PROMETHEUS_DIR / "run")], check=True)
