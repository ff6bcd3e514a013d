"""Cluster membership: who the members are, as every node holds it (``Membership``), and one
change to it (``MemberChange``), as it travels in the Raft log.

A change is one of three kinds, one at a time (Raft's single-server changes):

* ``learner``: a new member joins without a vote. The leader replicates to it (its journal
  through catch-up, its Raft state through a snapshot) and counts it toward nothing.
* ``promote``: a learner that has caught up becomes a voter. The leader proposes it itself
  once the learner holds every committed entry.
* ``remove``: a member leaves; its id stays in ``removed``, so that it cannot come back.

Each membership is numbered (the one the configs name is 0; each change adds one), so that a
change replayed from the log after a newer membership was loaded changes nothing.
Every node keeps its membership in ``membership.json`` in its data directory (versioned, written
atomically): a restart after a change rejoins the cluster as it is now, not as the node's config
first named it.

This module is pure: no sockets, no pysyncobj; files only in ``load``/``save``.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from raftseq.cluster.config import Address, NodeConfig, NodeId, PeerConfig

#: The version of ``membership.json`` and of a change's bytes in the Raft log.
MEMBERSHIP_FORMAT_VERSION = 1
MEMBERSHIP_FILE = "membership.json"
#: Memberships before the current one kept in the file: a change still uncommitted when the
#: node stopped may be undone by the next leader, and the node then goes back to the one
#: before it. One change is in flight at a time, so a few suffice.
MEMBERSHIP_HISTORY_MAX = 8
#: Removed member ids remembered (a removed node that comes back is refused by id).
REMOVED_MEMBERS_MAX = 1024
#: Members of a cluster at most (voters and learners): 7 voters as ``NodeConfig`` allows, and
#: one learner catching up.
MEMBERS_MAX = 8

ChangeKind = Literal["learner", "promote", "remove"]
#: The kinds of change as operators name them (``raftseq member add``: a learner), the
#: ``kind`` label of ``raftseq_membership_changes_total``.
CHANGE_KIND_NAMES: dict[str, str] = {"learner": "add", "promote": "promote", "remove": "remove"}
#: How a change proposed on the leader ended (the ``outcome`` label): committed; refused before
#: it was proposed (it cannot follow the membership, would leave no quorum, another is under
#: way); or proposed and not committed (leadership lost, refused by the log).
CHANGE_OUTCOMES = ("committed", "refused", "failed")


class MembershipError(Exception):
    """A change that cannot be made; the message says why, in one line."""


class Member(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    id: NodeId
    raft_address: Address
    client_address: Address
    #: Ed25519 public key, hex ("" in a cluster without node keys).
    raft_public_key: str = ""
    #: A learner receives the log and has no vote.
    learner: bool = False


class Membership(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    format_version: int
    #: How many changes led here (0: the membership the configs name).
    number: int
    members: list[Member]
    removed: list[str] = []
    #: The memberships before this one, newest last (``MEMBERSHIP_HISTORY_MAX``).
    history: list[Membership] = []

    @classmethod
    def of_config(cls, config: NodeConfig) -> Membership:
        """The membership a node's config names: itself and its peers, all voters (numbered 0).
        A joining node (``join``) is a learner in it, numbered -1: whatever the cluster tells
        it (a change, a snapshot) is newer."""
        me = Member(config.id, config.raft_address, config.client_address, config.raft_public_key, learner=config.join)
        peers = [Member(p.id, p.raft_address, p.client_address, p.raft_public_key) for p in config.peers]
        return cls(MEMBERSHIP_FORMAT_VERSION, -1 if config.join else 0, sorted([me, *peers], key=lambda m: m.id))

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.id == node_id), None)

    def by_raft_address(self, address: str) -> Member | None:
        return next((m for m in self.members if m.raft_address == address), None)

    def voters(self) -> list[Member]:
        return [m for m in self.members if not m.learner]

    def learners(self) -> list[Member]:
        return [m for m in self.members if m.learner]

    def peers_of(self, node_id: str) -> list[PeerConfig]:
        """Every member but `node_id`, as a config's peers (for catch-up and routing)."""
        return [PeerConfig(m.id, m.raft_address, m.client_address, m.raft_public_key) for m in self.members if m.id != node_id]

    def without_history(self) -> Membership:
        return msgspec.structs.replace(self, history=[])

    def change(self, kind: ChangeKind, member: Member) -> MemberChange:
        """The change of `kind` about `member` that follows this membership; raises
        ``MembershipError`` (one line) when it cannot follow it."""
        current = self.member(member.id)
        if kind == "learner":
            if member.id in self.removed:
                raise MembershipError(f"node id {member.id} was removed from this cluster; a new node needs a new id")
            if current is not None:
                raise MembershipError(f"{member.id} is a member already")
            for other in self.members:
                used = {other.raft_address, other.client_address} & {member.raft_address, member.client_address}
                if used:
                    raise MembershipError(f"address {sorted(used)[0]} is in use by member {other.id}")
                if member.raft_public_key and other.raft_public_key.lower() == member.raft_public_key.lower():
                    raise MembershipError(f"the public key of {member.id} is the key of member {other.id}")
            if bool(member.raft_public_key) != bool(self.members[0].raft_public_key):
                raise MembershipError(
                    "this cluster's members have node keys: a new member needs its public key"
                    if self.members[0].raft_public_key
                    else "this cluster's members have no node keys: a new member cannot have one"
                )
            if len(self.members) >= MEMBERS_MAX:
                raise MembershipError(f"a cluster has at most {MEMBERS_MAX} members")
            if self.learners():
                raise MembershipError(f"{self.learners()[0].id} is still catching up; one new member at a time")
            members = [*self.members, msgspec.structs.replace(member, learner=True)]
            removed = self.removed
        elif current is None:
            raise MembershipError(f"unknown node id {member.id} (members: {', '.join(x.id for x in self.members)})")
        elif kind == "promote":
            if not current.learner:
                raise MembershipError(f"{member.id} is a voter already")
            members = [msgspec.structs.replace(x, learner=False) if x.id == member.id else x for x in self.members]
            removed = self.removed
        else:
            if not current.learner and len(self.voters()) <= 1:
                raise MembershipError(f"{member.id} is the last voter")
            members = [x for x in self.members if x.id != member.id]
            removed = [*self.removed, member.id][-REMOVED_MEMBERS_MAX:]
        before = self.without_history()
        after = Membership(MEMBERSHIP_FORMAT_VERSION, self.number + 1, sorted(members, key=lambda x: x.id), removed)
        return MemberChange(MEMBERSHIP_FORMAT_VERSION, kind, current or member, before, after)

    def then(self, newer: Membership) -> Membership:
        """`newer` (a membership without history) with this one kept in its history."""
        history = [*self.history, self.without_history()][-MEMBERSHIP_HISTORY_MAX:]
        return msgspec.structs.replace(newer, history=history)

    def back_to(self, older: Membership) -> Membership:
        """`older`, after this membership's change was undone (history trimmed to before it)."""
        return msgspec.structs.replace(older, history=[h for h in self.history if h.number < older.number])


class MemberChange(msgspec.Struct, frozen=True, array_like=True):
    """One change, as the leader proposes it (inside pysyncobj's membership entry): the
    memberships before and after it travel whole, so that any node (a new one that has seen no
    change before, one undoing the change with a truncation) adopts the one it names."""

    format_version: int
    kind: ChangeKind
    member: Member
    before: Membership
    after: Membership


_file_encoder = msgspec.json.Encoder()
_file_decoder = msgspec.json.Decoder(Membership)
_change_encoder = msgspec.msgpack.Encoder()
_change_decoder = msgspec.msgpack.Decoder(MemberChange)


def encode_change(change: MemberChange) -> bytes:
    return _change_encoder.encode(change)


def _decode(decoder: msgspec.msgpack.Decoder | msgspec.json.Decoder, data: bytes, what: str):
    """`data` decoded, of this version; ``MembershipError`` naming `what` otherwise."""
    try:
        decoded = decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise MembershipError(f"not a {what}: {exc}") from None
    if decoded.format_version != MEMBERSHIP_FORMAT_VERSION:
        raise MembershipError(f"{what} format {decoded.format_version}, this node reads {MEMBERSHIP_FORMAT_VERSION}")
    return decoded


def decode_change(data: bytes) -> MemberChange:
    """Raises ``MembershipError`` on bytes that are not a change this version reads."""
    return _decode(_change_decoder, data, "membership change")


def encode_membership(membership: Membership) -> bytes:
    return _file_encoder.encode(membership)


def decode_membership(data: bytes, *, source: str) -> Membership:
    try:
        return _decode(_file_decoder, data, "membership")
    except MembershipError as exc:
        raise MembershipError(f"{source}: {exc}") from None


def membership_path(data_dir: str) -> str:
    return os.path.join(data_dir, MEMBERSHIP_FILE)


def load(data_dir: str) -> Membership | None:
    """The membership saved in `data_dir` (None when none was: the config's applies)."""
    path = membership_path(data_dir)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return decode_membership(data, source=path)


def save(data_dir: str, membership: Membership) -> None:
    """Write `membership` to `data_dir` atomically and durably (fsync of file and directory)."""
    path = membership_path(data_dir)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(encode_membership(membership))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quorum_problem(voters_after: list[str], reachable: set[str]) -> str:
    """Why a membership whose voters are `voters_after` would have no quorum when only the
    `reachable` ones answer ("" when it would have one)."""
    if not voters_after:
        return "it would leave no voter"
    up = [v for v in voters_after if v in reachable]
    if len(up) * 2 <= len(voters_after):
        return (
            f"it would leave no quorum: {len(up)} of the {len(voters_after)} voters after it are reachable "
            f"({', '.join(sorted(up)) or 'none'}), a majority needs {len(voters_after) // 2 + 1}"
        )
    return ""
