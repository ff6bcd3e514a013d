"""TLS on a real three-node cluster with mutual TLS, as ``cluster up --tls --tls-mutual`` makes it
(``cluster.certs.local_cluster_tls``): a client with the CA and the client certificate submits
and subscribes; a client without TLS gets ``TlsRequired`` from every node; ``raftseq status``
takes the TLS options; the state-machine runner applies the stream, publishes a snapshot and a
late joiner loads it, all over TLS, from the nodes and from a relay; ``raftseq sm check``,
``snapshots`` and ``record`` take the TLS options; a relay follows the nodes over TLS (with
``node_client_tls``, as a node's catch-up reaches its peers) and serves a TLS subscriber.

One cluster for the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
from cluster_harness import ClusterHarness, module_cluster
from test_cluster_up import RAFTSEQ, up  # noqa: F401
from test_sm_runner import KvStore, Put

from raftseq.clients import SequencerClient, subscribe
from raftseq.clients.sm import StateMachineRunner, encode_message
from raftseq.clients.tls import TlsOptions, TlsRequired
from raftseq.cluster.certs import client_pair, local_cluster_tls
from raftseq.cluster.cli.command import main
from raftseq.cluster.relay_local import wait_relay_serving

#: Bound on every wait for the nodes, in seconds.
WAIT_S = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tls") / "c")
    with module_cluster(data_dir, overrides={"tls": local_cluster_tls(data_dir, mutual=True)}) as harness:
        yield harness


def client_tls(h: ClusterHarness) -> TlsOptions:
    """What a user of ``cluster up --tls --tls-mutual`` gives a client: the CA and the client certificate."""
    cert, key = client_pair(h.data_dir)
    return TlsOptions(ca_file=h.nodes[0].config.tls.ca_file, cert_file=cert, key_file=key)


def test_a_tls_client_submits_and_a_tls_subscriber_reads_every_message(cluster):
    h = cluster

    async def run() -> list[int]:
        async with SequencerClient(h.endpoints, session="tls-writer", token=h.token, tls=client_tls(h)) as client:
            seqs = await client.submit_batch([b"m%d" % i for i in range(200)])
        got = []
        async with asyncio.timeout(WAIT_S):
            async for message in subscribe(h.endpoints, from_seq=seqs[0], token=h.token, tls=client_tls(h), session="tls-reader"):
                got.append(message.seq)
                if message.seq == seqs[-1]:
                    break
        assert got == seqs
        return seqs

    seqs = asyncio.run(run())
    assert seqs == list(range(seqs[0], seqs[0] + 200))


def test_a_client_without_tls_is_told_the_port_speaks_tls_by_every_node(cluster):
    h = cluster

    async def run() -> None:
        client = SequencerClient(h.endpoints, session="plain", token=h.token)
        with pytest.raises(TlsRequired, match="speaks TLS"):
            await client.connect()
        await client.close()

    asyncio.run(run())


def test_raftseq_status_takes_the_tls_options(cluster, capsys):
    h = cluster
    tls = client_tls(h)
    endpoints = ",".join(h.endpoints)
    h.wait_for_leader()
    argv = ["status", "--endpoints", endpoints, "--token", h.token, "-o", "json", "--timeout", str(WAIT_S)]
    assert main(argv + ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["leader"] in h.endpoints
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    assert all("speaks TLS" in node["error"] for node in report["nodes"]), report


def test_a_relay_follows_the_nodes_over_tls_and_serves_a_tls_subscriber(cluster):
    h = cluster
    [relay] = h.start_relays(1)

    async def run() -> None:
        async with SequencerClient(h.endpoints, session="tls-relay-writer", token=h.token, tls=client_tls(h)) as client:
            last = (await client.submit_batch([b"r%d" % i for i in range(20)]))[-1]
        await asyncio.to_thread(wait_relay_serving, relay, last, timeout_s=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            async for message in subscribe([relay.client_address], from_seq=last, token=h.token, tls=client_tls(h), session="r-reader"):
                assert message.seq == last
                break

    asyncio.run(run())


def test_the_state_machine_runner_publishes_and_a_late_joiner_loads_a_snapshot_over_tls(cluster):
    h = cluster
    tls = client_tls(h)

    async def run() -> None:
        async with SequencerClient(h.endpoints, session="tls-kv-writer", token=h.token, tls=tls) as client:
            last = (await client.submit_batch([encode_message(Put(f"k{i % 5}", i)) for i in range(50)]))[-1]
        kv = KvStore()
        publisher = StateMachineRunner(h.endpoints, [kv], token=h.token, replica="tls-r1", tls=tls)
        await asyncio.wait_for(publisher.run(until_seq=last), WAIT_S)
        [info] = await publisher.publish_snapshot("kv")
        late = KvStore()
        joiner = StateMachineRunner(h.endpoints, [late], token=h.token, replica="tls-r2", from_snapshot=True, tls=tls)
        await asyncio.wait_for(joiner.run(until_seq=info.last_seq), WAIT_S)
        assert joiner.joined_from["kv"] == info and late.data == kv.data
        await joiner.close()
        await publisher.close()

    asyncio.run(run())


def test_cluster_up_with_tls_prints_the_variables_that_raftseq_submit_and_tail_use(up):
    """``raftseq cluster up --tls-mutual`` as a user runs it: the banner's exports reach the
    cluster over mutual TLS; without the TLS variables the same command says the port speaks TLS."""
    cluster = up("--tls-mutual")
    exports = cluster.wait_for(r"export (RAFTSEQ_ENDPOINTS=.*)$")[1]
    cluster.wait_for("^Ctrl-C stops the cluster$")
    env = {**os.environ, **dict(item.split("=", 1) for item in exports.split())}
    assert {"RAFTSEQ_TLS_CA", "RAFTSEQ_TLS_CERT", "RAFTSEQ_TLS_KEY"} <= set(env)

    def raftseq(*argv: str, environ: dict) -> subprocess.CompletedProcess:
        return subprocess.run([RAFTSEQ, *argv], capture_output=True, text=True, timeout=WAIT_S, env=environ)

    submitted = raftseq("submit", "--session", "tls-up", "hello", environ=env)
    assert submitted.returncode == 0, submitted.stderr
    tailed = raftseq("tail", "--from", "1", "--limit", "1", environ=env)
    assert tailed.returncode == 0 and json.loads(tailed.stdout)["session"] == "tls-up", tailed.stderr
    plain = {k: v for k, v in env.items() if not k.startswith("RAFTSEQ_TLS_")}
    refused = raftseq("submit", "--session", "tls-up", "again", environ=plain)
    assert refused.returncode != 0 and "speaks TLS" in refused.stderr, refused.stderr


def tls_options(tls: TlsOptions) -> list[str]:
    return ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file]


def test_the_state_machine_runner_and_a_late_joiner_work_against_a_relay_over_mutual_tls(cluster):
    h = cluster
    tls = client_tls(h)
    [relay] = h.start_relays(1)

    async def run() -> None:
        async with SequencerClient(h.endpoints, session="tls-relay-kv-writer", token=h.token, tls=tls) as client:
            last = (await client.submit_batch([encode_message(Put(f"r{i % 7}", i)) for i in range(60)]))[-1]
        kv = KvStore()
        # Every connection the runner makes goes to the relay: the stream, the snapshot query (the
        # relay asks its upstream over TLS), the publishing client (sent on to the leader).
        publisher = StateMachineRunner([relay.client_address], [kv], token=h.token, replica="tls-relay-r1", tls=tls)
        await asyncio.wait_for(publisher.run(until_seq=last), WAIT_S)
        [info] = await publisher.publish_snapshot("kv")
        await asyncio.to_thread(wait_relay_serving, relay, info.last_seq, timeout_s=WAIT_S)
        late = KvStore()
        joiner = StateMachineRunner([relay.client_address], [late], token=h.token, replica="tls-relay-r2", from_snapshot=True, tls=tls)
        await asyncio.wait_for(joiner.run(until_seq=info.last_seq), WAIT_S)
        assert joiner.joined_from["kv"] == info and late.data == kv.data
        await joiner.close()
        await publisher.close()

    asyncio.run(run())


def test_raftseq_sm_check_snapshots_and_record_take_the_tls_options(cluster, tmp_path, capsys):
    """Against the nodes and against a relay, each over mutual TLS; without the options each
    says the port speaks TLS (exit 1)."""
    h = cluster
    tls = client_tls(h)
    relay = h.relays[0] if h.relays else h.start_relays(1)[0]

    async def publish() -> int:
        async with SequencerClient(h.endpoints, session="tls-sm-writer", token=h.token, tls=tls) as client:
            last = (await client.submit_batch([encode_message(Put(f"c{i % 3}", i)) for i in range(30)]))[-1]
        runner = StateMachineRunner(h.endpoints, [KvStore()], token=h.token, replica="tls-sm-r1", checkpoint_every=10, tls=tls)
        await asyncio.wait_for(runner.run(until_seq=last), WAIT_S)
        await runner.publish_snapshot("kv")
        assert await runner.flush()
        await runner.close()
        return last

    last = asyncio.run(publish())
    wait_relay_serving(relay, last, timeout_s=WAIT_S)
    for endpoints in (",".join(h.endpoints), relay.client_address):
        common = ["--endpoints", endpoints, "--token", h.token]
        # To the last number now: the checkpoints were sequenced after the messages they cover.
        assert main(["sm", "check", "-o", "json", *common, *tls_options(tls)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and "tls-sm-r1" in report["types"]["kv"]["replicas"], report
        assert main(["sm", "snapshots", "kv", "-o", "json", *common, *tls_options(tls)]) == 0
        # Each listed snapshot is its index entry's fields in order (array-like), the session among them.
        assert any("@snap/kv/tls-sm-r1" in fields for fields in json.loads(capsys.readouterr().out)["snapshots"])
        out = tmp_path / f"kv-{len(endpoints)}.smc"
        record = ["sm", "record", "--machine", "test_sm_runner:KvStore", "--out", str(out), "--to", str(last), "--quiet", *common]
        assert main([*record, *tls_options(tls)]) == 0, capsys.readouterr().err
        assert f"seq 1..{last}" in capsys.readouterr().out and out.exists()
        for plain in (["sm", "check", *common], ["sm", "snapshots", "kv", *common], [*record[:5], str(tmp_path / "no.smc"), *record[6:]]):
            assert main(plain) == 1
            assert "speaks TLS" in capsys.readouterr().err
