"""The node's background scrub: its journal's sealed segments read back at a bounded rate.

Each step reads at most ``limits.SCRUB_STEP_BYTES`` on the node's loop (``Scrubber.step``:
checksums and numbers); the task then sleeps long enough that the rate stays at
``journal.scrub_bytes_per_s``. Damage found is recorded in the journal (readers are refused
over it) and catch-up repairs it from a peer.
"""

from __future__ import annotations

import asyncio
import logging

from raftseq.sequencer import limits
from raftseq.sequencer.journal import Scrubber

log = logging.getLogger("raftseq.scrub")

#: With no sealed segment to read, the scrub looks again after this long, in seconds.
SCRUB_IDLE_S = 1.0


async def run_scrub(scrubber: Scrubber, *, bytes_per_s: int) -> None:
    """Scrub forever at `bytes_per_s` (cancelled when the node stops); 0: not at all."""
    while bytes_per_s:
        before = scrubber.bytes_read
        damage = scrubber.step(limits.SCRUB_STEP_BYTES)
        if damage is not None:
            log.error("journal damaged, found by the scrub: %s; refusing it until repaired from a peer", damage.describe())
        read = scrubber.bytes_read - before
        await asyncio.sleep(read / bytes_per_s if read else SCRUB_IDLE_S if damage is None else 0)
