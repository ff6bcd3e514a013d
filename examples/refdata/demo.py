"""Reference data shared by three processes through a local cluster, end to end.

    python -m examples.refdata.demo [--instruments 2000] [--updates 100000] [--data-dir DIR]

1. starts a local three-node cluster (``cluster.local.LocalCluster``);
2. starts the retail OMS (publishing snapshots) and the smart order router (two state
   machines on one subscription), both from sequence number 1;
3. the admin lists instruments (half of them with the old version-1 message), sets defaults,
   submits a day of updates, switches every copy to behaviour version 2 at one sequence
   number half way through, and closes the day;
4. once the retail OMS has published a snapshot, starts the institutional OMS last: it loads
   that snapshot (digest checked) and replays only the rest;
5. compares the three reports: same end-of-day sequence number, same digest, same verdicts on
   the sample orders; and runs ``raftseq sm check`` over the stream's checkpoints.

Exit status 0 when every copy agrees. Everything runs on 127.0.0.1 and is stopped at the end,
also on an error or Ctrl-C; the data directory is a temporary one unless ``--data-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from raftseq.clients import SequencerClient
from raftseq.clients.sm import query_snapshots
from raftseq.cluster.local import LocalCluster, die_with_parent, free_base_port
from raftseq.cluster.cli.sm import scan_checkpoints
from raftseq.cluster.processes import stop_process
from raftseq.cluster.status import gather_status
from examples.refdata.admin import Admin, listing, updates
from examples.refdata.messages import EndOfDay

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLL_S = 0.05


class App:
    """One trading process, started with ``python -m examples.refdata.apps``."""

    def __init__(self, role: str, replica: str, directory: str, cluster: LocalCluster, *extra: str) -> None:
        self.role = role
        self.report_path = os.path.join(directory, f"{replica}.json")
        self.log_path = os.path.join(directory, f"{replica}.log")
        command = [
            sys.executable, "-m", "examples.refdata.apps", role, "--replica", replica, "--report", self.report_path,
            "--endpoints", ",".join(cluster.endpoints), "--token", cluster.token, *extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
            )

    def wait(self, deadline: float) -> dict:
        try:
            code = self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.role} did not finish in time; log {self.log_path}:\n{self.log_tail()}") from None
        if code != 0:
            raise RuntimeError(f"{self.role} exited with {code}; log {self.log_path}:\n{self.log_tail()}")
        with open(self.report_path) as f:
            return json.load(f)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process, 5)


def wait_for_leader(cluster: LocalCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = gather_status(cluster.endpoints, token=cluster.token, timeout_s=1.0)["nodes"]
        leaders = [n for n in nodes if n.get("role") == "leader"]
        if len(leaders) == 1 and all(n.get("leader") == leaders[0]["address"] for n in nodes):
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"no leader within {timeout_s} s")


async def admin_day(cluster: LocalCluster, *, instruments: int, update_count: int, seed: int, say) -> dict:
    """The admin's day; returns the sequence numbers that matter."""
    rng = random.Random(seed)
    day = updates(update_count, instruments, rng)
    async with SequencerClient(cluster.endpoints, session="refdata-admin", token=cluster.token, in_flight_max=20_000) as client:
        admin = Admin(client)
        listed = await admin.send(listing(instruments, rng))
        say(f"admin: listed {instruments} instruments (half with version-1 messages) at seq {listed[0]}..{listed[-1]}")
        half = len(day) // 2
        first = await admin.send(day[:half])
        switch_at = first[-1] + max(10, update_count // 10)
        by = await admin.activate(2, switch_at)
        say(f"admin: behaviour version 2 activated from seq {switch_at} (message at seq {by})")
        rest = await admin.send(day[half:])
        [eod] = await admin.send([EndOfDay("2026-11-26")])
        say(f"admin: {update_count} updates at seq {first[0]}..{rest[-1] if rest else first[-1]}, end of day at seq {eod}")
    return {"end_of_day_seq": eod, "switch_at": switch_at}


async def every_node_lists_a_snapshot(cluster: LocalCluster, deadline: float) -> list:
    """The snapshots of refdata, once every node's index lists at least one (followers apply
    the publisher's chunks a moment after the leader acknowledged them)."""
    while True:
        answers = [await query_snapshots([e], "refdata", token=cluster.token) for e in cluster.endpoints]
        if all(answers):
            return answers[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every node lists a refdata snapshot: {[len(a) for a in answers]}")
        await asyncio.sleep(POLL_S)


def run_demo(
    *,
    data_dir: str,
    instruments: int = 2000,
    update_count: int = 100_000,
    seed: int = 1,
    checkpoint_every: int = 5000,
    snapshot_every: int = 20_000,
    timeout_s: float = 600.0,
    say=print,
) -> dict:
    """Run the whole story in `data_dir`; returns ``{"reports": [...], "identical": bool, ...}``."""
    deadline = time.monotonic() + timeout_s
    cluster = LocalCluster(os.path.join(data_dir, "cluster"), free_base_port(), insecure=False, restart=False)
    apps: list[App] = []
    try:
        cluster.start()
        wait_for_leader(cluster, 20)
        say(cluster.describe())
        common = ["--checkpoint-every", str(checkpoint_every)]
        retail = App("retail-oms", "retail-1", data_dir, cluster, *common, "--snapshot-every", str(snapshot_every))
        sor = App("sor", "sor-1", data_dir, cluster, *common)
        apps += [retail, sor]
        day = asyncio.run(admin_day(cluster, instruments=instruments, update_count=update_count, seed=seed, say=say))
        reports = [retail.wait(deadline), sor.wait(deadline)]
        snapshots = asyncio.run(every_node_lists_a_snapshot(cluster, deadline))
        say(f"cluster holds {len(snapshots)} refdata snapshots, newest covering seq {snapshots[0].covered_seq if snapshots else 0}")
        inst = App("institutional-oms", "inst-1", data_dir, cluster, *common, "--from-snapshot")
        apps.append(inst)
        reports.append(inst.wait(deadline))
        ledger, _, last = asyncio.run(scan_checkpoints(cluster.endpoints, token=cluster.token))
        divergence = ledger.first_divergence()
    finally:
        for app in apps:
            app.stop()
        cluster.stop()
    identical = len({(r["seq"], r["digest"], json.dumps(r["orders"])) for r in reports}) == 1 and reports[0]["seq"] == day["end_of_day_seq"]
    say(f"{'process':<20}{'stopped at':>12}  {'digest':<18}{'from snapshot':>14}{'applied':>10}{'seconds':>9}")
    for r in reports:
        say(
            f"{r['role']:<20}{r['seq']:>12}  {r['digest'][:16]:<18}{r['joined_from_snapshot_covering']:>14}"
            f"{r['messages_applied']:>10}{r['elapsed_s']:>9.2f}"
        )
    say(
        f"checkpoints in the stream up to seq {last}: {ledger.checkpoints_seen}, "
        + (divergence.describe() if divergence else "every copy agreed")
    )
    say("IDENTICAL: every copy holds the same reference data at the end of the day" if identical else "DIFFERENT: the copies disagree")
    return {
        "reports": reports,
        "identical": identical,
        "day": day,
        "snapshots": snapshots,
        "divergence": divergence,
        "checkpoints": ledger.summary(),
    }


def example_parser(module: str, doc: str, *, instruments: int, kept: str) -> argparse.ArgumentParser:
    """The options every run of this example takes: the instruments listed, the seed of the
    generated updates, and a directory to keep (`kept` says what it holds)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--instruments", type=int, default=instruments)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default="", help=f"keep {kept} here (default: a temporary directory, removed)")
    return parser


@contextlib.contextmanager
def data_directory(kept: str, *, prefix: str) -> Iterator[str]:
    """`kept` when given (created if missing, left in place), else a temporary directory removed at the end."""
    directory = kept or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(directory, exist_ok=True)
    try:
        yield directory
    finally:
        if not kept:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("examples.refdata.demo", __doc__, instruments=2000, kept="everything")
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--checkpoint-every", type=int, default=5000)
    parser.add_argument("--snapshot-every", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    with data_directory(args.data_dir, prefix="raftseq-refdata-") as data_dir:
        result = run_demo(
            data_dir=data_dir, instruments=args.instruments, update_count=args.updates, seed=args.seed,
            checkpoint_every=args.checkpoint_every, snapshot_every=args.snapshot_every, timeout_s=args.timeout,
        )  # fmt: skip
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
