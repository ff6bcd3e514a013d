"""Throughput of a local three-node cluster: acknowledged messages per second from one client
process, per message (``submit_nowait``) and in batches (``submit_batch_nowait``), and from
several client processes in batches; and what metrics cost: batched throughput with every
node's metrics served and scraped, against no metrics server (``bench_cluster.py`` runs them)."""

from __future__ import annotations

import argparse
import asyncio
import urllib.request
from collections.abc import Sequence

from benchmarks.figures import cpu_text, describe_ranges, expect, goal_text, merge_ranges, spread
from benchmarks.harness import BenchCluster
from benchmarks.load import ThroughputRun, multi_client_run, one_client_run
from benchmarks.machine import load_average
from raftseq.cluster.local import Watcher

GOAL_THROUGHPUT_PER_S = 150_000
#: Goal of the metrics workload: throughput with metrics on within this fraction of it off.
GOAL_METRICS_COST = 0.05
#: Messages of the warm-up run on a fresh cluster (at most ``--messages``).
WARMUP_MESSAGES = 20_000


#: How long a node may take, once its cluster is up, to serve its metrics (it opens its metrics
#: port after its client port: a scrape right after the start can be refused).
METRICS_SERVED_TIMEOUT_S = 20.0


def raft_log_syncs(bc: BenchCluster) -> dict[str, tuple[float, float]]:
    """node id -> (Raft log fsyncs, entries they covered) so far, from each node's metrics
    (power durability; zeros in crash durability). Empty when the nodes serve no metrics.
    ``LocalCluster.metrics`` reads a page made after the last one arrived (a quick run of
    0.15 s otherwise read the page from before it and counted 0 fsyncs)."""
    found = {}
    for node in bc.nodes:
        if not node.config.metrics_address:
            continue
        samples = bc.wait_for_metrics(node.id, lambda _: True, what="serves its metrics", timeout_s=METRICS_SERVED_TIMEOUT_S)
        found[node.id] = (samples.get("raftseq_raft_log_fsyncs_total", 0.0), samples.get("raftseq_raft_log_fsync_entries_sum", 0.0))
    return found


def sync_text(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], seconds: float) -> tuple[str, dict]:
    """Raft log fsyncs per second and entries per fsync of each node over one run."""
    figures = {}
    for node_id, (syncs, entries) in after.items():
        d_syncs, d_entries = syncs - before[node_id][0], entries - before[node_id][1]
        figures[node_id] = {"fsyncs_per_s": d_syncs / seconds, "entries_per_fsync": d_entries / d_syncs if d_syncs else 0.0}
    text = ", ".join(f"{k} {v['fsyncs_per_s']:,.0f} fsync/s x {v['entries_per_fsync']:.1f} entries" for k, v in figures.items())
    return text, figures


def workload_throughput(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    variants = [
        ("per_message", f"1 client, submit_nowait per message (window {args.in_flight_max:,})", 1, 1),
        ("batched", f"1 client, submit_batch_nowait, batches of {args.batch}", args.batch, 1),
        ("processes", f"{args.processes} client processes, submit_batch_nowait, batches of {args.batch}", args.batch, args.processes),
    ]
    with BenchCluster.start_in(root, "throughput", insecure=args.insecure, overrides=args.overrides) as bc:
        print(f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.messages:,} messages per run", flush=True)
        all_ranges: list[list[int]] = []

        async def warm_up() -> None:
            messages = min(args.messages, WARMUP_MESSAGES)
            run = await one_client_run(
                bc,
                "tp-warmup",
                payload,
                messages=messages,
                batch=args.batch,
                in_flight_max=args.in_flight_max,
                timeout_s=args.run_timeout_s,
            )
            all_ranges.append([run.seqs_first, run.seqs_last])

        asyncio.run(warm_up())
        runs: dict[str, list[ThroughputRun]] = {key: [] for key, *_ in variants}
        raft_log_fsyncs: dict[str, list[dict]] = {key: [] for key, *_ in variants}
        # Interleaved (a, b, c, a, b, c, ...) so a change in the machine's load hits every variant.
        for r in range(args.runs):
            for key, _, batch, processes in variants:
                session = f"tp-{key}-{r + 1}"
                syncs_before = raft_log_syncs(bc)
                if processes == 1:
                    run = asyncio.run(
                        one_client_run(
                            bc,
                            session,
                            payload,
                            messages=args.messages,
                            batch=batch,
                            in_flight_max=args.in_flight_max,
                            timeout_s=args.run_timeout_s,
                        )
                    )
                else:
                    run = multi_client_run(
                        bc,
                        session,
                        processes=processes,
                        messages=args.messages,
                        batch=batch,
                        payload_bytes=args.payload_bytes,
                        in_flight_max=args.in_flight_max,
                        timeout_s=args.run_timeout_s,
                    )
                runs[key].append(run)
                all_ranges.append([run.seqs_first, run.seqs_last])
                syncs, sync_figures = sync_text(syncs_before, raft_log_syncs(bc), run.seconds)
                raft_log_fsyncs[key].append(sync_figures)
                print(
                    f"    run {r + 1} {key:<12} {run.per_s:>10,.0f} msg/s  ({run.messages:,} in {run.seconds:.2f} s, "
                    f"seqs {run.seqs_first:,}..{run.seqs_last:,} unique and gapless; cpu {cpu_text(run.cpu_s)}"
                    + (f"; reconnects {run.reconnects}, resubmits {run.resubmits}" if run.reconnects or run.resubmits else "")
                    + (f"; Raft log {syncs}" if args.overrides and args.overrides.get("durability") == "power" else "")
                    + ")",
                    flush=True,
                )
        merged = merge_ranges(all_ranges, "throughput workload")
        expect(len(merged) == 1 and merged[0][0] == 1, f"throughput workload: numbers are not one run from 1: {describe_ranges(merged)}")
        final = bc.settled_seq()
    result: dict = {"messages_per_run": args.messages, "payload_bytes": args.payload_bytes, "variants": {}}
    print()
    for key, title, batch, processes in variants:
        rates = [run.per_s for run in runs[key]]
        s = spread(rates)
        status = goal_text(s["median"] >= GOAL_THROUGHPUT_PER_S, s["median"] / GOAL_THROUGHPUT_PER_S - 1)
        print(
            f"  {key:<12} {s['median']:>10,.0f} msg/s   min {s['min']:>9,.0f}  max {s['max']:>9,.0f}   goal >= {GOAL_THROUGHPUT_PER_S:,}: {status}"
        )
        print(f"  {'':<12} {title}")
        result["variants"][key] = {
            "title": title,
            "batch": batch,
            "processes": processes,
            "messages_per_s": s,
            "goal_messages_per_s": GOAL_THROUGHPUT_PER_S,
            "goal_met": s["median"] >= GOAL_THROUGHPUT_PER_S,
            "cpu_share_runs": [run.cpu_s for run in runs[key]],
            "raft_log_fsync_runs": raft_log_fsyncs[key],
            "reconnects": sum(run.reconnects for run in runs[key]),
            "resubmits": sum(run.resubmits for run in runs[key]),
        }
    print(f"  check: {merged[0][1]:,} sequence numbers 1..{merged[0][1]:,}, unique and gapless; nodes converged at {final}")
    result["total_sequenced"] = merged[0][1]
    return result


class Scraper(Watcher):
    """Fetches every node's /metrics every `interval_s` on a thread, as Prometheus would."""

    def __init__(self, urls: Sequence[str], interval_s: float) -> None:
        super().__init__(interval_s, name="bench-scraper")
        self.urls = list(urls)
        self.scrapes = 0
        self.errors = 0

    def poll(self) -> None:
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.errors += 1


def workload_metrics(args: argparse.Namespace, root: str) -> dict:
    """Batched throughput with metrics on (HTTP server, scraped every --scrape-interval) and off
    (no metrics server), alternating, each run on a fresh cluster."""
    payload = b"x" * args.payload_bytes
    modes = {"on": dict(args.overrides or {}), "off": {**(args.overrides or {}), "metrics_address": ""}}
    runs: dict[str, list[float]] = {"on": [], "off": []}
    scrapes = 0
    for r in range(args.runs):
        for mode, overrides in modes.items():
            with BenchCluster.start_in(root, f"metrics-{mode}-{r + 1}", insecure=args.insecure, overrides=overrides) as bc:
                urls = [f"http://{n.config.metrics_address}/metrics" for n in bc.nodes if n.config.metrics_address]
                expect((mode == "on") == bool(urls), f"metrics {mode}: nodes serve metrics at {urls}")

                async def measured() -> ThroughputRun:
                    await one_client_run(
                        bc,
                        "warm-up",
                        payload,
                        messages=min(args.messages, WARMUP_MESSAGES),
                        batch=args.batch,
                        in_flight_max=args.in_flight_max,
                        timeout_s=args.run_timeout_s,
                    )
                    return await one_client_run(
                        bc,
                        "measured",
                        payload,
                        messages=args.messages,
                        batch=args.batch,
                        in_flight_max=args.in_flight_max,
                        timeout_s=args.run_timeout_s,
                    )

                if urls:
                    with Scraper(urls, args.scrape_interval) as scraper:
                        run = asyncio.run(measured())
                    expect(scraper.errors == 0, f"metrics on: {scraper.errors} scrapes failed")
                    scrapes += scraper.scrapes
                else:
                    run = asyncio.run(measured())
            runs[mode].append(run.per_s)
            print(
                f"    run {r + 1} metrics {mode:<3} {run.per_s:>10,.0f} msg/s  (cpu {cpu_text(run.cpu_s)}, load {load_average()[0]:.2f})",
                flush=True,
            )
    on, off = spread(runs["on"]), spread(runs["off"])
    cost = 1 - on["median"] / off["median"]
    met = cost <= GOAL_METRICS_COST
    print(
        f"  metrics on   {on['median']:>10,.0f} msg/s   min {on['min']:>9,.0f}  max {on['max']:>9,.0f}   ({scrapes} scrapes, every {args.scrape_interval} s)"
    )
    print(f"  metrics off  {off['median']:>10,.0f} msg/s   min {off['min']:>9,.0f}  max {off['max']:>9,.0f}")
    print(
        f"  on/off {on['median'] / off['median']:.3f}: metrics cost {100 * cost:.1f}%   goal <= {100 * GOAL_METRICS_COST:.0f}%: {'met' if met else 'MISSED'}"
    )
    return {
        "on_messages_per_s": on,
        "off_messages_per_s": off,
        "cost": cost,
        "goal_met": met,
        "scrape_interval_s": args.scrape_interval,
        "scrapes": scrapes,
    }
