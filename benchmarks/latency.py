"""Latency and needless elections of a local three-node cluster under a steady offered rate
(``load.SteadyLoad``: latency from the *intended* send time to the ack): the latency
percentiles at each rate, and the leader changes seen in status polls and node logs during a
long steady load (``bench_cluster.py`` runs them)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from benchmarks.figures import cpu_text, expect, latency_line, latency_summary
from benchmarks.harness import LEADER_TIMEOUT_S, BenchCluster, leader_events
from benchmarks.load import SteadyLoad, run_precise
from benchmarks import stages
from benchmarks.machine import cpu_used, load_average
from benchmarks.throughput import raft_log_syncs, sync_text

GOAL_LATENCY_P99_MS = 5.0
GOAL_LATENCY_RATE_PER_S = 2000
GOAL_NEEDLESS_ELECTIONS = 0
#: Submits of the first second at each rate are not measured.
LATENCY_WARMUP_S = 1.0
ELECTIONS_POLL_S = 0.5


def scraped_syncs(bc) -> dict[str, tuple[float, float]]:
    """``raft_log_syncs``, or nothing when a node's metrics cannot be read (its server not yet
    listening): the rate's fsync figures are then left out, the latencies still count."""
    try:
        return raft_log_syncs(bc)
    except OSError:
        return {}


def workload_latency(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    result: dict = {"seconds": args.latency_seconds, "warmup_s": LATENCY_WARMUP_S, "rates": {}}
    probe_dir = os.path.join(root, "stages") if args.stages else ""
    if probe_dir:
        stages.enable(probe_dir)
    try:
        with BenchCluster.start_in(root, "latency", insecure=args.insecure, overrides=args.overrides) as bc:
            _latency_rates(args, bc, payload, result, probe_dir)
    finally:
        stages.disable()
    return result


def _latency_rates(args: argparse.Namespace, bc: BenchCluster, payload: bytes, result: dict, probe_dir: str) -> None:
    print(
        f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.latency_seconds:.0f} s per rate after {LATENCY_WARMUP_S:.0f} s warm-up",
        flush=True,
    )
    total_acked = 0

    async def one_rate(rate: int) -> dict:
        client = await bc.client(f"latency-{rate}", in_flight_max=args.in_flight_max)
        try:
            load = SteadyLoad(client, rate_per_s=rate, payload=payload)
            leader = (await bc.status_soon())["leader"]
            syncs_before = await asyncio.to_thread(scraped_syncs, bc)
            before, started = bc.cpu_times(), time.monotonic()
            await load.run(duration_s=LATENCY_WARMUP_S + args.latency_seconds)
            seconds = time.monotonic() - started
            cpu = cpu_used(before, bc.cpu_times(), seconds)
            syncs_after = await asyncio.to_thread(scraped_syncs, bc)
            syncs, sync_figures = ("", {})
            if syncs_before and syncs_after.keys() == syncs_before.keys():
                syncs, sync_figures = sync_text(syncs_before, syncs_after, seconds)
            seqs, _, _ = await load.checked_seqs(f"{rate} msg/s", seqs_what=f"latency {rate} msg/s")
            first_index = int(LATENCY_WARMUP_S * rate)
            total = load.latencies_ms(first_index=first_index)
            lag, service = load.split_ms(first_index=first_index)
            measured = load.submitted - first_index
            table = None
            if probe_dir:
                submits = [(load.seqs[i], load.sent[i], load.acked_at[i]) for i in range(first_index, load.submitted) if load.seqs[i]]
                table = await asyncio.to_thread(stages.stage_table, probe_dir, submits)
            return {
                "stages": table,
                "offered_per_s": rate,
                "achieved_per_s": measured / args.latency_seconds,
                "submitted": load.submitted,
                "latency": latency_summary(total),
                "sender_lag": latency_summary(lag),
                "service": latency_summary(service),
                "reconnects": client.reconnects,
                "leader": bc.node_id_of(leader),
                "cpu_share": cpu,
                "raft_log_fsyncs": sync_figures,
                "raft_log_fsyncs_text": syncs,
                "raft_log_fsync": sync_figures,  # the table of benchmarks.__main__
                "seqs": seqs,
            }
        finally:
            await client.close()

    for rate in args.rates:
        load_now = load_average()
        outcome = run_precise(one_rate(rate))
        total_acked += len(outcome.pop("seqs"))
        s = outcome["latency"]
        goal = ""
        if rate == GOAL_LATENCY_RATE_PER_S:
            met = s["p99_ms"] <= GOAL_LATENCY_P99_MS
            goal = f"   goal p99 <= {GOAL_LATENCY_P99_MS:.0f} ms: {'met' if met else 'MISSED'}"
            outcome["goal_p99_ms"] = GOAL_LATENCY_P99_MS
            outcome["goal_met"] = met
        print(f"  {rate:,} msg/s offered ({outcome['submitted']:,} submits, load avg {load_now[0] if load_now else '-'}){goal}")
        print(latency_line("intended -> ack", s))
        print(latency_line("sender lag", outcome["sender_lag"]))
        print(latency_line("send -> ack", outcome["service"]))
        print(f"  {'':<18} cpu {cpu_text(outcome['cpu_share'])} (leader {outcome['leader'] or '?'})", flush=True)
        if any(f["fsyncs_per_s"] for f in outcome["raft_log_fsyncs"].values()):
            print(f"  {'':<18} Raft log {outcome.pop('raft_log_fsyncs_text')}", flush=True)
        outcome.pop("raft_log_fsyncs_text", None)
        if outcome["reconnects"]:
            print(f"  {'':<18} client reconnected {outcome['reconnects']} times")
        if outcome["stages"] is not None:
            print("\n".join(stages.stage_lines(outcome["stages"])), flush=True)
        result["rates"][str(rate)] = outcome
    final = bc.settled_seq()
    expect(final is None or final == total_acked, f"latency workload: nodes hold {final} messages, {total_acked} were acknowledged")


def workload_elections(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    with BenchCluster.start_in(root, "elections", insecure=args.insecure, overrides=args.overrides) as bc:
        first = bc.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
        startup_events = leader_events(bc.log_lines())
        offsets = bc.log_sizes()
        print(
            f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; first leader {first['id']} (term {first['term']}); "
            f"{args.elections_rate:,} msg/s for {args.elections_seconds:.0f} s",
            flush=True,
        )

        async def run() -> dict:
            client = await bc.client("elections", in_flight_max=args.in_flight_max)
            load = SteadyLoad(client, rate_per_s=args.elections_rate, payload=payload)
            before, cpu_started = bc.cpu_times(), time.monotonic()
            sender = asyncio.create_task(load.run(duration_s=args.elections_seconds), name="elections-load")
            seen: list[dict] = []
            leader, term = first["address"], first["term"]
            polls = unreachable = 0
            next_report = time.monotonic() + 60
            try:
                while not sender.done():
                    report = await bc.status_soon()
                    polls += 1
                    up = [n for n in report["nodes"] if n.get("role") != "unreachable"]
                    unreachable += len(report["nodes"]) - len(up)
                    top_term = max((n["term"] for n in up), default=term)
                    if (report["leader"] and report["leader"] != leader) or top_term > term:
                        event = {"at_s": round(time.monotonic() - started, 2), "leader": report["leader"], "term": top_term}
                        seen.append(event)
                        print(
                            f"    leader change at +{event['at_s']:.1f} s: {bc.node_id_of(report['leader']) or 'none'} term {top_term}",
                            flush=True,
                        )
                        leader = report["leader"] or leader
                        term = max(term, top_term)
                    if time.monotonic() >= next_report:
                        next_report += 60
                        print(
                            f"    +{time.monotonic() - started:.0f} s: {load.acked:,} acked, {len(seen)} leader changes, load avg {load_average()[:1]}",
                            flush=True,
                        )
                    try:
                        await asyncio.wait_for(asyncio.shield(sender), ELECTIONS_POLL_S)
                    except TimeoutError:
                        pass
                sender.result()
                cpu = cpu_used(before, bc.cpu_times(), time.monotonic() - cpu_started)
            finally:
                load.stop()
                if not sender.done():
                    sender.cancel()
            _, first_seq, last_seq = await load.checked_seqs("elections")
            total = load.latencies_ms()
            outcome = {
                "status_changes": seen,
                "status_polls": polls,
                "status_unreachable": unreachable,
                "submitted": load.submitted,
                "achieved_per_s": load.submitted / args.elections_seconds,
                "seqs": [first_seq, last_seq],
                "latency": latency_summary(total),
                "client_failovers": client.failovers,
                "client_reconnects": client.reconnects,
                "cpu_share": cpu,
            }
            await client.close()
            return outcome

        started = time.monotonic()
        outcome = run_precise(run())
        events = leader_events(bc.log_lines(offsets))
        final = bc.settled_seq()
    log_elections = len([t for t in events["leader_terms"] if t > first["term"]])
    status_elections = len(outcome["status_changes"])
    needless = max(log_elections, status_elections)
    met = needless <= GOAL_NEEDLESS_ELECTIONS
    print()
    print(f"  needless elections {needless}   goal {GOAL_NEEDLESS_ELECTIONS}: {'met' if met else 'MISSED'}")
    print(f"    seen in {outcome['status_polls']} status polls: {status_elections} leader changes")
    print(
        f"    in the node logs after the first election: leaders named in terms {events['leader_terms'] or '-'} "
        f"({log_elections} new terms), {events['unknown_lines']} 'leader is now unknown' lines, "
        f"{events['no_leader_role_lines']} 'role -> candidate' (no leader known) lines"
    )
    print(f"    before the load (start-up): leaders named in terms {startup_events['leader_terms']}")
    s = outcome["latency"]
    print(latency_line(f"{args.elections_rate} msg/s", s))
    print(f"  {'':<18} cpu {cpu_text(outcome['cpu_share'])} (first leader {first['id']})")
    print(
        f"  check: {outcome['submitted']:,} submits, sequence numbers {outcome['seqs'][0]:,}..{outcome['seqs'][1]:,} unique and gapless; "
        f"client failovers {outcome['client_failovers']}, reconnects {outcome['client_reconnects']}; nodes converged at {final}"
    )
    return {
        "rate_per_s": args.elections_rate,
        "seconds": args.elections_seconds,
        "first_leader": first["id"],
        "first_term": first["term"],
        "needless_elections": needless,
        "status_leader_changes": status_elections,
        "log_new_terms": log_elections,
        "log_events": events,
        "startup_log_events": startup_events,
        "goal": GOAL_NEEDLESS_ELECTIONS,
        "goal_met": met,
        **outcome,
    }
