"""Every chaos scenario, against a real three-node cluster, checked by the history checker.

Each test prints its seed; ``RAFTSEQ_CHAOS_SEED=N`` replays a run's fault schedule
(``-k NAME`` picks the scenario). The cluster directory, node logs and history of a failed run
are kept under pytest's ``tmp_path`` for reading.
"""

from __future__ import annotations

import os
import random

import pytest

from chaos_tests.scenarios import SCENARIOS, run_scenario


def chaos_seed() -> int:
    given = os.environ.get("RAFTSEQ_CHAOS_SEED", "").strip()
    return int(given) if given else random.SystemRandom().randrange(1, 2**31)


#: The power cuts have their own tests (test_power.py): in the default durability a loss is expected.
@pytest.mark.parametrize("name", [name for name, scenario in SCENARIOS.items() if not scenario.powerfs])
def test_scenario(name, tmp_path):
    scenario = SCENARIOS[name]
    why_not = scenario.unavailable()
    assert not why_not, f"{name} needs something this machine lacks: {why_not}"
    seed = chaos_seed()
    result = run_scenario(name, seed=seed, directory=str(tmp_path), say=lambda line: print(line, flush=True))
    assert result.acked >= 200, f"seed {seed}: the workload barely ran ({result.acked} acknowledged)"
    assert result.report.counts.stream_length >= result.acked
    assert result.journals_ok, f"seed {seed}: {result.journal_problems}"
    assert result.report.ok, f"seed {seed}: {result.report.format()}"


def test_a_scenario_over_tls(tmp_path):
    """``raftseq chaos run client-faults --tls``, one round: the nodes' client ports speak mutual
    TLS; the workload's clients (reset mid-submit), its subscribers (dropped mid-stream), the
    final reads and the checker's history all go through them."""
    seed = chaos_seed()
    result = run_scenario("client-faults", seed=seed, directory=str(tmp_path), rounds=1, tls=True, say=lambda line: print(line, flush=True))
    with open(result.history_path, encoding="utf-8") as history:
        assert '"tls":true' in history.readline().replace(" ", ""), "the history says the run was over TLS"
    assert result.acked >= 200, f"seed {seed}: the workload barely ran over TLS ({result.acked} acknowledged)"
    assert result.report.counts.stream_length >= result.acked
    assert result.journals_ok, f"seed {seed}: {result.journal_problems}"
    assert result.report.ok, f"seed {seed}: {result.report.format()}"
