"""What a careless operator meets: each mistake is one clear line and its own exit code.

A real ``raftseq node`` process per case (a port in use, a data directory in use or unusable,
a configuration file that cannot be read or used): its exit code is the ``NodeExit`` of the
reason (docs/operating.md), its output holds exactly one line that says why, and no traceback.
Also: the data-directory lock itself, the restart policy of ``raftseq cluster up`` (delays
injected, a fake clock), and the modes of what a node creates.

The modules of the fix (``cluster.data_dir``, ``cluster.restarts``) are imported by the tests
that use them, so that every other test here runs (and fails) against the code before them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest

from raftseq.cluster.config import NodeConfig, to_toml
from raftseq.cluster.local import LocalCluster, free_base_port, local_configs
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit

ROOT = Path(__file__).resolve().parents[1]
#: A node that cannot start exits within this (it exits at once; the machine may be loaded).
NODE_EXIT_TIMEOUT_S = 60.0


def node_config(tmp_path: Path, **changes: object) -> NodeConfig:
    config = local_configs(str(tmp_path / "c"), free_base_port(), insecure=False)[0]
    return msgspec.structs.replace(config, **changes)


def run_node(config_path: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "raftseq.cluster.cli", "node", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=NODE_EXIT_TIMEOUT_S,
        cwd=ROOT,
    )


def run_config(tmp_path: Path, config: NodeConfig) -> subprocess.CompletedProcess:
    path = tmp_path / "node.toml"
    path.write_text(to_toml(config))
    return run_node(path)


def the_one_line(done: subprocess.CompletedProcess, code: NodeExit, *fragments: str) -> str:
    """Asserts the exit code, no traceback, and exactly one line naming the reason; returns it."""
    output = done.stdout + done.stderr
    print(f"exit {done.returncode}; output:\n{output}")
    assert done.returncode == code, (done.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    saying = [line for line in output.splitlines() if all(f in line for f in fragments)]
    assert len(saying) == 1, (fragments, output[-3000:])
    problems = [line for line in output.splitlines() if "level=CRITICAL" in line or "level=ERROR" in line]
    assert problems in ([], saying), output[-3000:]
    return saying[0]


@contextlib.contextmanager
def listening(address: str):
    host, _, port = address.rpartition(":")
    with socket.create_server((host, int(port))) as taken:
        yield taken


# --- ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "role"), [("client_address", "clients"), ("raft_address", "Raft"), ("metrics_address", "metrics")])
def test_a_port_in_use_is_one_line_and_exit_4(tmp_path, setting, role):
    config = node_config(tmp_path)
    address = getattr(config, setting)
    with listening(address):
        done = run_config(tmp_path, config)
    line = the_one_line(done, NodeExit.ADDRESS_UNAVAILABLE, f"cannot listen for {role} on {address}")
    assert setting in line and "in use" in line, line


# --- the data directory ------------------------------------------------------------------------


def test_a_data_directory_that_cannot_be_created_is_one_line_and_exit_6(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = run_config(tmp_path, node_config(tmp_path, data_dir=str(blocker / "n1")))
    line = the_one_line(done, NodeExit.DATA_DIR_UNUSABLE, "data directory")
    assert str(blocker / "n1") in line and "Not a directory" in line, line


def test_a_journal_directory_that_is_a_file_is_one_line_and_exit_6(tmp_path):
    config = node_config(tmp_path)
    os.makedirs(config.data_dir)
    Path(config.journal_dir).write_text("not a directory")
    done = run_config(tmp_path, config)
    line = the_one_line(done, NodeExit.DATA_DIR_UNUSABLE, "data directory")
    assert config.journal_dir in line, line


def test_a_journal_file_that_cannot_be_opened_is_one_line_and_exit_6(tmp_path):
    config = node_config(tmp_path)
    segment = Path(config.journal_dir) / "00000000000000000001.seg"
    segment.mkdir(parents=True)
    done = run_config(tmp_path, config)
    line = the_one_line(done, NodeExit.DATA_DIR_UNUSABLE, "cannot open the journal")
    assert str(segment) in line and "Is a directory" in line, line


#: Root writes into any directory whatever its mode: as root, the node runs as this user.
UNPRIVILEGED_UID = 65534


def as_unprivileged(command: list[str]) -> list[str]:
    """`command` run as ``UNPRIVILEGED_UID`` when this is root (``setpriv``), else as is."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups", *command]


def test_a_read_only_data_directory_is_one_line_and_exit_6():
    probe = subprocess.run(as_unprivileged([sys.executable, "-P", "-c", "import raftseq.cluster.node"]), capture_output=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot import this checkout's raftseq: {probe.stderr.decode()[-300:]}")
    base = Path(tempfile.mkdtemp(prefix="raftseq-read-only-"))
    try:
        base.chmod(0o755)
        config = node_config(base)
        os.makedirs(config.data_dir)
        if os.geteuid() == 0:
            os.chown(config.data_dir, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
            os.chown(config.raft_key_file, UNPRIVILEGED_UID, UNPRIVILEGED_UID)  # the node's own key (0600)
        os.chmod(os.path.dirname(config.raft_key_file), 0o755)  # local_configs made it 0700, for the key
        os.chmod(config.data_dir, 0o500)
        path = base / "node.toml"
        path.write_text(to_toml(config))
        path.chmod(0o644)
        command = [sys.executable, "-P", "-m", "raftseq.cluster.cli", "node", "--config", str(path)]
        done = subprocess.run(as_unprivileged(command), capture_output=True, text=True, timeout=NODE_EXIT_TIMEOUT_S, cwd="/")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    the_one_line(done, NodeExit.DATA_DIR_UNUSABLE, "data directory", config.data_dir)


def test_a_data_directory_held_by_another_process_is_one_line_with_its_pid_and_exit_8(tmp_path):
    config = node_config(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from raftseq.cluster.data_dir import lock_data_dir, NODE_LOCK_NAME;"
            "lock = lock_data_dir(sys.argv[1], NODE_LOCK_NAME); print('locked', flush=True); sys.stdin.read()",
            config.data_dir,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        done = run_config(tmp_path, config)
    finally:
        holder.stdin.close()  # it exits on end of input
        holder.wait(NODE_EXIT_TIMEOUT_S)
    line = the_one_line(done, NodeExit.DATA_DIR_IN_USE, "is in use by")
    assert f"in use by process {holder.pid} " in line and config.data_dir in line, line
    assert not os.path.exists(config.journal_dir), "the second process went past the lock"


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    from raftseq.cluster.data_dir import NODE_LOCK_NAME, lock_data_dir

    data_dir = str(tmp_path / "d")
    with lock_data_dir(data_dir, NODE_LOCK_NAME) as lock:
        assert Path(lock.path).read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
        with pytest.raises(NodeCannotRun) as caught:
            lock_data_dir(data_dir, NODE_LOCK_NAME)  # a second open file description: refused too
        assert caught.value.code == NodeExit.DATA_DIR_IN_USE and f"process {os.getpid()} " in str(caught.value)
    with lock_data_dir(data_dir, NODE_LOCK_NAME):
        pass


def test_claiming_a_data_directory_sets_a_private_umask(tmp_path):
    from raftseq.cluster.data_dir import claim_data_dir

    previous = os.umask(0o022)
    try:
        with claim_data_dir(str(tmp_path / "d"), (str(tmp_path / "d" / "journal"),)):
            assert os.umask(0o077) == 0o077
            assert stat.S_IMODE(os.stat(tmp_path / "d" / "journal").st_mode) == 0o700
    finally:
        os.umask(previous)


# --- the configuration file --------------------------------------------------------------------


def test_a_configuration_file_that_is_missing_or_a_directory_is_one_line_and_exit_2(tmp_path):
    the_one_line(run_node(tmp_path / "missing.toml"), NodeExit.USAGE, "cannot read", "missing.toml")
    the_one_line(run_node(tmp_path), NodeExit.USAGE, "cannot read", str(tmp_path))


def test_a_damaged_configuration_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "node.toml"
    text = to_toml(node_config(tmp_path))
    path.write_text(text[: len(text) // 2] + "\n[[peers\n")
    the_one_line(run_node(path), NodeExit.USAGE, "not valid TOML", str(path))
    path.write_bytes(b'id = "\xff\xfe"\n' + text.encode())  # bytes that are not UTF-8
    the_one_line(run_node(path), NodeExit.USAGE, "not valid TOML", str(path))


def test_a_configuration_that_is_toml_but_unusable_is_one_line_and_exit_5(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(to_toml(node_config(tmp_path)).replace("election_timeout_min_s = 0.2", "election_timeout_min_s = 9.0"))
    the_one_line(run_node(path), NodeExit.INVALID_CONFIG, "election timeouts", str(path))
    path.write_text(to_toml(node_config(tmp_path)) + "\nunknown_setting = 1\n")
    the_one_line(run_node(path), NodeExit.INVALID_CONFIG, "unknown_setting", str(path))


# --- cluster up's restart policy ---------------------------------------------------------------


def test_the_restart_delay_doubles_to_its_cap_and_resets_after_a_healthy_run():
    from raftseq.cluster.restarts import RestartPolicy

    policy = RestartPolicy(first_delay_s=1.0, delay_max_s=30.0, healthy_after_s=60.0)
    delays, previous = [], 0.0
    for _ in range(8):
        previous = policy.next_delay_s(previous, ran_s=0.5)
        delays.append(previous)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.next_delay_s(30.0, ran_s=59.9) == 30.0
    assert policy.next_delay_s(30.0, ran_s=60.0) == 1.0


def test_only_exit_codes_a_restart_can_help_are_restarted():
    from raftseq.cluster.restarts import operator_exit

    assert [code for code in range(0, 256) if operator_exit(code) is not None] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert operator_exit(-9) is None and operator_exit(NodeExit.INVARIANT) is None and operator_exit(1) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing_cluster(tmp_path: Path, clock: FakeClock, exit_code: int) -> LocalCluster:
    """A local cluster whose n1, once started, prints a line and exits with `exit_code` at once
    (a command prefix that runs in its place), supervised with the default delays on `clock`."""
    cluster = LocalCluster(str(tmp_path / "c"), free_base_port(), insecure=False, restart=True, clock=clock)
    script = f"import sys; print('n1 fails on purpose', flush=True); sys.exit({exit_code})"
    cluster.node("n1").command_prefix = [sys.executable, "-c", script]
    return cluster


def wait_exited(cluster: LocalCluster, node_id: str) -> None:
    cluster.node(node_id).process.wait(NODE_EXIT_TIMEOUT_S)


def test_cluster_up_backs_off_while_a_node_keeps_failing_and_says_why(tmp_path):
    clock = FakeClock()
    cluster = failing_cluster(tmp_path, clock, exit_code=1)
    n1 = cluster.node("n1")
    try:
        cluster.start_node(n1)
        seen = []
        for expected_delay in (1, 2, 4, 8, 16, 30, 30):
            wait_exited(cluster, "n1")
            [line] = cluster.supervise_once()
            seen.append(line)
            assert line.startswith(f"n1 exited with code 1: n1 fails on purpose; restarting in {expected_delay} s"), line
            clock.now += expected_delay - 0.01
            assert cluster.supervise_once() == [], "restarted before its delay"
            clock.now += 0.01
            [line] = cluster.supervise_once()
            assert line.startswith("restarted n1 "), line
        # A run longer than RESTART_HEALTHY_AFTER_S: the next failure starts from 1 s again.
        clock.now += 60
        wait_exited(cluster, "n1")
        [line] = cluster.supervise_once()
        assert "restarting in 1 s" in line, line
        print("\n".join(seen + [line]))
    finally:
        cluster.stop()


def test_cluster_up_does_not_restart_a_node_whose_exit_needs_an_operator(tmp_path):
    clock = FakeClock()
    cluster = failing_cluster(tmp_path, clock, exit_code=NodeExit.DATA_DIR_IN_USE)
    try:
        cluster.start_node(cluster.node("n1"))
        wait_exited(cluster, "n1")
        [line] = cluster.supervise_once()
        assert line.startswith("n1 exited with code 8: n1 fails on purpose; not restarting it: exit code 8 (DATA_DIR_IN_USE)"), line
        assert "needs an operator" in line
        clock.now += 3600
        assert cluster.supervise_once() == [] and cluster.node("n1").process is None
    finally:
        cluster.stop()


def test_a_real_node_whose_port_is_taken_is_not_restarted_and_the_reason_is_its_last_line(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), free_base_port(), insecure=False, restart=True)
    n1 = cluster.node("n1")
    try:
        with listening(n1.config.metrics_address):
            cluster.start_node(n1)
            wait_exited(cluster, "n1")
        [line] = cluster.supervise_once()
        print(line)
        assert line.startswith("n1 exited with code 4: ") and f"cannot listen for metrics on {n1.config.metrics_address}" in line
        assert "not restarting it: exit code 4 (ADDRESS_UNAVAILABLE) needs an operator" in line, line
        assert n1.stopped
    finally:
        cluster.stop()


# --- docs/operating.md --------------------------------------------------------------------------


def test_the_exit_code_table_of_the_operating_page_is_node_exit():
    """Every ``NodeExit`` has its row (code and name), no row names another, and the page's
    restart policy says what ``needs_operator`` says."""
    text = (ROOT / "docs" / "operating.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", text, flags=re.MULTILINE)
    assert [(int(code), name) for code, name in rows] == [(e.value, e.name) for e in NodeExit]
    needing = [e.value for e in NodeExit if e.needs_operator]
    assert needing == list(range(2, 12)), needing
    assert "RestartPreventExitStatus=" + " ".join(map(str, needing)) in text
    assert "(2 to 11 above)" in text and "Codes 2 to 11 name something only a person can fix" in text
