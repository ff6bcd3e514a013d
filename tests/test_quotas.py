"""Per-credential quotas (``cluster.quotas``): token buckets driven by a clock the test moves,
the admission of a frame's submits, and the bounded labels of the refusal counts."""

from __future__ import annotations

import pytest

from raftseq.cluster.config import CREDENTIAL_LABELS_MAX, OTHER_CREDENTIALS_LABEL
from raftseq.cluster.quotas import LIMIT_MESSAGES, RefusalCounts, TokenBucket, Usage, burst_of, retry_after_ms


def test_a_bucket_starts_full_and_refuses_past_its_burst():
    bucket = TokenBucket(10, 5, now_s=100.0)
    assert all(bucket.take(1, 100.0) for _ in range(5))
    assert bucket.take(1, 100.0) is False
    assert bucket.wait_s(1, 100.0) == pytest.approx(0.1)


def test_a_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(10, 5, now_s=0.0)
    assert bucket.take(5, 0.0)
    assert bucket.take(1, 0.05) is False  # half a token
    assert bucket.take(1, 0.1)
    assert bucket.take(1, 0.1) is False
    # An hour later it holds its burst, not 36,000 tokens.
    assert bucket.take(5, 3600.0)
    assert bucket.take(1, 3600.0) is False


def test_a_refused_take_takes_nothing():
    bucket = TokenBucket(10, 5, now_s=0.0)
    assert bucket.take(4, 0.0)
    assert bucket.take(2, 0.0) is False
    assert bucket.take(1, 0.0), "the refused take of 2 took the last token"


def test_a_clock_going_backwards_adds_no_tokens():
    bucket = TokenBucket(10, 5, now_s=10.0)
    assert bucket.take(5, 10.0)
    assert bucket.take(1, 9.0) is False
    assert bucket.take(1, 10.0) is False
    assert bucket.take(1, 10.1)


def test_rate_zero_is_no_limit():
    bucket = TokenBucket(0, 0, now_s=0.0)
    assert all(bucket.take(1_000_000, 0.0) for _ in range(10))
    assert bucket.wait_s(10**9, 0.0) == 0


def test_a_new_rate_keeps_the_tokens_held_up_to_the_new_burst():
    bucket = TokenBucket(100, 100, now_s=0.0)
    assert bucket.take(50, 0.0)
    bucket.set_rate(10, 10)
    assert bucket.take(10, 0.0)
    assert bucket.take(1, 0.0) is False
    unlimited = TokenBucket(0, 0, now_s=0.0)
    unlimited.set_rate(10, 10)
    assert unlimited.take(10, 0.0), "a bucket given its first rate starts full"
    assert unlimited.take(1, 0.0) is False


def test_the_burst_always_holds_one_frame():
    assert burst_of(100, 1) == 100
    assert burst_of(0.5, 1) == 1
    assert burst_of(10, 1024) == 1024


def test_admit_lets_in_what_the_buckets_hold_and_says_which_stopped_the_rest():
    usage = Usage(now_s=0.0)
    usage.messages.set_rate(3, 3)
    assert usage.admit([10] * 5, 0.0) == (3, pytest.approx(1 / 3), True)
    assert usage.admit([10], 0.0)[0] == 0
    assert usage.admit([10, 10], 1.0)[0] == 2

    by_bytes = Usage(now_s=0.0)
    by_bytes.bytes.set_rate(100, 100)
    admitted, wait_s, by_messages = by_bytes.admit([40, 40, 40], 0.0)
    assert (admitted, by_messages) == (2, False)
    assert wait_s == pytest.approx(0.2)


def test_a_refused_submit_is_told_to_retry_once_a_quarter_of_the_burst_is_back():
    """A client sends its whole window again after a Busy: told to retry as soon as one token
    was back, it got about one submit in per window sent (8,000 messages through a 2,000 msg/s
    quota with a window of 2,000: 211,756 resubmits)."""
    usage = Usage(now_s=0.0)
    usage.messages.set_rate(2_000, 2_000)
    admitted, wait_s, by_messages = usage.admit([10] * 2_100, 0.0)
    assert (admitted, by_messages) == (2_000, True)
    assert wait_s == pytest.approx(0.25), "a retry before a quarter of the burst is back"
    by_bytes = Usage(now_s=0.0)
    by_bytes.bytes.set_rate(1_000, 1_000)
    assert by_bytes.admit([1_000, 10], 0.0)[:2] == (1, pytest.approx(0.25))
    assert by_bytes.admit([600], 0.5)[:2] == (0, pytest.approx(0.1)), "the submit itself, when more than a quarter"


def test_a_submit_stopped_by_bytes_gives_its_message_token_back():
    usage = Usage(now_s=0.0)
    usage.messages.set_rate(2, 2)
    usage.bytes.set_rate(100, 100)
    assert usage.admit([200], 0.0)[0] == 0
    assert usage.admit([50, 50], 0.0)[0] == 2, "the refused submit kept a message token"


def test_retry_after_is_whole_milliseconds_with_a_floor():
    assert retry_after_ms(0.0, 10) == 10
    assert retry_after_ms(0.1234, 10) == 124


def test_refusal_labels_are_bounded():
    counts = RefusalCounts()
    assert counts.counts[(OTHER_CREDENTIALS_LABEL, LIMIT_MESSAGES)] == 0, "every limit has a sample from the start"
    for i in range(CREDENTIAL_LABELS_MAX + 30):
        counts.count(f"c{i}", LIMIT_MESSAGES)
    counts.count("c0", LIMIT_MESSAGES)
    names = {name for name, _ in counts.counts}
    assert len(names) == CREDENTIAL_LABELS_MAX + 1
    assert counts.counts[("c0", LIMIT_MESSAGES)] == 2
    assert counts.counts[(OTHER_CREDENTIALS_LABEL, LIMIT_MESSAGES)] == 30
