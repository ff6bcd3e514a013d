"""How a node runs and how operators drive it: the Raft adapter (``cluster.raft``, the only place
that names pysyncobj), batcher, gateway, subscriptions, catch-up, metrics, config, the ``raftseq``
command and the local cluster. May import ``sequencer`` and ``clients``; pysyncobj and
cryptography only in ``cluster.raft``, prometheus-client in ``cluster.metrics`` (and its text
parser in ``cluster.top``), rich in the terminal view (``tests/test_layering.py``)."""
