"""The reference-data admin tool: submits instrument and parameter changes to the stream.

    python -m examples.refdata.admin --endpoints H:P,... --token T add VOD --isin GB00BH4HKS39 --currency GBP --tick 0.0001 --lot 1 --venue XLON
    python -m examples.refdata.admin update VOD --tick 0.0002
    python -m examples.refdata.admin halt VOD --reason "news pending"
    python -m examples.refdata.admin resume VOD
    python -m examples.refdata.admin params VOD --max-qty 100000 --band-bps 500
    python -m examples.refdata.admin activate 2 --at 120000         # behaviour version 2 from seq 120000
    python -m examples.refdata.admin end-of-day 2026-11-26
    python -m examples.refdata.admin load --instruments 2000 --updates 100000 --seed 7

Each command prints the sequence numbers its messages got. Endpoints and token default to
``$RAFTSEQ_ENDPOINTS`` and ``$RAFTSEQ_TOKEN`` (printed by ``raftseq cluster up``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Iterable, Sequence

from raftseq.clients import SequencerClient, SequencerError
from raftseq.clients.sm import SmMessage, activate, encode_message
from examples.refdata.messages import (
    DEFAULT_SYMBOL,
    EndOfDay,
    InstrumentAdded,
    InstrumentAddedV1,
    InstrumentHalted,
    InstrumentResumed,
    InstrumentUpdated,
    TradingParametersSet,
)
from examples.refdata.venues import VenueClosed, VenueOpened

VENUES = ("XLON", "XAMS", "XPAR", "XETR")
E8 = 100_000_000


class Admin:
    """Submits reference-data changes through one client session (exactly once, in order)."""

    def __init__(self, client: SequencerClient) -> None:
        self.client = client

    async def send(self, messages: Iterable[SmMessage | bytes], *, batch: int = 1000) -> list[int]:
        """Submit `messages` (or ready payloads) in order; returns their sequence numbers."""
        payloads = [m if isinstance(m, bytes) else encode_message(m) for m in messages]
        seqs: list[int] = []
        for start in range(0, len(payloads), batch):
            seqs += await self.client.submit_batch(payloads[start : start + batch])
        return seqs

    async def activate(self, version: int, at_seq: int) -> int:
        """ "refdata behaves as `version` from `at_seq` on", sequenced now."""
        return (await self.send([activate("refdata", version, at_seq)]))[0]


def symbol_of(i: int) -> str:
    return f"SYM{i:05d}"


def listing(count: int, rng: random.Random, *, old_writer_share: float = 0.5) -> list[SmMessage]:
    """Instruments (the first part written by an old admin, at version 1), defaults, venues."""
    out: list[SmMessage] = [VenueOpened(v) for v in VENUES]
    for i in range(count):
        symbol = symbol_of(i)
        isin = f"GB{i:010d}"
        tick = rng.choice((1, 5, 10, 50)) * E8 // 10_000
        lot = rng.choice((1, 10, 100))
        if i < count * old_writer_share:
            out.append(InstrumentAddedV1(symbol, isin, "GBP", tick, lot))
        else:
            out.append(InstrumentAdded(symbol, isin, rng.choice(("GBP", "EUR")), tick, lot, rng.choice(VENUES)))
    out.append(TradingParametersSet(DEFAULT_SYMBOL, 1_000_000, 1000, 0))
    return out


def updates(count: int, instruments: int, rng: random.Random) -> list[SmMessage]:
    """A day of changes: mostly attribute updates, some parameters, halts and resumes (some of
    them refused by the state machine: unknown symbols, resuming what is not halted)."""
    out: list[SmMessage] = []
    for _ in range(count):
        i = rng.randrange(instruments + instruments // 50 + 1)  # ~2% unknown symbols
        symbol = symbol_of(i)
        r = rng.random()
        if r < 0.80:
            out.append(InstrumentUpdated(symbol, tick_size_e8=rng.choice((1, 5, 10)) * E8 // 10_000, lot_size=rng.choice((None, 1, 10))))
        elif r < 0.88:
            out.append(TradingParametersSet(symbol, rng.randrange(1, 100) * 1000, rng.choice((200, 500, 1000)), min_notional_e2=100))
        elif r < 0.94:
            out.append(InstrumentHalted(symbol, rng.choice(("news pending", "volatility", "corporate action"))))
        elif r < 0.995:
            out.append(InstrumentResumed(symbol))
        else:
            venue = rng.choice(VENUES)
            out.append(VenueClosed(venue, "outage") if rng.random() < 0.5 else VenueOpened(venue))
    return out


# --- the command ------------------------------------------------------------------------------


def _price_e8(text: str) -> int:
    whole, _, frac = text.partition(".")
    if not (whole or frac) or not (whole or "0").isdigit() or (frac and not frac.isdigit()) or len(frac) > 8:
        raise argparse.ArgumentTypeError(f"expected a decimal with at most 8 places, got {text!r}")
    return int(whole or "0") * E8 + int((frac + "0" * 8)[:8])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.refdata.admin", description="Submit reference-data changes.")
    parser.add_argument("--endpoints", default=os.environ.get("RAFTSEQ_ENDPOINTS", "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"))
    parser.add_argument("--token", default=os.environ.get("RAFTSEQ_TOKEN", ""))
    parser.add_argument("--session", default="refdata-admin", help="client session (default refdata-admin)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = sub.add_parser("add", help="list an instrument")
    add.add_argument("symbol")
    add.add_argument("--isin", required=True)
    add.add_argument("--currency", default="GBP")
    add.add_argument("--tick", type=_price_e8, required=True, help="tick size, e.g. 0.01")
    add.add_argument("--lot", type=int, default=1)
    add.add_argument("--venue", default="XLON")
    update = sub.add_parser("update", help="change an instrument's tick, lot or currency")
    update.add_argument("symbol")
    update.add_argument("--tick", type=_price_e8)
    update.add_argument("--lot", type=int)
    update.add_argument("--currency")
    halt = sub.add_parser("halt", help="halt trading in an instrument")
    halt.add_argument("symbol")
    halt.add_argument("--reason", default="halted by admin")
    resume = sub.add_parser("resume", help="resume trading in an instrument")
    resume.add_argument("symbol")
    params = sub.add_parser("params", help=f"set trading parameters ({DEFAULT_SYMBOL!r}: the defaults)")
    params.add_argument("symbol")
    params.add_argument("--max-qty", type=int, required=True)
    params.add_argument("--band-bps", type=int, required=True)
    params.add_argument("--min-notional", type=_price_e8, default=0)
    act = sub.add_parser("activate", help="switch every copy to a behaviour version at one sequence number")
    act.add_argument("version", type=int)
    act.add_argument("--at", type=int, required=True, metavar="SEQ")
    eod = sub.add_parser("end-of-day", help="close the business day")
    eod.add_argument("date")
    load = sub.add_parser("load", help="list N instruments and submit M random updates (a demo day)")
    load.add_argument("--instruments", type=int, default=1000)
    load.add_argument("--updates", type=int, default=10_000)
    load.add_argument("--seed", type=int, default=1)
    return parser


def messages_for(args: argparse.Namespace) -> Sequence[SmMessage | bytes]:
    c = args.command
    if c == "add":
        return [InstrumentAdded(args.symbol, args.isin, args.currency, args.tick, args.lot, args.venue)]
    if c == "update":
        return [InstrumentUpdated(args.symbol, tick_size_e8=args.tick, lot_size=args.lot, currency=args.currency)]
    if c == "halt":
        return [InstrumentHalted(args.symbol, args.reason)]
    if c == "resume":
        return [InstrumentResumed(args.symbol)]
    if c == "params":
        return [TradingParametersSet(args.symbol, args.max_qty, args.band_bps, args.min_notional // 1_000_000)]
    if c == "activate":
        return [activate("refdata", args.version, args.at)]
    if c == "end-of-day":
        return [EndOfDay(args.date)]
    rng = random.Random(args.seed)
    return listing(args.instruments, rng) + updates(args.updates, args.instruments, rng)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoints = [e for e in args.endpoints.split(",") if e]
    messages = messages_for(args)

    async def run() -> list[int]:
        async with SequencerClient(endpoints, session=args.session, token=args.token) as client:
            return await Admin(client).send(messages)

    try:
        seqs = asyncio.run(run())
    except SequencerError as exc:
        print(f"admin: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if len(seqs) <= 10:
        for seq in seqs:
            print(seq)
    else:
        print(f"{len(seqs)} messages sequenced as {seqs[0]}..{seqs[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
