"""TLS against plaintext on the same machine, in the same run: throughput and CPU per acknowledged
message of a local three-node cluster whose client ports speak TLS 1.3 (``cluster up --tls``;
``--mutual``: with client certificates too) and of one whose ports speak plaintext.

Both clusters run side by side (the idle one costs its heartbeats); runs alternate between
them (plaintext, TLS, TLS, plaintext, ...), so a change in the machine's load hits both. Each
run is one client pipelining ``--messages`` submits in batches (``benchmarks.load``). The goal:
TLS throughput >= 85 % of plaintext, as the median over the rounds of each round's TLS rate over
its plaintext rate (the two runs of a round are back to back: a load swing between rounds
cancels out). CPU per acknowledged message (all three nodes, the leader alone, the client) is
the figure that load on a shared machine moves least; it is printed beside the rates. Last, the
TLS work itself, measured in this process without sockets (``tls_work_us``): one batch of
submits encrypted by a client and decrypted by a node, as ``ssl`` does it under asyncio.

    python -m benchmarks.bench_tls [--messages 100000] [--rounds 3] [--mutual] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import tempfile
import time

from benchmarks.bench_cluster import BATCH_SIZE_DEFAULT
from benchmarks.figures import spread
from benchmarks.harness import BenchCluster
from benchmarks.load import IN_FLIGHT_MAX_DEFAULT, ThroughputRun, one_client_run
from benchmarks.machine import load_average, print_load
from benchmarks.options import write_report
from raftseq.cluster.certs import local_cluster_tls

#: TLS throughput over plaintext throughput, median against median, at least this.
GOAL_TLS_RATIO = 0.85
NODES = ("n1", "n2", "n3")
RUN_TIMEOUT_S = 300.0


def cpu_per_message_us(run: ThroughputRun) -> dict[str, float]:
    """Microseconds of CPU per acknowledged message: every node, the busiest node (the leader),
    and the client (this process)."""
    shares = run.cpu_s
    per_message = run.seconds / run.messages * 1e6
    nodes = [shares.get(node, 0.0) for node in NODES]
    return {
        "nodes_us": round(sum(nodes) * per_message, 2),
        "leader_us": round(max(nodes) * per_message, 2),
        "client_us": round(shares.get("bench", 0.0) * per_message, 2),
    }


def tls_work_us(root: str, batch_bytes: int, batches: int = 2000) -> float:
    """Microseconds to encrypt `batch_bytes` of application data on a TLS 1.3 client and decrypt
    it on a server (memory BIOs, the certificates of ``cluster up --tls``): the CPU TLS adds to
    one batch of submits, apart from the sockets and the loop (which plaintext pays too)."""
    settings = local_cluster_tls(f"{root}/tls-work")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(settings["cert_file"], settings["key_file"])
    client = ssl.create_default_context(cafile=settings["ca_file"])
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    to_server, from_client, to_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    sender = client.wrap_bio(to_client, from_client, server_hostname="localhost")
    receiver = server.wrap_bio(to_server, from_server, server_side=True)
    while True:  # the handshake, both ends in turn
        done = 0
        for end in (sender, receiver):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if done == 2:
            break
    data = b"x" * batch_bytes
    started = time.perf_counter()
    for _ in range(batches):
        sender.write(data)
        to_server.write(from_client.read())
        received = 0
        while received < batch_bytes:
            received += len(receiver.read(batch_bytes))
    return (time.perf_counter() - started) / batches * 1e6


def measure(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    tls = local_cluster_tls(f"{root}/tls-cluster", mutual=args.mutual)
    runs: dict[str, list[ThroughputRun]] = {"plaintext": [], "tls": []}
    with (
        BenchCluster.start_in(root, "plaintext", insecure=False, overrides=None) as plain,
        BenchCluster.start_in(root, "tls-cluster", insecure=False, overrides={"tls": tls}) as secured,
    ):
        clusters = {"plaintext": plain, "tls": secured}

        async def one(name: str, index: int) -> ThroughputRun:
            return await one_client_run(
                clusters[name],
                f"bench-{name}-{index}",
                payload,
                messages=args.messages,
                batch=args.batch,
                in_flight_max=args.in_flight_max,
                timeout_s=RUN_TIMEOUT_S,
            )

        for name in clusters:  # warm up: connections, the leaders' first batches
            asyncio.run(one(name, 0))
        for index in range(1, args.rounds + 1):
            order = ("plaintext", "tls") if index % 2 else ("tls", "plaintext")
            for name in order:
                run = asyncio.run(one(name, index))
                runs[name].append(run)
                cpu = cpu_per_message_us(run)
                print(
                    f"  round {index} {name:<9} {run.per_s:>9,.0f} msg/s  CPU per message: nodes {cpu['nodes_us']:.1f} us, "
                    f"leader {cpu['leader_us']:.1f} us, client {cpu['client_us']:.1f} us  (load {load_average()[0]:.2f})",
                    flush=True,
                )
    result: dict = {"messages_per_run": args.messages, "mutual": args.mutual, "variants": {}}
    for name, done in runs.items():
        cpus = [cpu_per_message_us(run) for run in done]
        result["variants"][name] = {
            "messages_per_s": spread([run.per_s for run in done]),
            **{key: spread([cpu[key] for cpu in cpus]) for key in ("nodes_us", "leader_us", "client_us")},
        }
    paired = [tls.per_s / plain.per_s for tls, plain in zip(runs["tls"], runs["plaintext"])]
    result["tls_ratio_per_round"] = [round(r, 3) for r in paired]
    ratio = statistics.median(paired)
    result["tls_ratio"] = round(ratio, 3)
    result["goal_met"] = ratio >= GOAL_TLS_RATIO
    # A batch as the client sends it: the payloads and about 10 bytes of framing each.
    batch_bytes = args.batch * (args.payload_bytes + 10)
    work_us = tls_work_us(root, batch_bytes)
    result["tls_work"] = {"batch_bytes": batch_bytes, "us_per_batch": round(work_us, 1), "us_per_message": round(work_us / args.batch, 3)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages per run (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument(
        "--batch", type=int, default=BATCH_SIZE_DEFAULT, help=f"payloads per submit_batch_nowait (default {BATCH_SIZE_DEFAULT})"
    )
    parser.add_argument("--in-flight-max", type=int, default=IN_FLIGHT_MAX_DEFAULT, help="the client's window")
    parser.add_argument("--payload-bytes", type=int, default=100, help="bytes of each payload (default 100)")
    parser.add_argument("--mutual", action="store_true", help="mutual TLS: the client presents a certificate")
    parser.add_argument("--json", default="", metavar="FILE", help="write the report as JSON there")
    args = parser.parse_args(argv)
    print(f"raftseq TLS benchmark: {args.rounds} rounds of {args.messages:,} messages per variant, payload {args.payload_bytes} B")
    load_start = print_load("at start")
    with tempfile.TemporaryDirectory(prefix="raftseq-bench-tls-") as root:
        result = measure(args, root)
    load_end = print_load("at end")
    variants = result["variants"]
    for name, v in variants.items():
        print(
            f"{name:<10} median {v['messages_per_s']['median']:>9,.0f} msg/s (min {v['messages_per_s']['min']:,.0f}, "
            f"max {v['messages_per_s']['max']:,.0f}); CPU per message: nodes {v['nodes_us']['median']:.1f} us, "
            f"leader {v['leader_us']['median']:.1f} us, client {v['client_us']['median']:.1f} us"
        )
    cpu_ratio = variants["tls"]["nodes_us"]["median"] / variants["plaintext"]["nodes_us"]["median"]
    print(
        f"goal      TLS throughput {100 * result['tls_ratio']:.1f}% of plaintext (median of the rounds' ratios "
        f"{', '.join(f'{100 * r:.0f}%' for r in result['tls_ratio_per_round'])}) >= {100 * GOAL_TLS_RATIO:.0f}%: "
        f"{'met' if result['goal_met'] else 'MISSED'}; the nodes' CPU per message x{cpu_ratio:.2f} with TLS"
    )
    work = result["tls_work"]
    print(
        f"TLS work  {work['us_per_batch']:.1f} us to encrypt and decrypt one batch of {work['batch_bytes']:,} bytes "
        f"({work['us_per_message']:.3f} us per message), without sockets"
    )
    write_report(args.json, {"benchmark": "raftseq tls", "load_average_start": load_start, "load_average_end": load_end, **result})
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
