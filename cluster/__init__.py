"""How a node runs: the pysyncobj adapter, batcher, gateway, subscriptions, metrics, config and
the ``raftseq`` command. Imports ``sequencer``, pysyncobj and prometheus-client."""
