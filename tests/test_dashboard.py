"""The Grafana dashboard and its provisioning: generated from deploy/grafana/dashboard.py,
built only from metrics a node or a relay exports, and covering every metric a node or a relay
exports (``METRICS`` and ``RELAY_METRICS`` of cluster/metrics.py)."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
from monitoring import (
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    all_panels,
    dashboard_expressions,
    dashboard_generator,
    family_of,
    load_dashboard,
    metric_names,
    node_sample_names,
    relay_sample_names,
)

from raftseq.cluster import metrics


#: What the dashboard may name: a node's samples and a relay's.
EXPORTED = node_sample_names() | relay_sample_names()


def unknown_metrics(dashboard: dict, exported: frozenset[str] = EXPORTED) -> list[str]:
    """One line per expression that names a metric neither a node nor a relay exports (or names none)."""
    problems = []
    for where, expr in dashboard_expressions(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        for name in sorted(names - exported):
            problems.append(f"{where}: {name} is not exported by a node or a relay: {expr}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def test_the_json_is_what_the_generator_writes(dashboard):
    generated = json.loads(dashboard_generator().render())
    assert dashboard == generated, "deploy/grafana/dashboards/raftseq.json is stale: run python3 deploy/grafana/dashboard.py"


def test_every_expression_names_only_exported_metrics(dashboard):
    assert len(dashboard_expressions(dashboard)) > 40
    problems = unknown_metrics(dashboard)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "mutation",
    [
        ("raftseq_messages_sequenced_total", "raftseq_messages_sequenced"),  # a counter without _total
        ("raftseq_ack_latency_seconds_bucket", "raftseq_ack_latency_bucket"),  # a renamed histogram
        ("raftseq_follower_lag_entries", "raftseq_follower_lag"),
        ("raftseq_relay_delivered_records_total", "raftseq_relay_delivered_total"),  # a relay metric renamed
    ],
)
def test_a_panel_naming_a_metric_that_does_not_exist_is_caught(dashboard, mutation):
    old, new = mutation
    mutated = copy.deepcopy(dashboard)
    hits = 0
    for panel in all_panels(mutated):
        for target in panel.get("targets", []):
            if old in target["expr"]:
                target["expr"] = target["expr"].replace(old, new)
                hits += 1
    assert hits, f"no expression uses {old}"
    problems = unknown_metrics(mutated)
    assert len(problems) >= hits and all(new in p for p in problems), problems


@pytest.mark.parametrize("gone", ["raftseq_raft_term", "raftseq_relay_upstream_lag_records"])
def test_a_metric_a_node_or_relay_stops_exporting_is_caught(dashboard, gone):
    problems = unknown_metrics(dashboard, EXPORTED - {gone})
    assert problems and all(gone in p for p in problems)


def metrics_without_a_panel(dashboard: dict) -> list[str]:
    used = {family_of(name) for _, expr in dashboard_expressions(dashboard) for name in metric_names(expr)}
    return [spec.name for spec in (*metrics.METRICS, *metrics.RELAY_METRICS) if spec.name not in used]


def test_every_exported_metric_has_a_panel(dashboard):
    """Every family of ``METRICS`` (a node's) and of ``RELAY_METRICS`` (a relay's)."""
    missing = metrics_without_a_panel(dashboard)
    assert not missing, f"metrics without a panel: {missing}"


def test_a_relay_metric_without_a_panel_is_caught(dashboard):
    mutated = copy.deepcopy(dashboard)
    for panel in all_panels(mutated):
        panel["targets"] = [t for t in panel.get("targets", []) if "raftseq_relay_tls_refusals_total" not in t["expr"]]
    assert metrics_without_a_panel(mutated) == ["raftseq_relay_tls_refusals_total"]


def test_relay_expressions_filter_by_the_relay_variable(dashboard):
    """A relay's samples carry ``relay``, not ``node``: every selector of a relay metric takes
    the ``$relay`` filter, and no relay metric is drawn per node."""
    problems = []
    for where, expr in dashboard_expressions(dashboard):
        relay_names = {name for name in metric_names(expr) if name.startswith("raftseq_relay_")}
        if not relay_names or expr.startswith("label_values("):
            continue
        for name in relay_names:
            selectors = [m.group(1) for m in re.finditer(rf"\b{name}\{{([^}}]*)\}}", expr)]
            if len(selectors) != expr.count(name) or not all('relay=~"$relay"' in s for s in selectors):
                problems.append(f"{where}: {name} without the $relay filter: {expr}")
        if "node" in expr:
            problems.append(f"{where}: a relay metric by node: {expr}")
    assert not problems, "\n".join(problems)


def test_panels_are_well_formed(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{panel['title']} sticks out: {pos}"
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel.get("description"), f"{panel['title']} has no description"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["allValue"] == ".*"
    assert variables["relay"]["allValue"] == ".*"
    assert metric_names(variables["relay"]["query"]["query"]) <= relay_sample_names()
    assert dashboard["uid"] and dashboard["title"] == "raftseq"


def test_provisioning_points_at_the_dashboard_and_a_prometheus():
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "raftseq.yml").read_text()
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "raftseq.yml").read_text()
    run = (GRAFANA_DIR / "run").read_text()
    assert "type: prometheus" in datasource and "url: ${RAFTSEQ_PROMETHEUS_URL}" in datasource
    assert "path: ${RAFTSEQ_GRAFANA_DASHBOARDS}" in provider
    for variable in ("RAFTSEQ_PROMETHEUS_URL", "RAFTSEQ_GRAFANA_DASHBOARDS", "GF_PATHS_PROVISIONING"):
        assert f"export {variable}=" in run, f"deploy/grafana/run does not set {variable}"
    assert 'RAFTSEQ_GRAFANA_DASHBOARDS="$here/dashboards"' in run
    assert 'GF_PATHS_PROVISIONING="$here/provisioning"' in run
    assert "prometheus_url=http://127.0.0.1:9090" in run, "Grafana's default Prometheus is deploy/prometheus/run's"
    assert "listen=127.0.0.1:9090" in (PROMETHEUS_DIR / "run").read_text()
    subprocess.run(["bash", "-n", str(GRAFANA_DIR / "run")], check=True)
