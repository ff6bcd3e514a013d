"""The local cluster: three nodes as child processes of this one, and the harness that tests,
chaos runs and benchmarks build on (``raftseq cluster up`` runs it in the foreground).

Each node gets a config file and a log file in the data directory; it is started as
``python -P -m raftseq.cluster.cli node --config FILE`` (``-P``: a user's working directory never
shadows the install). ``LocalCluster`` has one verb per thing a caller does to a cluster: start,
stop, kill, pause (any signal), reap and restart nodes, always by the pid of a process it
started; ask every node for its status; wait for a leader and for every node to hold the same
stream; read the node logs. Every wait has a deadline and raises ``ClusterTimeout`` (with the
last status and the tails of the node logs) when it passes. ``stop`` (also the end of a
``with`` block) ends every node: SIGTERM, then SIGKILL after a grace period. Children also get
SIGTERM if this process dies without cleaning up (Linux parent-death signal), so nothing is
left running.

``supervise_once`` restarts a node that crashed after a logged delay that doubles while it keeps
failing (``cluster.restarts``), and never one whose exit code needs an operator (unless
``restart=False``: then none); ``raftseq cluster up`` (``cluster.up``) runs it in the foreground.
Configs, logs and directories it creates are private to its user (0600 files, 0700 directories).
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import msgspec

from raftseq.clients.tls import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TlsOptions
from raftseq.cluster.config import (
    EPHEMERAL_PORTS_FIRST_DEFAULT,
    METRICS_PAGE_REUSE_S,
    PORTS_END,
    RAFT_SALT_BYTES_MIN,
    ConfigError,
    NodeConfig,
    PeerConfig,
    load_config,
    node_key_text,
    read_node_key,
    to_toml,
)
from raftseq.cluster.data_dir import PRIVATE_FILE_MODE, make_private_dirs, open_private, write_private
from raftseq.cluster.processes import wait_or_kill
from raftseq.cluster.relay_local import LocalRelay, local_relays
from raftseq.cluster.restarts import RestartPolicy, operator_exit
from raftseq.cluster.certs import client_pair
from raftseq.cluster.status import answered, gather_status
from raftseq.cluster.tls import node_client_tls

#: Exit codes of a node stopped on purpose: its own after SIGTERM or SIGINT, or killed by them.
STOP_EXIT_CODES = (0, -signal.SIGTERM, -signal.SIGINT)
STOP_GRACE_S = 5.0
NODE_COUNT = 3
#: From starting the nodes (or losing a leader) to a leader every node names.
LEADER_TIMEOUT_S = 15.0
#: For every node to report the same stream.
CONVERGE_TIMEOUT_S = 30.0
#: Between two status polls of a wait.
POLL_INTERVAL_S = 0.05
#: Per status request to one node.
STATUS_TIMEOUT_S = 1.0
#: Per metrics page request to one node (a loaded node renders its page slower than a status).
METRICS_TIMEOUT_S = 5.0
#: Lines of each node log in a ``ClusterTimeout`` message.
LOG_TAIL_LINES = 25
#: Attempts of ``LocalCluster.started`` (a port picked as free may be taken before a node binds it).
START_ATTEMPTS = 3
#: Port offsets from the base port: client P+1.., Raft P+101.., metrics P+201...
CLIENT_PORT_OFFSET = 1
RAFT_PORT_OFFSET = 101
METRICS_PORT_OFFSET = 201
#: Where the source distribution keeps the scripts the banner points to.
DEPLOY_SCRIPTS = ("deploy/prometheus/run", "deploy/grafana/run")


class ClusterTimeout(AssertionError):
    """A wait of ``LocalCluster`` passed its deadline. An ``AssertionError``: a test or a chaos
    scenario that waits for a cluster state reports it as a failed expectation."""


@dataclass
class LocalNode:
    config: NodeConfig
    config_path: str
    log_path: str
    process: subprocess.Popen | None = None
    restarts: int = 0
    #: ``LocalCluster.clock`` when this process was started, and when it was seen gone.
    started_at: float = 0.0
    died_at: float = 0.0
    #: The delay before its pending restart (0: none yet), from ``RestartPolicy``.
    restart_delay_s: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    #: Not restarted by ``supervise_once``: stopped on purpose (exited after SIGTERM or
    #: SIGINT), or exited with a code that needs an operator.
    stopped: bool = False
    #: Size of the log when this process was started: where its own lines begin.
    log_offset: int = 0
    #: Prepended to the node's command line (e.g. ``nsenter --mount=...``); the wrapper must
    #: exec the command so that the started process is the node itself.
    command_prefix: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.config.id

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def local_configs(
    data_dir: str,
    base_port: int,
    *,
    insecure: bool,
    secrets_from: dict | None = None,
    overrides: dict | None = None,
    durability: str | None = None,
) -> list[NodeConfig]:
    """Configs of a local cluster: client ports P+1.., Raft P+101.., metrics P+201.. Unless
    `insecure`, every node has a node key (``node_key_file``, made when missing) and every
    config names every member's public key.

    ``overrides`` replaces settings per section, e.g. ``{"raft": {"log_compaction_min_entries": 50}}``.
    ``durability`` ("crash", "power"): the nodes' ``durability`` setting (None: the config's default).
    """
    overrides = {**(overrides or {}), **({"durability": durability} if durability is not None else {})}
    secrets_from = secrets_from or {}
    password = "" if insecure else secrets_from.get("raft_password") or option_safe_secret(24)
    token = "" if insecure else secrets_from.get("client_token") or option_safe_secret(18)
    # A new cluster gets a salt of its own; one made before salts keeps the constant salt ("").
    salt = "" if insecure else secrets_from.get("raft_salt", "") if secrets_from else secrets.token_hex(RAFT_SALT_BYTES_MIN)
    ids = [f"n{i + 1}" for i in range(NODE_COUNT)]
    key_files = {node_id: "" if insecure else node_key_file(data_dir, node_id) for node_id in ids}
    public_keys = {node_id: local_node_key(path) if path else "" for node_id, path in key_files.items()}
    peers = [
        PeerConfig(
            node_id,
            f"127.0.0.1:{base_port + RAFT_PORT_OFFSET + i}",
            f"127.0.0.1:{base_port + CLIENT_PORT_OFFSET + i}",
            raft_public_key=public_keys[node_id],
        )
        for i, node_id in enumerate(ids)
    ]
    configs = []
    for i, peer in enumerate(peers):
        config = NodeConfig(
            id=peer.id,
            data_dir=os.path.join(data_dir, peer.id),
            raft_address=peer.raft_address,
            client_address=peer.client_address,
            peers=[p for p in peers if p.id != peer.id],
            metrics_address=f"127.0.0.1:{base_port + METRICS_PORT_OFFSET + i}",
            raft_password=password,
            raft_salt=salt,
            raft_key_file=key_files[peer.id],
            raft_public_key=peer.raft_public_key,
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


def option_safe_secret(nbytes: int) -> str:
    """A URL-safe secret of `nbytes` random bytes that does not start with "-": printed tokens
    are pasted after options (``--token X``), where one starting with "-" reads as an option."""
    while True:
        secret = secrets.token_urlsafe(nbytes)
        if not secret.startswith("-"):
            return secret


def joining_config(
    data_dir: str, node_id: str, members: Sequence[NodeConfig], *, insecure: bool, rng: random.Random | None = None
) -> NodeConfig:
    """The config of a new local node joining the cluster of `members` (``join = true``),
    written to ``DATA_DIR/NODE.toml``: ports of its own (from a free base port, at the usual
    offsets), a data directory and node key of its own, the members' secrets and settings."""
    data_dir = os.path.abspath(data_dir)
    if any(m.id == node_id for m in members) or os.path.exists(os.path.join(data_dir, f"{node_id}.toml")):
        raise ValueError(f"{node_id} is a node of this cluster already (or was: {node_id}.toml exists)")
    base = free_base_port(rng)
    key_file = "" if insecure else node_key_file(data_dir, node_id)
    config = msgspec.structs.replace(
        members[0],
        id=node_id,
        data_dir=os.path.join(data_dir, node_id),
        raft_address=f"127.0.0.1:{base + RAFT_PORT_OFFSET}",
        client_address=f"127.0.0.1:{base + CLIENT_PORT_OFFSET}",
        metrics_address=f"127.0.0.1:{base + METRICS_PORT_OFFSET}",
        raft_key_file=key_file,
        raft_public_key=local_node_key(key_file) if key_file else "",
        peers=[PeerConfig(c.id, c.raft_address, c.client_address, raft_public_key=c.raft_public_key) for c in members],
        join=True,
    )
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    write_private(os.path.join(data_dir, f"{node_id}.toml"), to_toml(config))
    return config


def local_node_configs(data_dir: str, *, insecure: bool) -> list[NodeConfig]:
    """Every node config in a local cluster's data directory (``*.toml``), by file name."""
    configs = []
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".toml"):
            configs.append(load_config(os.path.join(data_dir, name), insecure=insecure))
    return configs


def _joined_nodes(data_dir: str, *, insecure: bool) -> list[LocalNode]:
    return [
        LocalNode(c, os.path.join(data_dir, f"{c.id}.toml"), os.path.join(data_dir, f"{c.id}.log"))
        for c in local_node_configs(data_dir, insecure=insecure)
        if c.join
    ]


def node_key_file(data_dir: str, node_id: str) -> str:
    """Where the local cluster keeps a node's key: beside its config (``n1.key``, ``n1.toml``)."""
    return os.path.join(os.path.abspath(data_dir), f"{node_id}.key")


def local_node_key(path: str) -> str:
    """The public key (hex) of the node key file at `path`, made (0600, in a 0700 directory)
    when there is none yet or it cannot be used: a restarted local cluster keeps its keys."""
    try:
        return read_node_key(path)[1].hex()
    except ConfigError:
        pass
    from raftseq.cluster.raft.link_cipher import new_node_key  # the crypto library lives in the Raft adapter

    seed, public_key = new_node_key()
    make_private_dirs(os.path.dirname(path))
    write_private(path, node_key_text(seed, public_key))
    return public_key.hex()


def ephemeral_ports_first() -> int:
    """First port of the kernel's ephemeral range (``EPHEMERAL_PORTS_FIRST_DEFAULT`` when /proc
    does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_PORTS_FIRST_DEFAULT


def free_base_port(rng: random.Random | None = None) -> int:
    """A base port whose nine local-cluster ports are all free on 127.0.0.1 right now."""
    rng = rng or random.Random()
    # Stay below the kernel's ephemeral range: a port there can be taken by any outgoing
    # connection (even one to itself) before a node binds it.
    top = max(10010, min(ephemeral_ports_first(), PORTS_END) - 210)
    offsets = [first + i for first in (CLIENT_PORT_OFFSET, RAFT_PORT_OFFSET, METRICS_PORT_OFFSET) for i in range(NODE_COUNT)]
    for _ in range(200):
        base = rng.randrange(10000, top, 10)
        sockets = []
        try:
            for offset in offsets:
                sock = socket.socket()
                sock.bind(("127.0.0.1", base + offset))
                sockets.append(sock)
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError("no free port range found on 127.0.0.1")


def _can_bind(address: str) -> bool:
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError:
            return False
    return True


def _existing_secrets(path: str) -> dict:
    """Reuse the secrets of an existing local cluster so restarts keep their token."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {k: raw.get(k, "") for k in ("raft_password", "raft_salt", "client_token")}


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Child side of ``Popen(preexec_fn=...)``: the kernel sends `signum` to this child when
    the process that started it dies (Linux parent-death signal), so nothing is left running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def source_checkout() -> str:
    """The directory that holds the ``cluster/`` folder this module was loaded from: the source
    checkout when run from one (editable install), the installed ``raftseq`` package otherwise."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raftseq_command() -> str:
    """How to type the ``raftseq`` command that runs now: ``raftseq`` when that name on PATH is
    this very script, else the script's full path (e.g. ``.venv/bin/raftseq`` of a virtual
    environment that is not activated), so that the banner's commands work as printed."""
    script = os.path.join(os.path.dirname(sys.executable), "raftseq")
    on_path = shutil.which("raftseq")
    if not os.path.exists(script) or (on_path and os.path.realpath(on_path) == os.path.realpath(script)):
        return "raftseq"
    return script


def monitoring_hint(base_port: int, data_dir: str, *, root: str | None = None) -> str:
    """The banner's line on watching the cluster: the absolute paths of the Prometheus and
    Grafana scripts when they exist below `root` (default: the source checkout), otherwise
    where to find them. An installed package does not carry them."""
    root = root if root is not None else source_checkout()
    prometheus, grafana = (os.path.join(root, script) for script in DEPLOY_SCRIPTS)
    if os.path.isfile(prometheus) and os.path.isfile(grafana):
        readmes = os.path.join(root, "deploy", "*", "README.md")
        return f"  watch it: {raftseq_command()} top  |  {prometheus} --base-port {base_port} --data-dir {data_dir}  |  {grafana} (see {readmes})"
    return (
        f"  watch it: {raftseq_command()} top  |  Prometheus and Grafana for this cluster: the deploy/prometheus/run and "
        "deploy/grafana/run scripts in the deploy/ folder of the source distribution (not part of an installed package)"
    )


class Watcher:
    """Calls ``poll`` every `interval_s` on a daemon thread for the length of a ``with`` block:
    what watches a running cluster from the side (its leader, for a chaos run's timeline; its
    metrics pages, scraped as Prometheus would). ``poll`` must not raise."""

    def __init__(self, interval_s: float, *, name: str) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()


class LocalCluster:
    """Three nodes (``configs``, or ``local_configs`` of `base_port`) as child processes.

    `restart`: ``supervise_once`` restarts nodes that died (``raftseq cluster up``), after the
    delays of `restart_policy` measured on `clock`. A context manager: leaving the block stops
    every node."""

    log_tail_lines = LOG_TAIL_LINES

    def __init__(
        self,
        data_dir: str,
        base_port: int,
        *,
        insecure: bool,
        restart: bool,
        overrides: dict | None = None,
        configs: list[NodeConfig] | None = None,
        restart_policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        durability: str | None = None,
    ) -> None:
        """``configs``, when given, are used as they are (``overrides`` and ``durability`` are
        then ignored); otherwise ``local_configs`` makes them."""
        self.data_dir = os.path.abspath(data_dir)
        self.base_port = base_port
        self.restart_on_exit = restart
        self.restart_policy = restart_policy or RestartPolicy()
        self.clock = clock
        self.insecure = insecure
        self.startup_s = 0.0
        make_private_dirs(self.data_dir)
        first_config = os.path.join(self.data_dir, "n1.toml")
        if configs is None:
            configs = local_configs(
                self.data_dir,
                base_port,
                insecure=insecure,
                secrets_from=_existing_secrets(first_config),
                overrides=overrides,
                durability=durability,
            )
        #: Relays started by ``start_relays`` (stopped with the nodes).
        self.relays: list[LocalRelay] = []
        #: node id -> when (monotonic) its last metrics page had arrived (``metrics``).
        self._metrics_read_at: dict[str, float] = {}
        self.nodes: list[LocalNode] = []
        for config in configs:
            path = os.path.join(self.data_dir, f"{config.id}.toml")
            write_private(path, to_toml(config))
            self.nodes.append(LocalNode(config, path, os.path.join(self.data_dir, f"{config.id}.log")))
        # Nodes that joined later (``raftseq member add --local``) start with the others.
        known = {n.id for n in self.nodes}
        self.nodes.extend(n for n in _joined_nodes(self.data_dir, insecure=insecure) if n.id not in known)

    @classmethod
    def started(
        cls,
        data_dir: str,
        *,
        rng: random.Random | None = None,
        attempts: int = START_ATTEMPTS,
        leader_timeout_s: float = LEADER_TIMEOUT_S,
        **options,
    ) -> LocalCluster:
        """A cluster on free ports (from `rng`) with a leader. When a node could not bind a
        port taken meanwhile, starts again on other ports (in ``data_dir-2``, ...), at most
        `attempts` times. `options` go to the constructor (``insecure``, ``restart``, ...)."""
        for attempt in range(1, attempts + 1):
            directory = data_dir if attempt == 1 else f"{data_dir}-{attempt}"
            cluster = cls(directory, free_base_port(rng), **options)
            try:
                cluster.start(leader_timeout_s=leader_timeout_s)
                return cluster
            except Exception:  # noqa: BLE001 - whatever a subclass's wait raises; start stopped the nodes
                if attempt < attempts and cluster.lost_a_port():
                    print(f"ports from {cluster.base_port} were taken meanwhile; starting again on other ports", flush=True)
                    continue
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- who is where ---------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [n.config.client_address for n in self.nodes]

    @property
    def token(self) -> str:
        return self.nodes[0].config.client_token

    def _tls_exports(self) -> str:
        """The TLS variables of a client of this cluster (``clients.tls.tls_from_env``): the CA,
        and with mutual TLS the client certificate ``cluster up --tls`` made next to it."""
        tls = self.nodes[0].config.tls
        if not tls.enabled:
            return ""
        exports = f" {TLS_CA_ENV}={tls.ca_file}"
        if tls.client_ca_file:
            client = client_pair(self.data_dir)
            exports += f" {TLS_CERT_ENV}={client.cert_file} {TLS_KEY_ENV}={client.key_file}"
        return exports

    @property
    def tls(self) -> TlsOptions | None:
        """How a client reaches the nodes' client ports (``cluster.tls``; None: plaintext)."""
        return node_client_tls(self.nodes[0].config.tls)

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    def node(self, node_id: str) -> LocalNode:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def endpoint(self, node_id: str) -> str:
        return self.node(node_id).config.client_address

    def node_id_of(self, client_address: str) -> str:
        """The id of the node serving clients at `client_address` ("" for none)."""
        for node in self.nodes:
            if node.config.client_address == client_address:
                return node.id
        return ""

    def pid(self, node_id: str) -> int | None:
        process = self.node(node_id).process
        return process.pid if process is not None else None

    @property
    def pids(self) -> dict[str, int | None]:
        return {node.id: self.pid(node.id) for node in self.nodes}

    def is_running(self, node_id: str) -> bool:
        return self.node(node_id).running()

    def exit_code(self, node_id: str) -> int | None:
        """The exit code of a node process that ended on its own (None while it runs)."""
        process = self.node(node_id).process
        return process.poll() if process is not None else None

    def node_data_dir(self, node_id: str) -> str:
        """The node's data directory as this process reaches it."""
        return self.node(node_id).config.data_dir

    def journal_dir(self, node_id: str) -> str:
        return self._inside_data_dir(node_id, self.node(node_id).config.journal_dir)

    def raft_dir(self, node_id: str) -> str:
        return self._inside_data_dir(node_id, self.node(node_id).config.raft_dir)

    def _inside_data_dir(self, node_id: str, path: str) -> str:
        return os.path.join(self.node_data_dir(node_id), os.path.relpath(path, self.node(node_id).config.data_dir))

    # --- membership: new nodes for ``raftseq member add``, removed ones forgotten ------------

    def joining_node(self, node_id: str, *, peers: Sequence[str] | None = None, rng: random.Random | None = None) -> LocalNode:
        """A new node that joins this cluster (``joining_config``, written beside the others),
        with `peers` (default: every node) as the members it reaches first. Added to
        ``nodes``, not started; ``raftseq member add`` makes it a member."""
        members = [n.config for n in self.nodes if peers is None or n.id in peers]
        config = joining_config(self.data_dir, node_id, members, insecure=self.insecure, rng=rng)
        node = LocalNode(config, os.path.join(self.data_dir, f"{node_id}.toml"), os.path.join(self.data_dir, f"{node_id}.log"))
        self.nodes.append(node)
        return node

    def adopt_joined_nodes(self) -> list[LocalNode]:
        """Start the joining nodes whose configs appeared in the data directory
        (``raftseq member add --local``), and add them to ``nodes``."""
        known = {n.id for n in self.nodes}
        joined = [n for n in _joined_nodes(self.data_dir, insecure=self.insecure) if n.id not in known]
        for node in joined:
            self.nodes.append(node)
            self.start_node(node)
        return joined

    def forget_node(self, node_id: str) -> None:
        """Stop a node (if it runs) and drop it from ``nodes``: after ``raftseq member remove``."""
        node = self.node(node_id)
        if node.running():
            self.kill(node_id, signal.SIGTERM)
        self.nodes.remove(node)

    # --- processes (always by the pid of a process this cluster started) ------------------

    def start_node(self, node: LocalNode) -> None:
        """Start `node` in a process group of its own: a Ctrl-C at the terminal reaches this
        process only, which then stops the nodes itself."""
        command = [*node.command_prefix, sys.executable, "-P", "-m", "raftseq.cluster.cli", "node", "--config", node.config_path]
        # The node writes and rotates its log itself; stdout and stderr go to the same file
        # until it has opened it (an early failure is written there too).
        command += ["--log-file", node.log_path]
        if self.insecure:
            command.append("--insecure")
        log = os.fdopen(open_private(node.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")
        try:
            os.fchmod(log.fileno(), PRIVATE_FILE_MODE)  # a log made by an older version
            node.log_offset = log.seek(0, os.SEEK_END)
            node.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                process_group=0,
            )
            node.stopped = False
            node.started_at = self.clock()
        finally:
            log.close()

    def start(self, *, leader_timeout_s: float | None = None) -> dict | None:
        """Start every node. With `leader_timeout_s`: wait for a leader and return its status
        entry (``startup_s``: how long it took); when none comes, stop every node and raise
        ``ClusterTimeout``."""
        began = time.monotonic()
        try:
            for node in self.nodes:
                self.start_node(node)
            if leader_timeout_s is None:
                return None
            leader = self.wait_for_leader(timeout_s=leader_timeout_s)
            self.startup_s = time.monotonic() - began
            return leader
        except BaseException:
            self.stop()
            raise

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to a node's process (SIGKILL by default); SIGKILL and SIGTERM also reap
        it. Returns its pid."""
        node = self.node(node_id)
        if node.process is None:
            raise RuntimeError(f"{node_id} is not running")
        pid = node.process.pid
        node.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            node.process.wait()
            node.process = None
            node.died_at = self.clock()
        return pid

    def reap(self, node_id: str) -> int | None:
        """Forget a node process that exited on its own; returns its exit code (None if it is
        still running or was not started)."""
        node = self.node(node_id)
        if node.process is None:
            return None
        code = node.process.poll()
        if code is not None:
            node.exit_codes.append(code)
            node.process = None
            node.died_at = self.clock()
        return code

    def restart(self, node_id: str) -> int:
        """Start a node that is down (killed, or exited on its own). Returns the new pid."""
        self.reap(node_id)
        node = self.node(node_id)
        if node.process is not None:
            raise RuntimeError(f"{node_id} is running (pid {node.process.pid})")
        self.start_node(node)
        return node.process.pid

    def start_relays(self, count: int, *, upstream: list[str] | None = None, subscriber_lag_max: int | None = None) -> list[LocalRelay]:
        """Start `count` more relays (``cluster.relay_local``: clients on P+104.., metrics on
        P+204..), following `upstream` (default: every node), with their ``--subscriber-lag-max``
        (None: the default). Stopped by ``stop``."""
        relays = local_relays(
            self.data_dir,
            self.base_port,
            count,
            upstream=upstream or self.endpoints,
            token=self.token,
            insecure=self.insecure,
            first=len(self.relays),
            tls=msgspec.to_builtins(self.nodes[0].config.tls),
        )
        for relay in relays:
            relay.subscriber_lag_max = subscriber_lag_max
            relay.retention_from = self.nodes[0].config_path  # the nodes' [retention]
            relay.credentials_file = self.nodes[0].config.credentials_file
            relay.start(preexec_fn=die_with_parent)
            self.relays.append(relay)
        return relays

    def stop(self) -> None:
        """SIGTERM every running node, SIGKILL after the grace period, reap them. Idempotent.
        The exit codes of nodes that had exited on their own are kept (``exit_codes``)."""
        for relay in self.relays:
            relay.stop()
        for node in self.nodes:
            self.reap(node.id)
        running = [n.process for n in self.nodes if n.running()]
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            wait_or_kill(process, max(0.0, deadline - time.monotonic()))
        for node in self.nodes:
            node.process = None

    def supervise_once(self) -> list[str]:
        """Restart nodes that crashed, after the delay of ``restart_policy`` (doubling while a
        node keeps failing). A node that exited after SIGTERM or SIGINT was stopped, not
        crashed, and one whose exit code needs an operator cannot be helped by a restart: both
        stay down. Returns lines to print."""
        events = []
        now = self.clock()
        for node in self.nodes:
            if node.process is None:
                delay_s = node.restart_delay_s or self.restart_policy.first_delay_s
                if self.restart_on_exit and not node.stopped and node.died_at and now - node.died_at >= delay_s:
                    self.start_node(node)
                    node.restarts += 1
                    events.append(f"restarted {node.id} (pid {node.process.pid}, restart {node.restarts})")
                continue
            code = self.reap(node.id)
            if code is None:
                continue
            if code in STOP_EXIT_CODES:
                node.stopped = True
                events.append(f"{node.id} stopped (exit code {code}); not restarting it")
                continue
            what = self.describe_exit(node.id, code)
            if not self.restart_on_exit:
                events.append(f"{what}; not restarting (--no-restart; log {node.log_path})")
                continue
            reason = operator_exit(code)
            if reason is not None:
                node.stopped = True
                events.append(
                    f"{what}; not restarting it: exit code {code} ({reason.name}) needs an operator, a restart cannot help "
                    f"(see docs/operating.md; log {node.log_path})"
                )
                continue
            node.restart_delay_s = self.restart_policy.next_delay_s(node.restart_delay_s, node.died_at - node.started_at)
            events.append(f"{what}; restarting in {node.restart_delay_s:g} s (log {node.log_path})")
        return events

    def describe_exit(self, node_id: str, code: int) -> str:
        """``n1 was killed by SIGKILL``, or ``n1 exited with code 1: `` and the last line its
        latest process wrote to its log (where a node says why it stops)."""
        if code < 0:
            return f"{node_id} was killed by {signal.Signals(-code).name}"
        lines = self.log_text(node_id, since=self.node(node_id).log_offset).strip().splitlines()
        return f"{node_id} exited with code {code}" + (f": {lines[-1].strip()}" if lines else " (its log is empty)")

    def taken_ports(self) -> list[str]:
        """``NODE ROLE HOST:PORT`` of every address of the nodes' configs that something on this
        machine already listens on (a bind test, with the reuse option the nodes use)."""
        taken = []
        for node in self.nodes:
            c = node.config
            for role, address in (("client", c.client_address), ("Raft", c.raft_address), ("metrics", c.metrics_address)):
                if address and not _can_bind(address):
                    taken.append(f"{node.id} {role} {address}")
        return taken

    def lost_a_port(self) -> bool:
        """Whether a node exited on its own (or is gone) and a log says a port was taken."""
        exited = any(n.exit_codes or (n.process is not None and n.process.poll() is not None) for n in self.nodes)
        return exited and any("Address already in use" in self.log_text(n.id) for n in self.nodes)

    # --- status and waits -----------------------------------------------------------------

    def status(self, *, nodes: Sequence[str] | None = None, timeout_s: float = STATUS_TIMEOUT_S) -> dict:
        """``{"leader": address, "nodes": [...]}`` of `nodes` (default all) as ``raftseq status``
        sees it, each entry with ``node`` (the node id, also for unreachable ones)."""
        ids = list(nodes) if nodes is not None else self.node_ids
        report = gather_status([self.endpoint(i) for i in ids], token=self.token, timeout_s=timeout_s, tls=self.tls)
        for node_id, entry in zip(ids, report["nodes"]):
            entry["node"] = node_id
        return report

    def wait_for_leader(
        self,
        *,
        timeout_s: float = LEADER_TIMEOUT_S,
        among: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        majority: bool = False,
    ) -> dict:
        """The status entry of a leader, not one of `exclude`, that every reachable node of
        `among` (default: all but `exclude`) names. With `majority`: the leader with the highest
        term that a majority of all nodes (itself included) names; nodes cut off, paused or down
        may disagree. ``ClusterTimeout`` after `timeout_s`."""
        ids = [i for i in (among if among is not None else self.node_ids) if i not in exclude]
        needed = len(self.node_ids) // 2 + 1 if majority else None
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.status(nodes=None if majority else ids)
            up = [n for n in report["nodes"] if answered(n)]
            leaders = sorted((n for n in up if n["role"] == "leader" and n["node"] not in exclude), key=lambda n: -n["term"])
            for leader in leaders:
                naming = sum(1 for n in up if n["leader"] == leader["address"])
                if naming >= (needed or len(up)) and (majority or len(leaders) == 1):
                    return leader
            if time.monotonic() >= deadline:
                what = "named by a majority" if majority else f"among {ids}"
                raise ClusterTimeout(f"no leader {what} within {timeout_s} s; last status {report}\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL_S)

    def converged_seq(self, report: dict | None = None) -> int | None:
        """The ``last_seq`` every node of a status report (default: a fresh one of all nodes)
        holds when all are reachable and name one leader; None otherwise."""
        report = report if report is not None else self.status()
        seqs = {n.get("last_seq") for n in report["nodes"]}
        leaders = {n.get("leader") for n in report["nodes"]}
        if len(seqs) == 1 and None not in seqs and len(leaders) == 1 and None not in leaders:
            return seqs.pop()
        return None

    def wait_converged(
        self, at: int | None = None, *, at_least: int = 0, nodes: Sequence[str] | None = None, timeout_s: float = CONVERGE_TIMEOUT_S
    ) -> int:
        """Every node of `nodes` (default all) reachable, naming one leader and holding the same
        stream: ``last_seq`` equal to `at` when given, else the same value (>= `at_least`) in two
        polls in a row. Returns it; ``ClusterTimeout`` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        previous = None
        while True:
            report = self.status(nodes=nodes)
            seq = self.converged_seq(report)
            if seq is not None and (seq == at if at is not None else seq >= at_least and seq == previous):
                return seq
            previous = seq
            if time.monotonic() >= deadline:
                target = f"last_seq {at}" if at is not None else f"one last_seq >= {at_least}"
                raise ClusterTimeout(f"nodes did not converge on {target} within {timeout_s} s: {report}\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL_S)

    # --- metrics ----------------------------------------------------------------------------

    def metrics(self, node_id: str) -> dict[str, float]:
        """The node's metrics page now (``cluster.metrics.page_samples``). ``OSError`` or
        ``ValueError`` when it does not answer. A node serves one page for
        ``METRICS_PAGE_REUSE_S``: a read sooner than that after the last page arrived waits the
        rest, so it never gets the page from before (a load of 0.2 s between two reads read
        the first page again: no appends, last seq 0)."""
        from raftseq.cluster.metrics import page_samples

        wait_s = self._metrics_read_at.get(node_id, float("-inf")) + METRICS_PAGE_REUSE_S - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        address = self.node(node_id).config.metrics_address
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=METRICS_TIMEOUT_S) as answer:
            page = answer.read().decode("utf-8")
        self._metrics_read_at[node_id] = time.monotonic()
        return page_samples(page)

    def wait_for_metrics(
        self, node_id: str, done: Callable[[dict[str, float]], bool], *, what: str, timeout_s: float = CONVERGE_TIMEOUT_S
    ) -> dict[str, float]:
        """The node's metrics (``metrics``) once `done` holds for them; a page that does not
        answer yet (the node starting) has not got there. ``ClusterTimeout`` naming `what`
        after `timeout_s`. A node's counters start at 0 with its process: after a restart
        they speak of the new process only."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, float] | str = "no answer"
        while True:
            try:
                last = self.metrics(node_id)
            except (OSError, ValueError) as exc:
                last = f"no answer ({exc})"
            if not isinstance(last, str) and done(last):
                return last
            if time.monotonic() >= deadline:
                shown = last if isinstance(last, str) else {k: v for k, v in last.items() if k.startswith("raftseq_")}
                raise ClusterTimeout(f"{node_id}: {what}: not within {timeout_s} s; last metrics {shown}\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL_S)

    def wait_serving_metrics(self, node_id: str, *, timeout_s: float = LEADER_TIMEOUT_S) -> None:
        """Until the node's metrics port takes connections (a node opens it after its client
        port). It connects and reads no page: a page read here would be the one a test's own
        scrape gets for the next ``METRICS_PAGE_REUSE_S`` (a test read its node's counters
        from before its first submits)."""
        host, port = self.node(node_id).config.metrics_address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=METRICS_TIMEOUT_S).close()
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ClusterTimeout(f"{node_id}: no metrics port within {timeout_s} s ({exc})\n{self.diagnostics()}") from exc
            time.sleep(POLL_INTERVAL_S)

    def wait_hole_filled(self, node_id: str, *, timeout_s: float = CONVERGE_TIMEOUT_S) -> dict[str, float]:
        """Until the node's process has fetched journal records from a peer and holds no hole
        and nothing left to fetch: a restarted node's catch-up done. Returns its metrics."""

        def filled(samples: dict[str, float]) -> bool:
            fetched = samples.get("raftseq_catchup_fetched_records_total", 0)
            return fetched > 0 and samples.get("raftseq_catchup_missing_records") == 0 and samples.get("raftseq_journal_holes") == 0

        return self.wait_for_metrics(node_id, filled, what="fills its journal hole from a peer", timeout_s=timeout_s)

    def wait_damage_repaired(self, node_id: str, *, timeout_s: float = CONVERGE_TIMEOUT_S) -> dict[str, float]:
        """Until the node's process has repaired a damaged journal segment from a peer and
        refuses no record any more. Returns its metrics."""

        def repaired(samples: dict[str, float]) -> bool:
            return samples.get("raftseq_journal_damage_repaired_total", 0) > 0 and samples.get("raftseq_journal_damaged_records") == 0

        return self.wait_for_metrics(node_id, repaired, what="repairs its damaged journal from a peer", timeout_s=timeout_s)

    # --- logs -----------------------------------------------------------------------------

    def log_text(self, node_id: str, *, since: int = 0) -> str:
        """A node's log from byte offset `since` on ("" when there is none yet). A file
        shorter than `since` was rotated since (the node rotates its log): all of it."""
        try:
            with open(self.node(node_id).log_path, "rb") as f:
                f.seek(since if since <= os.fstat(f.fileno()).st_size else 0)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_sizes(self) -> dict[str, int]:
        """Each node log's size in bytes: offsets for ``log_text(since=...)``."""
        sizes = {}
        for node in self.nodes:
            try:
                sizes[node.id] = os.path.getsize(node.log_path)
            except OSError:
                sizes[node.id] = 0
        return sizes

    def wait_for_log(self, node_id: str, text: str, *, timeout_s: float = 20.0) -> str:
        """The first line of `node_id`'s log containing `text` (polled until `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_text(node_id).splitlines():
                if text in line:
                    return line
            if time.monotonic() >= deadline:
                raise ClusterTimeout(f"{node_id} never logged {text!r} within {timeout_s} s\n{self.log_tails()}")
            time.sleep(POLL_INTERVAL_S)

    def log_tails(self, lines: int | None = None) -> str:
        count = lines or self.log_tail_lines
        parts = []
        for node_id in self.node_ids:
            tail = self.log_text(node_id).splitlines()[-count:]
            parts.append(f"--- {node_id} log (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def diagnostics(self) -> str:
        """What a ``ClusterTimeout`` adds to its message."""
        return self.log_tails()

    def describe(self) -> str:
        lines = [f"raftseq local cluster: {len(self.nodes)} nodes, data in {self.data_dir}"]
        for node in self.nodes:
            c = node.config
            pid = node.process.pid if node.process else "-"
            lines.append(
                f"  {c.id}  client {c.client_address}  metrics http://{c.metrics_address}/metrics  "
                f"raft {c.raft_address}  pid {pid}  log {node.log_path}"
            )
        for relay in self.relays:
            pid = relay.process.pid if relay.process else "-"
            lines.append(
                f"  {relay.id}  relay {relay.client_address}  metrics http://{relay.metrics_address}/metrics  "
                f"upstream {','.join(relay.upstream)}  pid {pid}  log {relay.log_path}"
            )
        if self.insecure:
            lines.append("  authentication OFF and Raft links unencrypted (--insecure: local development only)")
        else:
            lines.append(f"  client token: {self.token}")
        credentials_file = self.nodes[0].config.credentials_file
        if credentials_file:
            lines.append(
                f"  credentials: {credentials_file} (raftseq cred add|list|revoke {credentials_file} ...; read again within a second)"
            )
        endpoints = ",".join(self.endpoints)
        lines.append(f"  for the other commands: export RAFTSEQ_ENDPOINTS={endpoints} RAFTSEQ_TOKEN={self.token}{self._tls_exports()}")
        base_port = int(self.nodes[0].config.client_address.rsplit(":", 1)[1]) - CLIENT_PORT_OFFSET
        lines.append(monitoring_hint(base_port, self.data_dir))
        return "\n".join(lines)
