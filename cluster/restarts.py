"""When ``raftseq cluster up`` restarts a node that exited: the restart policy.

A node that keeps failing is restarted after a delay that doubles with every failure in a row
(1 s, 2 s, 4 s, … up to 30 s); once a node has run for 60 s its next failure starts again from
1 s. A node whose exit code names something only a person can fix
(``NodeExit(code).needs_operator``: a port in use, a data directory in use or unusable, a
configuration or a Raft log that cannot be used, a damaged journal) is not restarted at all:
restarting it unchanged cannot help.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftseq.cluster.config import RESTART_DELAY_FIRST_S, RESTART_DELAY_MAX_S, RESTART_HEALTHY_AFTER_S
from raftseq.cluster.node_exit import NodeExit


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off between restarts (the defaults above; tests pass shorter ones)."""

    first_delay_s: float = RESTART_DELAY_FIRST_S
    delay_max_s: float = RESTART_DELAY_MAX_S
    healthy_after_s: float = RESTART_HEALTHY_AFTER_S

    def __post_init__(self) -> None:
        assert 0 < self.first_delay_s <= self.delay_max_s, self
        assert self.healthy_after_s > 0, self

    def next_delay_s(self, previous_delay_s: float, ran_s: float) -> float:
        """The delay before restarting a node that ran `ran_s` seconds and was last restarted
        after `previous_delay_s` (0 for none)."""
        if previous_delay_s <= 0 or ran_s >= self.healthy_after_s:
            return self.first_delay_s
        return min(previous_delay_s * 2, self.delay_max_s)


def operator_exit(code: int) -> NodeExit | None:
    """The ``NodeExit`` of `code` when it needs an operator (no restart can help), else None
    (a bug, a broken invariant, a signal: a restart recovers from the node's files)."""
    try:
        reason = NodeExit(code)
    except ValueError:
        return None
    return reason if reason.needs_operator else None
