"""The monitoring files under deploy/ as the tests read them: metric names in PromQL
expressions, the names a raftseq node exports, the dashboard's queries, the rule file's
expressions and the scrape-config generator.

The extraction is lexical, which is enough for the expressions we write: strings, label
matchers, ranges, grouping clauses and Grafana variables are removed; what remains of the
identifiers is a metric name unless it is a function (followed by ``(``), a keyword, or part
of a number. Anything it cannot place shows up as an unknown name — a failure, never a pass.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

from prometheus_client import ProcessCollector

from raftseq.cluster import metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "raftseq.json"

KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"}
)
#: Series Prometheus itself makes for every target (not exported by a node).
PROMETHEUS_SERIES = frozenset({"up"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects."""
    label_values = _LABEL_VALUES.match(expr)
    if label_values:  # Grafana's label_values(selector, label)
        expr = label_values.group(1)
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    previous = None
    while previous != text:  # nested braces/brackets, innermost first
        previous = text
        text = _MATCHERS.sub(" ", text)
        text = _RANGE.sub(" ", text)
    text = _CLAUSE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # 1e3, 0x10, 2.5e-3
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def process_sample_names() -> frozenset[str]:
    """The standard ``process_*`` samples a node serves (``cluster.metrics.build_registry``)."""
    return frozenset(s.name for family in ProcessCollector(registry=None).collect() for s in family.samples)


def node_sample_names() -> frozenset[str]:
    return metrics.exported_sample_names() | process_sample_names()


def relay_sample_names() -> frozenset[str]:
    """Every sample name a relay's ``/metrics`` page holds (``RELAY_METRICS``; none is a histogram)."""
    assert all(spec.type != "histogram" for spec in metrics.RELAY_METRICS)
    return frozenset(spec.name for spec in metrics.RELAY_METRICS)


def family_of(sample_name: str) -> str:
    """The ``METRICS`` entry a sample name belongs to (``_bucket``/``_sum``/``_count`` of a
    histogram map to the histogram)."""
    histograms = {spec.name for spec in metrics.METRICS if spec.type == "histogram"}
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in histograms:
            return sample_name[: -len(suffix)]
    return sample_name


def rule_expressions(path: Path) -> dict[str, str]:
    """``{alert name: expr}`` of a Prometheus rule file, read without a YAML library: an
    ``expr:`` is either inline or a block scalar (``>-``/``|``) of more-indented lines."""
    lines = path.read_text().splitlines()
    rules: dict[str, str] = {}
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        alert = re.match(r"^\s*-\s*(?:alert|record):\s*(\S+)\s*$", line)
        if alert:
            name = alert.group(1)
        expr = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if expr:
            assert name is not None, f"{path}:{i + 1}: expr before any alert/record"
            indent, value = len(expr.group(1)), expr.group(2).strip()
            if value in (">", ">-", "|", "|-"):
                body = []
                while i + 1 < len(lines) and (not lines[i + 1].strip() or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    body.append(lines[i].strip())
                value = " ".join(part for part in body if part)
            elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            assert name not in rules, f"{path}: {name} defined twice"
            rules[name] = value
        i += 1
    return rules


# --- deploy/ scripts and the dashboard ------------------------------------------------------


def load_script(path: Path) -> ModuleType:
    """A stdlib-only script under deploy/ (not a package) loaded as a module."""
    spec = importlib.util.spec_from_file_location(f"raftseq_deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scrape_config_module() -> ModuleType:
    return load_script(PROMETHEUS_DIR / "scrape_config.py")


def dashboard_generator() -> ModuleType:
    return load_script(GRAFANA_DIR / "dashboard.py")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside (collapsed) rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every query in the dashboard: panel targets and variables."""
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query))
    return found
