"""A three-node cluster wired for fault injection: every Raft link through the fault proxy,
optionally a node's data directory on a small tmpfs in a private mount namespace.

**How the Raft links go through the proxy.** pysyncobj keeps one TCP connection per pair of
nodes. It is dialled by the node whose *self address* (its ``raft_address``) compares greater
as a string; the dialler announces its self address and the receiver looks it up among the
addresses of its own peer list. So, for each pair, the dialler's config names the other node
by a proxy address (a link of the proxy, forwarding to the other node's real Raft port), and
the receiver's config names the dialler by its real self address, which it never dials. The
proxy address must compare below the dialler's self address, or the dialler would stop
dialling: ports of the same 5-digit block guarantee it, and ``ChaosCluster`` checks it. With
nodes n1 < n2 < n3 the links are n3→n2, n3→n1 and n2→n1; each node binds its real
``raft_address`` as before (no config field changed). Client ports are not proxied.

**A node on a tmpfs.** ``tmpfs_bytes={"n2": 64 << 20}`` starts a holder process
(``unshare -m``, private propagation) that mounts a tmpfs of that size over n2's data directory
and waits; n2 runs under ``nsenter --mount=/proc/HOLDER/ns/mnt`` (nsenter execs the node: the pid
the cluster holds is the node's). The tmpfs outlives node restarts and goes away with the holder
at ``stop``. The test process reaches the files through ``/proc/HOLDER/root``
(``node_data_dir``, ``journal_dir``).
Needs root (CAP_SYS_ADMIN); ``tmpfs_supported()`` says whether it works here.

**A node on a power-loss filesystem.** ``powerfs=["n1", ...]`` mounts each named node's data
directory through its own ``PowerFS`` (``chaos_tests/powerfs.py``; its disk is
``DATA/nX.disk``, its daemon's log ``DATA/nX.powerfs.log``), a FUSE daemon in a private mount
namespace; the node runs under ``nsenter --mount=/proc/DAEMON/ns/mnt`` and the test process
reaches its files through ``/proc/DAEMON/root``. ``cut_power`` drops what the node had not made
durable; ``unmount`` and ``remount`` put it back on what was (``Nemesis.power_cut`` does the
whole fault). ``durability`` is passed through to the nodes' configs (``local_configs``).

**Network namespaces instead of the proxy** (``network="netns"``, root only). Each node runs in
its own network namespace (``nsenter --net``), joined by a veth pair to a bridge in a hub
namespace, on 10.231.0.0/24 (which exists only inside those namespaces). The namespaces are
unnamed, each owned by a holder process (``unshare -n``) that exits when its stdin closes, so
even a killed test run leaves none behind; this process's own network is never touched. Raft
binds the node's 10.231.0.N address and goes over the veths; a partition is an iptables ``DROP`` of the sender's
address in the receiver's ``INPUT`` chain (the kernel drops the segments: SYNs and
retransmissions included, as in a real partition). Only ``pass`` and ``drop`` exist there: no
``hold`` and no delay (``tc netem`` is not available here). Client and metrics ports stay
``127.0.0.1:P`` inside each namespace; pass-only links of a ``FaultProxy`` (sockets created
inside the namespaces) forward them from this process's loopback and between the namespaces
(catch-up fetches from a peer's client port), so clients, leader hints and status work
unchanged and client traffic is never cut. Ending the holders at ``stop`` removes the
namespaces, their veths and every rule. ``netns_supported()`` says whether it works here.

Everything started is stopped by ``stop`` (also used by ``with``), whatever state it is in:
paused nodes are continued first, nodes are stopped, the proxy closed, holders ended.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from chaos_tests.powerfs import PowerFS
from chaos_tests.proxy import BACKWARD, DROP, FORWARD, PASS, DirectionFault, FaultProxy
from raftseq.cluster.local import LEADER_TIMEOUT_S, POLL_INTERVAL_S, LocalCluster, LocalNode, free_base_port, local_configs
from raftseq.cluster.processes import wait_or_kill

PORT_ATTEMPTS_MAX = 20
#: Proxy listening ports: base + these (in the client-port block, below every Raft port).
PROXY_PORT_OFFSETS = (4, 5, 6, 7, 8, 9)
HOLDER_READY_TIMEOUT_S = 5.0
HOLDER_STOP_TIMEOUT_S = 5.0
BALLAST_NAME = "chaos-ballast"


@dataclass(frozen=True)
class RaftLink:
    """One pysyncobj connection between two nodes, through a proxy link of the same name."""

    name: str
    initiator: str  # the node that dials (its self address compares greater)
    acceptor: str
    listen_address: str
    target_address: str

    def direction(self, src: str, dst: str) -> str:
        """The proxy direction carrying bytes from node `src` to node `dst`."""
        if (src, dst) == (self.initiator, self.acceptor):
            return FORWARD
        if (src, dst) == (self.acceptor, self.initiator):
            return BACKWARD
        raise ValueError(f"link {self.name} does not join {src} and {dst}")


def tmpfs_supported() -> tuple[bool, str]:
    """Whether a tmpfs can be mounted in a private mount namespace here (and why not)."""
    if os.geteuid() != 0:
        return False, "needs root (unshare -m and nsenter --mount)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"unshare failed: {exc}"
    if done.returncode != 0:
        return False, f"tmpfs mount in a private mount namespace failed: {done.stderr.strip()}"
    return True, ""


class _NamespaceHolder:
    """A process that owns new namespaces (``unshare`` flags) and waits; they live until it
    ends. It ends when ``stop`` closes its stdin, or when this process dies (the pipe closes),
    so an interrupted run leaves no namespace behind."""

    def __init__(self, unshare_flags: list[str], setup: str = "", args: Sequence[str] = (), *, what: str) -> None:
        script = f"{setup + ' && ' if setup else ''}echo ready && read _ ; exit 0"
        self.what = what
        self.process = subprocess.Popen(
            ["unshare", *unshare_flags, "sh", "-c", script, "holder", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        ready, _, _ = select.select([self.process.stdout], [], [], HOLDER_READY_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self._end()
            error = self.process.stderr.read().decode(errors="replace").strip()
            self.stop()
            raise RuntimeError(f"namespace holder for {what} did not start: {line!r} {error}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def namespace(self, kind: str) -> str:
        """The namespace file (``mnt``, ``net``) for nsenter and setns."""
        return f"/proc/{self.pid}/ns/{kind}"

    def _end(self) -> None:
        process = self.process
        if process.poll() is None:
            try:
                process.stdin.close()  # the holder's `read` returns: it exits
            except OSError:
                pass
            wait_or_kill(process, HOLDER_STOP_TIMEOUT_S)

    def stop(self) -> None:
        """End the holder (and with it the namespaces, once nothing else is in them)."""
        self._end()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None and not stream.closed:
                stream.close()


class _TmpfsHolder(_NamespaceHolder):
    """A private mount namespace with a tmpfs over one directory."""

    def __init__(self, directory: str, size_bytes: int) -> None:
        self.directory = directory
        self.size_bytes = size_bytes
        os.makedirs(directory, exist_ok=True)
        super().__init__(
            ["-m", "--propagation", "private"],
            'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2"',
            [str(size_bytes), directory],
            what=f"a tmpfs on {directory}",
        )

    @property
    def mount_namespace(self) -> str:
        return self.namespace("mnt")

    def path(self, inside: str) -> str:
        """`inside` (an absolute path in the namespace) as the test process reaches it."""
        return f"/proc/{self.pid}/root{inside}"


NETNS_SUBNET = "10.231.0"
NETNS_COMMAND_TIMEOUT_S = 10.0
NETWORKS = ("proxy", "netns", "none")


def _run(command: list[str], *, stdin: str = "") -> None:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=NETNS_COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")


def netns_supported() -> tuple[bool, str]:
    """Whether nodes can run in network namespaces joined by veth, cut by iptables (and why
    not)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, veth, iptables in the namespaces)"
    for tool in ("unshare", "ip", "nsenter", "iptables-restore"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (apt-get install -y iptables iproute2)"
    try:
        network = _NetnsNetwork(["a", "b"])
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return False, f"cannot build namespaces: {exc}"
    try:
        network.apply({("a", "b")})
        network.apply(set())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return False, f"iptables in a namespace failed: {exc}"
    finally:
        network.close()
    return True, ""


class _NetnsNetwork:
    """One network namespace per node, veth pairs to a bridge in a hub namespace, iptables
    drops. The namespaces are unnamed, each held by a ``_NamespaceHolder``: nothing is added
    to /run/netns, and they vanish with their holders."""

    def __init__(self, node_ids: Sequence[str]) -> None:
        self.ips = {node_id: f"{NETNS_SUBNET}.{i + 1}" for i, node_id in enumerate(node_ids)}
        self.holders: dict[str, _NamespaceHolder] = {}
        try:
            self.hub = _NamespaceHolder(["-n"], what="the hub network namespace")
            self.holders["hub"] = self.hub
            self._ip("hub", "link", "add", "br0", "type", "bridge")
            self._ip("hub", "link", "set", "br0", "up")
            for i, node_id in enumerate(node_ids):
                self.holders[node_id] = _NamespaceHolder(["-n"], what=f"{node_id}'s network namespace")
                inner, outer = "eth0", f"veth{i + 1}"
                # Created inside the node's namespace, the peer moved to the hub: nothing ever
                # appears in this process's namespace.
                self._ip(node_id, "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", str(self.hub.pid))
                self._ip("hub", "link", "set", outer, "master", "br0")
                self._ip("hub", "link", "set", outer, "up")
                self._ip(node_id, "addr", "add", f"{self.ips[node_id]}/24", "dev", inner)
                self._ip(node_id, "link", "set", inner, "up")
                self._ip(node_id, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _in(self, key: str, command: list[str], *, stdin: str = "") -> None:
        _run(["nsenter", f"--net={self.holders[key].namespace('net')}", "--", *command], stdin=stdin)

    def _ip(self, key: str, *args: str) -> None:
        self._in(key, ["ip", *args])

    @property
    def node_ids(self) -> list[str]:
        return list(self.ips)

    def path(self, node_id: str) -> str:
        return self.holders[node_id].namespace("net")

    def name(self, node_id: str) -> str:
        return f"net namespace of pid {self.holders[node_id].pid}"

    def apply(self, drops: set[tuple[str, str]]) -> None:
        """Exactly these (src, dst) directions dropped: each receiver's filter table is
        replaced at once (iptables-restore)."""
        for dst in self.ips:
            rules = [f"-A INPUT -s {self.ips[src]}/32 -j DROP" for src, d in sorted(drops) if d == dst]
            table = (
                "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                + "".join(r + "\n" for r in rules)
                + "COMMIT\n"
            )
            self._in(dst, ["iptables-restore"], stdin=table)

    def close(self) -> None:
        """End every holder: the namespaces, their veths and rules go with them."""
        for holder in reversed(list(self.holders.values())):
            holder.stop()
        self.holders.clear()


def _proxied_configs(configs: list, proxy_addresses: Iterable[str]) -> tuple[list, list[RaftLink]]:
    """Configs in which every dialler names its peer by a proxy address; and those links."""
    free = iter(proxy_addresses)
    by_id = {c.id: c for c in configs}
    links = []
    new_configs = []
    for config in configs:
        peers = []
        for peer in config.peers:
            other = by_id[peer.id]
            if config.raft_address > other.raft_address:  # this node dials the other
                listen = next(free)
                if not listen < config.raft_address:
                    raise RuntimeError(f"proxy address {listen} does not compare below {config.raft_address}")
                links.append(RaftLink(f"{config.id}-{other.id}", config.id, other.id, listen, other.raft_address))
                peers.append(msgspec.structs.replace(peer, raft_address=listen))
            else:
                peers.append(peer)
        new_configs.append(msgspec.structs.replace(config, peers=peers))
    return new_configs, links


class ChaosCluster(LocalCluster):
    """Three real nodes (a ``LocalCluster``: its verbs, status and waits), their Raft links
    through a ``FaultProxy``; pausing, partitions, small disks.

    ``rng`` chooses the ports (pass a seeded one to replay a run). ``overrides`` as in
    ``local_configs``. ``tmpfs_bytes`` maps node ids to the size of the tmpfs their data
    directory lives on. ``network``: ``"proxy"`` (Raft links through a ``FaultProxy``),
    ``"netns"`` (namespaces and iptables) or ``"none"`` (a plain cluster, same verbs).
    """

    def __init__(
        self,
        data_dir: str,
        *,
        rng: random.Random,
        overrides: dict | None = None,
        tmpfs_bytes: Mapping[str, int] | None = None,
        network: str = "proxy",
        powerfs: Sequence[str] = (),
        durability: str | None = None,
    ) -> None:
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        if set(powerfs) & set(tmpfs_bytes or {}):
            raise ValueError(f"a node's data directory is on a tmpfs or on a powerfs, not both: {sorted(set(powerfs) & set(tmpfs_bytes))}")
        self.data_dir = os.path.abspath(data_dir)
        self.network = network
        self.proxy: FaultProxy | None = None
        self.links: list[RaftLink] = []
        self.paused: set[str] = set()
        self._holders: dict[str, _TmpfsHolder] = {}
        self._tmpfs_bytes = dict(tmpfs_bytes or {})
        self._netns: _NetnsNetwork | None = None
        self._forwarder: FaultProxy | None = None
        self._drops: set[tuple[str, str]] = set()
        self._powerfs_nodes = list(powerfs)
        self.powerfs: dict[str, PowerFS] = {}
        self.durability = durability
        self.nodes: list[LocalNode] = []  # until the ports are chosen (_build)
        os.makedirs(self.data_dir, exist_ok=True)
        try:
            self._build(rng, overrides)
        except BaseException:
            self.stop()
            raise

    def _netns_configs(self, configs: list) -> list:
        """Raft on the node's namespace address; client and metrics ports forwarded."""
        self._netns = network = _NetnsNetwork([c.id for c in configs])
        raft = {c.id: f"{network.ips[c.id]}:{c.raft_address.rsplit(':', 1)[1]}" for c in configs}
        new_configs = [
            msgspec.structs.replace(
                c,
                raft_address=raft[c.id],
                peers=[msgspec.structs.replace(p, raft_address=raft[p.id]) for p in c.peers],
            )
            for c in configs
        ]
        self._forwarder = forwarder = FaultProxy().start()
        for c in new_configs:
            inside = network.path(c.id)
            forwarder.add_link(f"client-{c.id}", c.client_address, c.client_address, target_netns=inside)
            if c.metrics_address:
                forwarder.add_link(f"metrics-{c.id}", c.metrics_address, c.metrics_address, target_netns=inside)
            for other in new_configs:
                if other.id != c.id:
                    forwarder.add_link(
                        f"client-{c.id}-in-{other.id}",
                        c.client_address,
                        c.client_address,
                        listen_netns=network.path(other.id),
                        target_netns=inside,
                    )
        return new_configs

    def _build(self, rng: random.Random, overrides: dict | None) -> None:
        last_error: Exception | None = None
        for _ in range(PORT_ATTEMPTS_MAX):
            base_port = free_base_port(rng)
            configs = local_configs(self.data_dir, base_port, insecure=False, overrides=overrides, durability=self.durability)
            if self.network == "none":
                break
            if self.network == "netns":
                try:
                    configs = self._netns_configs(configs)
                except OSError as exc:  # a forwarded port was taken: another block
                    last_error = exc
                    self._stop_network()
                    continue
                break
            proxy_addresses = [f"127.0.0.1:{base_port + off}" for off in PROXY_PORT_OFFSETS]
            configs, links = _proxied_configs(configs, proxy_addresses)
            proxy = FaultProxy().start()
            try:
                for link in links:
                    proxy.add_link(link.name, link.listen_address, link.target_address)
            except OSError as exc:  # a proxy port was taken: another block
                proxy.stop()
                last_error = exc
                continue
            self.proxy, self.links = proxy, links
            break
        else:
            raise RuntimeError(f"no usable port block in {PORT_ATTEMPTS_MAX} attempts: {last_error}")
        self.base_port = base_port
        unknown = (set(self._tmpfs_bytes) | set(self._powerfs_nodes)) - {c.id for c in configs}
        if unknown:
            raise ValueError(f"tmpfs_bytes or powerfs name unknown nodes {sorted(unknown)}")
        super().__init__(self.data_dir, base_port, insecure=False, restart=False, configs=configs)
        for node_id, size in self._tmpfs_bytes.items():
            self._holders[node_id] = _TmpfsHolder(self.node(node_id).config.data_dir, size)
        for node_id in self._powerfs_nodes:
            fs = PowerFS(
                os.path.join(self.data_dir, f"{node_id}.disk"),
                self.node(node_id).config.data_dir,
                log_path=os.path.join(self.data_dir, f"{node_id}.powerfs.log"),
            )
            self.powerfs[node_id] = fs
            fs.mount()
        for node in self.nodes:
            self._set_command_prefix(node)

    def _set_command_prefix(self, node: LocalNode) -> None:
        """``nsenter`` into the node's network namespace and into the mount namespace of its
        tmpfs or of its filesystem's current daemon."""
        enter = []
        if self._netns is not None:
            enter.append(f"--net={self._netns.path(node.config.id)}")
        if node.config.id in self._holders:
            enter.append(f"--mount={self._holders[node.config.id].mount_namespace}")
        if node.config.id in self.powerfs:
            enter.append(f"--mount={self.powerfs[node.config.id].mount_namespace}")
        node.command_prefix = ["nsenter", *enter, "--"] if enter else []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, *, leader_timeout_s: float = LEADER_TIMEOUT_S) -> dict:
        """Start every node; return the status entry of the first leader."""
        return super().start(leader_timeout_s=leader_timeout_s)

    def stop(self) -> None:
        """Stop everything this cluster started. Idempotent; never raises for a node that is
        already gone."""
        try:
            for node_id in sorted(self.paused):
                node = self.node(node_id)
                if node.running():
                    node.process.send_signal(signal.SIGCONT)
            self.paused.clear()
            super().stop()
        finally:
            try:
                if self.proxy is not None:
                    self.proxy.stop()
            finally:
                try:
                    for holder in self._holders.values():
                        holder.stop()
                finally:
                    try:
                        for fs in self.powerfs.values():
                            fs.stop()
                    finally:
                        self._stop_network()

    def _stop_network(self) -> None:
        try:
            if self._forwarder is not None:
                self._forwarder.stop()
                self._forwarder = None
        finally:
            if self._netns is not None:
                self._netns.close()
                self._netns = None

    def __enter__(self) -> ChaosCluster:
        return self

    # --- who is where ---------------------------------------------------------------------

    def netns_path(self, node_id: str) -> str | None:
        """The network namespace file the node runs in (``network="netns"``), else None."""
        return self._netns.path(node_id) if self._netns is not None else None

    def describe(self) -> str:
        lines = [super().describe()]
        for link in self.links:
            lines.append(f"  raft link {link.name}: {link.initiator} dials {link.listen_address} -> {link.acceptor} {link.target_address}")
        if self._netns is not None:
            for node_id in self._netns.node_ids:
                lines.append(
                    f"  {node_id}: raft on {self._netns.ips[node_id]} in the {self._netns.name(node_id)} (hub pid {self._netns.hub.pid})"
                )
        for node_id, holder in self._holders.items():
            lines.append(f"  {node_id}: data on a {holder.size_bytes}-byte tmpfs (holder pid {holder.pid})")
        for node_id, fs in self.powerfs.items():
            daemon = f"daemon pid {fs.process.pid}" if fs.mounted else "unmounted"
            lines.append(f"  {node_id}: data on a power-loss filesystem over {fs.backing} ({daemon})")
        return "\n".join(lines)

    # --- network (Raft links only) --------------------------------------------------------

    def _require_proxy(self) -> FaultProxy:
        if self.proxy is None:
            raise RuntimeError(f"this cluster has no fault proxy (network={self.network!r})")
        return self.proxy

    def link_between(self, a: str, b: str) -> RaftLink:
        for link in self.links:
            if {link.initiator, link.acceptor} == {a, b}:
                return link
        raise KeyError(f"no Raft link between {a} and {b}")

    def set_directions(self, changes: Iterable[tuple[str, str, str | None, float | None]]) -> None:
        """Apply ``(src, dst, mode, delay_ms)`` changes to the bytes flowing from node `src`
        to node `dst`, all in one step (None keeps a field). With ``network="netns"`` only
        ``pass`` and ``drop`` exist, without delay."""
        if self._netns is not None:
            drops = set(self._drops)
            for src, dst, mode, delay_ms in changes:
                if mode not in (None, PASS, DROP) or delay_ms not in (None, 0, 0.0):
                    raise ValueError(f"network namespaces support pass and drop without delay, not {mode!r} {delay_ms!r}")
                if src == dst or src not in self._netns.ips or dst not in self._netns.ips:
                    raise ValueError(f"no link from {src} to {dst}")
                if mode == DROP:
                    drops.add((src, dst))
                elif mode == PASS:
                    drops.discard((src, dst))
            self._netns.apply(drops)
            self._drops = drops
            return
        proxy_changes = []
        for src, dst, mode, delay_ms in changes:
            link = self.link_between(src, dst)
            proxy_changes.append((link.name, link.direction(src, dst), mode, delay_ms))
        self._require_proxy().set_faults(proxy_changes)

    def direction_fault(self, src: str, dst: str) -> DirectionFault:
        if self._netns is not None:
            return DirectionFault(DROP if (src, dst) in self._drops else PASS, 0.0)
        link = self.link_between(src, dst)
        return self._require_proxy().fault(link.name, link.direction(src, dst))

    def partition(self, groups: Sequence[Sequence[str]], *, mode: str = DROP) -> list[tuple[str, str]]:
        """Cut every link between nodes of different groups (both directions). Nodes in no
        group are cut from everyone. Returns the directed pairs cut."""
        group_of = {}
        for index, group in enumerate(groups):
            for node_id in group:
                group_of[node_id] = index
        pairs = [
            (a, b)
            for a in self.node_ids
            for b in self.node_ids
            if a != b and group_of.get(a, ("alone", a)) != group_of.get(b, ("alone", b))
        ]
        self.set_directions([(a, b, mode, None) for a, b in pairs])
        return pairs

    def heal_network(self) -> None:
        """Every Raft link back to pass, no delay."""
        if self._netns is not None:
            self._netns.apply(set())
            self._drops = set()
            return
        self._require_proxy().heal()

    def reset_links(self, node_id: str | None = None) -> int:
        """Reset the open Raft connections (of `node_id`, or all). Returns how many."""
        proxy = self._require_proxy()
        return sum(proxy.reset(link.name) for link in self.links if node_id in (None, link.initiator, link.acceptor))

    # --- processes (always by the pid of a process this cluster started) ------------------

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to a node's process; SIGKILL and SIGTERM also reap it. Returns the pid."""
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.paused.discard(node_id)
        return super().kill(node_id, sig)

    def start_node(self, node: LocalNode) -> None:
        if node.id in self.powerfs:
            self._set_command_prefix(node)  # the daemon of the current mount
        super().start_node(node)

    def reap(self, node_id: str) -> int | None:
        code = super().reap(node_id)
        if code is not None:
            self.paused.discard(node_id)
        return code

    def pause(self, node_id: str) -> int:
        """SIGSTOP the node. Returns its pid."""
        pid = super().kill(node_id, signal.SIGSTOP)
        self.paused.add(node_id)
        return pid

    def resume(self, node_id: str) -> int:
        """SIGCONT a paused node. Returns its pid."""
        pid = super().kill(node_id, signal.SIGCONT)
        self.paused.discard(node_id)
        return pid

    # --- files and disks ------------------------------------------------------------------

    def node_data_dir(self, node_id: str) -> str:
        """The node's data directory as the test process reaches it (through the tmpfs
        holder's root for a node on a tmpfs)."""
        inside = super().node_data_dir(node_id)
        holder = self._holders.get(node_id)
        if node_id in self.powerfs:
            return self.powerfs[node_id].path()
        return holder.path(inside) if holder is not None else inside

    def cut_power(self, node_id: str, *, tear_seed: int | None = None) -> dict:
        """Drop what the node's filesystem holds unsynced (the node keeps running on a
        filesystem that fails every call: kill it next). Returns what was dropped."""
        return self._powerfs_of(node_id).cut(tear_seed=tear_seed)

    def unmount(self, node_id: str) -> None:
        """Unmount the node's filesystem (the node must be down)."""
        if self.is_running(node_id):
            raise RuntimeError(f"{node_id} is running; kill it before unmounting its filesystem")
        self._powerfs_of(node_id).unmount()

    def remount(self, node_id: str) -> None:
        """Mount the node's filesystem again, on what was durable."""
        self._powerfs_of(node_id).mount()

    def _powerfs_of(self, node_id: str) -> PowerFS:
        if node_id not in self.powerfs:
            raise ValueError(f"{node_id} is not on a power-loss filesystem (powerfs)")
        return self.powerfs[node_id]

    def on_tmpfs(self, node_id: str) -> bool:
        return node_id in self._holders

    def disk_free(self, node_id: str) -> int:
        return shutil.disk_usage(self.node_data_dir(node_id)).free

    def fill_disk(self, node_id: str, *, leave_bytes: int = 0) -> int:
        """Allocate a ballast file on the node's tmpfs until `leave_bytes` remain free.
        Returns the ballast's size."""
        if node_id not in self._holders:
            raise ValueError(f"{node_id} is not on a tmpfs (tmpfs_bytes)")
        path = os.path.join(self.node_data_dir(node_id), BALLAST_NAME)
        free = self.disk_free(node_id)
        current = os.path.getsize(path) if os.path.exists(path) else 0
        size = current + max(0, free - leave_bytes)
        with open(path, "ab") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError:
                pass  # ENOSPC on the last page: full is what was asked for
        return os.path.getsize(path) if os.path.exists(path) else 0

    def free_disk(self, node_id: str) -> None:
        """Remove the ballast of `fill_disk`."""
        path = os.path.join(self.node_data_dir(node_id), BALLAST_NAME)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def wait_until(predicate, *, timeout_s: float, what: str, interval_s: float = POLL_INTERVAL_S):
    """Poll `predicate` until it returns something true (returned); ``AssertionError`` naming
    `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)


__all__ = ["ChaosCluster", "NETWORKS", "RaftLink", "netns_supported", "tmpfs_supported", "wait_until"]
