"""``raftseq leader transfer [--to NODE]``: move leadership off a node before maintenance
(``cluster.handover`` does it on the leader)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK, INTERRUPTED, EXIT_INTERRUPTED
from raftseq.cluster.cli.args import add_cluster_options, cluster_tls, add_command, command_group, positive_seconds
from raftseq.cluster.maintenance import AdminFailed, transfer_leadership


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
    work = transfer_leadership(args.endpoints, to=args.to, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args))
    code, result = run_request("raftseq leader transfer", work)
    if result is None:
        return code
    before, answer = result
    if not answer.ok:
        print(f"raftseq leader transfer: not done: {answer.detail}", file=sys.stderr)
        return EXIT_FAILED
    print(f"leader {before} -> {answer.leader} (proposals held {answer.held_ms} ms){'; ' + answer.detail if answer.detail else ''}")
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    commands = command_group(sub, "leader", help="leadership: transfer", description="Move Raft leadership between nodes.")
    transfer = add_command(commands, "transfer", cmd_leader_transfer, help="hand leadership to another node")
    add_cluster_options(transfer)
    transfer.add_argument("--to", default="", metavar="NODE", help="node id to hand leadership to (default: the most caught-up follower)")
    transfer.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds to wait for the leader's answer (default 10)")
