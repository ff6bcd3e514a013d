"""Three real nodes with ``durability = "power"``: the group-committed Raft log, held replies
and the leader's own count running together, through compactions and a kill of every node.

(A power cut itself needs the power-loss file system of the chaos suite; here the restart
proves that what power mode writes is read back and that the journals agree.)
"""

from __future__ import annotations

import asyncio
import os
import signal


import pytest

from cluster_harness import pipeline, running_cluster  # noqa: F401
from raftseq.clients import SequencerClient
from raftseq.cluster.raft.log_store import segment_numbers

POWER = {"durability": "power", "raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5}}
MESSAGES = 3000


@pytest.mark.parametrize("running_cluster", [POWER], indirect=True, ids=["power"])
def test_power_mode_acknowledges_compacts_and_keeps_everything_through_a_kill_of_every_node(running_cluster):
    h = running_cluster
    payloads = [b"power-%d" % n for n in range(MESSAGES)]

    async def submit() -> list[int]:
        async with SequencerClient(h.endpoints, session="power", token=h.token, in_flight_max=200) as client:
            return await pipeline(client, payloads, timeout_s=60)

    seqs = asyncio.run(submit())
    assert seqs == list(range(1, MESSAGES + 1))
    h.wait_converged(MESSAGES, timeout_s=30)
    for node in h.nodes:
        assert os.path.isdir(os.path.join(h.raft_dir(node.id), "raft.log")), "the directory is marked for older releases"
        assert segment_numbers(h.raft_dir(node.id)), "the Raft log is in segments"
        assert os.path.isfile(os.path.join(h.raft_dir(node.id), "snapshot.bin")), "compaction ran"
        samples = h.metrics(node.id)
        assert samples["raftseq_raft_log_fsyncs_total"] > 0, node.id
        assert samples["raftseq_raft_log_fsync_entries_sum"] > 0, node.id
        assert 0 < samples["raftseq_raft_durable_index"] <= samples["raftseq_raft_commit_index"] + 1, node.id

    for node in h.nodes:
        h.kill(node.id, signal.SIGKILL)
    for node in h.nodes:
        h.restart(node.id)
    h.wait_for_leader()
    h.wait_converged(MESSAGES, timeout_s=30)
    h.stop()

    contents = [h.read_journal(node.id) for node in h.nodes]
    for journal in contents:
        assert [r.payload for r in journal.records] == payloads, journal.node_id
    assert len({journal.segment_bytes for journal in contents}) == 1, "the journals differ"
