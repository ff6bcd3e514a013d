"""A relay's settings (``raftseq relay``): where it follows the cluster, where it serves, its bounds.

A relay is built from its command line (``cluster.cli.relay``), or by ``cluster up --relays N``
(``cluster.local``); ``problems`` checks it before anything starts, as ``NodeConfig`` does a node's.
The gateway reads the same names of it as of a ``NodeConfig`` (``id``, ``client_address``,
``client_token``, ``gateway``, ``machine``).
"""

from __future__ import annotations

import os

import msgspec

from raftseq.clients.endpoints import endpoint_addresses
from raftseq.cluster.config import (
    Address,
    ConfigUnreadable,
    GatewayConfig,
    JournalConfig,
    MachineSection,
    NodeId,
    RetentionConfig,
    TlsConfig,
    read_toml,
)
from raftseq.sequencer import limits

#: Records a subscriber of a relay may fall behind the relay's head, once it has been within this bound,
#: before it is disconnected (``Busy`` with limit ``subscriber_lag``; the client resumes from its
#: next number and reads the backlog from the relay's journal at its own pace). 100,000 records is
#: 50 s of a 2,000 msg/s stream: a client paused that long costs the relay nothing but its socket
#: buffer (``gateway.subscriber_buffer_bytes_max``) meanwhile, and then a journal cursor.
RELAY_SUBSCRIBER_LAG_MAX_RECORDS = 100_000
#: A relay asks its upstream for its status (the cluster's leader, the upstream's last number:
#: the relay's lag) this often, in seconds.
RELAY_UPSTREAM_POLL_INTERVAL_S = 1.0
#: Status polls in a row in which the upstream knows no leader before the relay follows another
#: (a node cut off from the cluster serves what it has, then nothing).
RELAY_UPSTREAM_LEADERLESS_POLLS_MAX = 3
#: Status polls in a row in which the upstream followed is the cluster's leader before the relay
#: looks for a follower to follow instead (the leader sequences; fan-out belongs on followers).
#: When no follower answers it follows the leader again, and looks again after as many polls:
#: one reconnection (its last record asked again) per this many seconds.
RELAY_UPSTREAM_LEADER_POLLS_MAX = 5
#: Status polls in a row in which the upstream holds fewer records than the relay before the
#: relay says so (a warning) and follows another upstream: a node far behind, one that lost
#: records, or another cluster or a cluster that went back (the relay waits for its own last
#: number and compares that record: with this upstream alone it waits, and says so each time).
RELAY_UPSTREAM_BEHIND_POLLS_MAX = 10
#: Seconds a relay waits for an upstream to connect and welcome it, and for an answer to a request.
RELAY_UPSTREAM_TIMEOUT_S = 2.0
#: After every upstream refused or could not be reached, a relay waits this long (doubling up to
#: the maximum) before it tries them again, in seconds.
RELAY_RETRY_DELAY_MIN_S = 0.05
RELAY_RETRY_DELAY_MAX_S = 1.0
#: Snapshot queries a relay passes to its upstream at once; more get ``Busy``.
RELAY_SNAPSHOT_QUERIES_MAX = 16
#: State-machine types whose newest snapshot a relay's retention keeps (those its clients asked
#: about last): a type asked about longer ago no longer holds the relay's journal.
RELAY_SNAPSHOT_TYPES_KEPT_MAX = 64
#: The file in a relay's data directory that holds its id (made on first start).
RELAY_ID_FILE = "relay-id"


def _relay_gateway() -> GatewayConfig:
    # A relay exists to serve many subscribers: its tables are larger than a node's.
    return GatewayConfig(connections_max=5000, subscribers_max=5000)


class RelayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: The relay's id: its ``Welcome.node_id``, its log lines and metrics labels. A relay that
    #: is welcomed by an upstream with its own id is pointed at itself.
    id: NodeId
    data_dir: str
    #: Client addresses of the cluster's nodes, or of another relay (a chain).
    upstream: list[Address]
    #: Where the relay serves clients (the same protocol as a node's client port).
    client_address: Address
    metrics_address: str = ""
    #: The client token, presented upstream and required of the relay's own clients.
    client_token: str = ""
    #: A credentials file (``cluster.credentials``), checked for the relay's own clients as a
    #: node checks it; "": the client token only.
    credentials_file: str = ""
    insecure: bool = False
    gateway: GatewayConfig = msgspec.field(default_factory=_relay_gateway)
    journal: JournalConfig = JournalConfig()
    #: Records a subscriber that has been within this bound may fall behind the relay's head before it
    #: is disconnected (``RELAY_SUBSCRIBER_LAG_MAX_RECORDS``); 0: never.
    subscriber_lag_max_records: int = RELAY_SUBSCRIBER_LAG_MAX_RECORDS
    #: The cluster's machine settings as its nodes have them: the relay's ``Welcome`` reports
    #: their ``dedup_window`` (a client that submits is sent on to the cluster).
    machine: MachineSection = MachineSection()
    #: TLS on the relay's own port, and the CA (``ca_file``) it checks its upstream's
    #: certificates with (``cluster.tls``).
    tls: TlsConfig = TlsConfig()
    #: Journal retention, the nodes' ``[retention]`` settings (``--retention-from`` a node's
    #: config file; ``cluster.relay``, "Retention"). Every bound 0: the relay keeps everything.
    retention: RetentionConfig = RetentionConfig()

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.data_dir, "journal")

    def problems(self) -> list[str]:
        found = []
        if not self.upstream:
            found.append("a relay needs at least one upstream endpoint")
        if self.client_address in self.upstream:
            found.append(f"the relay's own address {self.client_address} is among its upstream endpoints (a relay cannot follow itself)")
        if not self.insecure and not self.client_token:
            found.append("client_token is required (or insecure for local development)")
        if self.insecure and self.credentials_file:
            found.append("a credentials file needs client authentication: leave out insecure")
        g = self.gateway
        found.extend(g.problems())
        found.extend(self.tls.problems())
        if self.subscriber_lag_max_records < 0:
            found.append("subscriber_lag_max_records must be >= 0 (0: never disconnect for lag)")
        if g.subscribers_max < 1 or g.connections_max < 1:
            found.append("gateway.subscribers_max and gateway.connections_max must be > 0")
        if self.journal.segment_bytes_max < limits.SEGMENT_BYTES_MIN:
            found.append(f"journal.segment_bytes_max must be at least {limits.SEGMENT_BYTES_MIN}")
        # A relay replays no Raft log: the records bound has no snapshot floor to respect.
        found.extend(self.retention.problems(segment_bytes_max=self.journal.segment_bytes_max, compaction_entries_min=0))
        return found


def relay_config(
    *,
    data_dir: str,
    upstream: str | list[str],
    listen: str,
    relay_id: str = "",
    token: str = "",
    metrics_address: str = "",
    insecure: bool = False,
    gateway: dict | None = None,
    subscriber_lag_max_records: int = RELAY_SUBSCRIBER_LAG_MAX_RECORDS,
    tls: dict | None = None,
    retention: dict | None = None,
    journal: dict | None = None,
    credentials_file: str = "",
) -> RelayConfig:
    """A checked ``RelayConfig``; ``ValueError`` naming what is wrong. Without `relay_id`, the id
    kept in the data directory (``RELAY_ID_FILE``; a new one is made and kept on first start)."""
    addresses = endpoint_addresses(upstream)
    raw = {
        "id": relay_id or relay_id_of(data_dir),
        "data_dir": data_dir,
        "upstream": addresses,
        "client_address": listen,
        "metrics_address": metrics_address,
        "client_token": token,
        "insecure": insecure,
        "subscriber_lag_max_records": subscriber_lag_max_records,
        "credentials_file": os.path.abspath(credentials_file) if credentials_file else "",
    }
    if tls:
        raw["tls"] = tls
    if gateway:
        raw["gateway"] = msgspec.to_builtins(msgspec.structs.replace(_relay_gateway(), **gateway))
    if retention:
        raw["retention"] = retention
    if journal:
        raw["journal"] = journal
    try:
        config = msgspec.convert(raw, RelayConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return config


def relay_id_of(data_dir: str) -> str:
    """The relay id kept in `data_dir`, made (``relay-`` and 8 random hex digits) when there is none."""
    path = os.path.join(data_dir, RELAY_ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    relay_id = f"relay-{os.urandom(4).hex()}"
    with open(path, "w", encoding="ascii") as f:
        f.write(relay_id + "\n")
    return relay_id


def retention_section(path: str) -> dict:
    """The ``[retention]`` table of a TOML file (a node's config: a relay keeps its journal within
    the nodes' settings); {} when it has none. ``ValueError`` (one line) when it cannot be read."""
    try:
        raw = read_toml(path)
    except ConfigUnreadable as exc:
        raise ValueError(str(exc)) from None
    section = raw.get("retention", {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: retention is not a table")
    return section
