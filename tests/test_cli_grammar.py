"""One grammar for every ``raftseq`` command: ``--endpoints``/``--token`` with their environment
defaults, ``-o table|json``, exit codes (0 ok, 1 failed check or unreachable cluster, 2 usage,
130 Ctrl-C), ``null`` for "no leader", a refused token that is not "unreachable", and
``journal verify`` of a directory without a journal or of a cluster data directory.

The commands run as a user runs them: the installed ``raftseq`` script, against a real local
cluster where the check is about a cluster."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from raftseq.cluster.cli import build_parser
from raftseq.cluster.cli.args import DEFAULT_ENDPOINTS, ENDPOINTS_ENV, TOKEN_ENV
from raftseq.cluster.processes import kill_process
from raftseq.cluster.local import LocalCluster, free_base_port
from raftseq.cluster.status import leader_of

RAFTSEQ = os.path.join(os.path.dirname(sys.executable), "raftseq")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_TIMEOUT_S = 60
#: Commands that talk to a cluster, and those of them whose output is structured.
CLUSTER_COMMANDS = ["status", "top", "submit", "tail", "sm check", "sm snapshots", "sm record"]
STRUCTURED_COMMANDS = ["status", "sm check", "sm snapshots", "sm verify", "journal verify"]


def subparser(path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in path.split():
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def raftseq(*args: str, env: dict | None = None, stdin: str = "", cwd: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (ENDPOINTS_ENV, TOKEN_ENV)}
    return subprocess.run(
        [RAFTSEQ, *args],
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=cwd,
    )


# --- the grammar, read from the parsers -------------------------------------------------------


@pytest.mark.parametrize("command", CLUSTER_COMMANDS)
def test_every_cluster_command_takes_endpoints_and_token_and_names_their_variables(command):
    parser = subparser(command)
    assert {"--endpoints", "--token"} <= options(parser), command
    text = parser.format_help()
    assert "$RAFTSEQ_ENDPOINTS" in text and "$RAFTSEQ_TOKEN" in text, text


@pytest.mark.parametrize("command", STRUCTURED_COMMANDS)
def test_structured_output_is_chosen_with_o(command):
    parser = subparser(command)
    assert {"-o", "--output"} <= options(parser), command
    output = next(a for a in parser._actions if "--output" in a.option_strings)
    assert list(output.choices) == ["table", "json"] and output.default == "table"


def test_endpoints_come_from_the_environment_and_are_split(monkeypatch):
    monkeypatch.delenv(ENDPOINTS_ENV, raising=False)
    assert build_parser().parse_args(["status"]).endpoints == DEFAULT_ENDPOINTS.split(",")
    monkeypatch.setenv(ENDPOINTS_ENV, "h1:1, h2:2")
    monkeypatch.setenv(TOKEN_ENV, "secret")
    args = build_parser().parse_args(["tail"])
    assert (args.endpoints, args.token) == (["h1:1", "h2:2"], "secret")
    args = build_parser().parse_args(["sm", "check", "--endpoints", "a:7", "--token", "t"])
    assert (args.endpoints, args.token) == (["a:7"], "t")


@pytest.mark.parametrize("bad", ["nohost", "h:port", "h:70000", ",", ":5"])
def test_a_bad_endpoint_is_a_usage_error(bad):
    done = raftseq("status", "--endpoints", bad)
    assert done.returncode == 2, done
    assert "--endpoints" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_bad_endpoint_in_the_environment_names_the_variable():
    done = raftseq("status", env={ENDPOINTS_ENV: "not-an-endpoint"})
    assert done.returncode == 2 and "$RAFTSEQ_ENDPOINTS" in done.stderr, done.stderr


def test_the_leader_is_the_one_the_nodes_name():
    follower = {"address": "a:2", "role": "follower", "term": 3, "leader": "a:1"}
    assert leader_of([follower]) == "a:1"
    assert leader_of([{"address": "a:3", "role": "unreachable", "error": "x"}]) is None
    assert leader_of([{**follower, "leader": None}]) is None
    # A deposed leader that still thinks it leads loses to what a newer term says.
    deposed = {"address": "a:1", "role": "leader", "term": 2, "leader": "a:1"}
    assert leader_of([deposed, {**follower, "term": 4, "leader": "a:3"}]) == "a:3"


# --- against a real cluster -------------------------------------------------------------------


#: How long a follower may take to name the leader that the leader itself reports.
FOLLOWER_AGREES_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = LocalCluster.started(str(tmp_path_factory.mktemp("grammar") / "c"), rng=random.Random(), insecure=False, restart=False)
    try:
        yield started
    finally:
        started.stop()


def test_status_of_one_follower_names_the_leader_in_its_row_and_footer(cluster):
    env = {TOKEN_ENV: cluster.token}
    # A follower names the leader once it has heard from it; on a loaded machine an election can
    # also move leadership between two looks. Look until the leader and a follower agree.
    deadline = time.monotonic() + FOLLOWER_AGREES_S
    while True:
        leader = cluster.wait_for_leader()
        follower = next(e for e in cluster.endpoints if e != leader["address"])
        report = json.loads(raftseq("status", "--endpoints", follower, "-o", "json", env=env).stdout)
        if report["leader"] == leader["address"] or time.monotonic() > deadline:
            break
    assert report["leader"] == leader["address"] == report["nodes"][0]["leader"], report
    done = raftseq("status", "--endpoints", follower, env=env)
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[-1] == f"leader: {leader['address']}", done.stdout
    assert done.stdout.splitlines()[1].endswith(leader["address"]), done.stdout


def test_status_positional_endpoints_still_work_with_a_warning(cluster):
    done = raftseq("status", *cluster.endpoints, env={TOKEN_ENV: cluster.token})
    assert done.returncode == 0 and "deprecated" in done.stderr and "--endpoints" in done.stderr, done


def test_no_leader_is_null_and_an_unreachable_cluster_exits_1():
    base = free_base_port()
    endpoints = f"127.0.0.1:{base + 1},127.0.0.1:{base + 2}"
    done = raftseq("status", "--endpoints", endpoints, "-o", "json", "--timeout", "0.5")
    assert done.returncode == 1, done
    report = json.loads(done.stdout)
    assert report["leader"] is None and [n["role"] for n in report["nodes"]] == ["unreachable"] * 2, report


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "--timeout", "1", "x"],
        ["sm", "check", "--timeout", "1"],
        ["sm", "snapshots", "refdata", "--timeout", "1"],
        ["sm", "record", "--machine", "examples.refdata.machine:ReferenceData", "--out", "never.smc"],
    ],
)
def test_a_cluster_that_cannot_be_reached_is_exit_1(command, tmp_path):
    base = free_base_port()
    endpoints = f"127.0.0.1:{base + 1},127.0.0.1:{base + 2}"
    done = raftseq(*command, "--endpoints", endpoints, cwd=REPO)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr


def test_a_refused_token_is_not_unreachable(cluster):
    for env in ({}, {TOKEN_ENV: "wrong"}):
        done = raftseq("status", "--endpoints", ",".join(cluster.endpoints), "-o", "json", env=env)
        assert done.returncode == 1, done
        report = json.loads(done.stdout)
        assert [n["role"] for n in report["nodes"]] == ["refused"] * 3, report
        assert report["leader"] is None
        table = raftseq("status", "--endpoints", ",".join(cluster.endpoints), env=env).stdout
        assert "refused" in table and "unreachable" not in table, table


def test_a_missing_token_and_a_wrong_token_are_different_errors(cluster):
    endpoints = ",".join(cluster.endpoints)
    missing = raftseq("submit", "--endpoints", endpoints, "--session", "grammar", "x", env={TOKEN_ENV: ""})
    wrong = raftseq("submit", "--endpoints", endpoints, "--session", "grammar", "x", env={TOKEN_ENV: "wrong"})
    assert missing.returncode == wrong.returncode == 1, (missing, wrong)
    assert "requires a client token and none was given" in missing.stderr and "pass --token or set $RAFTSEQ_TOKEN" in missing.stderr
    assert "rejected the client token" in wrong.stderr and "none was given" not in wrong.stderr, wrong.stderr
    for env, says in (({TOKEN_ENV: ""}, "none was given"), ({TOKEN_ENV: "wrong"}, "rejected")):
        report = json.loads(raftseq("status", "--endpoints", endpoints, "-o", "json", env=env).stdout)
        assert all(says in n["error"] for n in report["nodes"]), report


def test_tail_stops_on_ctrl_c_with_130_and_no_asyncio_warnings(cluster):
    env = {**os.environ, ENDPOINTS_ENV: ",".join(cluster.endpoints), TOKEN_ENV: cluster.token}
    assert raftseq("submit", "--session", "grammar", "one", env=env).returncode == 0
    process = subprocess.Popen([RAFTSEQ, "tail", "--from", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline(), "tail printed nothing"
        process.send_signal(signal.SIGINT)
        code = process.wait(COMMAND_TIMEOUT_S)
        stderr = process.stderr.read()
    finally:
        kill_process(process)
        process.stdout.close()
        process.stderr.close()
    assert code == 130, (code, stderr)
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr, stderr


# --- journal verify -----------------------------------------------------------------------------


def test_journal_verify_of_a_directory_without_a_journal_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a journal")
    done = raftseq("journal", "verify", str(tmp_path))
    assert done.returncode == 2 and "holds no journal" in done.stderr, done
    assert "ok" not in done.stdout, done.stdout


def test_journal_verify_of_a_cluster_data_directory_checks_every_node(cluster):
    env = {ENDPOINTS_ENV: ",".join(cluster.endpoints), TOKEN_ENV: cluster.token}
    assert raftseq("submit", "--session", "verify-all", "a", "b", "c", env=env).returncode == 0
    last = cluster.wait_converged()
    done = raftseq("journal", "verify", "-q", "-o", "json", cluster.data_dir)
    assert done.returncode == 0, done
    report = json.loads(done.stdout)
    assert report["ok"] and len(report["journals"]) == 3, report
    assert sorted(j["directory"] for j in report["journals"]) == sorted(cluster.journal_dir(n) for n in cluster.node_ids)
    assert all(j["last_seq"] == last for j in report["journals"]), report
    text = raftseq("journal", "verify", "-q", cluster.data_dir).stdout.splitlines()
    assert [line.split(": ok:")[0] for line in text] == [cluster.journal_dir(n) for n in cluster.node_ids], text
