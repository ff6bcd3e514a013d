"""``raftseq sm``: look at the state machines that applications run on the stream.

* ``raftseq sm check [--from N] [--to M] [--type T]`` reads the stream (any node), collects the
  checkpoints replicas published (``formats.Checkpoint``: state-machine type, sequence number,
  digest, replica) and reports, per type, the first sequence number at which two copies
  disagree and which replicas hold which digest (exit 1), or that every copy agreed (exit 0).
* ``raftseq sm snapshots TYPE`` lists the snapshots of TYPE the cluster holds (any node answers
  from its replicated index).
* ``raftseq sm record --machine MODULE:CLASS --out FILE [--from N] [--to M]`` records a slice of
  the stream with the reference implementation's digest after each message;
  ``raftseq sm verify FILE --machine MODULE:CLASS`` replays it through another implementation
  and reports the first mismatch (exit 1; 2 when the file or the machine is unusable);
  ``raftseq sm show FILE`` checks a recording and prints its header. These run the
  conformance kit (``clients.sm.conformance``) in this process; ``MODULE`` imports from the
  working directory or ``PYTHONPATH``.

The stream is read with the client library (``clients``); the formats and the comparison are
the SDK's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import msgspec

from raftseq.clients import Rejected, subscribe
from raftseq.clients.sm import conformance, formats, query_snapshots
from raftseq.clients.tls import ClientTls, TlsError
from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, INTERRUPTED
from raftseq.cluster.cli.args import (
    add_cluster_options,
    add_command,
    cluster_tls,
    add_output_option,
    command_group,
    describe_error,
    non_negative,
    positive,
)
from raftseq.sequencer import protocol

_json = msgspec.json.Encoder()
#: ``raftseq sm check`` gives up when no message arrives for this many times its --timeout.
STALL_TIMEOUTS_MAX = 3


async def scan_checkpoints(
    endpoints: list[str],
    *,
    token: str,
    from_seq: int = 1,
    to_seq: int = 0,
    types: set[str] | None = None,
    timeout_s: float = 5.0,
    session: str = "sm-check",
    tls: ClientTls = None,
) -> tuple[formats.CheckpointLedger, int, int]:
    """Read the stream ``from_seq..to_seq`` (0: up to the last number a node reports when the
    scan starts) and collect its checkpoints. Returns ``(ledger, first, last)`` read; the
    subscription resumes on another node when one fails. Raises ``ConnectionError`` when no node
    answers (or TLS cannot be agreed: `tls`, ``clients.tls``), or no message arrives for
    ``STALL_TIMEOUTS_MAX`` times `timeout_s`."""
    ledger = formats.CheckpointLedger(seqs_per_type_max=1_000_000)
    mark = formats.CHECKPOINT_MARK
    try:
        end = to_seq or await conformance.last_seq_of(endpoints, token=token, timeout_s=timeout_s, tls=tls)
    except (Rejected, TlsError) as exc:
        raise ConnectionError(f"status request refused: {describe_error(exc)}") from None
    if from_seq > end:
        return ledger, from_seq, end
    expected = from_seq
    stream = subscribe(
        endpoints, from_seq=from_seq, token=token, session=session, connect_timeout_s=timeout_s, heartbeat_timeout_s=timeout_s, tls=tls
    )
    try:
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per message, and a cancel (Ctrl-C) that
                # comes with a message is not lost (Python 3.11's wait_for returns the message).
                async with asyncio.timeout(STALL_TIMEOUTS_MAX * timeout_s):
                    message = await anext(stream)
            except TimeoutError:
                raise ConnectionError(
                    f"stream read stalled at seq {expected}: no message for {STALL_TIMEOUTS_MAX * timeout_s:g} s"
                ) from None
            except (Rejected, TlsError) as exc:
                raise ConnectionError(f"stream read refused: {describe_error(exc)}") from None
            payload = message.payload
            if payload[: len(mark)] == mark:
                try:
                    checkpoint = formats.decode_checkpoint(formats.decode_sm_envelope(payload))
                except protocol.SmFormatError:
                    checkpoint = None
                if checkpoint is not None and checkpoint.seq < message.seq and (not types or checkpoint.sm_type in types):
                    ledger.add(checkpoint.sm_type, checkpoint.seq, checkpoint.replica, checkpoint.digest)
            if message.seq >= end:
                return ledger, from_seq, end
            expected = message.seq + 1
    finally:
        await stream.aclose()


async def list_snapshots(
    endpoints: list[str], sm_type: str, *, token: str, timeout_s: float = 5.0, tls: ClientTls = None
) -> protocol.SnapshotList:
    """The snapshots of `sm_type` in the cluster's replicated index, newest first, and the last
    sequence number of a node that answers. Raises ``ConnectionError`` when none does."""
    try:
        last_seq = await conformance.last_seq_of(endpoints, token=token, timeout_s=timeout_s, tls=tls)
        snapshots = await query_snapshots(
            endpoints, sm_type, token=token, session="sm-snapshots", timeout_s=timeout_s, prefer=endpoints[0], tls=tls
        )
    except (Rejected, TlsError) as exc:
        raise ConnectionError(describe_error(exc)) from None
    return protocol.SnapshotList(sm_type=sm_type, snapshots=snapshots, last_seq=last_seq)


# --- the commands -----------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Read the stream and compare the checkpoints (state-machine type, sequence number, digest) that
    replicas published. Exit 0 when every copy agreed; 1 with the first sequence number at which two
    copies disagree and which replicas hold which digest, or when the cluster cannot be read."""
    started = time.monotonic()
    try:
        ledger, first, last = asyncio.run(
            scan_checkpoints(
                args.endpoints, token=args.token, from_seq=args.from_seq, to_seq=args.to_seq,
                types=set(args.type or ()), timeout_s=args.timeout, tls=cluster_tls(args),
            )
        )  # fmt: skip
    except ConnectionError as exc:
        print(f"raftseq sm check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    divergences = ledger.divergences()
    first_by_type: dict[str, formats.Divergence] = {}
    for d in divergences:
        first_by_type.setdefault(d.sm_type, d)
    summary = ledger.summary()
    if args.output == "json":
        report = {
            "from_seq": first,
            "to_seq": last,
            "checkpoints": ledger.checkpoints_seen,
            "types": summary,
            "divergences": [msgspec.structs.asdict(d) for d in first_by_type.values()],
            "ok": not divergences,
        }
        print(_json.encode(report).decode())
    else:
        print(f"read seq {first}..{last} in {time.monotonic() - started:.1f} s: {ledger.checkpoints_seen} checkpoints")
        for sm_type, info in summary.items():
            state = f"DIVERGED at seq {first_by_type[sm_type].seq}" if sm_type in first_by_type else "agree"
            print(
                f"  {sm_type}: {info['checkpoints']} checkpoint numbers from {', '.join(info['replicas'])}; "
                f"last agreement at seq {info['last_agreed_seq']}; {state}"
            )
        for d in first_by_type.values():
            print(f"DIVERGENCE: {d.describe()}")
            for digest, replicas in d.groups():
                print(f"  {digest}  {', '.join(replicas)}")
        if not summary:
            print("  no checkpoints in that range (replicas publish them with checkpoint_every)")
    return 1 if divergences else 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    """Ask a node for the snapshots of TYPE in the cluster's replicated index (newest first)."""
    try:
        answer = asyncio.run(list_snapshots(args.endpoints, args.sm_type, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args)))
    except ConnectionError as exc:
        print(f"raftseq sm snapshots: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.output == "json":
        print(_json.encode({"sm_type": answer.sm_type, "last_seq": answer.last_seq, "snapshots": answer.snapshots}).decode())
        return EXIT_OK
    print(f"{answer.sm_type}: {len(answer.snapshots)} snapshots (node at seq {answer.last_seq})")
    for info in answer.snapshots:
        print(
            f"  covers {info.covered_seq}  schema v{info.schema_version}  {info.total_bytes} bytes in {info.chunk_count} chunks "
            f"at seq {info.first_seq}..{info.last_seq}  by {info.session}  digest {info.digest[:16]}"
        )
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Apply the slice --from..--to of the stream to the reference state machine MODULE:CLASS and write
    each message with the digest of the state after it (a conformance recording). A slice from N > 1
    starts from the state after N-1 (the newest cluster snapshot at or before it plus a replay, else
    a replay from 1), which the file carries. Exit 0 when written, 1 when the reference stops on the
    stream, the stream stops or the cluster cannot be used, 2 when the machine cannot be loaded or the
    file cannot be written."""
    return conformance.run_record(
        args.endpoints, args.machine, args.out, prog="raftseq sm", token=args.token, from_seq=args.from_seq, to_seq=args.to_seq,
        all_messages=args.all_messages, use_snapshots=not args.no_snapshot, idle_timeout_s=args.idle_timeout, progress=not args.quiet,
        tls=cluster_tls(args),
    )  # fmt: skip


def cmd_verify(args: argparse.Namespace) -> int:
    """Replay the recording FILE through the state machine MODULE:CLASS and compare its digest with the
    recorded one after every message. Exit 0 when all match; 1 with the first mismatch (sequence
    number, expected and actual digest, the message's type and version) or the message the
    implementation cannot read; 2 when the file is unreadable or the machine cannot be loaded."""
    return conformance.run_verify(args.file, args.machine, prog="raftseq sm", json_report=args.output == "json", progress=not args.quiet)


def cmd_show(args: argparse.Namespace) -> int:
    """Check the recording FILE end to end and print its header and counts as one JSON object (exit 2 when
    damaged)."""
    return conformance.run_show(args.file, prog="raftseq sm")


def _conformance_command(command):
    """``record``, ``verify`` and ``show`` as commands: ``MODULE`` of ``--machine MODULE:CLASS``
    imports from the working directory (as under ``python -m``; the ``raftseq`` script does not
    put it on ``sys.path``; last, so that nothing there shadows what is installed), and Ctrl-C
    says so and exits 130."""

    def run(args: argparse.Namespace) -> int:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            return command(args)
        except INTERRUPTED:
            print(f"raftseq sm {args.sm_command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``raftseq sm check|snapshots|record|verify|show``."""
    ssub = command_group(
        subparsers,
        "sm",
        help="state machines on the stream: compare checkpoints, list snapshots, record and verify conformance",
        description="Look at the state machines applications run on the stream (clients.sm).",
    )

    check = add_command(ssub, "check", cmd_check, help="compare the checkpoints replicas published; report the first disagreement")
    check.add_argument(
        "--from", dest="from_seq", type=non_negative, default=1, metavar="N", help="first sequence number to read (default 1)"
    )
    check.add_argument(
        "--to", dest="to_seq", type=non_negative, default=0, metavar="M", help="last one (default 0: the last a node has now)"
    )
    check.add_argument("--type", action="append", metavar="T", help="only state machines of type T (repeatable)")
    add_output_option(check)
    _add_node_options(check)

    snaps = add_command(ssub, "snapshots", cmd_snapshots, help="list the snapshots of a state-machine type the cluster holds")
    snaps.add_argument("sm_type", metavar="TYPE", help="state-machine type")
    add_output_option(snaps)
    _add_node_options(snaps)

    rec = add_command(
        ssub,
        "record",
        _conformance_command(cmd_record),
        help="record a slice of the stream with the reference state machine's digest after each message",
    )
    rec.add_argument(
        "--machine", required=True, metavar="MODULE:CLASS", help="the reference implementation, e.g. examples.refdata.machine:ReferenceData"
    )
    rec.add_argument("--out", required=True, metavar="FILE", help="the recording to write")
    rec.add_argument(
        "--from", dest="from_seq", type=positive, default=1, metavar="N", help="first sequence number of the slice (default 1)"
    )
    rec.add_argument("--to", dest="to_seq", type=non_negative, default=0, metavar="M", help="last one (default 0: the last a node has now)")
    rec.add_argument(
        "--all-messages", action="store_true", help="keep every message of the slice, not only those that can change the machine"
    )
    rec.add_argument(
        "--no-snapshot", action="store_true", help="with --from N > 1: replay from 1 instead of starting from a cluster snapshot"
    )
    rec.add_argument(
        "--idle-timeout", type=float, default=conformance.IDLE_TIMEOUT_S, metavar="S",
        help=f"give up after S seconds without a message (default {conformance.IDLE_TIMEOUT_S:g})",
    )  # fmt: skip
    rec.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_cluster_options(rec)

    ver = add_command(
        ssub,
        "verify",
        _conformance_command(cmd_verify),
        help="replay a conformance recording through an implementation; report the first digest mismatch",
    )
    ver.add_argument("file", metavar="FILE", help="a recording made by raftseq sm record")
    ver.add_argument("--machine", required=True, metavar="MODULE:CLASS", help="the implementation under test")
    add_output_option(ver)
    ver.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    show = add_command(ssub, "show", _conformance_command(cmd_show), help="check a conformance recording and print its header")
    show.add_argument("file", metavar="FILE", help="a recording made by raftseq sm record")


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    """``--endpoints``, ``--token``, the TLS options and ``--timeout`` of ``check`` and ``snapshots``."""
    add_cluster_options(parser)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a node (default 5)")
