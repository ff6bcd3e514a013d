"""Failover of a local three-node cluster: SIGKILL of the current leader under a steady load,
``--kills`` times: kill to the first ack of a submit made after the kill, and the longest gap
between acks around it; then the killed node restarts and must catch up (``bench_cluster.py``
runs it)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.figures import BenchError, expect, largest_gap_s, latency_summary
from benchmarks.harness import CONVERGE_TIMEOUT_S, LEADER_TIMEOUT_S, BenchCluster
from benchmarks.load import SteadyLoad, run_precise

GOAL_FAILOVER_MEDIAN_S = 0.5
GOAL_FAILOVER_MAX_S = 1.0
#: After a leader kill: the longest wait for the first ack of a submit made after it.
FAILOVER_TIMEOUT_S = 30.0
#: After restarting the killed node: try this long under load for all three to report the same
#: last_seq, then hold the load until they do (at most CONVERGE_TIMEOUT_S in all).
CONVERGE_UNDER_LOAD_S = 5.0
#: Steady load between convergence and the next kill.
SETTLE_S = 1.0
#: Acks this long before the kill and after the first post-kill ack bound the gap search.
GAP_WINDOW_S = 1.0
STATUS_POLL_S = 0.05


async def _converge(bc: BenchCluster, load: SteadyLoad) -> tuple[float, int, bool]:
    """Wait until all three nodes report the same last_seq: under load for a while, then with
    the load held. Returns (seconds, last_seq, whether the load was held)."""
    started = time.monotonic()
    deadline = started + CONVERGE_TIMEOUT_S
    held = False
    try:
        while time.monotonic() < deadline:
            seq = await asyncio.to_thread(bc.converged_seq)
            if seq is not None:
                return time.monotonic() - started, seq, held
            if not held and time.monotonic() - started >= CONVERGE_UNDER_LOAD_S:
                load.hold()
                held = True
            await asyncio.sleep(STATUS_POLL_S)
    finally:
        if held:
            load.resume()
    report = await bc.status_soon()
    raise BenchError(f"nodes did not report the same last_seq within {CONVERGE_TIMEOUT_S:.0f} s: {report['nodes']}")


def workload_failover(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    kills: list[dict] = []
    with BenchCluster.start_in(root, "failover", insecure=args.insecure, overrides=args.overrides) as bc:
        print(
            f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.kills} leader kills under {args.failover_rate:,} msg/s",
            flush=True,
        )

        async def run() -> dict:
            client = await bc.client("failover", in_flight_max=args.in_flight_max)
            load = SteadyLoad(client, rate_per_s=args.failover_rate, payload=payload)
            # Long enough for every kill, each bounded below; stopped when the kills are done.
            budget_s = args.kills * (FAILOVER_TIMEOUT_S + CONVERGE_TIMEOUT_S + LEADER_TIMEOUT_S + SETTLE_S + 5)
            sender = asyncio.create_task(load.run(duration_s=budget_s), name="failover-load")
            try:
                await asyncio.sleep(SETTLE_S)
                for k in range(args.kills):
                    expect(not sender.done(), f"the load stopped early: {sender.exception() if sender.done() else ''}")
                    leader = await bc.leader_soon()
                    leader_id, term = leader["id"], leader["term"]
                    failovers_before = client.failovers
                    event = load.watch_from(load.submitted)
                    killed_at = time.monotonic()
                    bc.kill(leader_id)
                    try:
                        await asyncio.wait_for(event.wait(), FAILOVER_TIMEOUT_S)
                    except TimeoutError:
                        raise BenchError(
                            f"kill {k + 1} ({leader_id}): no submit made after the kill was acknowledged within "
                            f"{FAILOVER_TIMEOUT_S:.0f} s (client reconnects {client.reconnects}, in flight {client.in_flight})\n{bc.log_tails()}"
                        ) from None
                    failover_s = load.watch_acked_at - killed_at
                    await asyncio.sleep(GAP_WINDOW_S)
                    window = [t for t in load.acked_at if killed_at - GAP_WINDOW_S <= t <= load.watch_acked_at + GAP_WINDOW_S]
                    before = [t for t in load.acked_at if 0 < t < killed_at]
                    if before:
                        window.append(max(before))
                    gap_s = largest_gap_s(window)
                    new_leader = await bc.leader_soon(exclude=[leader_id])
                    client_failover_s = client.last_failover_s if client.failovers > failovers_before else None
                    restarted_at = time.monotonic()
                    bc.restart(leader_id)
                    converge_s, last_seq, held = await _converge(bc, load)
                    after = await bc.leader_soon()
                    record = {
                        "killed": leader_id,
                        "term": term,
                        "new_leader": new_leader["id"],
                        "new_term": new_leader["term"],
                        "failover_s": failover_s,
                        "ack_gap_s": gap_s,
                        "client_last_failover_s": client_failover_s,
                        "client_failovers": client.failovers - failovers_before,
                        "rejoin_converge_s": converge_s,
                        "converged_seq": last_seq,
                        "load_held_to_converge": held,
                        "leader_after_rejoin": after["id"],
                        "term_after_rejoin": after["term"],
                    }
                    kills.append(record)
                    note = []
                    if held:
                        note.append("load held to converge")
                    if after["term"] != new_leader["term"]:
                        note.append(f"rejoin changed the term {new_leader['term']} -> {after['term']} (leader {after['id']})")
                    client_text = f"{client_failover_s:.3f} s" if client_failover_s is not None else "no reconnect"
                    print(
                        f"    kill {k + 1:>2} {leader_id} (term {term}) -> {new_leader['id']} (term {new_leader['term']}): "
                        f"failover {failover_s:.3f} s, ack gap {gap_s:.3f} s, client.last_failover_s {client_text}; "
                        f"rejoined and converged at seq {last_seq:,} in {converge_s:.2f} s (after restart at +{restarted_at - killed_at:.2f} s)"
                        + (f"; {'; '.join(note)}" if note else ""),
                        flush=True,
                    )
                    await asyncio.sleep(SETTLE_S)
            finally:
                load.stop()
                try:
                    await asyncio.wait_for(sender, 5)
                except (TimeoutError, asyncio.CancelledError):
                    pass
            _, first, last = await load.checked_seqs("failover")
            total = load.latencies_ms()
            outcome = {
                "submitted": load.submitted,
                "seqs": [first, last],
                "client_failovers": client.failovers,
                "client_reconnects": client.reconnects,
                "client_resubmits": client.resubmits,
                "latency_all": latency_summary(total),
            }
            await client.close()
            return outcome

        outcome = run_precise(run())
        final = bc.settled_seq()
        expect(
            final is None or final == outcome["seqs"][1], f"failover: nodes hold {final} messages, {outcome['seqs'][1]} were acknowledged"
        )
    failovers = [k["failover_s"] for k in kills]
    gaps = [k["ack_gap_s"] for k in kills]
    client_s = [k["client_last_failover_s"] for k in kills if k["client_last_failover_s"] is not None]
    median_s, max_s = statistics.median(failovers), max(failovers)
    met_median, met_max = median_s <= GOAL_FAILOVER_MEDIAN_S, max_s <= GOAL_FAILOVER_MAX_S
    print()
    print(
        f"  kill -> first ack of a new submit   median {median_s:.3f} s  max {max_s:.3f} s   "
        f"goal median <= {GOAL_FAILOVER_MEDIAN_S} s: {'met' if met_median else 'MISSED'}, "
        f"max <= {GOAL_FAILOVER_MAX_S:.0f} s: {'met' if met_max else 'MISSED'}"
    )
    print(f"  longest gap between acks           median {statistics.median(gaps):.3f} s  max {max(gaps):.3f} s")
    if client_s:
        print(
            f"  client.last_failover_s             median {statistics.median(client_s):.3f} s  max {max(client_s):.3f} s   ({len(client_s)} of {len(kills)} kills)"
        )
    rejoin_elections = sum(1 for k in kills if k["term_after_rejoin"] != k["new_term"])
    print(
        f"  check: {outcome['submitted']:,} submits, sequence numbers {outcome['seqs'][0]:,}..{outcome['seqs'][1]:,} unique and gapless; "
        f"client failovers {outcome['client_failovers']}, resubmits {outcome['client_resubmits']:,}; "
        f"elections caused by a rejoining node {rejoin_elections}"
    )
    return {
        "rate_per_s": args.failover_rate,
        "kills": kills,
        "failover_s": {"median": median_s, "max": max_s},
        "ack_gap_s": {"median": statistics.median(gaps), "max": max(gaps)},
        "client_last_failover_s": {"median": statistics.median(client_s), "max": max(client_s)} if client_s else None,
        "goal_median_s": GOAL_FAILOVER_MEDIAN_S,
        "goal_max_s": GOAL_FAILOVER_MAX_S,
        "goal_met": met_median and met_max,
        "rejoin_elections": rejoin_elections,
        **outcome,
    }
