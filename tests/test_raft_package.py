"""The Raft adapter as pysyncobj's one door (``cluster.raft``).

* Every private pysyncobj name the package uses is listed in ``raft.private_names`` and exists
  on the pinned pysyncobj version; no code outside the package names pysyncobj.
* Importing the package (or the node) leaves pysyncobj as it is; ``raft.install()`` applies the
  process-wide changes, and a second call changes nothing.
"""

from __future__ import annotations

import ast
import inspect
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pysyncobj
import pysyncobj.pipe_notifier
import pysyncobj.syncobj
import pysyncobj.transport
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.fast_queue import FastQueue
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.version import VERSION

from raftseq.cluster.raft import private_names

ROOT = Path(__file__).resolve().parents[1]
RAFT_PACKAGE = ROOT / "cluster" / "raft"
#: Where plain pysyncobj is used on purpose: the benchmark's baseline peer.
PLAIN_PYSYNCOBJ_ALLOWED = {ROOT / "benchmarks" / "peers" / "plain_pysyncobj.py"}
PRIVATE_NAME = re.compile(r"_(?:SyncObj|PipeNotifier|TcpConnection|TcpServer|FastQueue)__\w+")


def a_syncobj() -> SyncObj:
    """A member set up as the node's (no append-entries batching: pysyncobj builds its pipe)."""
    conf = SyncObjConf(autoTick=False, bindAddress="127.0.0.1:0", dynamicMembershipChange=False, appendEntriesUseBatch=False)
    return SyncObj("127.0.0.1:0", [], conf)


def test_the_pinned_version_is_installed():
    assert VERSION == private_names.PINNED_VERSION


def test_every_listed_name_exists_on_the_pinned_pysyncobj():
    member = a_syncobj()
    try:
        for name in private_names.SYNCOBJ_ATTRIBUTES:
            assert hasattr(member, name), name
        for name in private_names.SYNCOBJ_METHODS:
            assert callable(getattr(SyncObj, name, None)), name
        notifier = member._SyncObj__pipeNotifier
        assert isinstance(notifier, pysyncobj.pipe_notifier.PipeNotifier)
        for name in private_names.PIPE_NOTIFIER_ATTRIBUTES:
            assert hasattr(notifier, name), name
    finally:
        member.destroy()
    for module_name, name in private_names.MODULE_NAMES:
        assert hasattr(importlib.import_module(module_name), name), f"{module_name}.{name}"
    for name in private_names.FAST_QUEUE_ATTRIBUTES:
        assert hasattr(FastQueue(1), name), name


def test_every_listed_link_name_exists_on_the_pinned_pysyncobj():
    connection = TcpConnection(poller=None)
    server = TcpServer(poller=None, host="127.0.0.1", port=0, onNewConnection=None)
    for name in private_names.TCP_CONNECTION_NAMES:
        assert hasattr(connection, name), name
    for name in private_names.TCP_SERVER_NAMES:
        assert hasattr(server, name), name
    transport_source = inspect.getsource(pysyncobj.transport.TCPTransport)
    for name in private_names.TCP_TRANSPORT_NAMES:
        assert f"self.{name}" in transport_source or f"def {name}(" in transport_source, name


def test_the_package_uses_no_private_name_missing_from_the_list():
    listed = (
        set(private_names.SYNCOBJ_ATTRIBUTES)
        | set(private_names.SYNCOBJ_METHODS)
        | set(private_names.PIPE_NOTIFIER_ATTRIBUTES)
        | set(private_names.TCP_CONNECTION_NAMES)
        | set(private_names.TCP_SERVER_NAMES)
        | set(private_names.TCP_TRANSPORT_NAMES)
        | set(private_names.FAST_QUEUE_ATTRIBUTES)
    )
    protected = {name for name in private_names.SYNCOBJ_METHODS if not name.startswith("_SyncObj__")}
    for path in sorted(RAFT_PACKAGE.glob("*.py")):
        if path.name == "private_names.py":
            continue
        source = path.read_text()
        used = set(PRIVATE_NAME.findall(source))
        assert used <= listed, f"{path.name} uses {sorted(used - listed)}, not in raft.private_names"
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and hasattr(SyncObj, node.attr)
            ):
                assert node.attr in listed or node.attr in protected, f"{path.name} uses SyncObj.{node.attr}"


def test_pysyncobj_is_named_only_inside_the_raft_package():
    for folder in ("cluster", "clients", "sequencer", "chaos_tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if RAFT_PACKAGE in path.parents or path in PLAIN_PYSYNCOBJ_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n == "pysyncobj" or n.startswith("pysyncobj.") for n in names), f"{path} imports pysyncobj"
            assert not PRIVATE_NAME.search(path.read_text()), f"{path} names a pysyncobj private name"


CHECK_UNPATCHED_THEN_INSTALL = """
import zlib
import pysyncobj.encryptor, pysyncobj.pickle, pysyncobj.poller, pysyncobj.syncobj, pysyncobj.tcp_connection

def plain():
    return (
        getattr(pysyncobj.pickle, "__protocol") == 2
        and pysyncobj.syncobj.getEncryptor is pysyncobj.encryptor.getEncryptor
        and pysyncobj.tcp_connection.zlib is zlib
        and pysyncobj.syncobj.createPoller is pysyncobj.poller.createPoller
    )

import raftseq.cluster.raft
import raftseq.cluster.node
import raftseq.cluster.cli
print("after import:", "plain" if plain() else "patched", raftseq.cluster.raft.installed())
raftseq.cluster.raft.install()
first = (getattr(pysyncobj.pickle, "__protocol"), pysyncobj.syncobj.getEncryptor, pysyncobj.tcp_connection.zlib, pysyncobj.syncobj.createPoller)
raftseq.cluster.raft.install()
second = (getattr(pysyncobj.pickle, "__protocol"), pysyncobj.syncobj.getEncryptor, pysyncobj.tcp_connection.zlib, pysyncobj.syncobj.createPoller)
print("after install:", "plain" if plain() else "patched", raftseq.cluster.raft.installed(), first == second, first[0])
"""


def test_importing_leaves_pysyncobj_plain_and_install_is_idempotent():
    done = subprocess.run([sys.executable, "-c", CHECK_UNPATCHED_THEN_INSTALL], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["after import: plain False", "after install: patched True True 5"], done.stdout
