"""The three trading processes, each keeping its own copy of reference data.

    python -m examples.refdata.apps retail-oms        --replica retail-1 --report retail.json --snapshot-every 5000
    python -m examples.refdata.apps sor               --replica sor-1    --report sor.json
    python -m examples.refdata.apps institutional-oms --replica inst-1   --report inst.json --from-snapshot

* **retail OMS** — reference data; checks retail orders against it; publishes snapshots for
  processes that start later.
* **smart order router** — reference data *and* venue status: two state machines on one
  subscription.
* **institutional OMS** — started last, weeks later in real life: loads the latest snapshot the
  cluster holds (``--from-snapshot``), checks its digest, and replays only what came after.

Each publishes checkpoints (``--checkpoint-every``), runs until the admin's end-of-day message,
and writes a JSON report: the sequence number it stopped at, its reference-data digest there,
a summary, and its verdicts on a fixed list of sample orders. Copies that applied the same
stream report the same digest and the same verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from raftseq.clients.sm import StateMachineError, StateMachineRunner
from examples.refdata.machine import ReferenceData
from examples.refdata.venues import VenueStatus

ROLES = ("retail-oms", "sor", "institutional-oms")
#: Orders every process checks at the end of the day: (symbol, quantity, price in 1e-8).
SAMPLE_ORDERS = [(f"SYM{i:05d}", q, p) for i in range(0, 200, 7) for q, p in ((10, 100_000_000), (1_000_000, 150_000))]


async def run_app(args: argparse.Namespace) -> dict:
    refdata = ReferenceData()
    machines = [refdata, VenueStatus()] if args.role == "sor" else [refdata]
    runner = StateMachineRunner(
        args.endpoints.split(","),
        machines,
        token=args.token,
        replica=args.replica,
        from_snapshot=args.from_snapshot,
        checkpoint_every=args.checkpoint_every,
        snapshot_every=args.snapshot_every,
        state_dir=args.state_dir or None,
        save_every=args.save_every,
        on_divergence="log",
    )
    started = time.monotonic()
    try:
        await runner.run(stop_when=lambda seq: refdata.end_of_day_seq != 0)
        await runner.wait_published()
    finally:
        await runner.close()
    joined = runner.joined_from.get("refdata")
    report = {
        "role": args.role,
        "replica": args.replica,
        "seq": refdata.end_of_day_seq,
        "digest": runner.digest("refdata"),
        "summary": refdata.summary(),
        "orders": [refdata.check_order(*order) for order in SAMPLE_ORDERS],
        "joined_from_snapshot_covering": joined.covered_seq if joined else 0,
        "messages_applied": runner.messages_applied,
        "snapshots_published": [(i.covered_seq, i.first_seq, i.last_seq) for i in runner.published],
        "snapshot_errors": [str(e) for e in runner.snapshot_errors],
        "divergences": [d.describe() for d in runner.divergences],
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    if args.role == "sor":
        report["open_venues"] = machines[1].open_venues()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.refdata.apps", description="Run one trading process.")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--replica", required=True, help="this copy's name (in checkpoints and snapshot sessions)")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--endpoints", default=os.environ.get("RAFTSEQ_ENDPOINTS", "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"))
    parser.add_argument("--token", default=os.environ.get("RAFTSEQ_TOKEN", ""))
    parser.add_argument("--from-snapshot", action="store_true", help="start from the latest snapshot in the cluster")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--state-dir", default="")
    parser.add_argument("--save-every", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.replica} %(name)s %(levelname)s %(message)s")
    try:
        report = asyncio.run(run_app(args))
    except StateMachineError as exc:
        print(f"{args.role}: stopped: {exc}", file=sys.stderr)
        return 1
    tmp = args.report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.report)
    print(json.dumps({k: report[k] for k in ("role", "seq", "digest", "joined_from_snapshot_covering", "messages_applied", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
