"""``python -m benchmarks`` (``raftseq bench``) runs its peer baselines at smoke size: NATS
JetStream (installed by the benchmark's own setup when missing) and plain pysyncobj produce
positive figures, the JSON report parses, and nothing is left behind. The stream workloads
(replay, recovery, fanout) give raftseq's and NATS's figures from one filled stream each: every
message of the stream replayed, every fanout subscriber complete.

That the figures exist and are consistent is checked (counts, orderings, bounds of a minute),
never their size: that depends on the machine. A NATS
that cannot be installed fails the test with the benchmark's message; it is never skipped.
"""

from __future__ import annotations

import json
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


#: The peers alone, at the smallest sizes that still give every figure.
PEERS_ALONE_QUICK = ["--skip-raftseq", "--quick", "--messages", "2000", "--rates", "1000", "--latency-seconds", "0.5"]
#: The workloads etcd is measured in, against etcd.
ETCD_WORKLOADS = ["throughput", "latency", "failover", "--vs", "etcd"]


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


def _quick_run(tmp_path: Path, args: list[str], *, timeout_s: float = 150) -> tuple[subprocess.CompletedProcess, str, dict]:
    """``raftseq bench ARGS`` with its temporary directory below ``tmp_path/scratch`` and its
    report in ``tmp_path/report.json``: it must set up every peer, exit 0 and report no
    failure. Returns the finished process, its output and the report."""
    report_path = tmp_path / "report.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = _bench([*args, "--dir", str(scratch), "--json", str(report_path)], timeout_s=timeout_s)
    output = done.stdout + done.stderr
    assert "SETUP FAILED" not in output, f"the benchmark could not set up a peer:\n{output}"
    assert done.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["failures"] == {}, output
    return done, output, report


def _assert_left_nothing(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    assert list(scratch.iterdir()) == [], "the benchmark left files behind"
    assert _processes_mentioning(str(scratch)) == [], "the benchmark left processes running"


def test_peers_quick_run_gives_positive_figures_and_cleans_up(tmp_path: Path) -> None:
    done, output, report = _quick_run(
        tmp_path,
        [
            "throughput",
            "latency",
            "--vs",
            "nats,pysyncobj",
            *PEERS_ALONE_QUICK,
        ],
    )
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
    _assert_left_nothing(tmp_path)


def test_etcd_quick_run_gives_positive_figures_and_fsync_counts_and_cleans_up(tmp_path: Path) -> None:
    """etcd (Debian's etcd-server, installed by the benchmark when missing): both throughput
    variants, latency with p99.9, the leader's WAL fsyncs counted, one leader kill, and no
    etcd process or data directory left afterwards; within a minute."""
    done, output, report = _quick_run(tmp_path, [*ETCD_WORKLOADS, *PEERS_ALONE_QUICK, "--kills", "1"], timeout_s=60)
    assert report["peers_setup"]["etcd"]["etcd"].startswith("etcd Version: 3.4"), report["peers_setup"]

    variants = report["workloads"]["throughput"]["payloads"]["100"]["systems"]["etcd"]
    assert set(variants) == {"1 client", "1 client, batched"}, variants.keys()
    for variant, figure in variants.items():
        assert figure["median"] > 0, f"{variant}: {figure}"
        fsync = figure["run_details"][0]["fsync"]
        assert fsync["wal_fsyncs"] > 0 and fsync["fsyncs_per_s"] > 0, f"{variant}: {fsync}"
        assert 0 < fsync["messages_per_fsync"] <= 2000, f"{variant}: {fsync}"
    batched = variants["1 client, batched"]["run_details"][0]
    assert batched["requests"] < batched["messages"], batched  # transactions of many puts

    latency = report["workloads"]["latency"]["rates"]["1000"]["systems"]["etcd"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["p999_ms"] <= latency["max_ms"], latency
    assert latency["fsync"]["fsyncs_per_s"] > 0, latency

    failover = report["workloads"]["failover"]["systems"]["etcd"]
    assert len(failover["kills"]) == 1 and 0 < failover["failover_s"]["max"] < 60, failover
    assert failover["ack_seq_duplicates"] == 0, failover

    assert re.search(r"^  fsync etcd\s+1 client, batched\s+leader\s+[\d,]+ fsyncs/s", done.stdout, re.MULTILINE), output
    _assert_left_nothing(tmp_path)


def test_one_run_gives_one_table_of_both_durabilities_beside_a_power_safe_peer(tmp_path: Path) -> None:
    """Issue 15 item 5 in one run: raftseq in the default (crash) and the power-safe mode, each
    a system of its own, beside etcd; the closing table has a column for each, the latency
    rows with p50 / p99 / p99.9, failover, and fsyncs where they are counted: raftseq-power's
    Raft log fsyncs (entries per fsync too), none for raftseq in crash mode."""
    quick = ["--quick", "--messages", "20000", "--rates", "2000", "--latency-seconds", "0.5", "--kills", "1"]
    done, output, report = _quick_run(tmp_path, [*ETCD_WORKLOADS, *quick], timeout_s=300)
    assert report["systems"] == ["raftseq", "raftseq-power", "etcd"], report["systems"]
    assert report["raftseq_durabilities"] == {"raftseq": "crash", "raftseq-power": "power"}, report["raftseq_durabilities"]

    throughput = report["workloads"]["throughput"]["payloads"]["100"]
    power = throughput["systems"]["raftseq-power"]["1 client, batched"]["run_details"][0]["fsync"]
    assert power["fsyncs_per_s"] > 0 and power["entries_per_fsync"] >= 1 and power["messages_per_fsync"] > 0, power
    assert all(d["fsync"] is None for d in throughput["systems"]["raftseq"]["1 client, batched"]["run_details"]), throughput
    goals = {g["goal"] for g in throughput["goals"]}
    assert {"raftseq-power >= 10x etcd", "raftseq-power >= 150,000 msg/s", "raftseq-power >= 0.6x raftseq"} <= goals, goals

    latency = report["workloads"]["latency"]["rates"]["2000"]["systems"]
    assert latency["raftseq-power"]["fsync"]["fsyncs_per_s"] > 0, latency["raftseq-power"]
    assert set(report["workloads"]["failover"]["systems"]) == {"raftseq", "raftseq-power", "etcd"}, output

    table = done.stdout[done.stdout.index("all systems, one table") :]
    assert "| figure | raftseq | raftseq-power | etcd |" in table, output
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines() if line.startswith("| ")}
    for row in ("100 B best msg/s (variant)", "100 B per message msg/s", "2,000/s p50 / p99 / p99.9 ms", "failover median / max s"):
        assert len(rows[row]) == 3 and all(cell.strip(" |") not in ("-", "") for cell in rows[row]), (row, table)
    assert re.fullmatch(r"[\d.]+ / [\d.]+ / [\d.]+", rows["2,000/s p50 / p99 / p99.9 ms"][1]), table
    fsyncs = rows["100 B best: fsyncs/s, msgs / entries per fsync"]
    assert fsyncs[0] == "none" and re.fullmatch(r"[\d,]+, [\d,.]+ / [\d,.]+", fsyncs[1]), table
    _assert_left_nothing(tmp_path)


def test_stream_workloads_quick_run_gives_real_figures_and_cleans_up(tmp_path: Path) -> None:
    subscribers, rate, seconds = 10, 1000, 1
    done, output, report = _quick_run(
        tmp_path,
        [
            "replay",
            "recovery",
            "fanout",
            "--vs",
            "nats,pysyncobj",
            "--quick",
            "--subscribers",
            str(subscribers),
            "--subscriber-processes",
            "2",
            "--fanout-rate",
            str(rate),
            "--fanout-seconds",
            str(seconds),
        ],
    )
    assert "not implemented" not in output.lower(), output
    filled = 5_000  # --quick
    workloads = report["workloads"]

    replay = workloads["replay"]["systems"]
    assert set(replay) == {"raftseq", "nats"}, output
    assert replay["raftseq"]["messages"] == replay["raftseq"]["stream"]["filled"] == filled, replay["raftseq"]
    assert replay["nats"]["messages"] == replay["nats"]["stream"]["filled"] == filled, replay["nats"]
    for key in ("raw_messages_per_s", "library_messages_per_s"):
        assert 0 < replay["raftseq"][key]["min"] <= replay["raftseq"][key]["median"] <= replay["raftseq"][key]["max"], replay["raftseq"]
    assert replay["nats"]["messages_per_s"] > 0, replay["nats"]
    assert workloads["replay"]["ratios"]["raftseq client library / nats"]["ratio"] > 0, workloads["replay"]
    assert [g["goal"] for g in workloads["replay"]["goals"]] == ["raftseq replay >= 500,000 msg/s"], workloads["replay"]

    recovery = workloads["recovery"]["systems"]
    assert set(recovery) == {"raftseq", "nats"}, output
    raft, nats = recovery["raftseq"], recovery["nats"]
    assert raft["messages"] == nats["messages"] == filled, recovery
    assert 0 < raft["status_s"]["median"] <= raft["serve_s"]["median"] < 60, raft
    assert 0 < raft["caught_up_s"]["median"] < 60 and raft["leader_changes"] == 0, raft
    assert 0 < nats["answers_s"]["median"] <= nats["current_s"]["median"] < 60, nats
    assert 0 < nats["healthy_s"]["median"] < 60, nats
    assert workloads["recovery"]["goals"][0]["value"] == raft["serve_s"]["median"], workloads["recovery"]

    fanout = workloads["fanout"]["systems"]
    assert set(fanout) == {"raftseq", "nats"}, output
    for system, figure in fanout.items():
        assert figure["messages"] == rate * seconds and figure["subscribers"] == subscribers, f"{system}: {figure}"
        assert figure["complete"] is True and figure["delivered"] == subscribers * rate * seconds, f"{system}: {figure}"
        assert figure["delivered_per_s"] > 0 and figure["seconds"] > 0, f"{system}: {figure}"
        assert figure["stream"]["last_seq_before"] >= filled, f"{system}: {figure}"
    assert set(fanout["nats"]["cpu"]) >= {"n1", "n2", "n3", "subscribers"}, fanout["nats"]["cpu"]

    for name in ("replay", "recovery", "fanout"):
        assert set(workloads[name]["not_measured"]) == {"pysyncobj", "raftseq-power"}, workloads[name]
        assert f"\n{name}: " in done.stdout, f"no {name} table:\n{output}"
    assert "pysyncobj  --" in done.stdout, output
    _assert_left_nothing(tmp_path)


def test_an_unknown_workload_is_a_usage_error(tmp_path: Path) -> None:
    done = _bench(["replays", "--dir", str(tmp_path)], timeout_s=60)
    assert done.returncode == 2 and "unknown workload" in done.stderr, done.stdout + done.stderr


def test_every_option_has_help() -> None:
    done = _bench(["--help"], timeout_s=60)
    assert done.returncode == 0, done.stderr
    for option in (
        "--vs",
        "--quick",
        "--runs",
        "--json",
        "--skip-raftseq",
        "--window",
        "--nats-window",
        "--rates",
        "--kills",
        "--stream-messages",
        "--subscribers",
        "--subscriber-processes",
        "--fanout-rate",
        "--fanout-seconds",
        "--etcd-connections",
        "--durability",
    ):
        assert option in done.stdout, option
    for peer in ("nats-sync", "etcd"):
        assert peer in done.stdout, peer
    bad = _bench(["--vs", "etcd2"], timeout_s=60)
    assert bad.returncode == 2 and "unknown peer" in bad.stderr, bad.stderr


def test_etcd_client_reads_chunked_and_sized_answers_and_reports_errors() -> None:
    """The benchmark's HTTP/1.1 client of etcd's gateway, against a scripted server on
    loopback: a sized answer, a chunked one on the same keep-alive connection, then a 500 that
    becomes one clear error."""
    from benchmarks.peers.etcd_kv import Connection, HttpError

    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom",
    ]

    async def scenario() -> list:
        requests: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                requests.append(await reader.readexactly(length))
                writer.write(answer)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        connection = Connection(server.sockets[0].getsockname()[1])
        try:
            first = await asyncio.wait_for(connection.request("/v3/kv/put", b'{"a":1}'), 5)
            second = await asyncio.wait_for(connection.request("/v3/kv/put", b"{}"), 5)
            try:
                await asyncio.wait_for(connection.request("/v3/kv/put", b"{}"), 5)
                error = ""
            except HttpError as exc:
                error = str(exc)
        finally:
            connection.close()
            server.close()
            await server.wait_closed()
        return [first, second, error, requests]

    first, second, error, requests = asyncio.run(scenario())
    assert first == b"{}" and second == b"abcde", (first, second)
    assert error.startswith("HTTP 500") and "boom" in error, error
    assert requests == [b'{"a":1}', b"{}", b"{}"], requests
