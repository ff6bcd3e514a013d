"""``raftseq member list|add|remove|replace``: the cluster's membership (``cluster.membership``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import msgspec

from raftseq.cluster.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    add_cluster_options,
    cluster_tls,
    add_command,
    add_output_option,
    command_group,
    positive_seconds,
)

_json = msgspec.json.Encoder()


def _print(reply, output: str) -> None:
    if output == "json":
        print(_json.encode({"number": reply.number, "members": reply.members, "removed": reply.removed, "leader": reply.leader}).decode())
        return
    print(f"{'id':<8}{'role':<10}{'raft':<24}{'client':<24}public key")
    for m in reply.members:
        print(
            f"{m.id:<8}{'learner' if m.learner else 'voter':<10}{m.raft_address:<24}{m.client_address:<24}{m.raft_public_key[:16] or '-'}"
        )
    print(f"membership {reply.number}; removed: {', '.join(reply.removed) or 'none'}; leader: {reply.leader or 'none'}")


def _run(args: argparse.Namespace, work) -> int:
    from raftseq.cluster.membership_client import MemberCommandError
    from raftseq.clients.connection import Rejected
    from raftseq.clients.tls import TlsError

    try:
        reply = asyncio.run(work())
    except (MemberCommandError, Rejected, _Refused, TlsError) as exc:
        print(f"raftseq member {args.member_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print(reply, args.output)
    return EXIT_OK


class _Refused(Exception):
    """A command refused before it asks the cluster (one line)."""


def _new_member(args: argparse.Namespace):
    from raftseq.sequencer import protocol

    if args.local:
        _write_local_config(args)
    elif not (args.raft and args.client):
        raise _Refused("--raft and --client are needed (or --local DIR for a node of a local cluster)")
    return protocol.MemberRequest("add", args.node_id, args.raft, args.client, args.public_key)


def _write_local_config(args: argparse.Namespace) -> None:
    """``--local DIR``: the new node's config in the data directory of a running ``raftseq
    cluster up`` (which starts it within a moment), its addresses and key into `args`."""
    import os

    from raftseq.cluster.config import ConfigError
    from raftseq.cluster.data_dir import CLUSTER_LOCK_NAME, lock_data_dir
    from raftseq.cluster.local import joining_config, local_node_configs
    from raftseq.cluster.node_exit import NodeCannotRun

    directory = os.path.abspath(args.local)
    if not os.path.isdir(directory):
        raise _Refused(f"--local {args.local}: no such directory")
    try:
        lock_data_dir(directory, CLUSTER_LOCK_NAME).release()
    except NodeCannotRun:
        pass  # held: a cluster up runs there, as it must
    else:
        raise _Refused(f"no raftseq cluster up runs on {directory}; start it first (it starts the new node)")
    try:
        members = local_node_configs(directory, insecure=False)
        if not members:
            raise _Refused(f"{directory} holds no node configs")
        config = joining_config(directory, args.node_id, members, insecure=members[0].insecure or not members[0].raft_password)
    except (ConfigError, ValueError) as exc:
        raise _Refused(str(exc)) from None
    args.raft, args.client, args.public_key = config.raft_address, config.client_address, config.raft_public_key
    print(f"{args.node_id}: config {os.path.join(directory, args.node_id + '.toml')} written; cluster up starts it", flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the members (voters and learners) and the removed ids, as the cluster holds them."""
    from raftseq.cluster.membership_client import list_members

    return _run(args, lambda: list_members(args.endpoints, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args)))


def cmd_add(args: argparse.Namespace) -> int:
    """Add a new node (started with join = true): it joins as a learner, catches up without a
    vote, and the leader makes it a voter once it holds every committed entry. Returns then."""
    from raftseq.cluster.membership_client import change

    return _run(args, lambda: change(args.endpoints, _new_member(args), token=args.token, timeout_s=args.timeout, tls=cluster_tls(args)))


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove a member (a leader hands leadership over first). Refused when the voters left
    would lack a quorum of reachable nodes; a removed node is refused if it comes back."""
    from raftseq.cluster.membership_client import change
    from raftseq.sequencer import protocol

    request = protocol.MemberRequest("remove", args.node_id)
    return _run(args, lambda: change(args.endpoints, request, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args)))


def cmd_replace(args: argparse.Namespace) -> int:
    """Replace a member by a new node: add the new one (learner, then voter once caught up),
    then remove the old one."""
    from raftseq.cluster.membership_client import replace

    args.node_id = args.new_id
    return _run(
        args,
        lambda: replace(args.endpoints, args.old_id, _new_member(args), token=args.token, timeout_s=args.timeout, tls=cluster_tls(args)),
    )


def _common(parser: argparse.ArgumentParser) -> None:
    add_cluster_options(parser)
    add_output_option(parser)
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds to wait for the change (default 60)")


def _new_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raft", default="", metavar="HOST:PORT", help="the new node's raft_address")
    parser.add_argument("--client", default="", metavar="HOST:PORT", help="the new node's client_address")
    parser.add_argument("--public-key", default="", metavar="HEX", help="the new node's raft_public_key (when the cluster has node keys)")
    parser.add_argument(
        "--local",
        metavar="DIR",
        help="a node of the local cluster that raftseq cluster up runs on DIR: write its config there (free ports, its own key); cluster up starts it",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    commands = command_group(sub, "member", help="list or change the cluster's members", description="The cluster's membership.")
    listing = add_command(commands, "list", cmd_list, help="print the members")
    _common(listing)
    add = add_command(commands, "add", cmd_add, help="add a new node (learner first, voter once caught up)")
    add.add_argument("node_id", metavar="NODE")
    _new_node_options(add)
    _common(add)
    remove = add_command(commands, "remove", cmd_remove, help="remove a member")
    remove.add_argument("node_id", metavar="NODE")
    _common(remove)
    replace = add_command(commands, "replace", cmd_replace, help="replace a member by a new node")
    replace.add_argument("old_id", metavar="OLD")
    replace.add_argument("--with", dest="new_id", required=True, metavar="NEW", help="the new node's id")
    _new_node_options(replace)
    _common(replace)
