"""``raftseq sm``: look at the state machines that applications run on the stream.

* ``raftseq sm check [--from N] [--to M] [--type T]`` reads the stream (any node), collects the
  checkpoints replicas published (``protocol.Checkpoint``: state-machine type, sequence number,
  digest, replica) and reports, per type, the first sequence number at which two copies
  disagree and which replicas hold which digest (exit 1), or that every copy agreed (exit 0).
* ``raftseq sm snapshots TYPE`` lists the snapshots of TYPE the cluster holds (any node answers
  from its replicated index).
* ``raftseq sm record --machine MODULE:CLASS --out FILE [--from N] [--to M]`` records a slice of
  the stream with the reference implementation's digest after each message;
  ``raftseq sm verify FILE --machine MODULE:CLASS`` replays it through another implementation
  and reports the first mismatch (exit 1; 2 when the file or the machine is unusable);
  ``raftseq sm show FILE`` checks a recording and prints its header. These need the
  state-machine SDK and the user's state machine, so they run ``clients.sm.conformance`` as a
  child process (same interpreter, same working directory, so ``MODULE`` imports as it would
  there) and exit with its status.

This module speaks the client protocol itself (``cluster`` does not import ``clients``); the
formats and the comparison are ``sequencer.protocol``'s, shared with the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import time

import msgspec

from raftseq.sequencer import protocol

DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
_json = msgspec.json.Encoder()


class _Link:
    """A connection to one node after the hello."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framer: protocol.FrameReader) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = framer
        self.frames: collections.deque = collections.deque()

    async def next_frame(self, timeout_s: float) -> object:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(262144), timeout_s)
            if not data:
                raise ConnectionError("closed by node")
            self.frames.extend(self.framer.feed(data))
        frame = self.frames.popleft()
        if isinstance(frame, protocol.FrameError):
            raise ConnectionError(frame.detail)
        if isinstance(frame, protocol.Rejected):
            raise ConnectionError(f"{frame.reason.value}: {frame.detail}")
        return frame

    def close(self) -> None:
        self.writer.close()


async def _connect(address: str, *, token: str, session: str, timeout_s: float) -> _Link:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    link = _Link(reader, writer, protocol.FrameReader("node"))
    try:
        writer.write(protocol.encode_frame(protocol.Hello(session, token, protocol.PROTOCOL_VERSION)))
        while True:
            frame = await link.next_frame(timeout_s)
            if isinstance(frame, protocol.Welcome):
                return link
    except BaseException:
        writer.close()
        raise


async def scan_checkpoints(
    endpoints: list[str],
    *,
    token: str,
    from_seq: int = 1,
    to_seq: int = 0,
    types: set[str] | None = None,
    timeout_s: float = 5.0,
    session: str = "sm-check",
) -> tuple[protocol.CheckpointLedger, int, int]:
    """Read the stream ``from_seq..to_seq`` (0: up to the last number a node reports when the
    scan starts) and collect its checkpoints. Returns ``(ledger, first, last)`` read; resumes
    on another node when one fails."""
    ledger = protocol.CheckpointLedger(seqs_per_type_max=1_000_000)
    mark = protocol.CHECKPOINT_MARK
    expected = from_seq
    end = to_seq
    failures = 0
    index = 0
    while True:
        address = endpoints[index % len(endpoints)]
        index += 1
        try:
            link = await _connect(address, token=token, session=session, timeout_s=timeout_s)
        except (OSError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > 3 * len(endpoints):
                raise ConnectionError(f"no node answered ({address}: {exc})") from None
            await asyncio.sleep(0.1)
            continue
        try:
            if not end:
                link.writer.write(protocol.encode_frame(protocol.StatusRequest()))
                while True:
                    frame = await link.next_frame(timeout_s)
                    if isinstance(frame, protocol.Status):
                        end = frame.last_seq
                        break
            if expected > end:
                return ledger, from_seq, end
            link.writer.write(protocol.encode_frame(protocol.Subscribe(expected)))
            while True:
                frame = await link.next_frame(timeout_s)
                if type(frame) is not protocol.Delivered:
                    continue
                if frame.seq != expected:
                    raise ConnectionError(f"node sent seq {frame.seq}, expected {expected}")
                payload = frame.payload
                if payload[: len(mark)] == mark:
                    try:
                        checkpoint = protocol.decode_checkpoint(protocol.decode_sm_envelope(payload))
                    except protocol.SmFormatError:
                        checkpoint = None
                    if checkpoint is not None and checkpoint.seq < frame.seq and (not types or checkpoint.sm_type in types):
                        ledger.add(checkpoint.sm_type, checkpoint.seq, checkpoint.replica, checkpoint.digest)
                expected += 1
                if expected > end:
                    return ledger, from_seq, end
        except (OSError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > 3 * len(endpoints):
                raise ConnectionError(f"stream read failed at seq {expected}: {exc}") from None
        finally:
            link.close()


async def list_snapshots(endpoints: list[str], sm_type: str, *, token: str, timeout_s: float = 5.0) -> protocol.SnapshotList:
    problems = []
    for address in endpoints:
        try:
            link = await _connect(address, token=token, session="sm-snapshots", timeout_s=timeout_s)
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc}")
            continue
        try:
            link.writer.write(protocol.encode_frame(protocol.SnapshotQuery(sm_type)))
            while True:
                frame = await link.next_frame(timeout_s)
                if isinstance(frame, protocol.SnapshotList):
                    return frame
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc}")
        finally:
            link.close()
    raise ConnectionError("; ".join(problems))


# --- the commands -----------------------------------------------------------------------------


def _endpoints(text: str) -> list[str]:
    found = [v.strip() for v in text.split(",") if v.strip()]
    for endpoint in found:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"raftseq sm: endpoint {endpoint!r} is not HOST:PORT")
    return found


def cmd_check(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        ledger, first, last = asyncio.run(
            scan_checkpoints(
                _endpoints(args.endpoints), token=args.token, from_seq=args.from_seq, to_seq=args.to_seq,
                types=set(args.type or ()), timeout_s=args.timeout,
            )
        )  # fmt: skip
    except ConnectionError as exc:
        print(f"raftseq sm check: {exc}", file=sys.stderr)
        return 2
    divergences = ledger.divergences()
    first_by_type: dict[str, protocol.Divergence] = {}
    for d in divergences:
        first_by_type.setdefault(d.sm_type, d)
    summary = ledger.summary()
    if args.json:
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
    try:
        answer = asyncio.run(list_snapshots(_endpoints(args.endpoints), args.sm_type, token=args.token, timeout_s=args.timeout))
    except ConnectionError as exc:
        print(f"raftseq sm snapshots: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(_json.encode({"sm_type": answer.sm_type, "last_seq": answer.last_seq, "snapshots": answer.snapshots}).decode())
        return 0
    print(f"{answer.sm_type}: {len(answer.snapshots)} snapshots (node at seq {answer.last_seq})")
    for info in answer.snapshots:
        print(
            f"  covers {info.covered_seq}  schema v{info.schema_version}  {info.total_bytes} bytes in {info.chunk_count} chunks "
            f"at seq {info.first_seq}..{info.last_seq}  by {info.session}  digest {info.digest[:16]}"
        )
    return 0


#: The module that records and verifies (``clients`` is installed with ``cluster``).
CONFORMANCE_MODULE = "raftseq.clients.sm.conformance"


def conformance_argv(args: argparse.Namespace) -> list[str]:
    """The child's arguments for ``raftseq sm record|verify|show`` (the same options)."""
    command = args.sm_command
    if command == "record":
        argv = ["record", "--machine", args.machine, "--out", args.out, "--from", str(args.from_seq), "--to", str(args.to_seq)]
        argv += ["--idle-timeout", str(args.idle_timeout), "--endpoints", args.endpoints, "--token", args.token]
        argv += [flag for flag, on in (("--all-messages", args.all_messages), ("--no-snapshot", args.no_snapshot), ("--quiet", args.quiet)) if on]
        return argv
    if command == "verify":
        return ["verify", args.file, "--machine", args.machine] + [f for f, on in (("--json", args.json), ("--quiet", args.quiet)) if on]
    return ["show", args.file]


def cmd_conformance(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", CONFORMANCE_MODULE, *conformance_argv(args)]
    try:
        child = subprocess.Popen(command, env=dict(os.environ, RAFTSEQ_CONFORMANCE_PROG="raftseq sm"))
    except OSError as exc:
        print(f"raftseq sm {args.sm_command}: cannot start {CONFORMANCE_MODULE}: {exc}", file=sys.stderr)
        return 2
    try:
        return child.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same process group): let it clean up and report.
        try:
            return child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return 130


def add_parser(subparsers) -> None:
    """``raftseq sm check|snapshots|record|verify|show``."""
    token_default = os.environ.get("RAFTSEQ_TOKEN", "")
    endpoints_default = os.environ.get("RAFTSEQ_ENDPOINTS", DEFAULT_ENDPOINTS)
    sm = subparsers.add_parser(
        "sm",
        help="state machines on the stream: compare checkpoints, list snapshots, record and verify conformance",
        description="Look at the state machines applications run on the stream (clients.sm).",
    )
    ssub = sm.add_subparsers(dest="sm_command", metavar="SUBCOMMAND")
    ssub.required = True

    def positive(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
        return value

    def at_least_one(text: str) -> int:
        value = positive(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
        return value

    check = ssub.add_parser(
        "check",
        help="compare the checkpoints replicas published; report the first disagreement",
        description="Read the stream and compare the checkpoints (state-machine type, sequence number, digest) that "
        "replicas published. Exit 0 when every copy agreed, 1 with the first sequence number at which two copies "
        "disagree and which replicas hold which digest, 2 when the cluster cannot be read.",
    )
    check.add_argument("--from", dest="from_seq", type=positive, default=1, metavar="N", help="first sequence number to read (default 1)")
    check.add_argument("--to", dest="to_seq", type=positive, default=0, metavar="M", help="last one (default 0: the last a node has now)")
    check.add_argument("--type", action="append", metavar="T", help="only state machines of type T (repeatable)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)")
    check.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a node (default 5)")
    check.set_defaults(func=cmd_check)

    snaps = ssub.add_parser(
        "snapshots",
        help="list the snapshots of a state-machine type the cluster holds",
        description="Ask a node for the snapshots of TYPE in the cluster's replicated index (newest first).",
    )
    snaps.add_argument("sm_type", metavar="TYPE", help="state-machine type")
    snaps.add_argument("--json", action="store_true", help="print one JSON object")
    snaps.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)")
    snaps.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    snaps.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a node (default 5)")
    snaps.set_defaults(func=cmd_snapshots)

    # The options of clients.sm.conformance (cluster does not import clients): keep in step
    # (tests/test_sm_conformance.py compares them).
    rec = ssub.add_parser(
        "record",
        help="record a slice of the stream with the reference state machine's digest after each message",
        description="Apply the slice --from..--to of the stream to the reference state machine MODULE:CLASS and write "
        "each message with the digest of the state after it (a conformance recording). A slice from N > 1 starts "
        "from the state after N-1 (the newest cluster snapshot at or before it plus a replay, else a replay from 1), "
        "which the file carries. Exit 0 when written, 1 when the reference stops on the stream or the stream stops, "
        "2 when the cluster or the machine cannot be used. Runs python -m clients.sm.conformance.",
    )
    rec.add_argument("--machine", required=True, metavar="MODULE:CLASS", help="the reference implementation, e.g. examples.refdata.machine:ReferenceData")
    rec.add_argument("--out", required=True, metavar="FILE", help="the recording to write")
    rec.add_argument("--from", dest="from_seq", type=at_least_one, default=1, metavar="N", help="first sequence number of the slice (default 1)")
    rec.add_argument("--to", dest="to_seq", type=positive, default=0, metavar="M", help="last one (default 0: the last a node has now)")
    rec.add_argument("--all-messages", action="store_true", help="keep every message of the slice, not only those that can change the machine")
    rec.add_argument("--no-snapshot", action="store_true", help="with --from N > 1: replay from 1 instead of starting from a cluster snapshot")
    rec.add_argument("--idle-timeout", type=float, default=30.0, metavar="S", help="give up after S seconds without a message (default 30)")
    rec.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    rec.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)")
    rec.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    rec.set_defaults(func=cmd_conformance)

    ver = ssub.add_parser(
        "verify",
        help="replay a conformance recording through an implementation; report the first digest mismatch",
        description="Replay the recording FILE through the state machine MODULE:CLASS and compare its digest with the "
        "recorded one after every message. Exit 0 when all match; 1 with the first mismatch (sequence number, "
        "expected and actual digest, the message's type and version) or the message the implementation cannot "
        "read; 2 when the file is unreadable or the machine cannot be loaded. Runs python -m clients.sm.conformance.",
    )
    ver.add_argument("file", metavar="FILE", help="a recording made by raftseq sm record")
    ver.add_argument("--machine", required=True, metavar="MODULE:CLASS", help="the implementation under test")
    ver.add_argument("--json", action="store_true", help="print one JSON object")
    ver.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ver.set_defaults(func=cmd_conformance)

    show = ssub.add_parser(
        "show",
        help="check a conformance recording and print its header",
        description="Check the recording FILE end to end and print its header and counts as one JSON object (exit 2 when damaged).",
    )
    show.add_argument("file", metavar="FILE", help="a recording made by raftseq sm record")
    show.set_defaults(func=cmd_conformance)


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.sm_cli check ...``: the same commands without the ``raftseq`` wrapper."""
    parser = argparse.ArgumentParser(prog="raftseq")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(["sm", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
