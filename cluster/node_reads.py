"""What the gateway and the metrics read of their node: two small protocols of reads.

The gateway and the metrics collector receive the node through one of these (plus the few
collaborators they use directly: config, metrics, journal, batcher), never the whole ``Node``:
what they may read is listed here, and nothing here imports the node (``cluster.node``
implements both; ``cluster.relay`` implements ``ClientFacingNode`` too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from raftseq.sequencer import protocol
from raftseq.cluster.membership import Membership
from raftseq.cluster.retention import RetentionState
from raftseq.sequencer.protocol import Role


class ClientFacingNode(Protocol):
    """What the gateway reads of its node to answer clients and subscribers."""

    #: This node's role, as its role watcher last saw it.
    role: Role
    #: True while free disk is below the minimum (submits are refused).
    disk_low: bool

    @property
    def published_seq(self) -> int:
        """Last committed sequence number this node knows (applied here or in its journal)."""
        ...

    def is_leader(self) -> bool: ...

    def raft_log_backlogged(self) -> bool:
        """True while the Raft log's writer is behind its bound (a stalled disk: submits are refused)."""
        ...

    def leader_client_address(self) -> str:
        """The client address of the leader this node knows ("" if none)."""
        ...

    def last_client_seq(self, session: str) -> int: ...

    def session_owner(self, session: str) -> int:
        """The owner (``Hello.owner``) that holds ``session`` in the applied state, 0 if none."""
        ...

    def status(self) -> protocol.Status: ...

    def member_request(self, request: protocol.MemberRequest, reply: Callable[[protocol.MemberReply], None]) -> None:
        """List the membership, or (on the leader) change it; `reply` is called once, perhaps
        later (a change: once committed)."""

    def snapshot_list(self, sm_type: str) -> protocol.SnapshotList | Awaitable[protocol.Frame]:
        """The state-machine snapshots the machine indexes for ``sm_type``, as of what it applied
        (a relay: an awaitable of its upstream's answer, ``cluster.relay``)."""
        ...

    async def transfer_leadership(self, to: str) -> protocol.LeaderTransferred:
        """Hand leadership to node `to` ("": the most caught-up follower); ``cluster.handover``."""
        ...


class ScrapedNode(Protocol):
    """What the metrics collector reads of its node at scrape time (on the scrape thread)."""

    role: Role
    #: Raft address of the leader this node knows ("" if none).
    leader_address: str
    disk_low: bool

    @property
    def published_seq(self) -> int: ...

    @property
    def readable_seq(self) -> int:
        """Last sequence number subscribers may read (below any journal hole)."""
        ...

    @property
    def last_log_time_ns(self) -> int: ...

    @property
    def catchup_missing(self) -> int:
        """Journal records still to fetch from a peer."""
        ...

    @property
    def catchup_fetched(self) -> int:
        """Journal records fetched from peers by catch-up so far."""
        ...

    @property
    def journal_scrubbed_bytes(self) -> int:
        """Bytes of sealed journal segments the scrub has read back so far."""
        ...

    def session_table(self) -> tuple[int, int, int]:
        """The applied session table: sessions, bytes it counts, sessions evicted so far."""
        ...

    def raft_status(self) -> dict:
        """pysyncobj's status of the Raft member; empty when it cannot be read."""
        ...

    def raft_counters(self) -> dict[str, int]:
        """The Raft member's counters (``raft.RAFT_COUNTERS``), zeros before it exists."""
        ...

    def membership_view(self) -> tuple[Membership | None, dict[tuple[str, str], int]]:
        """The membership this node holds (None before its Raft member is up), and the
        membership changes asked of it as leader by (kind, outcome)."""
        ...

    @property
    def retention_state(self) -> RetentionState:
        """Where retention left the journal, what it holds back and what it removed."""
        ...
