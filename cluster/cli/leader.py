"""``raftseq leader transfer [--to NODE]``: move leadership off a node before maintenance
(``cluster.handover`` does it on the leader)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK, INTERRUPTED, EXIT_INTERRUPTED
from raftseq.cluster.cli.args import add_cluster_options, add_command, command_group, describe_error, positive_seconds

#: The session name of the command's connection (it submits nothing).
ADMIN_SESSION = "admin"


class TransferFailed(Exception):
    """The transfer did not happen; the message says why (one line)."""


async def transfer_leadership(endpoints: list[str], *, to: str, token: str, timeout_s: float) -> tuple[str, object]:
    """Ask the leader of `endpoints` to hand leadership to `to` ("": its choice). Returns the
    leader's address before and its ``LeaderTransferred`` answer; raises ``TransferFailed``."""
    from raftseq.clients.connection import open_connection
    from raftseq.clients.errors import SequencerError
    from raftseq.cluster.status import leader_of, node_status
    from raftseq.sequencer import protocol

    nodes = await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s) for e in endpoints))
    leader = leader_of(list(nodes))
    if leader is None:
        raise TransferFailed(f"no leader among {', '.join(endpoints)}")
    try:
        link = await open_connection(leader, session=ADMIN_SESSION, token=token, timeout_s=timeout_s)
    except (OSError, TimeoutError, SequencerError) as exc:
        raise TransferFailed(f"cannot reach the leader {leader}: {describe_error(exc)}") from None
    try:
        return leader, await link.request(protocol.LeaderTransfer(to), protocol.LeaderTransferred, timeout_s)
    except ConnectionError as exc:
        if protocol.RejectReason.BAD_FRAME.value in str(exc):
            raise TransferFailed(f"the leader {leader} does not know leader transfer (a node older than 0.3): {exc}") from None
        raise TransferFailed(f"the leader {leader} closed the connection: {exc}") from None
    except TimeoutError:
        raise TransferFailed(f"no answer from the leader {leader} within {timeout_s:g} s") from None
    except SequencerError as exc:
        raise TransferFailed(describe_error(exc)) from None
    finally:
        link.close()


def cmd_leader_transfer(args: argparse.Namespace) -> int:
    """Hand leadership to --to NODE (default: the most caught-up follower). The leader holds
    new proposals, waits until the target holds its whole log, and has it stand for election
    at once; submits wait meanwhile (tens of milliseconds). Exit 0 once another node leads, 1
    with the reason when it did not happen (the old leader then leads on)."""
    try:
        before, answer = asyncio.run(transfer_leadership(args.endpoints, to=args.to, token=args.token, timeout_s=args.timeout))
    except TransferFailed as exc:
        print(f"raftseq leader transfer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except INTERRUPTED:
        return EXIT_INTERRUPTED
    if not answer.ok:
        print(f"raftseq leader transfer: not done: {answer.detail}", file=sys.stderr)
        return EXIT_FAILED
    print(f"leader {before} -> {answer.leader} (proposals held {answer.held_ms} ms)")
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    commands = command_group(sub, "leader", help="leadership: transfer", description="Move Raft leadership between nodes.")
    transfer = add_command(commands, "transfer", cmd_leader_transfer, help="hand leadership to another node")
    add_cluster_options(transfer)
    transfer.add_argument("--to", default="", metavar="NODE", help="node id to hand leadership to (default: the most caught-up follower)")
    transfer.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds to wait for the leader's answer (default 10)")
