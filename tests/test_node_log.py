"""The node log: repeated lines rate-limited per kind, the file rotated by size."""

from __future__ import annotations

import logging
import os
import stat

from raftseq.cluster.node_log import RepeatLimiter, RotatingNodeLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(template: str = "authentication failed from %s", *args: object, level: int = logging.WARNING, name: str = "raftseq.gateway"):
    return logging.LogRecord(name, level, __file__, 1, template, args or ("127.0.0.1:1",), None)


def passed(limiter: RepeatLimiter, records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if limiter.filter(r)]


def test_lines_of_one_kind_beyond_the_rate_are_dropped_and_counted():
    clock = Clock()
    limiter = RepeatLimiter(lines_max=3, interval_s=10, clock=clock)
    out = passed(limiter, [record("authentication failed from %s", f"10.0.0.{i}:1") for i in range(100)])
    assert out == [
        "authentication failed from 10.0.0.0:1",
        "authentication failed from 10.0.0.1:1",
        "authentication failed from 10.0.0.2:1 [similar lines dropped for the next 10 s]",
    ]
    assert limiter.dropped_total == 97
    clock.now = 10.0
    assert passed(limiter, [record()]) == ["authentication failed from 127.0.0.1:1 [97 similar lines dropped in the 10 s before]"]


def test_kinds_are_counted_apart_and_critical_lines_always_pass():
    limiter = RepeatLimiter(lines_max=1, interval_s=10, clock=Clock())
    assert len(passed(limiter, [record("a %s"), record("a %s"), record("b %s"), record("a %s", name="other")])) == 3
    assert len(passed(limiter, [record("a %s", level=logging.CRITICAL) for _ in range(5)])) == 5


def test_the_kinds_remembered_are_bounded():
    limiter = RepeatLimiter(lines_max=1, interval_s=10, kinds_max=4, clock=Clock())
    passed(limiter, [record(f"kind {i} %s") for i in range(100)])
    assert len(limiter.kinds) == 4


def test_the_log_file_is_rotated_at_its_size_and_old_files_are_bounded(tmp_path):
    path = tmp_path / "n1.log"
    handler = RotatingNodeLog(str(path), bytes_max=4096, files_kept=2)
    logger = logging.getLogger("raftseq.test_node_log")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.warning("line %d of a flood", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(os.listdir(tmp_path))
    assert files == ["n1.log", "n1.log.1", "n1.log.2"]
    assert all(os.path.getsize(tmp_path / f) <= 4096 for f in files)
    assert all(stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o600 for f in files)
    assert "line 999 of a flood" in path.read_text()
