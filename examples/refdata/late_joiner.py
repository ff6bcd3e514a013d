"""A late joiner from a snapshot against a full replay, on a long stream (a measurement).

    python -m examples.refdata.late_joiner [--messages 1000000] [--instruments 10000] [--tail 10000]

Starts a local three-node cluster, lists ``--instruments`` instruments and submits
``--messages`` reference-data updates; a publisher copy applies them and publishes a snapshot;
``--tail`` more updates and an end-of-day message follow. Then, one after the other, in this
process:

* **full replay** — a new copy subscribes from sequence number 1 and applies everything up to
  the end of the day;
* **late joiner** — a new copy asks a follower for the latest snapshot, fetches its chunks,
  checks length, SHA-256 and the state digest, and replays only what follows it.

Both must end with the publisher's digest. Prints both times and their ratio. Not a test (it
takes a minute or two on two cores); ``tests/test_examples_refdata.py`` covers correctness.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

from raftseq.clients import SequencerClient
from raftseq.clients.sm import StateMachineRunner, encode_message
from raftseq.cluster.local import LocalCluster, free_base_port
from raftseq.cluster.status import gather_status
from examples.refdata.admin import listing, updates
from examples.refdata.demo import data_directory, example_parser, wait_for_leader
from examples.refdata.machine import ReferenceData
from examples.refdata.messages import EndOfDay

CHUNK = 1000
IN_FLIGHT_CHUNKS = 16


async def submit_stream(client: SequencerClient, messages, say, label: str) -> int:
    """Submit messages (an iterable of ``SmMessage``) in pipelined chunks; returns the last seq."""
    pending: list[asyncio.Future] = []
    last = 0
    sent = 0
    started = time.monotonic()
    batch: list[bytes] = []

    async def flush() -> None:
        nonlocal last
        while len(pending) >= IN_FLIGHT_CHUNKS:
            last = max(last, (await pending.pop(0))[-1])
        await client.wait_for_room(len(batch))
        pending.append(client.submit_batch_nowait(list(batch)))
        batch.clear()

    for message in messages:
        batch.append(encode_message(message))
        if len(batch) == CHUNK:
            await flush()
            sent += CHUNK
            if sent % 200_000 == 0:
                say(f"  {label}: {sent:,} submitted ({sent / (time.monotonic() - started):,.0f}/s)")
    if batch:
        await flush()
    for future in pending:
        last = max(last, (await future)[-1])
    return last


def generated(count: int, instruments: int, seed: int):
    rng = random.Random(seed)
    for start in range(0, count, 10_000):
        yield from updates(min(10_000, count - start), instruments, rng)


async def scenario(cluster: LocalCluster, args, say) -> dict:
    endpoints, token = cluster.endpoints, cluster.token
    publisher_data = ReferenceData()
    publisher = StateMachineRunner(endpoints, [publisher_data], token=token, replica="publisher")
    async with SequencerClient(endpoints, session="refdata-admin", token=token, in_flight_max=CHUNK * IN_FLIGHT_CHUNKS) as admin:
        t = time.monotonic()
        listed = await submit_stream(admin, listing(args.instruments, random.Random(args.seed)), say, "listing")
        last = await submit_stream(admin, generated(args.messages, args.instruments, args.seed + 1), say, "updates")
        say(
            f"{args.instruments:,} instruments (to seq {listed}) and {args.messages:,} updates sequenced, to seq {last:,}, in {time.monotonic() - t:.1f} s"
        )
        t = time.monotonic()
        await publisher.run(until_seq=last)
        say(f"publisher applied the stream in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        [info] = await publisher.publish_snapshot("refdata")
        say(
            f"snapshot covering seq {info.covered_seq:,}: {info.total_bytes:,} bytes in {info.chunk_count} chunks "
            f"(seq {info.first_seq}..{info.last_seq}), published in {time.monotonic() - t:.2f} s"
        )
        tail_last = await submit_stream(admin, generated(args.tail, args.instruments, args.seed + 2), say, "tail")
        eod = (await admin.submit_batch([encode_message(EndOfDay("2026-11-26"))]))[0]
        say(f"{args.tail:,} more updates to seq {tail_last:,}; end of day at seq {eod:,}")
    await publisher.run(until_seq=eod)
    await publisher.close()
    reference = publisher.digest("refdata")

    # Any node serves snapshot queries and journal reads: the late joiner is given followers only.
    leader = (await asyncio.to_thread(gather_status, endpoints, token=token, timeout_s=2.0))["leader"]
    followers = [e for e in endpoints if e != leader]
    full_data = ReferenceData()
    full = StateMachineRunner(endpoints, [full_data], token=token)
    t = time.monotonic()
    await full.run(until_seq=eod)
    full_s = time.monotonic() - t
    await full.close()
    say(f"full replay:  {full_s:7.2f} s  ({full.messages_applied:,} messages applied from seq 1)")

    late_data = ReferenceData()
    late = StateMachineRunner(followers, [late_data], token=token, from_snapshot=True)
    t = time.monotonic()
    await late.run(until_seq=eod)
    late_s = time.monotonic() - t
    await late.close()
    joined = late.joined_from.get("refdata")
    say(
        f"late joiner:  {late_s:7.2f} s  (from followers {', '.join(followers)}: snapshot covering seq "
        f"{joined.covered_seq if joined else 0:,} loaded and verified, then {late.messages_applied:,} messages applied)"
    )
    same = full.digest("refdata") == late.digest("refdata") == reference
    say(
        f"late joiner took {late_s / full_s:.1%} of the full replay's time ({full_s / late_s:.0f}x faster); digests {'identical' if same else 'DIFFER'}"
    )
    return {"full_s": full_s, "late_s": late_s, "identical": same, "eod": eod, "joined_from": joined}


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("examples.refdata.late_joiner", __doc__, instruments=10_000, kept="the cluster's data")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--tail", type=int, default=10_000)
    args = parser.parse_args(argv)
    with data_directory(args.data_dir, prefix="raftseq-late-joiner-") as data_dir:
        cluster = LocalCluster(os.path.join(data_dir, "cluster"), free_base_port(), insecure=False, restart=False)
        try:
            cluster.start()
            wait_for_leader(cluster, 20)
            result = asyncio.run(scenario(cluster, args, lambda line: print(line, flush=True)))
        finally:
            cluster.stop()
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
