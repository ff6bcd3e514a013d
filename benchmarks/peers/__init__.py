"""Peer baselines of ``raftseq bench --vs``: a three-node NATS JetStream cluster
(``nats_jetstream``: ``nats``, and ``nats-sync`` with an fsync on every write), a three-member
etcd 3.4 cluster (``etcd_kv``: one fdatasync per commit) and the obvious pysyncobj design, one
``@replicated`` call per message (``plain_pysyncobj``).

Each module starts its own servers on loopback, measures the same workloads as
``bench_cluster.py`` with the same kind of Python client loop, and stops every process it
started by pid. ``common`` holds what they share.
"""
