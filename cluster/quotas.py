"""Per-credential quotas on one node: token buckets for messages and bytes per second, and
counts of the credential's connections, sessions and subscriptions (``cluster.credentials``).

Nothing here reads a clock: the caller passes ``now_s`` (a monotonic time in seconds), so the
buckets are tested with a clock the test moves. Quotas are per node: submits reach only the
leader, so the rates are the cluster's; connections, sessions and subscriptions are counted on
each node apart.
"""

from __future__ import annotations

import math
from collections import Counter

from raftseq.cluster.config import CREDENTIAL_BURST_S, CREDENTIAL_LABELS_MAX, OTHER_CREDENTIALS_LABEL, QUOTA_RETRY_REFILL
from raftseq.sequencer import protocol

#: The limits of ``Busy.limit`` for a credential's quotas, and the rules it can break
#: (``cluster.credentials``): the ``limit`` label of the refusal counts.
LIMIT_MESSAGES = protocol.BUSY_LIMIT_CREDENTIAL_MESSAGES
LIMIT_BYTES = protocol.BUSY_LIMIT_CREDENTIAL_BYTES
LIMIT_CONNECTIONS = "credential_connections"
LIMIT_SESSIONS = "credential_sessions"
LIMIT_SUBSCRIPTIONS = "credential_subscriptions"
REFUSED_ROLE = "role"
REFUSED_PREFIX = "session_prefix"
REFUSED_REVOKED = "revoked"
#: The node's own bound on scrypt checks (``CREDENTIAL_CHECKS_PER_S``), not a credential's.
LIMIT_CHECKS = "credential_checks"
CREDENTIAL_REFUSALS = (
    LIMIT_MESSAGES,
    LIMIT_BYTES,
    LIMIT_CONNECTIONS,
    LIMIT_SESSIONS,
    LIMIT_SUBSCRIPTIONS,
    REFUSED_ROLE,
    REFUSED_PREFIX,
    REFUSED_REVOKED,
)

#: Tokens a bucket may be short of an amount and still give it: what float rounding of
#: (elapsed seconds x rate) loses (0.1 s at 10/s refills 0.9999999999999964 tokens).
_ROUNDING_TOKENS = 1e-9


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` held (the bucket starts full).
    ``rate_per_s`` 0: no limit."""

    __slots__ = ("rate_per_s", "burst", "tokens", "updated_s")

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated_s = now_s

    def _refill(self, now_s: float) -> None:
        if now_s > self.updated_s:
            self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = max(self.updated_s, now_s)

    def take(self, amount: float, now_s: float) -> bool:
        """Take `amount` tokens if the bucket holds them; False (nothing taken) if not."""
        if not self.rate_per_s:
            return True
        self._refill(now_s)
        if amount > self.tokens + _ROUNDING_TOKENS:
            return False
        self.tokens = max(0.0, self.tokens - amount)
        return True

    def wait_s(self, amount: float, now_s: float) -> float:
        """Seconds until `amount` tokens could be taken (0: now). An amount above the burst is
        waited for as a full bucket."""
        if not self.rate_per_s:
            return 0.0
        self._refill(now_s)
        missing = min(amount, self.burst) - self.tokens
        return max(0.0, missing / self.rate_per_s)

    def set_rate(self, rate_per_s: float, burst: float) -> None:
        """A new rate (the credentials file changed): the tokens held stay, up to the new burst."""
        if not self.rate_per_s:
            self.tokens = burst
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = min(self.tokens, burst)


def burst_of(rate_per_s: float, floor: float) -> float:
    """The burst of a bucket of `rate_per_s`: ``CREDENTIAL_BURST_S`` seconds of it, and never
    below `floor` (one frame's worth must always fit, else that frame could never pass)."""
    return max(rate_per_s * CREDENTIAL_BURST_S, floor)


class Usage:
    """What one credential holds on this node and its rate buckets."""

    __slots__ = ("messages", "bytes", "connections", "sessions", "subscriptions")

    def __init__(self, now_s: float) -> None:
        #: No limit until ``TokenBucket.set_rate`` gives them one.
        self.messages = TokenBucket(0, 0, now_s)
        self.bytes = TokenBucket(0, 0, now_s)
        self.connections = 0
        #: Session name -> this credential's connections bound to it on this node.
        self.sessions: Counter[str] = Counter()
        self.subscriptions = 0

    def admit(self, sizes: list[int], now_s: float) -> tuple[int, float, bool]:
        """How many of the submits of `sizes` (payload bytes, in client_seq order) the rate
        buckets let in now, taking their tokens; when not all, the seconds until the next one
        would pass with ``QUOTA_RETRY_REFILL`` of the bucket's burst, and whether the message
        bucket (else the byte bucket) stopped it."""
        messages, byte_bucket = self.messages, self.bytes
        if not messages.rate_per_s and not byte_bucket.rate_per_s:
            return len(sizes), 0.0, False
        admitted = 0
        for size in sizes:
            if not messages.take(1, now_s):
                return admitted, messages.wait_s(max(1, QUOTA_RETRY_REFILL * messages.burst), now_s), True
            if not byte_bucket.take(size, now_s):
                messages.tokens += 1  # not taken after all
                return admitted, byte_bucket.wait_s(max(size, QUOTA_RETRY_REFILL * byte_bucket.burst), now_s), False
            admitted += 1
        return admitted, 0.0, False


def retry_after_ms(wait_s: float, floor_ms: int) -> int:
    """``Busy.retry_after_ms`` for a wait of `wait_s`: whole milliseconds, at least `floor_ms`."""
    return max(floor_ms, math.ceil(wait_s * 1000))


class RefusalCounts:
    """Refusals per (credential, limit), for the metrics. The label set is bounded: the first
    ``CREDENTIAL_LABELS_MAX`` credential names refused get a label of their own, every later
    one is counted as ``OTHER_CREDENTIALS_LABEL``."""

    def __init__(self) -> None:
        #: (credential, limit) -> refusals; every limit starts at 0 under the "other" label.
        self.counts: dict[tuple[str, str], int] = {(OTHER_CREDENTIALS_LABEL, limit): 0 for limit in CREDENTIAL_REFUSALS}
        self._names: set[str] = set()

    def count(self, credential: str, limit: str, refusals: int = 1) -> None:
        if credential not in self._names:
            if len(self._names) >= CREDENTIAL_LABELS_MAX:
                credential = OTHER_CREDENTIALS_LABEL
            else:
                self._names.add(credential)
        key = (credential, limit)
        self.counts[key] = self.counts.get(key, 0) + refusals
