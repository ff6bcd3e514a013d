"""A chaos run's report directory: ``report.json`` and ``timeline.png``.

``report.json`` holds the run (scenario, seed, duration), the checker's report (every invariant's
verdict, the violations, operation counts, availability around each fault) and the leader
changes seen. ``timeline.png`` shows, over the run, acknowledged submits per second and the
acknowledgement latency (median and maximum per second, from invoke to ack), with every fault's
window shaded and labelled and every leader change marked, so a person sees at a glance what
each fault did.
"""

from __future__ import annotations

import os
from array import array
from collections import defaultdict
from collections.abc import Iterable

import msgspec

from chaos_tests.checker import Report
from chaos_tests.history import AnyEvent, Complete, Fault, Invoke, Note, iter_history
from chaos_tests.history_index import Positions

#: Invariants the checker knows, in order (the report lists each with its verdict).
INVARIANTS = (
    "one-record-per-seq",
    "final-reads-prefix",
    "gapless-delivery",
    "payload-once",
    "acked-write-kept",
    "submitted-only",
    "real-time-order",
    "session-order",
    "failed-not-committed",
)


def _timeline(events: Iterable[AnyEvent]) -> dict:
    """Per-second figures from a history, read in one pass (it may be larger than memory).
    Also returns, under ``"t0"``, the first event's ``t`` (``None`` without events)."""
    t0 = last_t = None
    invoked = _InvokeTimes()
    latencies: dict[int, array] = defaultdict(lambda: array("d"))
    faults: dict[int, dict] = {}
    leaders = []
    for e in events:
        if t0 is None:
            t0 = e.t
        last_t = e.t
        kind = type(e)
        if kind is Invoke:
            invoked.add(e.op, e.t)
        elif kind is Complete and e.outcome == "ok" and (invoked_t := invoked.get(e.op)) is not None:
            latencies[int((e.t - t0) // 1_000_000_000)].append((e.t - invoked_t) / 1e6)
        elif kind is Fault:
            if e.phase == "start":
                faults[e.fault] = {"name": e.name, "start_s": (e.t - t0) / 1e9, "end_s": None, "leader": e.details.get("role") == "leader"}
            elif e.fault in faults:
                faults[e.fault]["end_s"] = (e.t - t0) / 1e9
        elif kind is Note and e.text == "leader":
            leaders.append({"at_s": (e.t - t0) / 1e9, "leader": e.fields.get("leader", ""), "term": e.fields.get("term", 0)})
    if t0 is None:
        return {"seconds": [], "acks": [], "latency_p50_ms": [], "latency_max_ms": [], "faults": [], "leaders": [], "t0": None}
    last = int((last_t - t0) // 1_000_000_000)
    seconds = list(range(last + 1))
    acks, p50, peak = [], [], []
    for s in seconds:
        values = sorted(latencies.get(s, ()))
        acks.append(len(values))
        p50.append(values[len(values) // 2] if values else None)
        peak.append(values[-1] if values else None)
    end = (last_t - t0) / 1e9
    for f in faults.values():
        if f["end_s"] is None:
            f["end_s"] = end
    return {
        "seconds": seconds,
        "acks": acks,
        "latency_p50_ms": p50,
        "latency_max_ms": peak,
        "faults": list(faults.values()),
        "leaders": leaders,
        "t0": t0,
    }


class _InvokeTimes:
    """Op id → invoke ``t``, in a column (``Positions`` numbers the op ids)."""

    def __init__(self) -> None:
        self._rows = Positions()
        self._times = array("q")

    def add(self, op: int, t: int) -> None:
        row = self._rows.get(op)
        if row is None:
            self._rows.add(op)
            self._times.append(t)
        else:
            self._times[row] = t

    def get(self, op: int) -> int | None:
        row = self._rows.get(op)
        return self._times[row] if row is not None else None


def write_report(directory: str, history_path: str, report: Report, run: dict) -> dict:
    """Write ``report.json`` and ``timeline.png`` into `directory`; returns the JSON document."""
    os.makedirs(directory, exist_ok=True)
    timeline = _timeline(iter_history(history_path))
    t0 = timeline.pop("t0")
    counts = report.violation_counts
    document = {
        "run": run,
        "ok": report.ok,
        "invariants": {
            name: (
                f"VIOLATED {counts[name]} time(s)"
                if counts.get(name)
                else f"excused {report.excused_counts[name]} time(s): the expected loss of a power cut in crash durability"
                if report.excused_counts.get(name)
                else "held"
            )
            for name in INVARIANTS
        },
        "checker": msgspec.to_builtins(report),
        "faults": len(timeline["faults"]),
        "leader_changes": max(0, len(timeline["leaders"]) - 1),
        "timeline": timeline,
        "history": os.path.abspath(history_path),
    }
    with open(os.path.join(directory, "report.json"), "w") as f:
        f.write(msgspec.json.format(msgspec.json.encode(document)).decode())
    samples = run.get("samples") or []
    if samples and t0 is not None:  # on the timeline's clock (seconds since the history's first event)
        samples = [{**s, "at_s": round((s["at_ns"] - t0) / 1e9, 1)} for s in samples]
    draw_timeline(
        timeline,
        os.path.join(directory, "timeline.png"),
        title=f"raftseq chaos: {run.get('scenario')} (seed {run.get('seed')})",
        samples=samples,
    )
    return document


#: Beyond this many faults (or leader changes) the picture gets a legend instead of a label each.
FAULT_LABELS_MAX = 40


def _draw_samples(axis, samples: list[dict]) -> None:
    """Journal MiB per node (solid, left axis) and RSS MiB per process (dashed, right axis)."""
    at = [s["at_s"] for s in samples]
    nodes = sorted({n for s in samples for n in s["nodes"]})
    palette = {n: f"C{i}" for i, n in enumerate(nodes)}
    for node in nodes:
        points = [(t, s["nodes"][node]["journal_bytes"] / MIB) for t, s in zip(at, samples) if node in s["nodes"]]
        axis.plot(*zip(*points), color=palette[node], marker="o", markersize=3, label=f"{node} journal")
    axis.set_ylabel("journal MiB (solid)")
    rss = axis.twinx()
    for node in nodes:
        points = [(t, (s["nodes"][node]["rss_bytes"] or 0) / MIB) for t, s in zip(at, samples) if node in s["nodes"]]
        rss.plot(*zip(*points), color=palette[node], linestyle="--", linewidth=0.8)
    rss.plot(
        at, [(s["workload_rss_bytes"] or 0) / MIB for s in samples], color="black", linestyle="--", linewidth=0.8, label="workload RSS"
    )
    rss.set_ylabel("RSS MiB (dashed)")
    axis.legend(loc="upper left", fontsize=7, ncol=len(nodes))
    rss.legend(loc="upper right", fontsize=7)


MIB = 1 << 20


def draw_timeline(timeline: dict, path: str, *, title: str, samples: list[dict] | None = None) -> None:
    """The picture; with `samples` (the ops soak), a third panel of disk and RSS."""
    import matplotlib
    import matplotlib.patches

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    if samples:
        figure, (top, bottom, third) = pyplot.subplots(3, 1, sharex=True, figsize=(14, 10), constrained_layout=True)
        _draw_samples(third, samples)
    else:
        figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(14, 7), constrained_layout=True)
    seconds = timeline["seconds"]
    top.plot(seconds, timeline["acks"], color="tab:blue", linewidth=1)
    top.set_ylabel("acknowledged / s")
    top.set_title(title)
    points = [(s, v) for s, v in zip(seconds, timeline["latency_p50_ms"]) if v is not None]
    peaks = [(s, v) for s, v in zip(seconds, timeline["latency_max_ms"]) if v is not None]
    if points:
        bottom.plot(*zip(*points), color="tab:green", linewidth=1, label="median")
    if peaks:
        bottom.plot(*zip(*peaks), color="tab:red", linewidth=0.8, alpha=0.7, label="max")
        bottom.set_yscale("log")
    bottom.set_ylabel("invoke → ack, ms")
    (third if samples else bottom).set_xlabel("seconds since the start of the run")
    bottom.legend(loc="upper right")
    faults = timeline["faults"]
    families = sorted({fault["name"] for fault in faults})
    palette = pyplot.get_cmap("tab10")
    color_of = {name: palette(i % 10) for i, name in enumerate(families)}
    label_each = len(faults) <= FAULT_LABELS_MAX
    for fault in faults:
        for axis in (top, bottom):
            axis.axvspan(
                fault["start_s"],
                max(fault["end_s"], fault["start_s"] + 0.05),
                color=color_of[fault["name"]],
                alpha=0.2 if fault["leader"] else 0.1,
            )
        if label_each:
            top.annotate(
                fault["name"], (fault["start_s"], 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="top", ha="right"
            )
    if not label_each and families:
        handles = [matplotlib.patches.Patch(color=color_of[name], alpha=0.35, label=name) for name in families]
        top.legend(
            handles=handles,
            loc="upper left",
            fontsize=7,
            ncol=min(len(families), 6),
            title=f"{len(faults)} faults (darker: hit the leader)",
            title_fontsize=7,
        )
    changes = timeline["leaders"][1:]
    for change in changes:
        if len(changes) <= FAULT_LABELS_MAX:
            for axis in (top, bottom):
                axis.axvline(change["at_s"], color="black", linestyle=":", linewidth=0.8)
            bottom.annotate(
                f"{change['leader']} t{change['term']}",
                (change["at_s"], 0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                va="bottom",
            )
        else:
            bottom.axvline(change["at_s"], ymax=0.04, color="black", linewidth=0.8)
    if len(changes) > FAULT_LABELS_MAX:
        bottom.annotate(f"ticks at the bottom: {len(changes)} leader changes", (0.01, 0.05), xycoords="axes fraction", fontsize=7)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
