"""A second, tiny state machine the smart order router keeps next to reference data: which
venues are open. Its messages share the stream (and the router's one subscription) with
reference data; each machine sees only its own types."""

from __future__ import annotations

import msgspec

from raftseq.clients.sm import MessageTypes, SmMessage, StateMachine

TYPES = MessageTypes("venues")


@TYPES.message
class VenueOpened(SmMessage):
    TYPE = "venues.opened"
    VERSION = 1
    venue: str


@TYPES.message
class VenueClosed(SmMessage):
    TYPE = "venues.closed"
    VERSION = 1
    venue: str
    reason: str = ""


class VenueStatus(StateMachine):
    TYPE = "venues"
    MESSAGES = TYPES

    def __init__(self) -> None:
        self.open: dict[str, bool] = {}

    def apply(self, message, seq: int, log_time_ns: int) -> None:
        self.open[message.venue] = type(message) is VenueOpened

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(sorted(self.open.items()))

    def restore(self, data: bytes) -> None:
        self.open = dict(msgspec.msgpack.decode(data, type=list[tuple[str, bool]]))

    def open_venues(self) -> list[str]:
        return sorted(v for v, is_open in self.open.items() if is_open)


__all__ = ["TYPES", "VenueClosed", "VenueOpened", "VenueStatus"]
