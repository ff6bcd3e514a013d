"""``raftseq cluster up`` as a person at a terminal meets it: a taken port is one line and exit 1
before any banner; the banner and the lines after it name the leader and every leader change; a
node stopped with SIGTERM stays stopped while a crashed one is restarted; Ctrl-C at the terminal
(SIGINT to the whole process group) stops everything with exit 130 and no "restarting" line; with
--no-restart the command ends once no node is left."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from raftseq.cluster.local import free_base_port

RAFTSEQ = os.path.join(os.path.dirname(sys.executable), "raftseq")
LINE_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


class ClusterUp:
    """``raftseq cluster up`` in a session of its own (as a terminal runs it), its output
    (stdout and stderr) read line by line."""

    def __init__(self, data_dir: str, base_port: int, *options: str) -> None:
        self.process = subprocess.Popen(
            [RAFTSEQ, "cluster", "up", "--data-dir", data_dir, "--base-port", str(base_port), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout_s: float = LINE_TIMEOUT_S) -> re.Match:
        """The first line from now on that matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout_s} s; output so far:\n" + "\n".join(self.seen)
                ) from None
            if line is None:
                raise AssertionError(f"output ended without {pattern!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def rest(self) -> list[str]:
        """Every line until the output ends (call once the process has exited)."""
        while (line := self.lines.get(timeout=LINE_TIMEOUT_S)) is not None:
            self.seen.append(line)
        return self.seen

    def node_pids(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for m in (re.match(r"\s+(n\d)\s.*\bpid (\d+)", line) for line in self.seen) if m}

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def up(tmp_path):
    started: list[ClusterUp] = []

    def start(*options: str, base_port: int | None = None) -> ClusterUp:
        started.append(ClusterUp(str(tmp_path / f"data-{len(started)}"), base_port or free_base_port(), *options))
        return started[-1]

    yield start
    for cluster in started:
        cluster.close()


def test_a_taken_port_is_one_line_and_exit_1_before_any_banner(tmp_path):
    base = free_base_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 2))
        holder.listen()
        done = subprocess.run(
            [RAFTSEQ, "cluster", "up", "--data-dir", str(tmp_path / "d"), "--base-port", str(base)],
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT_S,
        )
    assert done.returncode == 1, done
    assert done.stdout == "", done.stdout
    assert done.stderr.splitlines() == [
        f"raftseq cluster up: port in use: n2 client 127.0.0.1:{base + 2}; stop what listens there or choose another --base-port"
    ], done.stderr


def test_the_banner_names_the_leader_and_every_change_and_a_sigterm_is_a_stop(up):
    cluster = up()
    first = cluster.wait_for(r"^  leader: (n\d) \(")[1]
    pids = cluster.node_pids()
    assert set(pids) == {"n1", "n2", "n3"}, cluster.seen
    cluster.wait_for("^Ctrl-C stops the cluster$")

    os.kill(pids[first], signal.SIGKILL)
    cluster.wait_for(rf"^{first} was killed by SIGKILL; restarting")
    second = cluster.wait_for(r"^leader is now (n\d) \(")[1]
    assert second != first
    cluster.wait_for(rf"^restarted {first} ")

    follower = next(n for n in ("n1", "n2", "n3") if n not in (first, second))
    os.kill(pids[follower], signal.SIGTERM)
    cluster.wait_for(rf"^{follower} stopped \(exit code 0\); not restarting it$")
    # Crash the old leader again: its restart comes after the moment the stopped node would
    # have been restarted (same delay, later start), so no "restarted <follower>" line is owed.
    restarted_pid = int(re.search(r"pid (\d+)", _restart_line(cluster, first))[1])
    os.kill(restarted_pid, signal.SIGKILL)
    cluster.wait_for(rf"^restarted {first} ")
    assert not any(line.startswith(f"restarted {follower}") for line in cluster.seen), cluster.seen

    os.killpg(cluster.process.pid, signal.SIGINT)
    assert cluster.process.wait(EXIT_TIMEOUT_S) == 130
    after = cluster.rest()
    stopping = after.index("stopping the cluster…")
    assert after[-1] == "all nodes stopped", after
    assert not any("exited" in line or "restart" in line or "killed" in line for line in after[stopping:]), after


def _restart_line(cluster: ClusterUp, node: str) -> str:
    return next(line for line in reversed(cluster.seen) if line.startswith(f"restarted {node} "))


def test_ctrl_c_right_after_start_prints_no_restart(up):
    cluster = up()
    cluster.wait_for("^Ctrl-C stops the cluster$")
    os.killpg(cluster.process.pid, signal.SIGINT)
    assert cluster.process.wait(EXIT_TIMEOUT_S) == 130
    lines = cluster.rest()
    assert not any("exited" in line or "restart" in line for line in lines), lines
    assert lines[-2:] == ["stopping the cluster…", "all nodes stopped"], lines


def test_with_no_restart_the_command_ends_when_no_node_is_left(up):
    cluster = up("--no-restart")
    cluster.wait_for("^Ctrl-C stops the cluster$")
    for pid in cluster.node_pids().values():
        os.kill(pid, signal.SIGKILL)
    assert cluster.process.wait(EXIT_TIMEOUT_S) == 1
    lines = cluster.rest()
    assert "raftseq cluster up: no node is running and none will be restarted" in lines, lines
    assert sum("not restarting (--no-restart" in line for line in lines) == 3, lines


# --- deploy/local/up: what it prints can be typed as printed --------------------------------------


def test_the_banner_names_raftseq_by_its_path_when_it_is_not_on_path(monkeypatch, tmp_path):
    from raftseq.cluster.local import raftseq_command

    script = os.path.join(os.path.dirname(sys.executable), "raftseq")
    monkeypatch.setenv("PATH", str(tmp_path))  # a venv that is not activated: raftseq not on PATH
    assert raftseq_command() == script and os.access(script, os.X_OK)
    monkeypatch.setenv("PATH", os.path.dirname(script))
    assert raftseq_command() == "raftseq"


def test_the_default_data_directory_of_cluster_up_is_ignored_by_git():
    from raftseq.cluster.cli import build_parser

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = build_parser().parse_args(["cluster", "up"]).data_dir
    if not os.path.exists(os.path.join(repo, ".git")):
        pytest.fail(f"{repo} is not a git checkout: cannot ask git what it ignores")
    done = subprocess.run(["git", "check-ignore", "-q", f"{data_dir}/n1/journal/x.seg"], cwd=repo, timeout=30)
    assert done.returncode == 0, f"{data_dir}/ is not ignored by git"


# --- a data directory in use, a node that needs an operator ----------------------------------------


def test_a_second_cluster_up_on_a_data_directory_in_use_is_one_line_and_exit_1(up, tmp_path):
    first = up()
    first.wait_for("^Ctrl-C stops the cluster$")
    data_dir = first.process.args[first.process.args.index("--data-dir") + 1]
    done = subprocess.run(
        [RAFTSEQ, "cluster", "up", "--data-dir", data_dir, "--base-port", str(free_base_port())],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )
    assert done.returncode == 1 and done.stdout == "", done
    [line] = done.stderr.splitlines()
    assert line.startswith(f"raftseq cluster up: data directory {data_dir} is in use by process {first.process.pid} "), line
    assert first.process.poll() is None, "the first cluster up must keep running"


def test_a_node_whose_restart_needs_an_operator_is_not_restarted_and_cluster_up_says_why(up):
    cluster = up()
    cluster.wait_for("^Ctrl-C stops the cluster$")
    pid = cluster.node_pids()["n2"]
    metrics = next(re.search(r"metrics http://([\d.:]+)/", line)[1] for line in cluster.seen if line.startswith("  n2 "))
    os.kill(pid, signal.SIGKILL)
    cluster.wait_for(r"^n2 was killed by SIGKILL; restarting in 1 s")
    host, port = metrics.rsplit(":", 1)
    with socket.create_server((host, int(port))):  # free once n2 is gone; taken before its restart
        cluster.wait_for(r"^restarted n2 ")
        line = cluster.wait_for(r"^n2 exited with code 4: ").string
    assert f"cannot listen for metrics on {metrics}" in line, line
    assert "not restarting it: exit code 4 (ADDRESS_UNAVAILABLE) needs an operator" in line, line
    assert "Traceback" not in "\n".join(cluster.seen)


def test_sighup_restarts_every_node_in_turn_the_leader_last_and_drained(up):
    cluster = up()
    leader = cluster.wait_for(r"^  leader: (n\d) \(")[1]
    before = cluster.node_pids()
    cluster.wait_for(r"^kill -HUP \d+ cycles the nodes one at a time")
    os.kill(cluster.process.pid, signal.SIGHUP)
    order = cluster.wait_for(r"^rolling restart: (n\d), (n\d), (n\d)$").groups()
    assert order[-1] == leader and sorted(order) == ["n1", "n2", "n3"]
    pids = {}
    for node in order:
        if node == leader:
            cluster.wait_for(rf"^{node} drained: leader (n\d)", timeout_s=60)
        pids[node] = int(cluster.wait_for(rf"^rolling restart: {node} restarted \(pid (\d+)\)", timeout_s=60)[1])
    assert all(pids[n] != before[n] for n in order), (pids, before)
    assert not any("rolling restart stopped" in line for line in cluster.seen), cluster.seen


def test_with_credentials_a_credential_added_while_it_runs_is_taken_and_the_shared_token_still_works(up, tmp_path):
    path = tmp_path / "creds.json"
    cluster = up("--credentials", str(path))
    cluster.wait_for(rf"^credentials file {re.escape(str(path))}: 0 credentials$")
    token = cluster.wait_for(r"^  client token: (\S+)$")[1]
    cluster.wait_for(rf"^  credentials: {re.escape(str(path))} ")
    endpoints = cluster.wait_for(r"RAFTSEQ_ENDPOINTS=(\S+)")[1]
    cluster.wait_for("^Ctrl-C stops the cluster$")
    added = subprocess.run([RAFTSEQ, "cred", "add", str(path), "writer", "--prefix", "w-"], capture_output=True, text=True, timeout=30)
    assert added.returncode == 0, added.stderr
    writer_token = added.stdout.split()[-1]
    assert writer_token.startswith("writer:")

    def submit(session: str, with_token: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAFTSEQ_ENDPOINTS": endpoints, "RAFTSEQ_TOKEN": with_token}
        return subprocess.run([RAFTSEQ, "submit", "--session", session, "hello"], capture_output=True, text=True, timeout=60, env=env)

    assert submit("shared-1", token).returncode == 0
    deadline = time.monotonic() + 10  # the nodes read the file again within a second
    while (done := submit("w-1", writer_token)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr
    outside = submit("x-1", writer_token)
    assert outside.returncode != 0 and "prefix" in outside.stderr, outside.stderr


@pytest.mark.parametrize("problem", ["not json", "insecure"])
def test_a_credentials_file_the_nodes_could_not_use_is_one_line_and_exit_1_before_any_banner(tmp_path, problem):
    path = tmp_path / "creds.json"
    options = ["--credentials", str(path)]
    if problem == "not json":
        path.write_text("{")
    else:
        options.append("--insecure")
    done = subprocess.run(
        [RAFTSEQ, "cluster", "up", "--data-dir", str(tmp_path / "d"), "--base-port", str(free_base_port()), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("raftseq cluster up: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "raftseq local cluster" not in done.stdout
