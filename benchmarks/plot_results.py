"""Draw a ``raftseq bench`` report: raftseq side by side with its peers, one panel per workload.

    python -m benchmarks --vs nats,pysyncobj --json report.json
    python benchmarks/plot_results.py report.json [--out benchmarks/results.png]

Reads the JSON report written by ``python -m benchmarks --json FILE`` and writes a PNG
(matplotlib, Agg backend: no display needed):

* throughput -- acknowledged messages/s per payload size, each system's best variant (median of
  the runs, min - max as the error bar; the variant's name above the bar);
* latency -- p50 (solid) and p99 (dashed) per offered rate, ms, log scale; a rate at which a
  system acknowledged nothing after the warm-up has no point;
* replay, recovery, fanout, failover -- when the report holds them: the median per system (and
  the max where the workload has one), with the benchmark goal as a dotted line.

The goals drawn are the report's own (``goal_values``, written by ``python -m benchmarks``); a
report written before it carried them is drawn without goal lines.

A workload missing from the report has no panel. Exit status 0 when the PNG was written, 2 when
the report cannot be read or holds none of these workloads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DEFAULT = os.path.join(BENCH_DIR, "results.png")

#: One colour per system, the same in every panel.
COLORS = {"raftseq": "#1f77b4", "nats": "#2ca02c", "pysyncobj": "#d62728"}
OTHER_COLOR = "#7f7f7f"
PANEL_WIDTH_IN = 6.4
PANEL_HEIGHT_IN = 4.2
DPI = 100


def color(system: str) -> str:
    return COLORS.get(system, OTHER_COLOR)


# --- what to draw, from the report --------------------------------------------------------


def throughput_bars(workload: dict) -> list[dict]:
    """Per payload size and system: the best variant's median, min and max."""
    bars = []
    for payload, p in workload.get("payloads", {}).items():
        for system, variants in p.get("systems", {}).items():
            if not variants:
                continue
            name = max(variants, key=lambda v: variants[v]["median"])
            v = variants[name]
            bars.append(
                {
                    "group": f"{int(payload):,} B",
                    "system": system,
                    "value": v["median"],
                    "low": v.get("min", v["median"]),
                    "high": v.get("max", v["median"]),
                    "label": name,
                }
            )
    return bars


def latency_lines(workload: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per system: (rate, ms) points of p50 and p99 (rates without acks left out)."""
    lines: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rate, r in sorted(workload.get("rates", {}).items(), key=lambda kv: int(kv[0])):
        for system, s in r.get("systems", {}).items():
            for q in ("p50", "p99"):
                value = s.get(f"{q}_ms")
                if value is not None and value > 0:
                    lines.setdefault(system, {"p50": [], "p99": []})[q].append((int(rate), value))
    return lines


def replay_bars(workload: dict) -> list[dict]:
    bars = []
    for system, s in workload.get("systems", {}).items():
        if system == "raftseq":
            for key, label in (("library_messages_per_s", "client library"), ("raw_messages_per_s", "raw frames")):
                if key in s:
                    bars.append({"group": system, "system": system, "value": s[key]["median"], "label": label})
        elif "messages_per_s" in s:
            bars.append({"group": system, "system": system, "value": s["messages_per_s"], "label": "ordered consumer"})
    return bars


def recovery_bars(workload: dict) -> list[dict]:
    names = {
        "raftseq": (("status_s", "answers"), ("serve_s", "serves"), ("caught_up_s", "caught up")),
        "nats": (("answers_s", "answers"), ("healthy_s", "healthz ok"), ("current_s", "replica current")),
    }
    bars = []
    for system, s in workload.get("systems", {}).items():
        for key, label in names.get(system, ()):
            if key in s:
                bars.append({"group": system, "system": system, "value": s[key]["median"], "high": s[key].get("max"), "label": label})
    return bars


def fanout_bars(workload: dict) -> list[dict]:
    return [
        {"group": system, "system": system, "value": s["delivered_per_s"], "label": "" if s.get("complete", True) else "INCOMPLETE"}
        for system, s in workload.get("systems", {}).items()
        if "delivered_per_s" in s
    ]


def failover_bars(workload: dict) -> list[dict]:
    return [
        {"group": system, "system": system, "value": s["failover_s"]["median"], "high": s["failover_s"].get("max"), "label": ""}
        for system, s in workload.get("systems", {}).items()
        if "failover_s" in s
    ]


# --- drawing ------------------------------------------------------------------------------


def draw_bars(ax, bars: list[dict], *, ylabel: str, title: str, goal: float | None = None, goal_label: str = "", log: bool = False) -> None:
    """Bars grouped by ``group``, coloured by system, each labelled with its value (and
    ``label``); ``low``/``high`` become an error bar."""
    groups = list(dict.fromkeys(b["group"] for b in bars))
    per_group = {g: [b for b in bars if b["group"] == g] for g in groups}
    width = 0.8 / max(len(v) for v in per_group.values())
    for gi, group in enumerate(groups):
        members = per_group[group]
        for k, b in enumerate(members):
            x = gi + width * (k + 0.5 - len(members) / 2)  # the group's bars centred on its tick
            low, high = b.get("low", b["value"]), b.get("high") or b["value"]
            second = k > 0 and b["system"] == members[k - 1]["system"]  # e.g. raftseq's raw frames next to its library figure
            ax.bar(
                x,
                b["value"],
                width * 0.9,
                color=color(b["system"]),
                alpha=0.55 if second else 0.85,
                yerr=[[max(0.0, b["value"] - low)], [max(0.0, high - b["value"])]] if (low, high) != (b["value"], b["value"]) else None,
                capsize=3,
                ecolor="#333333",
            )
            text = _short(b["value"]) + (f"\n{b['label']}" if b.get("label") else "")
            ax.annotate(text, (x, max(high, b["value"])), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    else:
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: _short(value) if value else "0"))
    if goal is not None:
        ax.axhline(goal, color="black", linestyle=":", linewidth=1, label=goal_label)
    ax.margins(y=0.25)
    _system_legend(ax, list(dict.fromkeys(b["system"] for b in bars)))


def _system_legend(ax, systems: list[str]) -> None:
    """One patch per system, then whatever is labelled on the axes (the goal line)."""
    import matplotlib.patches

    handles = [matplotlib.patches.Patch(color=color(s), label=s) for s in systems]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="upper right")


def draw_latency(ax, lines: dict, goals: dict) -> None:
    for system, qs in lines.items():
        for q, style in (("p50", "-"), ("p99", "--")):
            if qs[q]:
                xs, ys = zip(*qs[q])
                ax.plot(xs, ys, style, marker="o", markersize=4, color=color(system), label=f"{system} {q}")
    for q, shade in (("p50", "black"), ("p99", "gray")):
        goal = goals.get(f"latency_{q}_ms")
        if goal is not None:
            ax.axhline(goal, color=shade, linestyle=":", linewidth=1, label=f"goal {q} <= {goal:g} ms at {goals['latency_rate_per_s']:,}/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, msg/s")
    ax.set_ylabel("latency from the intended send time, ms")
    ax.set_title("latency: p50 (solid), p99 (dashed)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)


def _short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def panels_of(report: dict) -> list[tuple[str, object]]:
    """(name, what to draw) for each workload in the report that has figures."""
    workloads = report.get("workloads", {})
    panels = []
    if "throughput" in workloads and throughput_bars(workloads["throughput"]):
        panels.append(("throughput", throughput_bars(workloads["throughput"])))
    if "latency" in workloads and latency_lines(workloads["latency"]):
        panels.append(("latency", latency_lines(workloads["latency"])))
    for name, extract in (("replay", replay_bars), ("recovery", recovery_bars), ("fanout", fanout_bars), ("failover", failover_bars)):
        if name in workloads and extract(workloads[name]):
            panels.append((name, extract(workloads[name])))
    return panels


#: The bar panels: ``draw_bars`` options per workload; ``goal`` names the report's goal value
#: (``goal_values``) and ``goal_label`` shows it.
BAR_PANELS = {
    "throughput": {
        "ylabel": "acknowledged msg/s",
        "title": "throughput: each system's best variant (median, min - max)",
        "goal": "throughput_per_s",
        "goal_label": "goal >= {:,}/s at 100 B",
        "log": True,
    },
    "replay": {
        "ylabel": "msg/s to one subscriber",
        "title": "replay from the start on a follower (median)",
        "goal": "replay_per_s",
        "goal_label": "goal >= {:,}/s",
    },
    "recovery": {
        "ylabel": "s after the restart",
        "title": "recovery of a SIGKILLed follower (median, max)",
        "goal": "recovery_s",
        "goal_label": "goal: serves again <= {:g} s",
    },
    "fanout": {"ylabel": "msg/s delivered in total", "title": "fanout: live subscribers on the followers"},
    "failover": {
        "ylabel": "s from the kill to the next ack",
        "title": "failover: SIGKILL of the leader (median, max)",
        "goal": "failover_median_s",
        "goal_label": "goal median <= {:g} s",
        "log": True,
    },
}


def bar_options(name: str, goals: dict) -> dict:
    """``draw_bars`` options of panel `name`, its goal taken from the report's `goals` (no goal
    line when the report has none)."""
    options = dict(BAR_PANELS[name])
    key, label = options.pop("goal", None), options.pop("goal_label", "")
    if key in goals:
        options.update(goal=goals[key], goal_label=label.format(goals[key]))
    return options


def plot(report: dict, out: str) -> list[str]:
    """Write the PNG; returns the names of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    panels = panels_of(report)
    if not panels:
        raise ValueError("the report holds no throughput, latency, replay, recovery, fanout or failover figures")
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(PANEL_WIDTH_IN * columns, PANEL_HEIGHT_IN * rows), squeeze=False)
    for ax, (name, data) in zip(axes.flat, panels):
        if name == "latency":
            draw_latency(ax, data, report.get("goal_values", {}))
        else:
            draw_bars(ax, data, **bar_options(name, report.get("goal_values", {})))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    machine = report.get("machine", {})
    code = report.get("code", {})
    figure.suptitle(
        f"raftseq bench: {', '.join(report.get('systems', []))}; nproc {machine.get('nproc', '?')}, "
        f"commit {code.get('git_commit') or '?'}{' (dirty)' if code.get('dirty') else ''}, "
        f"load avg at start {(report.get('load_average_start') or ['?'])[0]}"
        + ("; QUICK" if report.get("settings", {}).get("quick") else ""),
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=DPI)
    pyplot.close(figure)
    return [name for name, _ in panels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw a `python -m benchmarks --json FILE` report as a PNG.")
    parser.add_argument("report", help="the JSON report")
    parser.add_argument("--out", default=OUT_DEFAULT, help=f"the PNG to write (default {os.path.relpath(OUT_DEFAULT)})")
    args = parser.parse_args(argv)
    try:
        with open(args.report) as f:
            report = json.load(f)
        drawn = plot(report, args.out)
    except (OSError, ValueError) as exc:
        print(f"plot_results: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(drawn)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
