"""What the Raft links' pickle checks cost per message (``cluster/raft/safe_pickle.py``).

For messages as pysyncobj sends them on a link (a heartbeat, a reply, an AppendEntries with one
small entry, with one 60 KB batch, with eight 8 KB batches), pickled with protocol 5 (raftseq's)
and 2 (pysyncobj's own), it times in the same run: the allow-list loader alone (what
``safe_pickle.loads`` did before the memo-index check: the baseline), the check alone, and
``safe_pickle.loads`` (both).
Each figure is the median of ``--rounds`` rounds of ``--loops`` loads, in microseconds.

    python -m benchmarks.bench_safe_pickle [--rounds 7] [--loops 3000]
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import statistics
import time
from collections.abc import Callable

from raftseq.cluster.raft import safe_pickle


def messages() -> dict[str, object]:
    def append_entries(entries: list) -> dict:
        return {"type": "append_entries", "term": 5, "commit_index": 1234, "entries": entries, "prevLogIdx": 1234, "prevLogTerm": 5}

    link_key = os.urandom(32)  # every link message is wrapped with the link's random key
    return {
        "heartbeat": (link_key, append_entries([])),
        "reply": (link_key, {"type": "next_node_idx", "next_node_idx": 1235, "success": True, "reset": False, "term": 5}),
        "ae 1 x 200 B": (link_key, append_entries([(os.urandom(200), 1235, 5)])),
        "ae 1 x 60 KB": (link_key, append_entries([(os.urandom(60_000), 1235, 5)])),
        "ae 8 x 8 KB": (link_key, append_entries([(os.urandom(8_000), 1235 + i, 5) for i in range(8)])),
    }


def median_us(load: Callable[[bytes], object], data: bytes, rounds: int, loops: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(loops):
            load(data)
        times.append((time.perf_counter() - started) / loops * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loops", type=int, default=3000)
    args = parser.parse_args(argv)
    print(f"{'message':14} {'proto':>5} {'bytes':>7} {'before us':>9} {'check us':>9} {'after us':>9} {'after/before':>12}")
    for name, message in messages().items():
        for protocol in (5, 2):
            data = pickle.dumps(message, protocol)
            plain = median_us(lambda d: safe_pickle.AllowListUnpickler(io.BytesIO(d)).load(), data, args.rounds, args.loops)
            check = median_us(lambda d: safe_pickle.check_memo_indexes(d, len(d)), data, args.rounds, args.loops)
            safe = median_us(safe_pickle.loads, data, args.rounds, args.loops)
            print(f"{name:14} {protocol:>5} {len(data):>7} {plain:>9.2f} {check:>9.2f} {safe:>9.2f} {safe / plain:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
