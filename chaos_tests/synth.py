"""A synthetic ops-soak history, to measure the checker on histories as long as an hour's.

``python -m chaos_tests.synth OUT.jsonl --ops N [--seed S]`` writes what the ops scenario
records, without a cluster: clients submitting the workload's payloads (``c<i>-<n>-<pad>``) in
batches, most acknowledged, some failed (not in the stream), some unknown (half of them in the
stream, half never completed), two subscribers receiving every seq, a few faults (every other one
marked as hitting the leader) and final reads of three nodes. The history is clean: every
invariant holds, so the checker's verdict on it is known in advance.

Then ``python -m chaos_tests.synth --check OUT.jsonl`` checks it and prints the peak RSS and the
time taken (the measurement of ``check_file``'s footprint).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time

from chaos_tests.history import HistoryRecorder

CLIENTS = 8
SUBSCRIBERS = ("s1", "s2")
NODES = ("n1", "n2", "n3")
#: Submits in flight per batch (all invoked, then all completed, then delivered).
BATCH_OPS = 64
#: The workload's payload padding (``WorkloadConfig.payload_pad``).
PAYLOAD_PAD = 40
#: One in this many ops fails, and one in this many is unknown.
FAIL_EVERY = 2000
UNKNOWN_EVERY = 1000
FAULTS = 8
#: The recorder's clock steps by this much per event: ~5,000 acks per second, as the soak.
STEP_NS = 50_000


def write_history(path: str, ops: int, *, seed: int = 1) -> None:
    rng = random.Random(seed)
    clock = iter(range(1, 1 << 62, STEP_NS))
    pad = "." * PAYLOAD_PAD
    sessions = [f"{rng.getrandbits(128):032x}" for _ in range(CLIENTS)]
    client_seqs = [0] * CLIENTS
    stream: list[tuple[int, str, int, str]] = []
    fault_at = {ops * (i + 1) // (FAULTS + 1): i for i in range(FAULTS)}
    with HistoryRecorder(path, clock_ns=lambda: next(clock)) as rec:
        rec.note("scenario", scenario="ops", durability="fsync", seed=seed)
        for sub in SUBSCRIBERS:
            rec.sub_connect(sub, NODES[SUBSCRIBERS.index(sub)], 1)
        fault = None
        for first in range(0, ops, BATCH_OPS):
            batch = []
            for n in range(first, min(ops, first + BATCH_OPS)):
                if n in fault_at:
                    if fault is not None:
                        rec.fault_end(fault)
                    fault = rec.fault_start("kill", node=NODES[n % 3], role="leader" if fault_at[n] % 2 else "follower")
                c = n % CLIENTS
                client_seqs[c] += 1
                message = (sessions[c], client_seqs[c], f"c{c}-{n:07d}-{pad}")
                batch.append((rec.invoke(f"c{c}", *message), message, n))
            delivered_from = len(stream) + 1
            for op, message, n in batch:
                if n % FAIL_EVERY == FAIL_EVERY - 1:
                    rec.complete_fail(op, "rejected")
                    continue
                stream.append((len(stream) + 1, *message))
                if n % UNKNOWN_EVERY == UNKNOWN_EVERY - 1:
                    rec.complete_unknown(op, "deadline")
                elif n % UNKNOWN_EVERY == UNKNOWN_EVERY // 2:
                    stream.pop()  # never completed, never committed
                else:
                    rec.complete_ok(op, len(stream))
            for sub in SUBSCRIBERS:
                for seq, session, client_seq, payload in stream[delivered_from - 1 :]:
                    rec.deliver(sub, NODES[SUBSCRIBERS.index(sub)], seq, session, client_seq, payload)
        if fault is not None:
            rec.fault_end(fault)
        for node in NODES:
            rec.final_read(node, stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos_tests.synth", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="check PATH and print peak RSS and time")
    args = parser.parse_args(argv)
    if not args.check:
        write_history(args.path, args.ops, seed=args.seed)
        return 0
    from chaos_tests.checker import check_file

    started = time.monotonic()
    report = check_file(args.path)
    elapsed_s = time.monotonic() - started
    print(report.format())
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"checked in {elapsed_s:.1f} s, peak RSS {rss_mib:.0f} MiB")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
