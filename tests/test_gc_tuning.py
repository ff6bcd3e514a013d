"""The node's collector settings (``cluster.node.tune_gc``): objects that live as long as a
submit in flight on a saturated leader die young instead of triggering full collections."""

from __future__ import annotations

import gc
from collections import deque

from raftseq.cluster.node import GC_YOUNG_ALLOCATIONS_MAX, tune_gc

#: Batches of objects allocated, their size, and how many of the latest stay alive: like a
#: leader's batches of submits in flight (thousands of submits, each a few ms old at 150k msg/s).
BATCHES = 400
BATCH_OBJECTS = 5_000
BATCHES_ALIVE = 4
PYTHON_DEFAULT_THRESHOLDS = (700, 10, 10)


def _full_collections_during_churn() -> int:
    full = 0

    def count(phase: str, info: dict) -> None:
        nonlocal full
        if phase == "start" and info["generation"] == 2:
            full += 1

    gc.collect()
    gc.callbacks.append(count)
    try:
        window: deque = deque()
        for b in range(BATCHES):
            window.append([[b, i] for i in range(BATCH_OBJECTS)])
            if len(window) > BATCHES_ALIVE:
                window.popleft()
    finally:
        gc.callbacks.remove(count)
    return full


def test_objects_alive_for_a_few_thousand_allocations_trigger_no_full_collection() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(*PYTHON_DEFAULT_THRESHOLDS)
        with_defaults = _full_collections_during_churn()
        tune_gc()
        assert gc.get_threshold()[0] == GC_YOUNG_ALLOCATIONS_MAX
        tuned = _full_collections_during_churn()
    finally:
        gc.set_threshold(*saved)
    assert with_defaults >= 5, f"the churn should provoke full collections with Python's defaults: {with_defaults}"
    assert tuned <= 1, f"{tuned} full collections with the node's settings ({with_defaults} with Python's defaults)"
