"""What the journal raises."""

from __future__ import annotations


class JournalError(Exception):
    """Base of journal errors."""


class JournalCorruptError(JournalError):
    """The journal holds a record that fails its checks, somewhere it may not be cut off.

    ``seq`` is the first sequence number that could not be read (0 when unknown).
    """

    def __init__(self, message: str, *, seq: int = 0, path: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.seq = seq
        self.path = path
        self.offset = offset


class JournalRecordError(JournalError):
    """Records handed to the journal (from a peer, or an unchecked append) fail their checks:
    torn, a bad checksum, numbered wrongly, or fewer or more than the range they claim to be.
    Nothing of them was written.

    Raised explicitly, not by ``assert``: records fetched from a peer are input from outside,
    and must be refused under ``python -O`` too.
    """
