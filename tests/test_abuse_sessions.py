"""Abuse probe: filling the session table (issue 14, defect 8).

Before: ``sessions_max`` sessions with one submit each locked every new session out for 24 h
(``too_many_sessions`` until idle expiry), and the table was bounded by count only: a full
dedup window cost ~167 KB per session (16.7 GB at the default limits).

Now the table is bounded by bytes (each session counted with a full window from its first
submit, ``session_table_bytes_max``), and a full table refuses a new session only while no
session has been idle for ``session_evict_idle`` of log time; then the least recently active
one goes (``docs/sessions.md``).

The probe: an attacker with the token opens sessions and fills each one's dedup window until
the table refuses it, while a legitimate client keeps submitting. Asserted: the leader is
alive; its RSS grew by less than a stated bound; the legitimate client's p99 stayed within a
stated bound and every message it was acknowledged is in the journal; a new session is refused
(typed ``too_many_sessions``) only until the attacker's sessions have been idle for the
eviction age, and then admitted.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from abuse_probes import describe_latencies, percentile, rss_bytes
from cluster_harness import ClusterHarness, running_cluster  # noqa: F401

from raftseq.clients import Rejected, SequencerClient
from raftseq.sequencer.limits import MachineConfig
from raftseq.sequencer.protocol import RejectReason

#: Remembered submits per session: small, so that the probe fills windows in seconds.
DEDUP_WINDOW = 1024
#: The table's byte bound in this probe: room for ~60 sessions with full windows.
TABLE_BYTES_MAX = 1024 * 1024
#: Seconds of log time after which a full table evicts an idle session: longer than the
#: attacker needs to fill the table (a few seconds here).
EVICT_IDLE_S = 12
SESSIONS = {
    "machine": {
        "dedup_window": DEDUP_WINDOW,
        "session_table_bytes_max": TABLE_BYTES_MAX,
        "session_evict_idle_s": EVICT_IDLE_S,
    }
}
#: Most sessions the attacker tries to open (the bound admits about 60).
ATTACK_SESSIONS_MAX = 160
#: Attacker sessions run at once.
ATTACK_CONCURRENCY = 8
#: Bounds asserted: the leader's RSS growth, the legitimate client's p99, the probe's time.
RSS_GROWTH_MAX_BYTES = 150 * 1024 * 1024
LEGIT_P99_MAX_S = 1.0
PROBE_TIMEOUT_S = 50.0
#: How long a new session may wait past the eviction age to be admitted, in seconds.
ADMIT_SLACK_S = 10.0
#: Leeway between the probe's clock and the leader's log time, in seconds.
CLOCK_LEEWAY_S = 0.5
#: Pause between a refused newcomer's attempts, in seconds (it polls log time passing).
ADMIT_RETRY_S = 0.25


async def _attack_session(h: ClusterHarness, index: int) -> bool:
    """Open session ``attacker-<index>`` and fill its window; False when the table refused it."""
    async with SequencerClient(h.endpoints, session=f"attacker-{index}", token=h.token, in_flight_max=DEDUP_WINDOW) as client:
        try:
            await client.submit(b"a")
        except Rejected as exc:
            assert exc.reason is RejectReason.TOO_MANY_SESSIONS, exc
            return False
        await client.submit_batch([b"%d" % i for i in range(DEDUP_WINDOW - 1)])
        return True


async def _legit(h: ClusterHarness, stop: asyncio.Event, latencies: list[float], acked: dict[int, bytes]) -> None:
    async with SequencerClient(h.endpoints, session="legit", token=h.token) as client:
        i = 0
        while not stop.is_set():
            payload = b"legit-%d" % i
            started = time.perf_counter()
            acked[await client.submit(payload)] = payload
            latencies.append(time.perf_counter() - started)
            i += 1


async def _admitted_after(h: ClusterHarness, session: str, deadline_s: float) -> tuple[float, int]:
    """Seconds until a new session is admitted, and how often it was refused before."""
    started = time.monotonic()
    refusals = 0
    while True:
        async with SequencerClient(h.endpoints, session=session, token=h.token) as client:
            try:
                await client.submit(b"newcomer")
                return time.monotonic() - started, refusals
            except Rejected as exc:
                assert exc.reason is RejectReason.TOO_MANY_SESSIONS, exc
                refusals += 1
        assert time.monotonic() - started < deadline_s, f"{session} still refused after {deadline_s} s"
        await asyncio.sleep(ADMIT_RETRY_S)


@pytest.mark.parametrize("running_cluster", [SESSIONS], indirect=True, ids=["small-session-table"])
def test_a_filled_session_table_stays_within_its_bytes_and_admits_new_sessions_after_the_eviction_age(running_cluster):
    h: ClusterHarness = running_cluster
    leader = h.wait_for_leader()
    pid = h.pid(leader["id"])
    rss_before = rss_bytes(pid)
    latencies: list[float] = []
    acked: dict[int, bytes] = {}

    async def probe() -> tuple[int, int, float, int]:
        attack_start = time.monotonic()
        stop = asyncio.Event()
        legit = asyncio.create_task(_legit(h, stop, latencies, acked))
        admitted = refused = 0
        gate = asyncio.Semaphore(ATTACK_CONCURRENCY)

        async def one(index: int) -> bool:
            async with gate:
                return await _attack_session(h, index)

        for start in range(0, ATTACK_SESSIONS_MAX, ATTACK_CONCURRENCY * 4):
            results = await asyncio.gather(*(one(i) for i in range(start, min(start + ATTACK_CONCURRENCY * 4, ATTACK_SESSIONS_MAX))))
            admitted += sum(results)
            refused += len(results) - sum(results)
            if refused >= ATTACK_CONCURRENCY * 4:
                break  # the table is full: the rest would be refused the same way
        _, refusals = await _admitted_after(h, "newcomer", EVICT_IDLE_S + ADMIT_SLACK_S)
        since_attack = time.monotonic() - attack_start
        stop.set()
        await legit
        return admitted, refused, since_attack, refusals

    started = time.monotonic()
    admitted, refused, since_attack, refusals = asyncio.run(asyncio.wait_for(probe(), PROBE_TIMEOUT_S))
    rss_after = rss_bytes(pid)
    one_session = MachineConfig(dedup_window=DEDUP_WINDOW).session_bytes("attacker-000")
    print(
        f"attacker: {admitted} sessions admitted with full windows, {refused} refused (bound: {TABLE_BYTES_MAX // one_session} "
        f"sessions of {one_session} B); newcomer admitted {since_attack:.1f} s after the attack began (eviction age {EVICT_IDLE_S} s), "
        f"refused {refusals} times before; "
        f"leader RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB; legit {describe_latencies(latencies)}; "
        f"probe {time.monotonic() - started:.1f} s"
    )
    assert h.is_running(leader["id"]), "the leader died"
    assert refused > 0 and admitted <= TABLE_BYTES_MAX // one_session
    assert refusals > 0, "the table was never full: the probe proved nothing"
    assert since_attack >= EVICT_IDLE_S - CLOCK_LEEWAY_S, "a new session came in before anyone was idle long enough"
    assert rss_after - rss_before < RSS_GROWTH_MAX_BYTES
    assert percentile(latencies, 0.99) < LEGIT_P99_MAX_S
    h.wait_converged(at_least=max(acked), timeout_s=30)
    h.stop()
    journal = {r.seq: r.payload for r in h.read_journal(leader["id"]).records}
    lost = [seq for seq, payload in acked.items() if journal.get(seq) != payload]
    assert not lost, f"{len(lost)} acknowledged legitimate messages are not in the journal"
