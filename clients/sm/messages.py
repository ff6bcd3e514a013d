"""Typed, versioned application messages.

A state-machine message is a msgspec ``Struct`` (subclass ``SmMessage``) with two class
attributes: ``TYPE`` (a dotted name in its state machine's namespace, e.g.
``"refdata.instrument_added"``) and ``VERSION`` (its schema version, from 1). On the wire it is
``["sm", TYPE, VERSION, body]`` (``clients.sm.formats.SmEnvelope``) with the body encoded as a
msgpack *map*, so that:

* **adding a field with a default is not a new version**: old readers ignore fields they do not
  know, new readers fill in the default for old messages;
* **anything else is a new version** (a field removed, renamed, retyped, or given new meaning):
  register the new class with ``VERSION = n + 1`` and an *upcaster* that turns a version-n
  message into a version-(n+1) one. A reader decodes every older version it has registered and
  upcasts it, step by step, to the current one, so ``apply`` only ever sees current versions;
* a reader that meets a version above the newest it knows, or a type in its namespace that it
  does not know, stops with an error naming the type, the version and the sequence number
  (``UnsupportedMessageVersion``, ``UnknownMessageType``) — never applies it some other way.

Writers may keep writing an older version until every reader is upgraded, then switch; an
``Activate`` message (``activate``) switches *behaviour* at one sequence number for all
replicas.

    types = MessageTypes("refdata")

    @types.message
    class InstrumentAddedV1(SmMessage):
        TYPE: ClassVar[str] = "refdata.instrument_added"
        VERSION: ClassVar[int] = 1
        symbol: str
        tick_size_e8: int

    @types.message(upcast=lambda v1: InstrumentAdded(v1.symbol, v1.tick_size_e8, venue="XLON"))
    class InstrumentAdded(SmMessage):
        TYPE: ClassVar[str] = "refdata.instrument_added"
        VERSION: ClassVar[int] = 2
        symbol: str
        tick_size_e8: int
        venue: str

    payload = types.encode(InstrumentAdded("VOD", 100_000, venue="XLON"))   # submit this
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from raftseq.clients.sm import formats
from raftseq.clients.sm.errors import MessageDecodeError, UnknownMessageType, UnsupportedMessageVersion
from raftseq.sequencer import protocol

_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z")
_encoder = msgspec.msgpack.Encoder()


class SmMessage(msgspec.Struct, frozen=True):
    """Base of application messages: set ``TYPE`` and ``VERSION`` as ``ClassVar``s."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


def encode_message(message: SmMessage) -> bytes:
    """The payload of `message`: its envelope (``TYPE``, ``VERSION``) around its body."""
    cls = type(message)
    if not cls.TYPE:
        raise TypeError(f"{cls.__name__} has no TYPE")
    return formats.encode_sm_message(cls.TYPE, cls.VERSION, _encoder.encode(message))


def activate(sm_type: str, version: int, at_seq: int) -> bytes:
    """The payload of "from seq `at_seq` on, `sm_type` behaves as version `version`"."""
    return formats.encode_activate(formats.Activate(sm_type, version, at_seq))


class _Version:
    __slots__ = ("cls", "decoder", "upcast")

    def __init__(self, cls: type, upcast: Callable[[Any], Any] | None) -> None:
        self.cls = cls
        self.decoder = msgspec.msgpack.Decoder(cls)
        self.upcast = upcast


class _Kind:
    __slots__ = ("name", "versions", "current", "current_decode")

    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[int, _Version] = {}
        self.current = 0
        self.current_decode: Callable[[Any], Any] | None = None


class MessageTypes:
    """The message types of one namespace, every version a reader knows, and their upcasters.

    ``namespace`` names a family of types (``"refdata"`` owns ``"refdata.*"``): a state machine
    that reads a namespace treats an unknown type inside it as an error, and ignores every type
    outside it (those are other teams' messages sharing the stream).
    """

    def __init__(self, namespace: str) -> None:
        if not _NAME.match(namespace) or namespace.startswith(formats.SM_CONTROL_PREFIX.rstrip(".")):
            raise ValueError(f"namespace {namespace!r}: dotted names of [A-Za-z0-9_-], not starting with 'raftseq'")
        self.namespace = namespace
        self._prefix = namespace + "."
        self._kinds: dict[str, _Kind] = {}

    # --- registering ----------------------------------------------------------------------

    def add(self, cls: type, *, upcast: Callable[[Any], Any] | None = None) -> type:
        """Register message class `cls` (its ``TYPE`` and ``VERSION``). A version above 1 whose
        predecessor is registered needs `upcast` (predecessor instance -> `cls` instance).
        Register the versions of one type oldest first."""
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            raise TypeError(f"{cls!r} is not a msgspec Struct")
        type_name = getattr(cls, "TYPE", "")
        version = getattr(cls, "VERSION", 0)
        if not isinstance(type_name, str) or not type_name.startswith(self._prefix) or not _NAME.match(type_name):
            raise ValueError(f"{cls.__name__}.TYPE {type_name!r} must be a dotted name in namespace {self.namespace!r}")
        if len(type_name) > formats.SM_MESSAGE_TYPE_CHARS_MAX:
            raise ValueError(f"{cls.__name__}.TYPE is longer than {formats.SM_MESSAGE_TYPE_CHARS_MAX} characters")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{cls.__name__}.VERSION must be an integer >= 1")
        if getattr(cls, "__struct_config__").array_like:
            raise ValueError(f"{cls.__name__}: message bodies are maps (array_like=False), so that readers ignore unknown fields")
        kind = self._kinds.setdefault(type_name, _Kind(type_name))
        if version in kind.versions:
            raise ValueError(f"{type_name} version {version} is already registered ({kind.versions[version].cls.__name__})")
        if kind.versions and version < kind.current:
            raise ValueError(f"{type_name}: register versions oldest first ({version} after {kind.current})")
        if version - 1 in kind.versions and upcast is None:
            raise ValueError(f"{type_name} version {version} needs an upcaster from version {version - 1}")
        if upcast is not None and version - 1 not in kind.versions:
            raise ValueError(f"{type_name} version {version}: an upcaster needs version {version - 1} registered first")
        kind.versions[version] = _Version(cls, upcast)
        kind.current = version
        kind.current_decode = kind.versions[version].decoder.decode
        return cls

    def message(self, cls: type | None = None, *, upcast: Callable[[Any], Any] | None = None):
        """Class decorator form of ``add``: ``@types.message`` or ``@types.message(upcast=f)``."""
        if cls is not None:
            return self.add(cls, upcast=upcast)
        return lambda c: self.add(c, upcast=upcast)

    # --- queries --------------------------------------------------------------------------

    @property
    def type_names(self) -> frozenset[str]:
        return frozenset(self._kinds)

    def owns(self, type_name: str) -> bool:
        """True when `type_name` belongs to this namespace (known or not)."""
        return type_name.startswith(self._prefix)

    def current_version(self, type_name: str) -> int:
        return self._kinds[type_name].current

    def readable_versions(self, type_name: str) -> tuple[int, ...]:
        return tuple(sorted(self._kinds[type_name].versions))

    # --- encoding and decoding ------------------------------------------------------------

    def encode(self, message: SmMessage) -> bytes:
        """The payload of `message`, which must be of a registered type and version."""
        cls = type(message)
        kind = self._kinds.get(getattr(cls, "TYPE", ""))
        if kind is None or kind.versions.get(cls.VERSION, None) is None or kind.versions[cls.VERSION].cls is not cls:
            raise ValueError(f"{cls.__name__} is not registered in {self.namespace!r}")
        return formats.encode_sm_message(cls.TYPE, cls.VERSION, _encoder.encode(message))

    def decode(self, envelope: formats.SmEnvelope, seq: int = 0) -> Any:
        """The message in `envelope` as its type's current version (upcast if older).

        Raises ``UnknownMessageType``, ``UnsupportedMessageVersion`` or ``MessageDecodeError``,
        each naming the type, the version and `seq`.
        """
        kind = self._kinds.get(envelope.type)
        if kind is None:
            raise UnknownMessageType(envelope.type, envelope.version, seq, namespace=self.namespace)
        version = envelope.version
        if version == kind.current:
            try:
                return kind.current_decode(envelope.body)
            except protocol.DECODE_ERRORS as exc:
                raise MessageDecodeError(envelope.type, version, seq, str(exc)) from None
        entry = kind.versions.get(version)
        if entry is None:
            readable = tuple(sorted(kind.versions))
            detail = f"newer than any this reader knows (it reads {', '.join(map(str, readable))})" if version > kind.current else ""
            raise UnsupportedMessageVersion(envelope.type, version, seq, readable=readable, detail=detail)
        try:
            message = entry.decoder.decode(envelope.body)
        except protocol.DECODE_ERRORS as exc:
            raise MessageDecodeError(envelope.type, version, seq, str(exc)) from None
        for step in range(version + 1, kind.current + 1):
            target = kind.versions.get(step)
            if target is None or target.upcast is None:
                raise UnsupportedMessageVersion(
                    envelope.type, version, seq, readable=tuple(sorted(kind.versions)), detail=f"no upcaster to version {step}"
                )
            try:
                message = target.upcast(message)
            except Exception as exc:  # noqa: BLE001 - the application's upcaster
                raise MessageDecodeError(envelope.type, version, seq, f"the upcaster to version {step} raised {exc!r}") from exc
            if type(message) is not target.cls:
                raise MessageDecodeError(envelope.type, version, seq, f"the upcaster to version {step} returned {type(message).__name__}")
        return message


__all__ = ["MessageTypes", "SmMessage", "activate", "encode_message"]
