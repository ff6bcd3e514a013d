"""pysyncobj's pickles, loaded with an allow-list: no code runs from a peer's bytes.

pysyncobj pickles every link message, every Raft log entry's command and its log file's
records, and loads them with ``pickle.loads``: a pickle names any importable callable
(``os.system``) and calls it while loading. The link cipher keeps strangers out, but anyone
holding the cluster password (a compromised node, a leaked config) could run code on every
node. ``raft.patches.install()`` makes pysyncobj load with ``loads``/``load`` here instead.

What pysyncobj sends are plain values: dicts, lists, tuples, str, bytes, int, float, bool and
None, which pickle builds without naming any class. Protocol 2 (pysyncobj's own, and a peer
without ``install()``) writes ``bytes`` as ``_codecs.encode(text, "latin1")``: that one name
is admitted, as a function that only ever encodes latin-1. Every other name is refused: the
load raises ``pickle.UnpicklingError`` (pysyncobj drops the link, or counts a failed tick) and
``refused_count()`` rises.

**Memo indexes are bounded by the pickle's length.** CPython's unpickler grows its memo array
to twice the index a PUT or LONG_BINPUT names, at once (8 bytes a slot, zeroed): a 9-byte
pickle naming 2**31 made a node touch GiBs and stall 21 s, naming no class at all. A pickle
stores one memo entry per opcode at most, so a writer's indexes stay below its length:
``loads`` and ``load`` refuse a pickle naming a PUT or LONG_BINPUT index above its length in
bytes (the memo then costs at most 16 bytes per byte of pickle). The check walks the
opcodes before the C unpickler runs: measured here (``benchmarks/bench_safe_pickle.py``, 2
cores, medians) 2.4-3.8 us for a heartbeat, a reply or a one-batch AppendEntries of protocol
5, against 1.3-4.1 us for the allow-list load itself (a load costs 2-3.5x what it did). BINPUT (one byte), MEMOIZE (the next slot) and the GETs (which only
read) cannot grow the memo.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, BinaryIO

#: The one encoding protocol 2 writes ``bytes`` with.
_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1"})


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it (``bytes`` as latin-1 text), and nothing else."""
    if not isinstance(text, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not a pysyncobj value")
    return text.encode("latin1")


#: ``(module, name)`` a pickle may name, and what it gets instead.
ALLOWED = {("_codecs", "encode"): _latin1_encode}

_refused = 0

#: Bytes of argument after each opcode (by its byte): >= 0 a fixed count; the negative
#: constants of ``pickletools`` for arguments up to a newline or after a length; None for a
#: byte that is no opcode (the unpickler refuses it).
_ARG_BYTES: list[int | None] = [None] * 256
for _op in pickletools.opcodes:
    _ARG_BYTES[ord(_op.code.encode("latin1"))] = _op.arg.n if _op.arg is not None else 0
_PUT, _LONG_BINPUT, _STOP = ord("p"), ord("r"), ord(".")
#: GLOBAL and INST take two lines (module, name).
_TWO_LINES = frozenset({ord("c"), ord("i")})


def _refuse(why: str) -> None:
    global _refused
    _refused += 1
    raise pickle.UnpicklingError(why)


def _check_memo_index(index: int, bound: int) -> None:
    if index > bound:
        _refuse(f"a Raft pickle named memo index {index}, above its length of {bound} bytes")


def check_memo_indexes(data: bytes | bytearray, bound: int) -> None:
    """Refuse (``pickle.UnpicklingError``) a pickle whose PUT or LONG_BINPUT names a memo
    index above `bound`. Stops at STOP or where the pickle breaks (the unpickler refuses it)."""
    pos, end = 0, len(data)
    while pos < end:
        code = data[pos]
        pos += 1
        arg = _ARG_BYTES[code]
        if arg is None or code == _STOP:
            return
        if arg >= 0:
            if code == _LONG_BINPUT:
                _check_memo_index(int.from_bytes(data[pos : pos + 4], "little"), bound)
            pos += arg
        elif arg == pickletools.UP_TO_NEWLINE:
            lines = 2 if code in _TWO_LINES else 1
            for _ in range(lines):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    return
                if code == _PUT:
                    text = data[pos:newline]
                    if not (text.isdigit() and len(text) <= len(str(bound))):  # a writer writes plain digits
                        _refuse(f"a Raft pickle named memo index {bytes(text[:40])!r}, not a number up to its length")
                    _check_memo_index(int(text), bound)
                pos = newline + 1
        elif arg == pickletools.TAKEN_FROM_ARGUMENT1:
            if pos >= end:
                return
            pos += 1 + data[pos]
        elif arg == pickletools.TAKEN_FROM_ARGUMENT8U:
            pos += 8 + int.from_bytes(data[pos : pos + 8], "little")
        else:
            pos += 4 + int.from_bytes(data[pos : pos + 4], "little", signed=arg == pickletools.TAKEN_FROM_ARGUMENT4)


def refused_count() -> int:
    """Pickles refused in this process (each named something not in ``ALLOWED``, or a memo
    index above its length)."""
    return _refused


class AllowListUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the names in ``ALLOWED``."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is None:
            _refuse(f"a Raft pickle named {module}.{name}: refused")
        return allowed


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """pysyncobj's ``pickle.loads``, with the allow-list and memo indexes bounded by the
    pickle's length (and no fallback loader)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, memoryview):
        data = data.tobytes()
    check_memo_indexes(data, len(data))
    return AllowListUnpickler(io.BytesIO(data)).load()


def load(file: BinaryIO) -> Any:
    """pysyncobj's ``pickle.load`` (its log file's records), with the same checks as
    ``loads``: the rest of `file` is read, one pickle loaded from it, and `file` left just
    after that pickle (it must be seekable, as pysyncobj's files are)."""
    start = file.tell()
    data = file.read()
    check_memo_indexes(data, len(data))
    buffer = io.BytesIO(data)
    value = AllowListUnpickler(buffer).load()
    file.seek(start + buffer.tell())
    return value
