"""``raftseq leader transfer [--to NODE]``: move leadership off a node before maintenance
(``cluster.handover`` does it on the leader)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK, INTERRUPTED, EXIT_INTERRUPTED
from raftseq.cluster.cli.args import add_cluster_options, add_command, command_group, describe_error, positive_seconds

#: The session name of the command's connection (it submits nothing).
ADMIN_SESSION = "admin"


class AdminFailed(Exception):
    """An operator request did not happen; the message says why (one line)."""


async def ask_node(address: str, request: object, answer: type, *, token: str, timeout_s: float, what: str) -> object:
    """Send `request` to the node at `address` and return its `answer` frame; raises
    ``AdminFailed`` (a node that predates `request`, 0.2, answers ``bad_frame``). `what`
    names the node in messages ("the leader")."""
    from raftseq.clients.connection import open_connection
    from raftseq.clients.errors import SequencerError
    from raftseq.sequencer import protocol

    try:
        link = await open_connection(address, session=ADMIN_SESSION, token=token, timeout_s=timeout_s)
    except (OSError, TimeoutError, SequencerError) as exc:
        raise AdminFailed(f"cannot reach {what} {address}: {describe_error(exc)}") from None
    try:
        return await link.request(request, answer, timeout_s)
    except ConnectionError as exc:
        if protocol.RejectReason.BAD_FRAME.value in str(exc):
            raise AdminFailed(f"{what} {address} does not know {type(request).__name__} (a node older than 0.3): {exc}") from None
        raise AdminFailed(f"{what} {address} closed the connection: {exc}") from None
    except TimeoutError:
        raise AdminFailed(f"no answer from {what} {address} within {timeout_s:g} s") from None
    except SequencerError as exc:
        raise AdminFailed(describe_error(exc)) from None
    finally:
        link.close()


async def cluster_status(endpoints: list[str], *, token: str, timeout_s: float) -> list[dict]:
    """Every endpoint's status entry (``cluster.status.node_status``)."""
    from raftseq.cluster.status import node_status

    return list(await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s) for e in endpoints)))


async def transfer_leadership(endpoints: list[str], *, to: str, token: str, timeout_s: float) -> tuple[str, object]:
    """Ask the leader of `endpoints` to hand leadership to `to` ("": its choice). Returns the
    leader's address before and its ``LeaderTransferred`` answer; raises ``AdminFailed``."""
    from raftseq.cluster.status import leader_of
    from raftseq.sequencer import protocol

    leader = leader_of(await cluster_status(endpoints, token=token, timeout_s=timeout_s))
    if leader is None:
        raise AdminFailed(f"no leader among {', '.join(endpoints)}")
    answer = await ask_node(
        leader, protocol.LeaderTransfer(to), protocol.LeaderTransferred, token=token, timeout_s=timeout_s, what="the leader"
    )
    return leader, answer


def run_request(command: str, work: Coroutine) -> tuple[int, object]:
    """Run an operator request: ``(EXIT_OK, its result)``, or ``(exit code, None)`` after
    saying why on stderr in one line."""
    try:
        return EXIT_OK, asyncio.run(work)
    except AdminFailed as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_FAILED, None
    except INTERRUPTED:
        return EXIT_INTERRUPTED, None


def cmd_leader_transfer(args: argparse.Namespace) -> int:
    """Hand leadership to --to NODE (default: the most caught-up follower). The leader holds
    new proposals, waits until the target holds its whole log, and has it stand for election
    at once; submits wait meanwhile (tens of milliseconds). Exit 0 once another node leads, 1
    with the reason when it did not happen (the old leader then leads on)."""
    work = transfer_leadership(args.endpoints, to=args.to, token=args.token, timeout_s=args.timeout)
    code, result = run_request("raftseq leader transfer", work)
    if result is None:
        return code
    before, answer = result
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
