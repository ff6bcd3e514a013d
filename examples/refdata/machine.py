"""The reference-data state machine every trading process keeps its own copy of.

Behaviour versions: in version 1 an update to a halted instrument applies; from version 2 on
(switched on for all copies at one sequence number by ``activate("refdata", 2, S)``) it is
refused and counted, so that a halted instrument cannot be changed under traders' feet.
"""

from __future__ import annotations

import hashlib

import msgspec

from raftseq.clients.sm import StateMachine
from examples.refdata.messages import (
    DEFAULT_SYMBOL,
    TYPES,
    EndOfDay,
    InstrumentAdded,
    InstrumentHalted,
    InstrumentResumed,
    InstrumentUpdated,
    TradingParametersSet,
)


class Instrument(msgspec.Struct, array_like=True):
    symbol: str
    isin: str
    currency: str
    tick_size_e8: int
    lot_size: int
    venue: str
    halted: bool = False
    halt_reason: str = ""
    #: Sequence number of the last message that changed it.
    changed_seq: int = 0


class Parameters(msgspec.Struct, frozen=True, array_like=True):
    symbol: str
    max_order_qty: int
    price_band_bps: int
    min_notional_e2: int


class Refusal(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    reason: str


class State(msgspec.Struct, array_like=True):
    """The snapshot: everything, in a canonical order (sorted by symbol)."""

    instruments: list[Instrument]
    parameters: list[Parameters]
    refusals: int
    last_refusal: Refusal | None
    messages: int
    end_of_day: str
    end_of_day_seq: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(State)


class ReferenceData(StateMachine):
    TYPE = "refdata"
    MESSAGES = TYPES
    SNAPSHOT_VERSION = 1
    BEHAVIOUR_VERSIONS = (1, 2)

    def __init__(self) -> None:
        self.instruments: dict[str, Instrument] = {}
        self.parameters: dict[str, Parameters] = {}
        self.refusals = 0
        self.last_refusal: Refusal | None = None
        self.messages = 0
        self.end_of_day = ""
        self.end_of_day_seq = 0
        self._handlers = {
            InstrumentAdded: self._added,
            InstrumentUpdated: self._updated,
            InstrumentHalted: self._halted,
            InstrumentResumed: self._resumed,
            TradingParametersSet: self._parameters,
            EndOfDay: self._end_of_day,
        }

    # --- queries the trading processes use --------------------------------------------------

    def parameters_for(self, symbol: str) -> Parameters | None:
        return self.parameters.get(symbol) or self.parameters.get(DEFAULT_SYMBOL)

    def tradable(self, symbol: str) -> bool:
        instrument = self.instruments.get(symbol)
        return instrument is not None and not instrument.halted

    def check_order(self, symbol: str, qty: int, price_e8: int) -> str:
        """ "ok" or why an order for `qty` at `price_e8` must be refused."""
        instrument = self.instruments.get(symbol)
        if instrument is None:
            return "unknown instrument"
        if instrument.halted:
            return f"halted: {instrument.halt_reason}"
        if qty <= 0 or qty % instrument.lot_size:
            return f"quantity must be a positive multiple of {instrument.lot_size}"
        if price_e8 % instrument.tick_size_e8:
            return f"price must be a multiple of the tick {instrument.tick_size_e8}e-8"
        params = self.parameters_for(symbol)
        if params is not None and qty > params.max_order_qty:
            return f"quantity above {params.max_order_qty}"
        return "ok"

    # --- the transition ---------------------------------------------------------------------

    def apply(self, message, seq: int, log_time_ns: int) -> None:
        self.messages += 1
        self._handlers[type(message)](message, seq)

    def _refuse(self, seq: int, reason: str) -> None:
        self.refusals += 1
        self.last_refusal = Refusal(seq, reason)

    def _added(self, m: InstrumentAdded, seq: int) -> None:
        if m.symbol in self.instruments:
            self._refuse(seq, f"{m.symbol} already listed")
            return
        if m.tick_size_e8 <= 0 or m.lot_size <= 0:
            self._refuse(seq, f"{m.symbol}: tick and lot must be positive")
            return
        self.instruments[m.symbol] = Instrument(m.symbol, m.isin, m.currency, m.tick_size_e8, m.lot_size, m.venue, changed_seq=seq)

    def _updated(self, m: InstrumentUpdated, seq: int) -> None:
        instrument = self.instruments.get(m.symbol)
        if instrument is None:
            self._refuse(seq, f"{m.symbol} not listed")
            return
        if instrument.halted and self.active_version >= 2:
            self._refuse(seq, f"{m.symbol} is halted")
            return
        if m.tick_size_e8 is not None and m.tick_size_e8 > 0:
            instrument.tick_size_e8 = m.tick_size_e8
        if m.lot_size is not None and m.lot_size > 0:
            instrument.lot_size = m.lot_size
        if m.currency is not None:
            instrument.currency = m.currency
        instrument.changed_seq = seq

    def _halted(self, m: InstrumentHalted, seq: int) -> None:
        instrument = self.instruments.get(m.symbol)
        if instrument is None:
            self._refuse(seq, f"{m.symbol} not listed")
            return
        instrument.halted = True
        instrument.halt_reason = m.reason
        instrument.changed_seq = seq

    def _resumed(self, m: InstrumentResumed, seq: int) -> None:
        instrument = self.instruments.get(m.symbol)
        if instrument is None or not instrument.halted:
            self._refuse(seq, f"{m.symbol} is not halted")
            return
        instrument.halted = False
        instrument.halt_reason = ""
        instrument.changed_seq = seq

    def _parameters(self, m: TradingParametersSet, seq: int) -> None:
        if m.symbol != DEFAULT_SYMBOL and m.symbol not in self.instruments:
            self._refuse(seq, f"{m.symbol} not listed")
            return
        self.parameters[m.symbol] = Parameters(m.symbol, m.max_order_qty, m.price_band_bps, m.min_notional_e2)

    def _end_of_day(self, m: EndOfDay, seq: int) -> None:
        self.end_of_day = m.business_date
        self.end_of_day_seq = seq

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return _encoder.encode(
            State(
                [self.instruments[s] for s in sorted(self.instruments)],
                [self.parameters[s] for s in sorted(self.parameters)],
                self.refusals,
                self.last_refusal,
                self.messages,
                self.end_of_day,
                self.end_of_day_seq,
            )
        )

    def restore(self, data: bytes) -> None:
        state = _decoder.decode(data)
        self.instruments = {i.symbol: i for i in state.instruments}
        self.parameters = {p.symbol: p for p in state.parameters}
        self.refusals = state.refusals
        self.last_refusal = state.last_refusal
        self.messages = state.messages
        self.end_of_day = state.end_of_day
        self.end_of_day_seq = state.end_of_day_seq

    def digest(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    def summary(self) -> dict:
        return {
            "instruments": len(self.instruments),
            "halted": sum(1 for i in self.instruments.values() if i.halted),
            "parameters": len(self.parameters),
            "refusals": self.refusals,
            "messages": self.messages,
            "behaviour_version": self.active_version,
            "end_of_day": self.end_of_day,
        }


__all__ = ["Instrument", "Parameters", "ReferenceData"]
