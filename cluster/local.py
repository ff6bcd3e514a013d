"""``raftseq cluster up``: a local three-node cluster as child processes, in the foreground.

Each node gets a config file and a log file in the data directory. A node that dies is
restarted after a short, logged delay (unless ``--no-restart``). Ctrl-C or SIGTERM stops every
node cleanly (SIGTERM, then SIGKILL after a grace period); children also get SIGTERM if this
process dies without cleaning up (Linux parent-death signal), so nothing is left running.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgspec

from raftseq.cluster.config import NodeConfig, PeerConfig, to_toml

RESTART_DELAY_S = 1.0
STOP_GRACE_S = 5.0
NODE_COUNT = 3


@dataclass
class LocalNode:
    config: NodeConfig
    config_path: str
    log_path: str
    process: subprocess.Popen | None = None
    restarts: int = 0
    died_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    #: Prepended to the node's command line (e.g. ``nsenter --mount=...``); the wrapper must
    #: exec the command so that the started process is the node itself.
    command_prefix: list[str] = field(default_factory=list)


def local_configs(
    data_dir: str,
    base_port: int,
    *,
    insecure: bool,
    secrets_from: dict | None = None,
    overrides: dict | None = None,
) -> list[NodeConfig]:
    """Configs of a local cluster: client ports P+1.., Raft P+101.., metrics P+201..

    ``overrides`` replaces settings per section, e.g. ``{"raft": {"log_compaction_min_entries": 50}}``.
    """
    secrets_from = secrets_from or {}
    password = "" if insecure else secrets_from.get("raft_password") or secrets.token_urlsafe(24)
    token = "" if insecure else secrets_from.get("client_token") or secrets.token_urlsafe(18)
    ids = [f"n{i + 1}" for i in range(NODE_COUNT)]
    peers = [
        PeerConfig(node_id, f"127.0.0.1:{base_port + 101 + i}", f"127.0.0.1:{base_port + 1 + i}") for i, node_id in enumerate(ids)
    ]
    configs = []
    for i, peer in enumerate(peers):
        config = NodeConfig(
                id=peer.id,
                data_dir=os.path.join(data_dir, peer.id),
                raft_address=peer.raft_address,
                client_address=peer.client_address,
                peers=[p for p in peers if p.id != peer.id],
                metrics_address=f"127.0.0.1:{base_port + 201 + i}",
                raft_password=password,
                client_token=token,
                insecure=insecure,
            )
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                config = msgspec.structs.replace(config, **{section: msgspec.structs.replace(getattr(config, section), **values)})
            else:
                config = msgspec.structs.replace(config, **{section: values})
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        configs.append(config)
    return configs


def free_base_port(rng=None) -> int:
    """A base port whose nine local-cluster ports are all free on 127.0.0.1 right now."""
    import random
    import socket

    rng = rng or random.Random()
    # Stay below the kernel's ephemeral range: a port there can be taken by any outgoing
    # connection (even one to itself) before a node binds it.
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    top = max(10010, min(low, 65536) - 210)
    for _ in range(200):
        base = rng.randrange(10000, top, 10)
        ports = [base + off for off in (1, 2, 3, 101, 102, 103, 201, 202, 203)]
        sockets = []
        try:
            for port in ports:
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError("no free port range found on 127.0.0.1")


def _existing_secrets(path: str) -> dict:
    """Reuse the secrets of an existing local cluster so restarts keep their token."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {k: raw.get(k, "") for k in ("raft_password", "client_token")}


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalCluster:
    def __init__(
        self,
        data_dir: str,
        base_port: int,
        *,
        insecure: bool,
        restart: bool,
        overrides: dict | None = None,
        configs: list[NodeConfig] | None = None,
    ) -> None:
        """``configs``, when given, are used as they are (``base_port`` and ``overrides`` are
        then ignored); otherwise ``local_configs`` makes them."""
        self.data_dir = os.path.abspath(data_dir)
        self.restart = restart
        os.makedirs(self.data_dir, exist_ok=True)
        first_config = os.path.join(self.data_dir, "n1.toml")
        if configs is None:
            configs = local_configs(
                self.data_dir, base_port, insecure=insecure, secrets_from=_existing_secrets(first_config), overrides=overrides
            )
        self.nodes: list[LocalNode] = []
        for config in configs:
            path = os.path.join(self.data_dir, f"{config.id}.toml")
            body = to_toml(config)
            with open(path, "w") as f:
                f.write(body)
            os.chmod(path, 0o600)
            self.nodes.append(LocalNode(config, path, os.path.join(self.data_dir, f"{config.id}.log")))
        self.insecure = insecure

    @property
    def endpoints(self) -> list[str]:
        return [n.config.client_address for n in self.nodes]

    @property
    def token(self) -> str:
        return self.nodes[0].config.client_token

    def start_node(self, node: LocalNode) -> None:
        command = [*node.command_prefix, sys.executable, "-P", "-m", "raftseq.cluster.cli", "node", "--config", node.config_path]
        if self.insecure:
            command.append("--insecure")
        log = open(node.log_path, "ab")
        try:
            node.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        finally:
            log.close()

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def describe(self) -> str:
        lines = [f"raftseq local cluster: {len(self.nodes)} nodes, data in {self.data_dir}"]
        for node in self.nodes:
            c = node.config
            pid = node.process.pid if node.process else "-"
            lines.append(
                f"  {c.id}  client {c.client_address}  metrics http://{c.metrics_address}/metrics  "
                f"raft {c.raft_address}  pid {pid}  log {node.log_path}"
            )
        if self.insecure:
            lines.append("  authentication OFF and Raft links unencrypted (--insecure: local development only)")
        else:
            lines.append(f"  client token: {self.token}")
        endpoints = ",".join(self.endpoints)
        lines.append(f"  for the other commands: export RAFTSEQ_ENDPOINTS={endpoints} RAFTSEQ_TOKEN={self.token}")
        base_port = int(self.nodes[0].config.client_address.rsplit(":", 1)[1]) - 1
        lines.append(
            f"  watch it: raftseq top  |  deploy/prometheus/run --base-port {base_port} --data-dir {self.data_dir}"
            "  |  deploy/grafana/run (see deploy/*/README.md)"
        )
        return "\n".join(lines)

    def supervise_once(self) -> list[str]:
        """Restart nodes that died (after RESTART_DELAY_S). Returns lines to print."""
        events = []
        now = time.monotonic()
        for node in self.nodes:
            process = node.process
            if process is None:
                if self.restart and node.died_at and now - node.died_at >= RESTART_DELAY_S:
                    self.start_node(node)
                    node.restarts += 1
                    events.append(f"restarted {node.config.id} (pid {node.process.pid}, restart {node.restarts})")
                continue
            code = process.poll()
            if code is None:
                continue
            node.exit_codes.append(code)
            node.process = None
            node.died_at = now
            if self.restart:
                events.append(f"{node.config.id} exited with code {code}; restarting in {RESTART_DELAY_S:.0f} s (log {node.log_path})")
            else:
                events.append(f"{node.config.id} exited with code {code}; not restarting (--no-restart)")
        return events

    def node(self, node_id: str) -> LocalNode:
        for node in self.nodes:
            if node.config.id == node_id:
                return node
        raise KeyError(node_id)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to a node's process (SIGKILL by default) and reap it. Returns its pid."""
        node = self.node(node_id)
        assert node.process is not None, f"{node_id} is not running"
        pid = node.process.pid
        node.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            node.process.wait()
            node.process = None
            node.died_at = time.monotonic()
        return pid

    def restart_node(self, node_id: str) -> None:
        node = self.node(node_id)
        assert node.process is None, f"{node_id} is running"
        self.start_node(node)

    def stop(self) -> None:
        running = [n.process for n in self.nodes if n.process is not None and n.process.poll() is None]
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for node in self.nodes:
            node.process = None


def run_cluster_up(args) -> int:
    cluster = LocalCluster(args.data_dir, args.base_port, insecure=args.insecure, restart=not args.no_restart)
    stop = {"now": False}

    def request_stop(signum, frame) -> None:
        stop["now"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        print(cluster.describe(), flush=True)
        if args.demo:
            print("demo traffic: 3 sessions submitting, one subscriber on a follower; Ctrl-C stops everything", flush=True)
            from raftseq.cluster.demo_traffic import run_demo_traffic

            asyncio.run(run_demo_traffic(cluster, stop, rate_per_s=args.demo_rate))
        else:
            print("Ctrl-C stops the cluster", flush=True)
            while not stop["now"]:
                for line in cluster.supervise_once():
                    print(line, flush=True)
                time.sleep(0.2)
    finally:
        print("stopping the cluster…", flush=True)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("all nodes stopped", flush=True)
    return 0
