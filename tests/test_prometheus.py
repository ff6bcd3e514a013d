"""A real Prometheus scraping a real three-node cluster and a relay through a leader failover.

The test starts a cluster (``running_cluster``), one relay of it (r1; the config lists every
relay slot, the five others stay down targets) and a Prometheus server on loopback with the
scrape config of deploy/prometheus (generated for the cluster's ports, scraping every 0.5 s)
and its alert rules, drives traffic, SIGKILLs the leader, and asks Prometheus's HTTP API what it
saw: all three node targets and the relay up, the sequenced-message counter and the relay's last
sequence number advancing, the role, leader identity, term and leader-change metrics following
the failover, the alert rules evaluating without error, and every metric a node or the relay
exports, and every one the dashboard and rules name, present in Prometheus.

Prometheus comes from Debian's ``prometheus`` package (.ci/run installs it). Without it the
test fails with a message; it does not skip.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster_harness import ClusterHarness, pipeline, running_cluster  # noqa: F401
from monitoring import ALERTS, dashboard_expressions, load_dashboard, metric_names, node_sample_names, scrape_config_module

from raftseq.clients import SequencerClient
from raftseq.cluster.metrics import RELAY_METRICS
from raftseq.cluster.local import die_with_parent, ephemeral_ports_first
from raftseq.cluster.processes import stop_process

SCRAPE_INTERVAL_S = 0.5
READY_TIMEOUT_S = 30.0
#: How long Prometheus may take to show a change (several scrapes, on a busy 2-core box).
SEE_TIMEOUT_S = 20.0
POLL_S = 0.25
HTTP_TIMEOUT_S = 5.0
STOP_GRACE_S = 10.0
MESSAGES = 300
MESSAGES_AFTER_FAILOVER = 100
#: Families a node exports only in some states: no sample, so no series, in this test's cluster.
SAMPLES_ONLY_SOMETIMES = frozenset({"raftseq_learner_lag_entries"})  # only while a learner catches up


def free_loopback_port(rng: random.Random) -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range (see
    ``cluster.local.free_base_port`` for why)."""
    low = ephemeral_ports_first()
    for _ in range(200):
        port = rng.randrange(10000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port on 127.0.0.1")


class PrometheusServer:
    """One Prometheus process on 127.0.0.1 with its data in a temp dir; stopped by pid."""

    def __init__(self, binary: str, config: Path, directory: Path, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.log_path = directory / "prometheus.log"
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={self.address}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
            )
        print(f"prometheus pid {self.process.pid} on http://{self.address}, log {self.log_path}", flush=True)

    def stop(self) -> None:
        stop_process(self.process, STOP_GRACE_S)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "--- prometheus log ---\n" + "\n".join(text.splitlines()[-lines:])

    # --- HTTP API -------------------------------------------------------------------------

    def get(self, path: str, **params: str) -> dict:
        url = f"http://{self.address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            body = json.loads(response.read())
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """An instant query: ``[(labels, value)]``."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def by_node(self, expr: str) -> dict[str, float]:
        return {labels["node"]: value for labels, value in self.query(expr)}

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=HTTP_TIMEOUT_S) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = repr(exc)
            time.sleep(POLL_S)
        raise AssertionError(f"prometheus not ready within {timeout_s} s ({last})\n{self.log_tail()}")

    def wait_for(self, what: str, check: Callable[[], object], *, timeout_s: float = SEE_TIMEOUT_S):
        """Poll `check` until it returns something true; return that. On timeout, fail with
        `what`, the last value seen, the targets' health and the log."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(POLL_S)
        targets = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.get("/api/v1/targets")["activeTargets"]]
        raise AssertionError(f"Prometheus did not show {what} within {timeout_s} s; last {last!r}; targets {targets}\n{self.log_tail()}")


@pytest.fixture
def prometheus_binary() -> str:
    """Checked before a cluster is started for nothing."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: install Debian's prometheus package (apt-get install prometheus; .ci/run does it)")
    return binary


@pytest.fixture
def prometheus(prometheus_binary, running_cluster, tmp_path):  # noqa: F811 - the fixture imported above
    binary = prometheus_binary
    directory = tmp_path / "prometheus"
    directory.mkdir()
    config = directory / "prometheus.yml"
    config.write_text(scrape_config_module().render(running_cluster.base_port, interval_s=SCRAPE_INTERVAL_S, rule_files=(str(ALERTS),)))
    server = PrometheusServer(binary, config, directory, free_loopback_port(random.Random(running_cluster.seed)))
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()


async def submit(h: ClusterHarness, session: str, count: int) -> list[int]:
    client = SequencerClient(h.endpoints, session=session, token=h.token)
    try:
        await client.connect()
        return await pipeline(client, [b"%s-%d" % (session.encode(), i) for i in range(count)], timeout_s=30.0)
    finally:
        await client.close()


def test_prometheus_follows_traffic_and_a_leader_failover(prometheus, running_cluster):  # noqa: F811
    h, prom = running_cluster, prometheus
    instances = {node.config.metrics_address: node.config.id for node in h.nodes}
    (relay,) = h.start_relays(1)

    # All three targets up, each node's metrics under its own id.
    prom.wait_for(
        "all three targets up",
        lambda: {labels["instance"]: v for labels, v in prom.query('up{job="raftseq"}')} == dict.fromkeys(instances, 1.0),
    )
    prom.wait_for(
        "each instance's node label",
        lambda: {labels["instance"]: labels["node"] for labels, _ in prom.query("raftseq_start_time_seconds")} == instances,
    )

    leader = h.wait_for_leader()["id"]
    followers = [n for n in h.node_ids if n != leader]
    prom.wait_for(f"{leader} as the only leader", lambda: prom.by_node('raftseq_role{role="leader"} == 1') == {leader: 1.0})
    prom.wait_for(
        f"every node naming {leader} as leader",
        lambda: prom.by_node(f'raftseq_raft_leader{{leader="{leader}"}} == 1').keys() == set(h.node_ids),
    )
    term_before = prom.by_node("raftseq_raft_term")[leader]
    changes_before = prom.by_node("raftseq_leader_changes_total")
    sequenced_before = prom.by_node("raftseq_messages_sequenced_total")
    assert set(sequenced_before) == set(h.node_ids)

    # Traffic: every node applies every message, so every node's counter advances.
    seqs = asyncio.run(submit(h, "prom-a", MESSAGES))
    assert len(seqs) == MESSAGES
    prom.wait_for(
        f"raftseq_messages_sequenced_total advancing by {MESSAGES} on every node",
        lambda: all(prom.by_node("raftseq_messages_sequenced_total").get(n, 0) >= sequenced_before[n] + MESSAGES for n in h.node_ids),
    )
    prom.wait_for(
        f"raftseq_last_seq {max(seqs)} everywhere", lambda: prom.by_node("raftseq_last_seq") == dict.fromkeys(h.node_ids, float(max(seqs)))
    )
    prom.wait_for(
        "ack latency observed on the leader", lambda: prom.by_node("raftseq_ack_latency_seconds_count").get(leader, 0) >= MESSAGES
    )
    # The relay, scraped as job raftseq-relay at the address cluster up gives r1.
    prom.wait_for(
        f"relay {relay.id} up at {relay.metrics_address}",
        lambda: {labels["instance"] for labels, v in prom.query('up{job="raftseq-relay"} == 1')} == {relay.metrics_address},
    )
    prom.wait_for(
        f"raftseq_relay_last_seq {max(seqs)} on {relay.id}",
        lambda: {labels["relay"]: v for labels, v in prom.query("raftseq_relay_last_seq")} == {relay.id: float(max(seqs))},
    )

    # Failover.
    killed_instance = h.node(leader).config.metrics_address
    h.kill(leader)
    new_leader = h.wait_for_leader(exclude=[leader])["id"]
    assert new_leader in followers
    prom.wait_for(
        f"the killed leader's target ({killed_instance}) down",
        lambda: dict(((labels["instance"], v) for labels, v in prom.query('up{job="raftseq"}'))).get(killed_instance) == 0.0,
    )
    prom.wait_for(f"{new_leader} as the only leader", lambda: prom.by_node('raftseq_role{role="leader"} == 1') == {new_leader: 1.0})
    prom.wait_for(
        f"both survivors naming {new_leader} as leader",
        lambda: prom.by_node(f'raftseq_raft_leader{{leader="{new_leader}"}} == 1').keys() == set(followers),
    )
    prom.wait_for(
        "raftseq_leader_changes_total advancing on both survivors",
        lambda: all(prom.by_node("raftseq_leader_changes_total").get(n, 0) > changes_before[n] for n in followers),
    )
    assert prom.by_node("raftseq_raft_term")[new_leader] > term_before
    prom.wait_for(
        "a positive increase() of leader changes on the survivors",
        lambda: {n for n, v in prom.by_node("increase(raftseq_leader_changes_total[1m])").items() if v > 0} >= set(followers),
    )

    # The new leader sequences, and Prometheus sees it.
    sequenced_mid = prom.by_node("raftseq_messages_sequenced_total")
    seqs_after = asyncio.run(submit(h, "prom-b", MESSAGES_AFTER_FAILOVER))
    assert min(seqs_after) > max(seqs)
    prom.wait_for(
        "raftseq_messages_sequenced_total advancing on the survivors after the failover",
        lambda: all(
            prom.by_node("raftseq_messages_sequenced_total").get(n, 0) >= sequenced_mid[n] + MESSAGES_AFTER_FAILOVER for n in followers
        ),
    )
    prom.wait_for(
        f"follower lag exported by {new_leader}",
        lambda: {labels["node"] for labels, _ in prom.query("raftseq_follower_lag_entries")} == {new_leader},
    )

    # The alert rules load and evaluate without error against real series.
    def rules_evaluated() -> list[dict]:
        rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        return rules if rules and not any(r["lastEvaluation"].startswith("0001-") for r in rules) else []

    rules = prom.wait_for("every alert rule evaluated", rules_evaluated)
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "RaftseqNoLeader" not in firing and "RaftseqTwoLeadersInOneTerm" not in firing, firing

    # Every metric a node or the relay exports reached Prometheus, and every dashboard query runs.
    stored = set(prom.get("/api/v1/label/__name__/values"))
    missing = sorted(node_sample_names() - stored - SAMPLES_ONLY_SOMETIMES)
    assert not missing, f"exported by the nodes but not in Prometheus: {missing}"
    missing = sorted({spec.name for spec in RELAY_METRICS} - stored)
    assert not missing, f"exported by the relay but not in Prometheus: {missing}"
    failed = []
    for where, expr in dashboard_expressions(load_dashboard()):
        assert metric_names(expr) - SAMPLES_ONLY_SOMETIMES <= stored, f"{where}: {metric_names(expr) - stored}"
        concrete = expr.replace("$__rate_interval", "2s").replace('"$node"', '".*"').replace('"$relay"', '".*"')
        if concrete.startswith("label_values("):
            continue
        try:
            prom.query(concrete)
        except (AssertionError, urllib.error.HTTPError) as exc:
            failed.append(f"{where}: {concrete}: {exc}")
    assert not failed, "\n".join(failed)
