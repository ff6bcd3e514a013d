"""``raftseq.cluster.local``: the banner of ``raftseq cluster up`` points only to scripts that
exist, and the one ``wait_for_leader`` / ``wait_converged`` decide from status reports as
tests, chaos runs and benchmarks expect (no node is started here: the status is scripted)."""

from __future__ import annotations

import os

import pytest

from raftseq.cluster import local
from raftseq.cluster.local import ClusterTimeout, LocalCluster

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cluster(tmp_path) -> LocalCluster:
    return LocalCluster(str(tmp_path / "c"), 20000, insecure=False, restart=False)


def test_from_the_source_checkout_the_banner_names_the_deploy_scripts_by_absolute_path(tmp_path):
    banner = _cluster(tmp_path).describe()
    for script in ("deploy/prometheus/run", "deploy/grafana/run"):
        path = os.path.join(REPO_DIR, script)
        assert os.path.isfile(path)
        assert path in banner, banner
    assert f"{os.path.join(REPO_DIR, 'deploy/prometheus/run')} --base-port 20000 --data-dir {tmp_path / 'c'}" in banner


def test_an_installed_package_without_deploy_scripts_is_told_where_they_are(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "raftseq"
    (installed / "cluster").mkdir(parents=True)
    monkeypatch.setattr(local, "source_checkout", lambda: str(installed))
    banner = _cluster(tmp_path).describe()
    watch = [line for line in banner.splitlines() if "watch it" in line]
    assert len(watch) == 1, banner
    assert "raftseq top" in watch[0]
    assert "the deploy/ folder of the source distribution" in watch[0]
    assert str(installed) not in watch[0]
    assert not any(word.startswith("/") and word.endswith("/run") for word in watch[0].split()), watch[0]


class Scripted(LocalCluster):
    """A cluster whose status reports come from a list (the last one repeats)."""

    def __init__(self, tmp_path, reports: list[list[dict]]) -> None:
        super().__init__(str(tmp_path / "c"), 20000, insecure=False, restart=False)
        self.reports = reports
        self.asked: list[list[str]] = []

    def status(self, *, nodes=None, timeout_s: float = 1.0) -> dict:
        ids = list(nodes) if nodes is not None else self.node_ids
        self.asked.append(ids)
        entries = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        chosen = [dict(e) for e in entries if e["node"] in ids]
        return {"leader": "", "nodes": chosen}


def up(node: str, role: str, leader: str, *, term: int = 1, last_seq: int = 0) -> dict:
    return {
        "node": node,
        "id": node,
        "address": f"a-{node}",
        "role": role,
        "term": term,
        "leader": f"a-{leader}" if leader else None,
        "last_seq": last_seq,
    }


def down(node: str) -> dict:
    return {"node": node, "address": f"a-{node}", "role": "unreachable", "error": "refused"}


def test_wait_for_leader_wants_one_leader_every_reachable_node_names(tmp_path):
    split = [up("n1", "leader", "n1"), up("n2", "follower", "n3"), up("n3", "leader", "n3", term=2)]
    agreed = [up("n1", "follower", "n3", term=2), up("n2", "follower", "n3", term=2), up("n3", "leader", "n3", term=2)]
    cluster = Scripted(tmp_path, [split, split, agreed])
    assert cluster.wait_for_leader(timeout_s=5)["node"] == "n3"
    assert len(cluster.asked) == 3


def test_wait_for_leader_leaves_out_excluded_nodes_and_raises_a_cluster_timeout(tmp_path):
    killed = [down("n1"), up("n2", "leader", "n2", term=3), up("n3", "follower", "n2", term=3)]
    cluster = Scripted(tmp_path, [killed])
    assert cluster.wait_for_leader(timeout_s=5, exclude=["n1"])["node"] == "n2"
    assert cluster.asked[-1] == ["n2", "n3"]
    with pytest.raises(ClusterTimeout, match="no leader among"):
        cluster.wait_for_leader(timeout_s=0.1, exclude=["n2"])
    assert issubclass(ClusterTimeout, AssertionError)


def test_wait_for_leader_by_majority_takes_the_highest_term_a_majority_names(tmp_path):
    cut_off = [up("n1", "leader", "n1", term=1), up("n2", "follower", "n3", term=2), up("n3", "leader", "n3", term=2)]
    cluster = Scripted(tmp_path, [cut_off])
    with pytest.raises(ClusterTimeout):
        cluster.wait_for_leader(timeout_s=0.1)
    assert cluster.wait_for_leader(timeout_s=5, majority=True)["node"] == "n3"


def test_wait_converged_reaches_a_target_or_holds_still_for_two_polls(tmp_path):
    def at(seq: int, leader: str = "n1") -> list[dict]:
        return [up(n, "leader" if n == leader else "follower", leader, last_seq=seq) for n in ("n1", "n2", "n3")]

    behind = [up("n1", "leader", "n1", last_seq=9), up("n2", "follower", "n1", last_seq=7), down("n3")]
    cluster = Scripted(tmp_path, [behind, at(9), at(10)])
    assert cluster.wait_converged(10, timeout_s=5) == 10
    cluster = Scripted(tmp_path, [at(9), at(10), at(10)])
    assert cluster.wait_converged(timeout_s=5) == 10
    assert len(cluster.asked) == 3
    no_leader = [dict(e, leader=None) for e in at(10)]
    with pytest.raises(ClusterTimeout, match="did not converge"):
        Scripted(tmp_path, [no_leader]).wait_converged(timeout_s=0.1)
    with pytest.raises(ClusterTimeout):
        Scripted(tmp_path, [at(10)]).wait_converged(at_least=11, timeout_s=0.1)


class ScriptedMetrics(LocalCluster):
    """A cluster whose metrics pages come from a list (the last one repeats); a string is a
    page that does not answer."""

    def __init__(self, tmp_path, pages: list[dict | str]) -> None:
        super().__init__(str(tmp_path / "c"), 20000, insecure=False, restart=False)
        self.pages = pages
        self.scrapes = 0

    def metrics(self, node_id: str) -> dict[str, float]:
        self.scrapes += 1
        page = self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]
        if isinstance(page, str):
            raise ConnectionRefusedError(page)
        return dict(page)


def catchup(fetched: float, missing: float, holes: float) -> dict[str, float]:
    return {"raftseq_catchup_fetched_records_total": fetched, "raftseq_catchup_missing_records": missing, "raftseq_journal_holes": holes}


def test_wait_hole_filled_waits_for_a_fetch_and_no_hole_on_a_page_that_answers(tmp_path):
    # Starting (no page), then a fresh process with nothing fetched yet and no hole known (the
    # Raft snapshot has not come), then fetching, then filled.
    pages = ["starting", catchup(0, 0, 0), catchup(0, 500, 1), catchup(200, 300, 1), catchup(500, 0, 0)]
    cluster = ScriptedMetrics(tmp_path, pages)
    assert cluster.wait_hole_filled("n2", timeout_s=5)["raftseq_catchup_fetched_records_total"] == 500
    assert cluster.scrapes == 5
    with pytest.raises(ClusterTimeout, match=r"n2: fills its journal hole from a peer: not within 0.1 s; last metrics no answer"):
        ScriptedMetrics(tmp_path, ["refused"]).wait_hole_filled("n2", timeout_s=0.1)
    with pytest.raises(ClusterTimeout, match="raftseq_catchup_missing_records"):
        ScriptedMetrics(tmp_path, [catchup(100, 5, 1)]).wait_hole_filled("n2", timeout_s=0.1)


def test_wait_damage_repaired_wants_a_repair_and_no_refused_record(tmp_path):
    def damage(repaired: float, refused: float) -> dict[str, float]:
        return {"raftseq_journal_damage_repaired_total": repaired, "raftseq_journal_damaged_records": refused}

    cluster = ScriptedMetrics(tmp_path, [damage(0, 0), damage(0, 40), damage(1, 0)])
    cluster.wait_damage_repaired("n1", timeout_s=5)
    assert cluster.scrapes == 3
    with pytest.raises(ClusterTimeout, match="repairs its damaged journal"):
        ScriptedMetrics(tmp_path, [damage(1, 40)]).wait_damage_repaired("n1", timeout_s=0.1)


def test_metrics_reads_the_node_page_samples_labelled_with_the_node_only(tmp_path):
    import http.server
    import threading

    import msgspec

    page = (
        b'# TYPE raftseq_disk_low gauge\nraftseq_disk_low{node="n1"} 1.0\n'
        b'# TYPE raftseq_refused_total counter\nraftseq_refused_total{node="n1",reason="busy"} 3.0\n'
        b"# TYPE raftseq_up gauge\nraftseq_up 1.0\n"
    )

    pages_asked = []

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            pages_asked.append(self.path)
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cluster = _cluster(tmp_path)
        node = cluster.node("n1")
        node.config = msgspec.structs.replace(node.config, metrics_address=f"127.0.0.1:{server.server_address[1]}")
        cluster.wait_serving_metrics("n1", timeout_s=5)
        # Waiting for the port reads no page (the node would serve that one again for
        # METRICS_PAGE_REUSE_S, to the test's own first scrape).
        assert pages_asked == []
        assert cluster.metrics("n1") == {"raftseq_disk_low": 1.0, "raftseq_up": 1.0}
        assert pages_asked == ["/metrics"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    with pytest.raises(ClusterTimeout, match="no metrics port"):
        cluster.wait_serving_metrics("n1", timeout_s=0.1)
