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
"""

from __future__ import annotations

import io
import pickle
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


def refused_count() -> int:
    """Pickles refused in this process (each named something not in ``ALLOWED``)."""
    return _refused


class AllowListUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the names in ``ALLOWED``."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is None:
            global _refused
            _refused += 1
            raise pickle.UnpicklingError(f"a Raft pickle named {module}.{name}: refused")
        return allowed


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """pysyncobj's ``pickle.loads``, with the allow-list (and no fallback loader)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return AllowListUnpickler(io.BytesIO(data)).load()


def load(file: BinaryIO) -> Any:
    """pysyncobj's ``pickle.load``, with the allow-list."""
    return AllowListUnpickler(file).load()
