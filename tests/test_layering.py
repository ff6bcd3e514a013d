"""The import rules of DESIGN.md section 2, checked on the source text (nothing is imported).

| package       | may import                                                          |
| sequencer/    | stdlib and msgspec; no sockets, threads, asyncio, subprocess,       |
|               | clocks, pysyncobj or prometheus; file I/O only in sequencer.journal |
| clients/      | sequencer.protocol, sequencer.limits, sequencer.version, stdlib,    |
|               | msgspec; prometheus_client in clients/metrics.py only (the opt-in   |
|               | collector), and ``import raftseq.clients`` must not load it         |
| cluster/      | sequencer, clients; pysyncobj in cluster.raft only, cryptography in |
|               | cluster.raft and cluster.certs (TLS certificates of cluster up);    |
|               | prometheus_client in cluster.metrics (and its text parser in the    |
|               | terminal view, cluster.top); rich in cluster.top only               |
| chaos_tests/  | clients, cluster, sequencer.protocol/limits, sequencer.journal      |
| nobody        | imports chaos_tests, tests, benchmarks or examples (but the suites  |
|               | themselves: tests import everything, benchmarks and examples their  |
|               | own modules)                                                        |
| everywhere    | no import cycle among our modules; no private name imported from    |
|               | another module; our packages only as ``raftseq.*``                  |

Every import statement counts, wherever it sits (inside functions, under ``if TYPE_CHECKING``),
and so do ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEVER_IMPORTED = ("chaos_tests", "tests", "benchmarks")
# What the core must not touch: I/O beyond its journal files, threads, clocks, Raft, metrics.
SEQUENCER_FORBIDDEN = (
    "socket",
    "socketserver",
    "ssl",
    "selectors",
    "asyncio",
    "threading",
    "_thread",
    "concurrent",
    "multiprocessing",
    "subprocess",
    "time",
    "pickle",  # machine state is serialized with msgspec, never pickle (DESIGN.md section 4)
    "pysyncobj",
    "prometheus_client",
    "cluster",
    "clients",
    *NEVER_IMPORTED,
)
CLIENTS_FORBIDDEN = ("cluster", "pysyncobj", "prometheus_client", *NEVER_IMPORTED)
# Modules of the sequencer package that clients may use. protocol imports limits and
# re-exports it as `protocol.limits`; importing it directly changes nothing.
CLIENTS_MAY_USE = ("sequencer.protocol", "sequencer.limits", "sequencer.version")
# The one exception: the opt-in metrics collector may import prometheus_client. Nothing else in
# clients/ may, so that applications that do not opt in never load it.
CLIENTS_METRICS_MODULE = "clients.metrics"
CLIENTS_METRICS_MAY_USE = ("prometheus_client",)
STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Import:
    """One import: `module` as written (resolved if relative) and, for `from m import a, b`,
    the candidates `m.a`, `m.b` (each may name a submodule)."""

    path: str
    line: int
    module: str
    names: tuple[str, ...] = ()
    #: The module whose source holds the import ("" if not known).
    importer: str = ""

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.module, *(f"{self.module}.{n}" if self.module else n for n in self.names))

    def __str__(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.path}:{self.line}: {what}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".") if package else []
    base = parts[: max(0, len(parts) - (level - 1))]
    if module:
        base.append(module)
    return ".".join(base)


def imports_of(source: str, *, path: str = "<string>", module: str = "", is_package: bool = False) -> list[Import]:
    """Every import in `source`, anywhere in the tree. `module` names the file's own module, to
    resolve relative imports."""
    tree = ast.parse(source, filename=path)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, source_name(alias.name), importer=module) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = _resolve_relative(package, node.level, node.module) if node.level else (node.module or "")
            found.append(Import(path, node.lineno, source_name(name), tuple(a.name for a in node.names if a.name != "*"), importer=module))
        elif isinstance(node, ast.Call) and node.args and _is_dynamic_import(node.func):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append(Import(path, node.lineno, source_name(first.value), importer=module))
    return found


#: The three source folders are installed as subpackages of one namespace (pyproject.toml).
INSTALLED_AS = "raftseq."
OUR_PACKAGES = ("sequencer", "cluster", "clients")


def source_name(name: str) -> str:
    """`raftseq.cluster.node` -> `cluster.node`: the rules speak of the source folders."""
    return name[len(INSTALLED_AS) :] if name.startswith(INSTALLED_AS) else name


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden(imp: Import, prefixes: tuple[str, ...]) -> bool:
    return any(within(c, p) for c in imp.candidates for p in prefixes)


def package_imports(package: str, root: Path = ROOT) -> list[Import]:
    files = sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python files under {package}/"
    found = []
    for file in files:
        found += imports_of(
            file.read_text(encoding="utf-8"),
            path=str(file.relative_to(root)),
            module=module_name(file, root),
            is_package=file.name == "__init__.py",
        )
    return found


def sequencer_violations(found: list[Import]) -> list[str]:
    bad = []
    for imp in found:
        top = imp.module.split(".")[0]
        if forbidden(imp, SEQUENCER_FORBIDDEN):
            bad.append(f"{imp} (forbidden in sequencer/)")
        elif top not in STDLIB and top not in ("msgspec", "sequencer"):
            bad.append(f"{imp} (sequencer/ may import only the standard library and msgspec)")
    return bad


def clients_violations(found: list[Import]) -> list[str]:
    bad = []
    for imp in found:
        top = imp.module.split(".")[0]
        if imp.importer == CLIENTS_METRICS_MODULE and all(
            any(within(c, allowed) for allowed in CLIENTS_METRICS_MAY_USE) for c in imp.candidates
        ):
            continue
        if forbidden(imp, CLIENTS_FORBIDDEN):
            where = f"outside {CLIENTS_METRICS_MODULE}" if forbidden(imp, CLIENTS_METRICS_MAY_USE) else ""
            bad.append(f"{imp} (forbidden in clients/{' ' + where if where else ''})")
        elif top in STDLIB or top in ("msgspec", "clients"):
            continue
        elif any(within(imp.module, allowed) for allowed in CLIENTS_MAY_USE):
            continue
        elif imp.module == "sequencer" and imp.names and all(f"sequencer.{n}" in CLIENTS_MAY_USE for n in imp.names):
            continue
        else:
            bad.append(f"{imp} (clients/ may import only the standard library, msgspec and sequencer.protocol)")
    return bad


def never_imported_violations(found: list[Import]) -> list[str]:
    return [f"{imp} (nothing imports {', '.join(NEVER_IMPORTED)})" for imp in found if forbidden(imp, NEVER_IMPORTED)]


# --- the rules, on the repository ---------------------------------------------------------


def test_scanner_reads_the_real_sources():
    # The scan is not vacuous: it sees imports known to be there.
    modules = {imp.module for imp in package_imports("sequencer")}
    assert "msgspec" in modules
    assert "sequencer" in modules or "sequencer.limits" in modules


def test_sequencer_imports_only_stdlib_and_msgspec():
    assert sequencer_violations(package_imports("sequencer")) == []


def test_clients_import_only_the_protocol():
    assert clients_violations(package_imports("clients")) == []


def test_only_the_metrics_module_of_clients_imports_prometheus_client():
    # Not vacuous: the collector does import it, and no other module of clients/ does.
    importers = {imp.importer for imp in package_imports("clients") if forbidden(imp, CLIENTS_METRICS_MAY_USE)}
    assert importers == {CLIENTS_METRICS_MODULE}


def test_importing_clients_does_not_load_prometheus_client():
    # A fresh interpreter: what `import clients` (and the blocking facade) pull in, transitively.
    code = (
        "import sys, raftseq.clients, raftseq.clients.blocking, raftseq.clients.client\n"
        "loaded = sorted(m for m in sys.modules if m == 'prometheus_client' or m.startswith('prometheus_client.'))\n"
        "print(' '.join(loaded))\n"
        "import raftseq.clients.metrics\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    without, with_metrics = result.stdout.splitlines()
    assert without == "", f"import clients loaded {without}"
    assert with_metrics == "True", "importing clients.metrics should load prometheus_client (is the check blind?)"


@pytest.mark.parametrize("package", ["sequencer", "cluster", "clients"])
def test_nothing_imports_tests_chaos_tests_or_benchmarks(package):
    assert never_imported_violations(package_imports(package)) == []


# --- the scanner catches what it should ---------------------------------------------------


def scan(source: str, module: str = "sequencer.example", is_package: bool = False) -> list[Import]:
    return imports_of(source, path=f"{module}.py", module=module, is_package=is_package)


@pytest.mark.parametrize(
    "source",
    [
        "import socket",
        "import os, threading",
        "import concurrent.futures",
        "from concurrent.futures import ThreadPoolExecutor",
        "from time import monotonic",
        "import time as clock",
        "def f():\n    import asyncio\n    return asyncio",
        "class C:\n    def m(self):\n        if True:\n            from pysyncobj import SyncObj",
        "try:\n    import prometheus_client\nexcept ImportError:\n    pass",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import selectors",
        "import multiprocessing.pool",
        "import subprocess",
        "from cluster.node import Node",
        "from clients import client",
        "import tests.helpers",
        "from chaos_tests import nemesis",
        "from benchmarks.run import main",
        "import importlib\nimportlib.import_module('threading')",
        "__import__('socket')",
        "from .. import cluster",
        "import requests",
    ],
)
def test_scanner_flags_forbidden_sequencer_imports(source):
    assert sequencer_violations(scan(source)) != []


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations\nimport enum, struct, zlib, os, bisect",
        "from collections.abc import Callable",
        "import msgspec\nfrom msgspec import Struct",
        "from sequencer import limits, protocol",
        "from sequencer.journal import Journal",
        "from . import limits",
        "from .machine import SequencerMachine",
        "import hashlib",
        "timestamp = 'import time'",
    ],
)
def test_scanner_allows_what_sequencer_may_import(source):
    assert sequencer_violations(scan(source)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import cluster",
        "from cluster import gateway",
        "import pysyncobj",
        "from prometheus_client import Counter",
        "from sequencer import machine",
        "from sequencer import protocol, journal",
        "from sequencer.journal import Journal",
        "import sequencer.core",
        "import sequencer",
        "from sequencer import SequencerMachine",
        "def f():\n    from tests import helpers",
        "from ..cluster import node",
        "import numpy",
    ],
)
def test_scanner_flags_forbidden_client_imports(source):
    assert clients_violations(scan(source, module="clients.example")) != []


@pytest.mark.parametrize(
    "source",
    [
        "import prometheus_client",
        "from prometheus_client import Counter",
        "from prometheus_client.core import CounterMetricFamily",
        "import importlib\nimportlib.import_module('prometheus_client')",
        "def f():\n    from prometheus_client import REGISTRY",
    ],
)
@pytest.mark.parametrize("module", ["clients.client", "clients.blocking", "clients", "clients.sub.metrics", "clients.metrics_util"])
def test_prometheus_client_is_flagged_anywhere_in_clients_but_the_metrics_module(source, module):
    bad = clients_violations(scan(source, module=module, is_package=module == "clients"))
    assert bad != []
    assert "outside clients.metrics" in bad[0]
    assert clients_violations(scan(source, module="clients.metrics")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import cluster",
        "from cluster.metrics import NodeCollector",
        "import pysyncobj",
        "from sequencer.journal import Journal",
        "import requests",
        "from prometheus_client import Counter\nimport cluster.metrics",
        "from tests import helpers",
    ],
)
def test_the_metrics_module_of_clients_keeps_every_other_rule(source):
    assert clients_violations(scan(source, module="clients.metrics")) != []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio, socket, ssl, time, random",
        "import msgspec",
        "from sequencer import protocol",
        "from sequencer import limits, protocol",
        "from sequencer.protocol import Submit, encode_frame",
        "import sequencer.protocol",
        "import sequencer.limits",
        "from . import sync",
        "from clients.client import SequencerClient",
    ],
)
def test_scanner_allows_what_clients_may_import(source):
    assert clients_violations(scan(source, module="clients.example")) == []


def test_relative_imports_resolve_against_the_package():
    (imp,) = scan("from . import protocol", module="sequencer.machine")
    assert imp.candidates == ("sequencer", "sequencer.protocol")
    (imp,) = scan("from .protocol import Submit", module="sequencer", is_package=True)
    assert imp.module == "sequencer.protocol"
    (imp,) = scan("from ..cluster import node", module="clients.sub.mod")
    assert imp.module == "clients.cluster"
    (imp,) = scan("from ..cluster import node", module="clients.mod")
    assert imp.module == "cluster"


def test_never_imported_packages_are_flagged_anywhere():
    for module in ("cluster.node", "clients.client", "sequencer.machine"):
        assert never_imported_violations(scan("def f():\n    import benchmarks.report", module=module)) != []
        assert never_imported_violations(scan("from tests.test_protocol import x", module=module)) != []
        assert never_imported_violations(scan("import chaos_tests", module=module)) != []
        assert never_imported_violations(scan("import testsuite, benchmarking", module=module)) == []


def test_a_planted_prometheus_import_is_found_outside_the_clients_metrics_module(tmp_path):
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "__init__.py").write_text('"""Clients."""\nfrom clients.client import C\n')
    (tmp_path / "clients" / "metrics.py").write_text("from prometheus_client.core import CounterMetricFamily\n")
    (tmp_path / "clients" / "client.py").write_text("import asyncio\n\nclass C:\n    def m(self):\n        import prometheus_client\n")
    bad = clients_violations(package_imports("clients", root=tmp_path))
    assert len(bad) == 1
    assert "clients/client.py:5" in bad[0]


def test_a_planted_forbidden_import_is_found_in_a_package_tree(tmp_path):
    (tmp_path / "sequencer").mkdir()
    (tmp_path / "sequencer" / "__init__.py").write_text('"""Core."""\n')
    (tmp_path / "sequencer" / "deep").mkdir()
    (tmp_path / "sequencer" / "deep" / "clocky.py").write_text("def now():\n    from time import time\n    return time()\n")
    found = package_imports("sequencer", root=tmp_path)
    bad = sequencer_violations(found)
    assert len(bad) == 1
    assert "sequencer/deep/clocky.py:2" in bad[0]


# --- installed names ------------------------------------------------------------------------


def bare_imports(source: str, path: str = "<string>") -> list[str]:
    """Imports that name `sequencer`, `cluster` or `clients` without the `raftseq.` namespace:
    they would find a user's own `cluster/` or `clients.py` first (pyproject.toml)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=path)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        bad += [f"{path}:{node.lineno}: {n}" for n in names if n.split(".")[0] in OUR_PACKAGES]
    return bad


def test_every_import_of_our_packages_goes_through_the_raftseq_namespace():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(files) > 50, "git ls-files found too few sources (is the scan blind?)"
    bad = [b for f in files for b in bare_imports((ROOT / f).read_text(encoding="utf-8"), f)]
    assert bad == []


def test_bare_imports_are_caught():
    assert bare_imports("from cluster.node import Node") != []
    assert bare_imports("import clients") != []
    assert bare_imports("from raftseq.cluster.node import Node\nimport clientside") == []


# --- cluster/: pysyncobj behind one door, metrics and terminal libraries in their modules -------

#: Third-party packages and the cluster modules (prefixes) that alone may import them.
CLUSTER_CONFINED = {
    "pysyncobj": ("cluster.raft",),
    "cryptography": ("cluster.raft", "cluster.certs"),
    "prometheus_client": ("cluster.metrics", "cluster.top"),
    "rich": ("cluster.top", "cluster.cli.top"),
}
CLUSTER_MAY_USE = ("sequencer", "cluster", "clients", "msgspec", *CLUSTER_CONFINED)


def cluster_violations(found: list[Import]) -> list[str]:
    bad = []
    for imp in found:
        top = imp.module.split(".")[0]
        if forbidden(imp, NEVER_IMPORTED + ("examples",)):
            bad.append(f"{imp} (nothing imports {', '.join(NEVER_IMPORTED)} or examples)")
        elif top in CLUSTER_CONFINED and not any(within(imp.importer, home) for home in CLUSTER_CONFINED[top]):
            bad.append(f"{imp} ({top} only in {', '.join(CLUSTER_CONFINED[top])})")
        elif top not in STDLIB and top not in CLUSTER_MAY_USE:
            bad.append(f"{imp} (cluster/ may import the standard library, msgspec, sequencer, clients and {', '.join(CLUSTER_CONFINED)})")
    return bad


def test_cluster_keeps_pysyncobj_metrics_and_terminal_libraries_in_their_modules():
    found = package_imports("cluster")
    assert any(imp.module.split(".")[0] == "pysyncobj" for imp in found), "the scan sees no pysyncobj import (is it blind?)"
    assert cluster_violations(found) == []


@pytest.mark.parametrize(
    "source, module",
    [
        ("from pysyncobj import SyncObjException", "cluster.node"),
        ("import pysyncobj.syncobj", "cluster.gateway"),
        ("def f():\n    from cryptography.hazmat.primitives import hashes", "cluster.config"),
        ("from prometheus_client import Counter", "cluster.gateway"),
        ("from rich.table import Table", "cluster.cli"),
        ("import requests", "cluster.node"),
        ("from chaos_tests import nemesis", "cluster.local"),
        ("from examples.refdata import demo", "cluster.cli"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pysyncobj import SyncObj", "cluster.batcher"),
    ],
)
def test_scanner_flags_forbidden_cluster_imports(source, module):
    assert cluster_violations(scan(source, module=module)) != []


@pytest.mark.parametrize(
    "source, module",
    [
        ("from pysyncobj import SyncObj", "cluster.raft.replica"),
        ("import pysyncobj", "cluster.raft"),
        ("from prometheus_client.core import GaugeMetricFamily", "cluster.metrics"),
        ("from rich.live import Live", "cluster.top.render"),
        ("from raftseq.clients import SequencerClient\nfrom raftseq.sequencer import protocol", "cluster.cli"),
    ],
)
def test_scanner_allows_what_cluster_may_import(source, module):
    assert cluster_violations(scan(source, module=module)) == []


# --- chaos_tests/ and the suites ------------------------------------------------------------

CHAOS_MAY_USE_FROM_SEQUENCER = ("sequencer.protocol", "sequencer.limits", "sequencer.journal")


def chaos_violations(found: list[Import]) -> list[str]:
    bad = []
    for imp in found:
        if forbidden(imp, ("tests", "benchmarks", "examples")):
            bad.append(f"{imp} (chaos_tests imports no tests, benchmarks or examples)")
        elif imp.module.split(".")[0] == "sequencer" and not all(
            any(within(c, allowed) for allowed in CHAOS_MAY_USE_FROM_SEQUENCER) for c in imp.candidates[1:] or imp.candidates
        ):
            bad.append(f"{imp} (chaos_tests may use only {', '.join(CHAOS_MAY_USE_FROM_SEQUENCER)} of sequencer)")
    return bad


def test_chaos_tests_use_only_the_public_surface():
    assert chaos_violations(package_imports("chaos_tests")) == []


@pytest.mark.parametrize(
    "source, bad",
    [
        ("from raftseq.sequencer.machine import SequencerMachine", True),
        ("from raftseq.sequencer import machine", True),
        ("from tests.cluster_harness import Harness", True),
        ("from benchmarks import bench_cluster", True),
        ("from raftseq.sequencer import protocol", False),
        ("from raftseq.sequencer.journal import Journal", False),
        ("from raftseq.cluster.local import LocalCluster\nfrom raftseq.clients import SequencerClient", False),
    ],
)
def test_scanner_checks_chaos_imports(source, bad):
    assert (chaos_violations(scan(source, module="chaos_tests.example")) != []) is bad


@pytest.mark.parametrize("package, allowed", [("examples", ("examples",)), ("benchmarks", ("benchmarks",))])
def test_examples_and_benchmarks_import_no_other_suite(package, allowed):
    suites = tuple(s for s in (*NEVER_IMPORTED, "examples") if s not in allowed)
    assert [str(imp) for imp in package_imports(package) if forbidden(imp, suites)] == []


# --- no import cycles -----------------------------------------------------------------------

PRODUCT = ("sequencer", "cluster", "clients")


def _source_files(packages: tuple[str, ...], root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every Python file of `packages`."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def findings_in(packages: tuple[str, ...], check: Callable[[str, str], list[str]]) -> list[str]:
    """What ``check(source, module)`` finds in every Python file of `packages`."""
    return [found for m, p in _source_files(packages).items() for found in check(p.read_text(encoding="utf-8"), m)]


def import_graph(packages: tuple[str, ...] = PRODUCT, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (``from pkg import sub`` counts as the
    submodule where one exists, else the package), TYPE_CHECKING imports included."""
    files = _source_files(packages, root)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for imp in imports_of(path.read_text(encoding="utf-8"), path=str(path), module=module, is_package=path.name == "__init__.py"):
            targets = [c for c in imp.candidates[1:] if c in files] or ([imp.module] if imp.module in files else [])
            graph[module].update(t for t in targets if t != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (depth-first search, colours on the stack)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_no_import_cycles():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50, "the graph is nearly empty (is the scan blind?)"
    assert find_cycle(graph) == []


def test_a_planted_cycle_through_type_checking_is_found(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "__init__.py").write_text("")
    (tmp_path / "cluster" / "node.py").write_text("from raftseq.cluster.gateway import Gateway\n")
    (tmp_path / "cluster" / "gateway.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raftseq.cluster import node\n"
    )
    assert find_cycle(import_graph(("cluster",), root=tmp_path)) == ["cluster.gateway", "cluster.node", "cluster.gateway"]
    (tmp_path / "cluster" / "gateway.py").write_text("import asyncio\n")
    assert find_cycle(import_graph(("cluster",), root=tmp_path)) == []


# --- no private names across modules --------------------------------------------------------

CODE = (*PRODUCT, "chaos_tests", "benchmarks", "examples")


def private_imports(found: list[Import]) -> list[str]:
    """``from our.module import _name`` where the name is private to another module."""
    ours = (*CODE, "tests")
    return [
        str(imp)
        for imp in found
        if imp.module.split(".")[0] in ours
        for name in imp.names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]


@pytest.mark.parametrize("package", CODE)
def test_no_private_name_is_imported_across_modules(package):
    assert private_imports(package_imports(package)) == []


def test_a_planted_private_import_is_found():
    assert private_imports(scan("from raftseq.clients.client import Message, _open_link", module="clients.sm.snapshots")) != []
    assert private_imports(scan("from .client import _Link", module="clients.sm.snapshots")) != []
    assert private_imports(scan("from raftseq.sequencer.version import __version__\nfrom os import _exit", module="clients")) == []


# --- file I/O in sequencer/ only under the journal ------------------------------------------

#: ``os.X(...)`` / ``io.X(...)`` calls that touch the file system.
FILE_IO_CALLS = frozenset(
    {
        "open",
        "fsync",
        "fdatasync",
        "replace",
        "rename",
        "remove",
        "unlink",
        "makedirs",
        "mkdir",
        "listdir",
        "scandir",
        "truncate",
        "ftruncate",
        "write",
        "read",
        "pread",
        "pwrite",
        "stat",
    }
)
FILE_IO_MODULES = ("mmap", "shutil", "tempfile", "pathlib", "glob")


def file_io_outside_journal(source: str, module: str) -> list[str]:
    if within(module, "sequencer.journal"):
        return []
    bad = [str(imp) for imp in scan(source, module=module) if forbidden(imp, FILE_IO_MODULES)]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            bad.append(f"{module}:{node.lineno}: open(...)")
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("os", "io"):
            if func.attr in FILE_IO_CALLS:
                bad.append(f"{module}:{node.lineno}: {func.value.id}.{func.attr}(...)")
    return bad


def test_sequencer_touches_files_only_in_the_journal():
    assert any(within(m, "sequencer.journal") for m in _source_files(("sequencer",)))
    assert findings_in(("sequencer",), file_io_outside_journal) == []


@pytest.mark.parametrize("source", ["import os\nos.fsync(3)", "f = open('x', 'wb')", "import shutil", "from pathlib import Path"])
def test_planted_file_io_outside_the_journal_is_found(source):
    assert file_io_outside_journal(source, "sequencer.machine") != []
    assert file_io_outside_journal(source, "sequencer.journal.segments") == []


def test_a_journal_method_is_not_file_io():
    assert file_io_outside_journal("held = journal.read_bytes(1, 2)\nos_path = 'x'", "sequencer.core") == []


# --- every bound named once -----------------------------------------------------------------

BOUNDS_HOMES = ("sequencer.limits", "cluster.config")


def stray_bounds(source: str, module: str) -> list[str]:
    """Literals that look like a byte bound outside the homes of bounds: a power of two of 4 KiB
    or more, or ``N * 1024`` (KiB and MiB arithmetic). Unit conversions (1000, 1e9) and the
    defaults of keyword options (a client's own bound, documented on its signature) pass."""
    if module in BOUNDS_HOMES:
        return []
    tree = ast.parse(source)
    defaults = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for default in [*fn.args.defaults, *(d for d in fn.args.kw_defaults if d is not None)]
        for node in ast.walk(default)
    }
    # Histogram buckets are lists of values, not bounds.
    defaults |= {id(c) for t in ast.walk(tree) if isinstance(t, ast.Tuple) and len(t.elts) > 3 for c in t.elts}
    bad = []
    for node in ast.walk(tree):
        if id(node) in defaults:
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 4096 and node.value & (node.value - 1) == 0:
            bad.append(f"{module}:{node.lineno}: {node.value}")
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mult)
            and any(isinstance(side, ast.Constant) and side.value == 1024 for side in (node.left, node.right))
        ):
            bad.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_every_byte_bound_lives_in_limits_or_config():
    assert findings_in(PRODUCT, stray_bounds) == []


@pytest.mark.parametrize("source", ["READ_CHUNK = 65536", "buf = sock.recv(256 * 1024)", "if n > 262144:\n    pass", "x = 1024 * 1024"])
def test_a_planted_stray_bound_is_found(source):
    assert stray_bounds(source, "cluster.gateway") != []
    assert stray_bounds(source, "sequencer.limits") == []


@pytest.mark.parametrize("source", ["ms = s * 1000", "def f(*, read_bytes_max: int = 65536):\n    pass", "n = 1023 + 5000"])
def test_conversions_and_keyword_defaults_are_not_stray_bounds(source):
    assert stray_bounds(source, "clients.client") == []
