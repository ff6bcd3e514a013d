"""Gateway and metrics receive the node as a small protocol of reads (``cluster.node_reads``),
never ``Node``: neither imports ``cluster.node`` (a ``TYPE_CHECKING`` import included), and the
node offers every read those protocols list."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from raftseq.cluster import node_reads
from raftseq.cluster.node import Node

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_gateway_metrics_and_their_protocols_do_not_import_the_node():
    for name in ("gateway.py", "metrics.py", "node_reads.py", "publication.py", "batcher.py"):
        modules = imported_modules(CLUSTER / name)
        assert "raftseq.cluster.node" not in modules, f"{name} imports cluster.node"


def test_the_node_offers_every_read_of_both_protocols():
    for protocol_class in (node_reads.ClientFacingNode, node_reads.ScrapedNode):
        names = {n for n, _ in inspect.getmembers(protocol_class) if not n.startswith("_")}
        names |= set(protocol_class.__annotations__)
        for name in names:
            assert hasattr(Node, name) or name in inspect.signature(Node.__init__).parameters or name in Node.__init__.__code__.co_names, (
                f"Node lacks {protocol_class.__name__}.{name}"
            )
