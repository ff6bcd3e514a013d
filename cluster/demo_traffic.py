"""Demo traffic for ``raftseq cluster up --demo``: a few sessions submit orders at a steady
rate, one subscriber follows the stream from sequence 1, and a line a second says how it goes.
Kill a node (its pid is printed) and watch the clients fail over and the subscriber resume."""

from __future__ import annotations

import asyncio
import random
import sys
import time

from raftseq.clients import NotConnected, Rejected, SequencerClient, subscribe
from raftseq.clients.tls import TlsOptions

SESSIONS = ("oms-retail", "router", "refdata-admin")


async def _submitter(client: SequencerClient, rate_per_s: float, stop: dict, counts: dict) -> None:
    rng = random.Random(client.session)
    interval = 1.0 / rate_per_s
    next_at = time.monotonic()
    n = 0
    pending: set[asyncio.Future] = set()
    while not stop["signal"]:
        n += 1
        text = f"{client.session} order {n} {rng.choice(('BUY', 'SELL'))} {rng.randint(1, 500)} XYZ @ {rng.randint(9000, 11000) / 100:.2f}"
        try:
            await client.wait_for_room()
            future = client.submit_nowait(text.encode())
        except (NotConnected, Rejected) as exc:
            counts["errors"] += 1
            counts["last_error"] = str(exc)
            await asyncio.sleep(0.5)
            continue
        pending.add(future)
        future.add_done_callback(pending.discard)
        future.add_done_callback(lambda f: counts.__setitem__("acked", counts["acked"] + (0 if f.cancelled() or f.exception() else 1)))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            next_at = time.monotonic()


async def _subscriber(endpoints: list[str], token: str, stop: dict, state: dict, tls: TlsOptions | None) -> None:
    async for message in subscribe(endpoints, from_seq=1, token=token, session="demo-subscriber", prefer=endpoints[-1], tls=tls):
        if message.seq != state["last_seq"] + 1:
            state["gaps"] += 1
        state["last_seq"] = message.seq
        state["last_text"] = message.payload.decode(errors="replace")
        if stop["signal"]:
            return


async def run_demo_traffic(cluster, supervisor, stop: dict, *, rate_per_s: float) -> int:
    """Demo traffic and a progress line every second (naming the leader) until a stop request
    (0) or until no node is left running and none will be restarted (1). `supervisor` is the
    ``cluster.up.Supervisor`` of `cluster`: its lines are printed as ``[cluster] ...``."""
    endpoints = cluster.endpoints
    token = cluster.token
    counts = {"acked": 0, "errors": 0, "last_error": ""}
    state = {"last_seq": 0, "last_text": "", "gaps": 0}
    clients = [SequencerClient(endpoints, session=name, token=token, in_flight_max=1000, tls=cluster.tls) for name in SESSIONS]
    tasks = []
    try:
        for client in clients:
            while not stop["signal"]:
                try:
                    await client.connect()
                    break
                except NotConnected:
                    await asyncio.sleep(0.5)
            tasks.append(asyncio.create_task(_submitter(client, rate_per_s, stop, counts)))
        tasks.append(asyncio.create_task(_subscriber(endpoints, token, stop, state, cluster.tls)))
        last_acked = 0
        last_print = time.monotonic()
        while not stop["signal"]:
            await asyncio.sleep(0.2)
            for line in await asyncio.to_thread(supervisor.step):
                if not stop["signal"]:
                    print(f"[cluster] {line}", flush=True)
            if supervisor.finished():
                print("raftseq cluster up: no node is running and none will be restarted", file=sys.stderr, flush=True)
                return 1
            now = time.monotonic()
            if now - last_print >= 1.0:
                rate = (counts["acked"] - last_acked) / (now - last_print)
                last_acked, last_print = counts["acked"], now
                failovers = sum(c.failovers for c in clients)
                print(
                    f"leader {supervisor.leader_name():<4} acked {counts['acked']:>8}  {rate:>7.0f} msg/s  subscriber at seq {state['last_seq']:>8} "
                    f"(gaps {state['gaps']})  failovers {failovers}  last: {state['last_text'][:60]}",
                    flush=True,
                )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    return 0
