"""Stopping the node on a broken invariant.

pysyncobj retries an entry whose apply raised, forever (the whole cluster wedges), and logs
and swallows what its tick raises: an invariant check inside the node must not rely on raising.
``fail_stop`` logs and ends the process at once; the node restarts and recovers from its files.
"""

from __future__ import annotations

import logging
import os
import sys

from raftseq.cluster.node_exit import NodeExit

log = logging.getLogger("raftseq.replica")

#: Exit code of a node stopped on a broken invariant (it restarts clean).
EXIT_INVARIANT = NodeExit.INVARIANT


def fail_stop(message: str, *args: object) -> None:
    """Log a broken invariant and end the process at once (no cleanup that could hang)."""
    log.critical("broken invariant, stopping the node: " + message, *args)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    sys.stderr.flush()
    os._exit(EXIT_INVARIANT)
