"""Typed, versioned messages: envelopes, unknown fields, upcasters, and the errors a reader
gives for what it cannot read (each naming the type, the version and the sequence number)."""

from __future__ import annotations

from typing import ClassVar

import msgspec
import pytest

from raftseq.clients.sm import MessageDecodeError, MessageTypes, SmMessage, UnknownMessageType, UnsupportedMessageVersion, encode_message
from raftseq.clients.sm import formats
from raftseq.sequencer import protocol


def envelope(payload: bytes) -> formats.SmEnvelope:
    found = formats.decode_sm_envelope(payload)
    assert found is not None
    return found


# Version 1 as the first writers knew it, and the same type as a newer writer extended it with
# an optional field (no new version: old readers ignore it).
class PriceV1(SmMessage):
    TYPE = "md.price"
    VERSION = 1
    symbol: str
    price_e8: int


class PriceV1Extended(PriceV1):
    venue: str = "XLON"


# Version 2 changes a field's meaning (price in cents); version 3 adds a required field.
class PriceV2(SmMessage):
    TYPE = "md.price"
    VERSION = 2
    symbol: str
    price_cents: int


class PriceV3(SmMessage):
    TYPE = "md.price"
    VERSION = 3
    symbol: str
    price_cents: int
    currency: str


def old_reader() -> MessageTypes:
    types = MessageTypes("md")
    types.add(PriceV1)
    return types


def new_reader() -> MessageTypes:
    types = MessageTypes("md")
    types.add(PriceV1)
    types.add(PriceV2, upcast=lambda v1: PriceV2(v1.symbol, v1.price_e8 // 1_000_000))
    types.add(PriceV3, upcast=lambda v2: PriceV3(v2.symbol, v2.price_cents, "GBP"))
    return types


def test_a_message_travels_in_an_envelope_with_its_type_and_version():
    payload = new_reader().encode(PriceV3("VOD", 7250, "GBP"))
    env = envelope(payload)
    assert (env.type, env.version) == ("md.price", 3)
    assert new_reader().decode(env, 10) == PriceV3("VOD", 7250, "GBP")
    # The body is a map: readers find fields by name.
    assert msgspec.msgpack.decode(env.body) == {"symbol": "VOD", "price_cents": 7250, "currency": "GBP"}


def test_old_readers_ignore_fields_they_do_not_know_and_new_readers_default_them():
    newer = encode_message(PriceV1Extended("VOD", 72_500_000_000, venue="XAMS"))
    assert old_reader().decode(envelope(newer), 5) == PriceV1("VOD", 72_500_000_000)
    extended = MessageTypes("md")
    extended.add(PriceV1Extended)
    older = encode_message(PriceV1("VOD", 1))
    assert extended.decode(envelope(older), 6) == PriceV1Extended("VOD", 1, venue="XLON")


def test_old_versions_are_upcast_step_by_step_to_the_current_one():
    reader = new_reader()
    assert reader.decode(envelope(encode_message(PriceV1("VOD", 72_500_000_000))), 1) == PriceV3("VOD", 72500, "GBP")
    assert reader.decode(envelope(encode_message(PriceV2("VOD", 72500))), 2) == PriceV3("VOD", 72500, "GBP")
    assert reader.readable_versions("md.price") == (1, 2, 3) and reader.current_version("md.price") == 3


def test_a_version_newer_than_the_reader_stops_it_naming_type_version_and_seq():
    with pytest.raises(UnsupportedMessageVersion) as caught:
        old_reader().decode(envelope(encode_message(PriceV2("VOD", 1))), 4711)
    text = str(caught.value)
    assert "md.price" in text and "version 2" in text and "seq 4711" in text and "newer" in text
    assert (caught.value.type_name, caught.value.version, caught.value.seq) == ("md.price", 2, 4711)


def test_an_old_version_without_its_class_is_refused():
    only_v3 = MessageTypes("md")
    only_v3.add(PriceV3)
    with pytest.raises(UnsupportedMessageVersion, match=r"seq 9: .*md.price.* version 1"):
        only_v3.decode(envelope(encode_message(PriceV1("VOD", 1))), 9)


def test_an_unknown_type_in_the_namespace_is_named():
    class Trade(SmMessage):
        TYPE = "md.trade"
        VERSION = 1
        qty: int

    with pytest.raises(UnknownMessageType, match=r"seq 12: .*md.trade") as caught:
        old_reader().decode(envelope(encode_message(Trade(5))), 12)
    assert caught.value.seq == 12


def test_a_body_that_does_not_match_its_type_is_a_decode_error():
    bad = formats.encode_sm_message("md.price", 1, msgspec.msgpack.encode({"symbol": 5, "price_e8": "x"}))
    with pytest.raises(MessageDecodeError, match=r"seq 3: message type 'md.price' version 1 does not decode"):
        old_reader().decode(envelope(bad), 3)


def test_payloads_that_are_not_state_machine_messages_are_told_apart():
    assert formats.decode_sm_envelope(b"plain text payload") is None
    assert formats.decode_sm_envelope(b"") is None
    with pytest.raises(protocol.SmFormatError):
        formats.decode_sm_envelope(formats.SM_ENVELOPE_MARK + b"\xff\xff")


def test_control_messages_round_trip():
    act = formats.Activate("refdata", 2, 1000)
    assert formats.decode_activate(envelope(formats.encode_activate(act))) == act
    cp = formats.Checkpoint("refdata", 500, "ab" * 32, "oms-1")
    payload = formats.encode_checkpoint(cp)
    assert payload.startswith(formats.CHECKPOINT_MARK)
    assert formats.decode_checkpoint(envelope(payload)) == cp
    with pytest.raises(protocol.SmFormatError):
        formats.decode_checkpoint(envelope(formats.encode_activate(act)))


@pytest.mark.parametrize(
    "mistake",
    ["no_upcaster", "upcaster_without_predecessor", "outside_namespace", "array_like", "twice", "older_after_newer"],
)
def test_registration_mistakes_are_refused_at_import_time(mistake):
    types = MessageTypes("md")
    with pytest.raises((ValueError, TypeError)):
        if mistake == "no_upcaster":
            types.add(PriceV1)
            types.add(PriceV2)
        elif mistake == "upcaster_without_predecessor":
            types.add(PriceV2, upcast=lambda m: m)
        elif mistake == "outside_namespace":
            MessageTypes("other").add(PriceV1)
        elif mistake == "array_like":

            class Packed(SmMessage, array_like=True):
                TYPE: ClassVar[str] = "md.packed"
                x: int

            types.add(Packed)
        elif mistake == "twice":
            types.add(PriceV1)
            types.add(PriceV1)
        else:
            types.add(PriceV3)
            types.add(PriceV2, upcast=lambda m: m)


def test_namespaces_may_not_take_the_sdk_control_prefix():
    with pytest.raises(ValueError):
        MessageTypes("raftseq")
