"""Local relays: ``raftseq relay`` processes beside a local cluster (``cluster up --relays N``,
tests, benchmarks), started and stopped by the pid of the process started.

Relay ``i`` (from 0) of a cluster on base port P serves clients on P+104+i and metrics on
P+204+i (ports ending in 4..9 of the Raft and metrics blocks: no local cluster's node, and no
chaos proxy, ever takes one), keeps its data in ``DATA_DIR/r<i+1>`` and its log in ``DATA_DIR/r<i+1>.log``. The
token goes to the relay in its environment (``RAFTSEQ_TOKEN``), never on its command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from raftseq.clients.endpoints import TOKEN_ENV
from raftseq.cluster.processes import stop_process

#: Port offsets from a local cluster's base port (``cluster.local``): relay clients P+104..,
#: relay metrics P+204...
RELAY_CLIENT_PORT_OFFSET = 104
RELAY_METRICS_PORT_OFFSET = 204
#: Relays one local cluster may have (their ports stay below the next base port's, P+110).
LOCAL_RELAYS_MAX = 6
#: Seconds a stopping relay has after SIGTERM before SIGKILL.
RELAY_STOP_GRACE_S = 5.0


@dataclass
class LocalRelay:
    id: str
    data_dir: str
    client_address: str
    metrics_address: str
    upstream: list[str]
    token: str
    log_path: str
    insecure: bool = False
    #: ``--subscriber-lag-max`` (None: the relay's default).
    subscriber_lag_max: int | None = None
    #: ``--retention-from``: a node's config file ("": keep everything).
    retention_from: str = ""
    #: ``--credentials``: the nodes' credentials file ("": the token only).
    credentials_file: str = ""
    process: subprocess.Popen | None = None
    #: ``[tls]`` settings of the relay (``cluster.tls``): its port's certificate and the CA of
    #: its upstream's (``--tls-*``); empty: plaintext.
    tls: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        command = [sys.executable, "-P", "-m", "raftseq.cluster.cli", "relay", "--id", self.id, "--data-dir", self.data_dir]
        command += ["--upstream", ",".join(self.upstream), "--listen", self.client_address, "--log-file", self.log_path]
        if self.metrics_address:
            command += ["--metrics", self.metrics_address]
        if self.subscriber_lag_max is not None:
            command += ["--subscriber-lag-max", str(self.subscriber_lag_max)]
        if self.retention_from:
            command += ["--retention-from", self.retention_from]
        if self.credentials_file:
            command += ["--credentials", self.credentials_file]
        if self.insecure:
            command.append("--insecure")
        for key, value in self.tls.items():
            if value:
                command += [f"--tls-{key.removesuffix('_file').replace('_', '-')}", value]
        return command

    def start(self, *, preexec_fn: Callable[[], None] | None = None) -> int:
        """Start the relay process (`preexec_fn` runs in the child first); its pid."""
        assert not self.running(), f"relay {self.id} is running"
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        env = {**os.environ, TOKEN_ENV: self.token}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=preexec_fn,
                process_group=0,
            )
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code of a relay that stops on its own within `timeout_s`."""
        assert self.process is not None, f"relay {self.id} was not started"
        return self.process.wait(timeout_s)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            self.process.send_signal(sig)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period; idempotent."""
        if self.process is not None:
            stop_process(self.process, RELAY_STOP_GRACE_S)

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def local_relays(
    data_dir: str,
    base_port: int,
    count: int,
    *,
    upstream: list[str],
    token: str,
    insecure: bool = False,
    first: int = 0,
    tls: dict | None = None,
) -> list[LocalRelay]:
    """`count` relays of the local cluster on `base_port`, each following `upstream`; numbered
    from `first` (0: r1 on P+104)."""
    if not 0 <= first + count <= LOCAL_RELAYS_MAX:
        raise ValueError(f"a local cluster has 0..{LOCAL_RELAYS_MAX} relays, not {first + count}")
    relays = []
    for i in range(first, first + count):
        relay_id = f"r{i + 1}"
        relays.append(
            LocalRelay(
                relay_id,
                os.path.join(data_dir, relay_id),
                f"127.0.0.1:{base_port + RELAY_CLIENT_PORT_OFFSET + i}",
                f"127.0.0.1:{base_port + RELAY_METRICS_PORT_OFFSET + i}",
                list(upstream),
                token,
                os.path.join(data_dir, f"{relay_id}.log"),
                insecure,
                tls=dict(tls or {}),
            )
        )
    return relays


def wait_relay_serving(relay: LocalRelay, seq: int, *, timeout_s: float) -> None:
    """Return once `relay` answers a status with last_seq >= `seq`; AssertionError (with its
    log's tail) when it does not within `timeout_s` or its process ended."""
    from raftseq.cluster.config import TlsConfig
    from raftseq.cluster.status import answered, gather_status
    from raftseq.cluster.tls import node_client_tls

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if relay.process is not None and relay.process.poll() is not None:
            break
        [last] = gather_status([relay.client_address], token=relay.token, timeout_s=1.0, tls=node_client_tls(TlsConfig(**relay.tls)))[
            "nodes"
        ]
        if answered(last) and last["last_seq"] >= seq:
            return
        time.sleep(0.05)
    tail = "\n".join(relay.log_text().splitlines()[-20:])
    raise AssertionError(f"relay {relay.id} did not reach seq {seq} in {timeout_s} s (last status {last}); log:\n{tail}")
