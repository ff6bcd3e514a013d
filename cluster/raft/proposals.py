"""What a proposal's callback is told: pysyncobj's ``FAIL_REASON`` codes, named for raftseq."""

from __future__ import annotations

from pysyncobj import FAIL_REASON

#: The callback's error for a batch that committed and was applied.
PROPOSAL_OK = FAIL_REASON.SUCCESS

_NAMED = ("QUEUE_FULL", "MISSING_LEADER", "DISCARDED", "NOT_LEADER", "LEADER_CHANGED", "REQUEST_DENIED", "UNKNOWN_OUTCOME")


def proposal_error_name(code: int) -> str:
    """The name of a proposal's error code (``leader_changed``…), for an unknown outcome."""
    for name in _NAMED:
        if getattr(FAIL_REASON, name, None) == code:
            return name.lower()
    return f"raft error {code}"
