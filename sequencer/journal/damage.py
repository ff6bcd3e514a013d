"""Damaged ranges of sealed segments, kept in memory until a peer's copy repairs them.

A sealed segment can be damaged after it was written (a flipped bit, a truncated file, a
segment file gone): the journal finds it on open (``recovery``), in the background scrub
(``scrub``) or when a reader meets it (``cursor``). Each finding is a ``Damage``: from the first
record that fails to the end of its segment (records after a bad one cannot be trusted to be
found by their lengths). Readers are refused over a damaged range; catch-up fetches the whole
segment from a peer and the journal renames the repaired copy in (``Journal.repair``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import msgspec


class Damage(msgspec.Struct, frozen=True):
    """Records ``first_seq..last_seq`` of the segment file ``path`` cannot be served."""

    first_seq: int
    last_seq: int
    path: str
    #: Byte offset in ``path`` of the first damaged record (where reading failed).
    offset: int
    reason: str

    def describe(self) -> str:
        return f"{self.path} offset {self.offset} (seq {self.first_seq}..{self.last_seq}): {self.reason}"


class DamageMap:
    """The damaged ranges of a journal, in order, none overlapping."""

    def __init__(self, damages: list[Damage] | None = None) -> None:
        self._ranges: list[Damage] = []
        for damage in damages or ():
            self.add(damage)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __iter__(self) -> Iterator[Damage]:
        return iter(list(self._ranges))

    def add(self, damage: Damage) -> bool:
        """Record `damage`; False (and nothing changes) when its first record is already known
        to be damaged. A range that starts earlier in a known one's segment replaces it."""
        if self.covering(damage.first_seq) is not None:
            return False
        self._ranges = [d for d in self._ranges if not (damage.first_seq <= d.first_seq <= damage.last_seq)]
        bisect.insort(self._ranges, damage, key=lambda d: d.first_seq)
        return True

    def clear_range(self, first_seq: int, last_seq: int) -> int:
        """Forget every damage within ``first_seq..last_seq`` (repaired); how many."""
        before = len(self._ranges)
        self._ranges = [d for d in self._ranges if d.last_seq < first_seq or d.first_seq > last_seq]
        return before - len(self._ranges)

    def covering(self, seq: int) -> Damage | None:
        """The damaged range holding `seq`, if any."""
        damage = self.next_from(seq)
        return damage if damage is not None and damage.first_seq <= seq else None

    def next_from(self, seq: int) -> Damage | None:
        """The first damaged range that ends at or after `seq`."""
        for damage in self._ranges:
            if damage.last_seq >= seq:
                return damage
        return None

    @property
    def records(self) -> int:
        """Records in damaged ranges."""
        return sum(d.last_seq - d.first_seq + 1 for d in self._ranges)
