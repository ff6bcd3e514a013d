"""The raftseq release: one number for the package, ``raftseq --version`` and the hello a client
sends. Wire, journal and snapshot formats carry versions of their own (``protocol``, ``journal``)."""

__version__ = "0.3.0.dev0"
