"""``raftseq top``: a live view of the cluster for a person at a keyboard.

Every interval it takes one sample (``cluster.top.sample``), steps the pure core
(``cluster.top.model``) and shows the view (``cluster.top.render``): a live screen on a
terminal, plain lines when piped. Top keeps running through nodes going down and coming back,
and exits 130 on Ctrl-C (like every command).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable

from raftseq.cluster.cli.args import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_cluster_options,
    add_command,
    add_legacy_endpoints,
    cluster_endpoints,
    cluster_tls,
    non_negative,
    positive_seconds,
)
from raftseq.cluster.top.model import TopState, View, step
from raftseq.cluster.top.render import render_lines, render_table
from raftseq.cluster.top.sample import take_sample

#: Seconds between refreshes, by default.
INTERVAL_S_DEFAULT = 1.0
#: Seconds to wait for one node's status or metrics before showing it as down / without latency.
NODE_TIMEOUT_S_DEFAULT = 0.5


async def _run(args: argparse.Namespace, endpoints: list[str], show: Callable[[View], None]) -> None:
    state = TopState()
    refreshes = 0
    next_at = time.monotonic()
    while True:
        sample = await take_sample(endpoints, token=args.token, timeout_s=args.timeout, tls=cluster_tls(args))
        state, view = step(state, sample)
        show(view)
        refreshes += 1
        if args.iterations and refreshes >= args.iterations:
            return
        # Pace the refreshes; after falling behind (slow nodes), start counting afresh.
        next_at += args.interval
        now = time.monotonic()
        if next_at < now:
            next_at = now
        await asyncio.sleep(next_at - now)


def _wall_time() -> str:
    return time.strftime("%H:%M:%S")


def run_top(args: argparse.Namespace) -> int:
    """Show one row per node, refreshed every --interval seconds: role, term, last sequence number,
    messages/s, lag behind the leader (sequence numbers), acknowledgement latency p50/p99 over the
    last interval (on the leader, from its metrics endpoint), and a marker on the new leader when
    the leader changes. Nodes that cannot be reached show as down until they answer again. On a
    terminal the view is a live screen; when stdout is not a terminal (or with --plain) each refresh
    prints plain lines. Ctrl-C quits (exit code 130)."""
    endpoints = cluster_endpoints(args, "raftseq top")
    plain = args.plain or not sys.stdout.isatty()
    try:
        if plain:

            def show(view: View) -> None:
                print("\n".join(render_lines(view, wall_time=_wall_time())), flush=True)

            asyncio.run(_run(args, endpoints, show))
        else:
            from rich.console import Console
            from rich.live import Live

            with Live(console=Console(), auto_refresh=False, screen=False) as live:

                def show(view: View) -> None:
                    live.update(render_table(view, wall_time=_wall_time()), refresh=True)

                asyncio.run(_run(args, endpoints, show))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our pipe went away (`raftseq top | head`): not an error. Point stdout
        # at /dev/null so that the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Define ``raftseq top`` on the ``raftseq`` command's subparsers."""
    top = add_command(subparsers, "top", run_top, help="live view of every node: role, term, last_seq, messages/s, lag, ack latency")
    add_legacy_endpoints(top)
    add_cluster_options(top)
    top.add_argument(
        "--interval", type=positive_seconds, default=INTERVAL_S_DEFAULT, help=f"seconds between refreshes (default {INTERVAL_S_DEFAULT:g})"
    )
    top.add_argument(
        "--timeout",
        type=positive_seconds,
        default=NODE_TIMEOUT_S_DEFAULT,
        help=f"seconds to wait for each node's status and metrics before showing it as down (default {NODE_TIMEOUT_S_DEFAULT:g})",
    )
    count = top.add_mutually_exclusive_group()
    count.add_argument(
        "--iterations", type=non_negative, default=0, metavar="N", help="stop after N refreshes (default 0: run until Ctrl-C)"
    )
    count.add_argument("--once", dest="iterations", action="store_const", const=1, help="one refresh, then exit (same as --iterations 1)")
    top.add_argument("--plain", action="store_true", help="print plain lines per refresh even on a terminal")
    return top
