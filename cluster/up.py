"""``raftseq cluster up``: a local cluster (``cluster.local``) in the foreground.

Before anything starts, the data directory is locked (``cluster.lock``: a second ``cluster up``
on it is refused with the holder's pid) and every port the nodes need is checked: either
problem is one line on stderr and exit code 1, before any banner. The banner comes once every node serves and names the
leader; from then on every leader change is a line of its own. A node that crashes is restarted
after a delay that doubles while it keeps failing (``cluster.restarts``; unless
``--no-restart``), with the last line of its log as the reason; a node stopped on purpose (a
plain SIGTERM to it) stays stopped, and so does one whose exit code needs an operator. When no node is left running and
none will be restarted, the command ends with exit code 1. Ctrl-C stops every node and exits
130, SIGTERM exits 0.

A rolling restart on request: ``kill -HUP`` of the ``cluster up`` process (its pid is in
``DATA_DIR/cluster.lock``) restarts every node in turn, the followers first and the leader
last, after draining it (``raftseq node drain``: leadership handed over first). Each node is
stopped with SIGTERM, started again, and must hold what the leader held before the next one
goes; each step is a line. A step that fails ends the rolling restart with a line saying why
(the cluster keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from raftseq.cluster.data_dir import CLUSTER_LOCK_NAME, lock_data_dir
from raftseq.cluster.local import LEADER_TIMEOUT_S, POLL_INTERVAL_S, LocalCluster
from raftseq.cluster.node_exit import NodeCannotRun

#: Seconds between two status polls that look for a leader change.
LEADER_POLL_INTERVAL_S = 1.0
#: Per node, for those polls: short, so that a node that is down does not delay the others.
LEADER_POLL_TIMEOUT_S = 0.5
#: Between two supervision steps without demo traffic.
SUPERVISE_INTERVAL_S = 0.2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

#: What asks ``cluster up`` for a rolling restart.
ROLLING_RESTART_SIGNAL = signal.SIGHUP
#: Seconds each step of a rolling restart may take: a drain, a node's start and catch-up.
ROLLING_STEP_TIMEOUT_S = 30.0


class RollingRestartFailed(Exception):
    """A step of a rolling restart did not complete; the message says which and why."""


def rolling_restart(cluster: LocalCluster) -> list[str]:
    """Restart every node in turn (followers first, the leader last and drained first);
    returns the lines to print. Raises ``RollingRestartFailed``."""
    from raftseq.cluster.maintenance import AdminFailed, drain_node
    from raftseq.cluster.status import answered

    report = cluster.status()
    leaders = [n["node"] for n in report["nodes"] if answered(n) and n["role"] == "leader"]
    order = sorted(i for i in cluster.node_ids if i not in leaders) + leaders
    lines = [f"rolling restart: {', '.join(order)}"]
    for node_id in order:
        started = time.monotonic()
        if node_id in leaders:
            try:
                lines.append(asyncio.run(drain_node(cluster.endpoints, node_id, token=cluster.token, timeout_s=ROLLING_STEP_TIMEOUT_S)))
            except AdminFailed as exc:
                raise RollingRestartFailed(f"{node_id} not drained: {exc}") from None
        if cluster.is_running(node_id):
            cluster.kill(node_id, signal.SIGTERM)
        pid = cluster.restart(node_id)
        seq = _caught_up(cluster, node_id)
        lines.append(f"rolling restart: {node_id} restarted (pid {pid}), holds seq {seq}, {time.monotonic() - started:.1f} s")
    return lines


def _caught_up(cluster: LocalCluster, node_id: str) -> int:
    """Wait until `node_id` follows a leader and holds what that leader held when it came up."""
    deadline = time.monotonic() + ROLLING_STEP_TIMEOUT_S
    target = None
    while time.monotonic() < deadline:
        code = cluster.reap(node_id)
        if code is not None:
            raise RollingRestartFailed(cluster.describe_exit(node_id, code))
        nodes = {n["node"]: n for n in cluster.status(timeout_s=LEADER_POLL_TIMEOUT_S)["nodes"]}
        node = nodes[node_id]
        leaders = [n for n in nodes.values() if n["role"] == "leader"]
        if leaders and node["role"] in ("leader", "follower"):
            target = leaders[0]["last_seq"] if target is None else target
            if node["last_seq"] >= target:
                return node["last_seq"]
        time.sleep(POLL_INTERVAL_S)
    raise RollingRestartFailed(f"{node_id} did not catch up within {ROLLING_STEP_TIMEOUT_S:g} s")


class StartFailed(Exception):
    """The cluster did not come up: a node exited while starting, or no leader came."""


class Supervisor:
    """Watches a started cluster: restarts what crashed (``LocalCluster.supervise_once``) and
    notices leader changes. ``step`` returns the lines to print."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.leader: tuple[str, int] | None = None
        self._next_poll = 0.0

    def describe_leader(self, entry: dict) -> str:
        return f"{entry['id']} ({entry['address']}, term {entry['term']})"

    def wait_until_serving(self, stop: dict, timeout_s: float = LEADER_TIMEOUT_S) -> dict:
        """The status entry of the leader every node names, once there is one. ``StartFailed``
        when a node exits meanwhile (with its reason) or after `timeout_s`; None on a stop
        request."""
        deadline = time.monotonic() + timeout_s
        while not stop["signal"]:
            for node in self.cluster.nodes:
                code = self.cluster.reap(node.id)
                if code is not None:
                    raise StartFailed(f"{self.cluster.describe_exit(node.id, code)} (while starting; log {node.log_path})")
            report = self.cluster.status(timeout_s=LEADER_POLL_TIMEOUT_S)
            leaders = [n for n in report["nodes"] if n["role"] == "leader"]
            if len(leaders) == 1 and all(n.get("leader") == leaders[0]["address"] for n in report["nodes"]):
                self.leader = (leaders[0]["id"], leaders[0]["term"])
                return leaders[0]
            if time.monotonic() >= deadline:
                raise StartFailed(f"no leader within {timeout_s:g} s; see the node logs in {self.cluster.data_dir}")
            time.sleep(POLL_INTERVAL_S)
        return {}

    def step(self) -> list[str]:
        """One round: restarts and stops (from ``supervise_once``), then, at most once per
        LEADER_POLL_INTERVAL_S, a line when the leader changed."""
        lines = self.cluster.supervise_once()
        for node in self.cluster.adopt_joined_nodes():
            lines.append(f"{node.id} joins (config {node.config_path}, log {node.log_path}); raftseq member add makes it a member")
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + LEADER_POLL_INTERVAL_S
            lines.extend(self._leader_change())
        return lines

    def _leader_change(self) -> list[str]:
        report = self.cluster.status(timeout_s=LEADER_POLL_TIMEOUT_S)
        leaders = sorted((n for n in report["nodes"] if n["role"] == "leader"), key=lambda n: -n["term"])
        if not leaders:
            if self.leader is not None and not any(n["role"] != "unreachable" and n.get("leader") for n in report["nodes"]):
                self.leader = None
                return ["no leader (an election is under way, or too few nodes are up)"]
            return []
        key = (leaders[0]["id"], leaders[0]["term"])
        if self.leader is not None and key[0] == self.leader[0]:
            self.leader = key
            return []
        self.leader = key
        return [f"leader is now {self.describe_leader(leaders[0])}"]

    def leader_name(self) -> str:
        return self.leader[0] if self.leader else "none"

    def finished(self) -> bool:
        """No node runs and none will be restarted: every node's exit was reported by ``step``
        (its process reaped) and none is due for a restart."""
        return all(n.process is None for n in self.cluster.nodes) and (
            not self.cluster.restart_on_exit or all(n.stopped for n in self.cluster.nodes)
        )


def run_cluster_up(args: argparse.Namespace) -> int:
    try:
        lock = lock_data_dir(os.path.abspath(args.data_dir), CLUSTER_LOCK_NAME)
    except NodeCannotRun as exc:
        print(f"raftseq cluster up: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with lock:
        return _run_locked(args)


def credentials_override(args: argparse.Namespace) -> dict:
    """The node setting of ``--credentials FILE`` (its absolute path), the file made empty when
    missing. Raises ``StartFailed`` (one line) for a file the nodes could not use."""
    from raftseq.cluster.credentials import CredentialsError, read_credentials, write_credentials

    if not args.credentials:
        return {}
    if args.insecure:
        raise StartFailed("--credentials needs client authentication: leave out --insecure")
    path = os.path.abspath(args.credentials)
    try:
        if not os.path.exists(path):
            write_credentials(path, [])
        count = len(read_credentials(path))
    except CredentialsError as exc:
        raise StartFailed(str(exc)) from None
    except OSError as exc:
        raise StartFailed(f"credentials file {path}: cannot make it: {exc.strerror or exc}") from None
    print(f"credentials file {path}: {count} credential{'' if count == 1 else 's'}", flush=True)
    return {"credentials_file": path}


def _run_locked(args: argparse.Namespace) -> int:
    try:
        credentials = credentials_override(args)
    except StartFailed as exc:
        print(f"raftseq cluster up: {exc}", file=sys.stderr)
        return EXIT_FAILED
    cluster = LocalCluster(
        args.data_dir,
        args.base_port,
        insecure=args.insecure,
        restart=not args.no_restart,
        overrides={"durability": args.durability, **credentials},
    )
    taken = cluster.taken_ports()
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        print(
            f"raftseq cluster up: port in use: {taken[0]}{more}; stop what listens there or choose another --base-port",
            file=sys.stderr,
        )
        return EXIT_FAILED
    stop = {"signal": 0, "roll": False}

    def request_stop(signum, frame) -> None:
        stop["signal"] = signum

    def request_roll(signum, frame) -> None:
        stop["roll"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[ROLLING_RESTART_SIGNAL] = signal.signal(ROLLING_RESTART_SIGNAL, request_roll)
    supervisor = Supervisor(cluster)
    try:
        cluster.start()
        try:
            leader = supervisor.wait_until_serving(stop)
        except StartFailed as exc:
            print(f"raftseq cluster up: {exc}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        if leader:
            if args.relays:
                cluster.start_relays(args.relays)
            print(cluster.describe(), flush=True)
            print(f"  leader: {supervisor.describe_leader(leader)}", flush=True)
            code = _run(args, cluster, supervisor, stop)
            if code != EXIT_OK:
                return code
        print("stopping the cluster…", flush=True)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("all nodes stopped", flush=True)
    return EXIT_INTERRUPTED if stop["signal"] == signal.SIGINT else EXIT_OK


def _run(args: argparse.Namespace, cluster: LocalCluster, supervisor: Supervisor, stop: dict) -> int:
    """Supervise (with demo traffic when asked) until a stop request or no node is left."""
    if args.demo:
        print("demo traffic: 3 sessions submitting, one subscriber on a follower; Ctrl-C stops everything", flush=True)
        from raftseq.cluster.demo_traffic import run_demo_traffic

        return asyncio.run(run_demo_traffic(cluster, supervisor, stop, rate_per_s=args.demo_rate))
    print("Ctrl-C stops the cluster", flush=True)
    print(f"kill -HUP {os.getpid()} cycles the nodes one at a time (stop, start, catch up; the leader drained first)", flush=True)
    while not stop["signal"]:
        if stop["roll"]:
            stop["roll"] = False
            try:
                for line in rolling_restart(cluster):
                    print(line, flush=True)
            except RollingRestartFailed as exc:
                print(f"rolling restart stopped: {exc}", flush=True)
        for line in supervisor.step():
            if not stop["signal"]:
                print(line, flush=True)
        if supervisor.finished():
            print("raftseq cluster up: no node is running and none will be restarted", file=sys.stderr, flush=True)
            return EXIT_FAILED
        time.sleep(SUPERVISE_INTERVAL_S)
    return EXIT_OK
