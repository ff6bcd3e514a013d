"""The reference-data protocol: what the admin tool writes and every copy reads.

Schema history, as a team would live it:

* ``refdata.instrument_added`` version 1 had no venue. Version 2 made the venue a required
  field: a new version, with an upcaster (version-1 instruments were all listed on XLON), so
  that a reader of today replays last year's stream unchanged.
* ``refdata.trading_parameters_set`` gained ``min_notional_e2`` later, with a default: not a
  new version; older readers ignore it.
"""

from __future__ import annotations

from raftseq.clients.sm import MessageTypes, SmMessage

TYPES = MessageTypes("refdata")
#: Symbol of the defaults that apply to instruments without parameters of their own.
DEFAULT_SYMBOL = "*"


@TYPES.message
class InstrumentAddedV1(SmMessage):
    TYPE = "refdata.instrument_added"
    VERSION = 1
    symbol: str
    isin: str
    currency: str
    tick_size_e8: int
    lot_size: int


@TYPES.message(upcast=lambda v1: InstrumentAdded(v1.symbol, v1.isin, v1.currency, v1.tick_size_e8, v1.lot_size, venue="XLON"))
class InstrumentAdded(SmMessage):
    TYPE = "refdata.instrument_added"
    VERSION = 2
    symbol: str
    isin: str
    currency: str
    tick_size_e8: int
    lot_size: int
    venue: str


@TYPES.message
class InstrumentUpdated(SmMessage):
    """Change some attributes of a listed instrument (``None``: unchanged)."""

    TYPE = "refdata.instrument_updated"
    VERSION = 1
    symbol: str
    tick_size_e8: int | None = None
    lot_size: int | None = None
    currency: str | None = None


@TYPES.message
class InstrumentHalted(SmMessage):
    TYPE = "refdata.instrument_halted"
    VERSION = 1
    symbol: str
    reason: str


@TYPES.message
class InstrumentResumed(SmMessage):
    TYPE = "refdata.instrument_resumed"
    VERSION = 1
    symbol: str


@TYPES.message
class TradingParametersSet(SmMessage):
    """Limits for one instrument, or for every instrument without its own (``symbol="*"``)."""

    TYPE = "refdata.trading_parameters_set"
    VERSION = 1
    symbol: str
    max_order_qty: int
    price_band_bps: int
    min_notional_e2: int = 0


@TYPES.message
class EndOfDay(SmMessage):
    """The admin closes the business day; processes that run for a day stop after it."""

    TYPE = "refdata.end_of_day"
    VERSION = 1
    business_date: str


__all__ = [
    "DEFAULT_SYMBOL",
    "EndOfDay",
    "InstrumentAdded",
    "InstrumentAddedV1",
    "InstrumentHalted",
    "InstrumentResumed",
    "InstrumentUpdated",
    "TYPES",
    "TradingParametersSet",
]
