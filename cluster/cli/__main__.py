"""``python -m raftseq.cluster.cli``: the ``raftseq`` command (``cluster.local`` starts nodes so)."""

import sys

from raftseq.cluster.cli.command import main

sys.exit(main())
