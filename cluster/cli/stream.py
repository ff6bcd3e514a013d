"""``raftseq submit`` and ``raftseq tail``: put payloads on the stream, read it back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import msgspec

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, INTERRUPTED
from raftseq.cluster.cli.args import add_cluster_options, cluster_tls, add_command, describe_error, non_negative, positive
from raftseq.cluster.cli.journal import add_payload

_json = msgspec.json.Encoder()


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit each PAYLOAD (or each line of stdin) and print its sequence number."""
    from raftseq.clients import BlockingSequencerClient, SequencerError

    payloads = [p.encode() for p in args.payload] if args.payload else [line.rstrip("\n").encode() for line in sys.stdin]
    try:
        with BlockingSequencerClient(
            args.endpoints, session=args.session, token=args.token, outcome_deadline_s=args.timeout, tls=cluster_tls(args)
        ) as client:
            for payload, seq in zip(payloads, client.submit_many(payloads)):
                print(f"{seq}\t{payload.decode(errors='replace')}")
    except SequencerError as exc:
        print(f"raftseq submit: {describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the stream as JSON lines, from --from N on."""
    from raftseq.clients import SequencerError

    try:
        asyncio.run(_tail(args))
    except SequencerError as exc:
        print(f"raftseq tail: {describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except INTERRUPTED:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


async def _tail(args: argparse.Namespace) -> None:
    """Print the stream from ``--from`` as JSON lines until ``--limit`` messages or
    ``--idle-exit`` seconds without one. On Ctrl-C ``asyncio.run`` cancels this task, which
    closes the subscription before the loop ends (no task is left pending)."""
    from raftseq.clients import subscribe

    printed = 0
    stream = subscribe(args.endpoints, from_seq=args.from_seq, token=args.token, session=args.session, tls=cluster_tls(args))
    async with contextlib.aclosing(stream):
        while not args.limit or printed < args.limit:
            try:
                # asyncio.timeout, not wait_for: no task per message (wait_for made one for each
                # with --idle-exit), and a Ctrl-C that comes with a message is not lost.
                async with asyncio.timeout(args.idle_exit or None):
                    m = await anext(stream)
            except (TimeoutError, StopAsyncIteration):
                return
            row = {"seq": m.seq, "timestamp_ns": m.timestamp_ns, "session": m.session, "client_seq": m.client_seq}
            add_payload(row, m.payload, text=args.text)
            print(_json.encode(row).decode(), flush=True)
            printed += 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``raftseq submit`` and ``raftseq tail``."""
    submit = add_command(sub, "submit", cmd_submit, help="sequence payloads given as arguments (or lines of stdin)")
    submit.add_argument("payload", nargs="*", help="payloads (default: lines of stdin)")
    add_cluster_options(submit)
    submit.add_argument("--session", default=f"cli-{os.getpid()}", help="client session name (default cli-PID)")
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each outcome (default 30)")

    tail = add_command(sub, "tail", cmd_tail, help="print the stream from a sequence number")
    tail.add_argument("--from", dest="from_seq", type=positive, default=1, metavar="N", help="first sequence number (default 1)")
    tail.add_argument("--limit", type=non_negative, default=0, help="stop after K messages (default 0: never)")
    tail.add_argument("--idle-exit", type=float, default=0, help="stop after this many seconds without a message (default: never)")
    tail.add_argument("--text", action="store_true", help="print payloads as UTF-8 text")
    add_cluster_options(tail)
    tail.add_argument("--session", default=f"tail-{os.getpid()}", help="session name used in the hello")
