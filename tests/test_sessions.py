"""Sessions on a real cluster: two clients that share one session name, the reserved
``@snap/`` prefix. (The machine's rules are unit-tested in ``tests/test_machine.py``.)"""

from __future__ import annotations

import asyncio
from collections import Counter

from cluster_harness import ClusterHarness, running_cluster  # noqa: F401

from raftseq.clients import Rejected, SequencerClient, SequencerError

#: Submits each of the two clients makes.
SUBMITS = 300
#: Seconds the two clients get to finish.
RUN_TIMEOUT_S = 60.0


async def _submit_all(client: SequencerClient, name: bytes) -> tuple[dict[int, bytes], list[Exception]]:
    """Submit SUBMITS payloads as fast as the window allows; (seq -> payload acked, errors)."""
    acked: dict[int, bytes] = {}
    errors: list[Exception] = []
    futures = []
    for i in range(SUBMITS):
        payload = b"%s-%d" % (name, i)
        try:
            await client.wait_for_room()
            futures.append((payload, client.submit_nowait(payload)))
        except SequencerError as exc:
            errors.append(exc)
            break
        await asyncio.sleep(0)  # let the other client interleave
    for payload, future in futures:
        try:
            acked[await future] = payload
        except SequencerError as exc:
            errors.append(exc)
    return acked, errors


def test_two_clients_on_one_session_never_get_an_ack_for_the_other_clients_payload(running_cluster):
    """Defect: the second client's submits were acknowledged as duplicates of the first's
    (same client_seq, other payload): acknowledged, yet its payload is in no journal."""
    h: ClusterHarness = running_cluster

    async def run() -> tuple[dict, dict, list, list]:
        a = SequencerClient(h.endpoints, session="x", token=h.token, in_flight_max=16)
        b = SequencerClient(h.endpoints, session="x", token=h.token, in_flight_max=16)
        await a.connect()
        await b.connect()
        try:
            (acked_a, errors_a), (acked_b, errors_b) = await asyncio.wait_for(
                asyncio.gather(_submit_all(a, b"a"), _submit_all(b, b"b")), RUN_TIMEOUT_S
            )
        finally:
            await a.close()
            await b.close()
        return acked_a, acked_b, errors_a, errors_b

    acked_a, acked_b, errors_a, errors_b = asyncio.run(run())
    h.wait_converged(at_least=max([*acked_a, *acked_b]), timeout_s=30)
    h.stop()
    journal = {r.seq: r.payload for r in h.read_journal(h.node_ids[0]).records}
    print(f"a: {len(acked_a)} acked, errors {Counter(map(repr, errors_a))}; b: {len(acked_b)} acked, errors {Counter(map(repr, errors_b))}; journal {len(journal)}")
    for who, acked in (("a", acked_a), ("b", acked_b)):
        wrong = {seq: (payload, journal.get(seq)) for seq, payload in acked.items() if journal.get(seq) != payload}
        assert not wrong, f"client {who} was acknowledged for {len(wrong)} payloads the journal does not hold: {list(wrong.items())[:3]}"
    for error in errors_a + errors_b:
        assert isinstance(error, Rejected) and error.reason.value in ("session_conflict", "session_taken_over"), repr(error)
