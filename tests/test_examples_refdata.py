"""The reference-data example end to end: a local cluster, the admin tool, and three separate
processes — retail OMS, smart order router, and an institutional OMS started last from a
snapshot — end the day with identical reference data.

The example lives in ``examples/`` (not an installed package): it is imported from the
repository root, as ``python -m examples.refdata.demo`` would.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from raftseq.clients.sm import MessageTypes, encode_message  # noqa: E402
from examples.refdata.admin import listing, updates  # noqa: E402
from examples.refdata.demo import run_demo  # noqa: E402
from examples.refdata.machine import ReferenceData  # noqa: E402
from examples.refdata.messages import TYPES, InstrumentAdded, InstrumentAddedV1, InstrumentHalted, InstrumentUpdated  # noqa: E402
from raftseq.clients.sm import formats  # noqa: E402


def test_three_processes_end_the_day_with_identical_reference_data(tmp_path):
    # 6,800 updates end the day past seq 7000: whichever snapshot the late joiner loads (they
    # cover multiples of 2000, the newest 6000), it passes a checkpoint multiple of 1000 after it
    # and publishes a checkpoint of its own.
    result = run_demo(data_dir=str(tmp_path), instruments=300, update_count=6800, checkpoint_every=1000, snapshot_every=2000, timeout_s=120)
    reports = {r["role"]: r for r in result["reports"]}
    assert set(reports) == {"retail-oms", "sor", "institutional-oms"}
    assert result["identical"], [(r["role"], r["seq"], r["digest"]) for r in reports.values()]
    eod = result["day"]["end_of_day_seq"]
    assert all(r["seq"] == eod for r in reports.values())
    # The institutional OMS started last, from a snapshot, and replayed only what followed it.
    inst = reports["institutional-oms"]
    assert 0 < inst["joined_from_snapshot_covering"] < eod and not inst["snapshot_errors"]
    assert inst["joined_from_snapshot_covering"] // 1000 < eod // 1000
    assert inst["messages_applied"] < reports["retail-oms"]["messages_applied"]
    # Behaviour version 2 was switched on half way, for every copy.
    assert {r["summary"]["behaviour_version"] for r in reports.values()} == {2}
    assert reports["sor"]["open_venues"]  # the router's second state machine, same subscription
    assert result["divergence"] is None and result["checkpoints"]["refdata"]["replicas"] == ["inst-1", "retail-1", "sor-1"]


def test_old_and_new_admin_messages_build_the_same_instrument():
    """Version-1 instruments (written by last year's admin) are upcast: venue XLON."""
    types: MessageTypes = TYPES
    old = types.encode(InstrumentAddedV1("VOD", "GB00BH4HKS39", "GBP", 10_000, 1))
    upcast = types.decode(formats.decode_sm_envelope(old), 1)
    assert upcast == InstrumentAdded("VOD", "GB00BH4HKS39", "GBP", 10_000, 1, venue="XLON")


def test_behaviour_2_refuses_updates_to_halted_instruments():
    machine = ReferenceData()
    machine.apply(InstrumentAdded("VOD", "X", "GBP", 10_000, 1, "XLON"), 1, 0)
    machine.apply(InstrumentHalted("VOD", "news"), 2, 0)
    machine.apply(InstrumentUpdated("VOD", tick_size_e8=20_000), 3, 0)
    assert machine.instruments["VOD"].tick_size_e8 == 20_000 and machine.refusals == 0
    machine.active_version = 2
    machine.apply(InstrumentUpdated("VOD", tick_size_e8=30_000), 4, 0)
    assert machine.instruments["VOD"].tick_size_e8 == 20_000 and machine.refusals == 1
    assert machine.check_order("VOD", 10, 100_000) == "halted: news"


def test_snapshot_restore_round_trips_the_reference_data():
    rng = random.Random(3)
    machine = ReferenceData()
    seq = 0
    for message in listing(50, rng) + updates(2000, 50, rng):
        seq += 1
        if TYPES.owns(type(message).TYPE):  # as a reader sees it: old versions upcast
            machine.apply(TYPES.decode(formats.decode_sm_envelope(encode_message(message)), seq), seq, 0)
    assert machine.instruments and machine.refusals
    copy = ReferenceData()
    copy.restore(machine.snapshot())
    assert copy.digest() == machine.digest() and copy.summary() == machine.summary()
