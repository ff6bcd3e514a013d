"""The ``raftseq`` command (``main``; ``build_parser`` for its options). One module per command
group: ``journal``, ``demo``, ``node``, ``cluster`` (up), ``status``, ``top``, ``sm``, ``stream``
(submit, tail), ``suites`` (chaos and bench, handed to the source checkout); ``args`` holds the
argument helpers they share. ``python -m raftseq.cluster.cli node ...`` is how
``cluster.local`` starts a node."""

from raftseq.cluster.cli.command import build_parser, main

__all__ = ["build_parser", "main"]
