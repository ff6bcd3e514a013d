"""``raftseq demo``: demo traffic through one replica's core (machine + journal), in one process.

Several sessions submit numbered messages; some submits are retried (as a client does after a
lost acknowledgement) and answered from the dedup window. The stream is printed as it grows and
the journal verified at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from raftseq.cluster.cli.args import add_command, positive
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal, verify_journal
from raftseq.sequencer.machine import Outcome, SequencerMachine
from raftseq.sequencer.stream import SequencedStream


def cmd_demo(args: argparse.Namespace) -> int:
    """Run demo traffic from several sessions (with retries and duplicates) through the state machine and a
    journal in DIR, print the sequenced stream as it grows, then verify the journal."""
    if args.batch > limits.BATCH_ENTRIES_MAX:
        print(f"raftseq demo: --batch must be at most {limits.BATCH_ENTRIES_MAX}")
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    temporary = not args.dir
    directory = args.dir or tempfile.mkdtemp(prefix="raftseq-demo-")
    print(f"raftseq demo: seed {seed}, journal in {directory}")
    sessions = [f"demo-{i}" for i in range(args.sessions)]
    next_client_seq = dict.fromkeys(sessions, 1)
    counts = {Outcome.SEQUENCED: 0, Outcome.DUPLICATE: 0, Outcome.REJECTED: 0}
    journal = Journal.open(directory, segment_bytes_max=4 * limits.MIB)
    try:
        core = SequencedStream(SequencerMachine(), journal)
        started = time.monotonic()
        log_time_ns = time.time_ns()
        shown = 0
        while counts[Outcome.SEQUENCED] < args.messages:
            entries = []
            for _ in range(min(args.batch, args.messages - counts[Outcome.SEQUENCED])):
                session = rng.choice(sessions)
                client_seq = next_client_seq[session]
                if client_seq > 1 and rng.random() < 0.05:  # a retry of an earlier submit
                    client_seq = rng.randint(max(1, client_seq - 50), client_seq - 1)
                else:
                    next_client_seq[session] += 1
                text = f"order {session}#{client_seq} px={rng.randint(9000, 11000) / 100:.2f} qty={rng.randint(1, 500)}"
                entries.append(protocol.Entry(session, client_seq, text.encode()))
            log_time_ns = max(log_time_ns, time.time_ns())
            result = core.apply(protocol.encode_batch(log_time_ns, entries))
            for r in result.results:
                counts[r.outcome] += 1
            if result.first_seq and shown < 10:
                for record in journal.records(result.first_seq, min(result.last_seq, result.first_seq + 2)):
                    print(f"  seq {record.seq:>8}  {record.session}#{record.client_seq}  {record.payload.decode()}")
                    shown += 1
        elapsed = time.monotonic() - started
        print(
            f"sequenced {counts[Outcome.SEQUENCED]} messages in {elapsed:.2f} s "
            f"({counts[Outcome.SEQUENCED] / max(elapsed, 1e-9):,.0f}/s); "
            f"{counts[Outcome.DUPLICATE]} retries answered from the dedup window, {counts[Outcome.REJECTED]} rejected"
        )
        print(f"state digest {core.machine.state_digest()[:16]}…  last seq {journal.last_seq}")
    finally:
        journal.close()
    report = verify_journal(directory)
    print(f"journal verify: {'ok' if report.ok else 'FAILED: ' + report.problem}, {report.records} records, {report.segments} segments")
    if temporary:
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if report.ok else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = add_command(sub, "demo", cmd_demo, help="sequence demo traffic through the core (machine + journal) in one process")
    demo.add_argument("--dir", default="", help="journal directory (default: a new temporary directory)")
    demo.add_argument("--messages", type=positive, default=10_000, help="messages to sequence (default 10000)")
    demo.add_argument("--sessions", type=positive, default=4, help="client sessions (default 4)")
    demo.add_argument("--batch", type=positive, default=100, help=f"entries per batch, at most {limits.BATCH_ENTRIES_MAX} (default 100)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
