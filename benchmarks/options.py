"""What every benchmark command shares: argument types (positive numbers, lists of them, node
settings), SIGTERM that unwinds through every ``finally`` that stops servers, and the JSON
report file."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable


def _number(kind, text: str, *, low: float, strict: bool):
    """`text` as `kind` (``_`` allowed between digits), at least `low` (above it if `strict`)."""
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, low=1, strict=False)


def non_negative_int(text: str) -> int:
    return _number(int, text, low=0, strict=False)


def positive_float(text: str) -> float:
    return _number(float, text, low=0, strict=True)


def positive_ints(text: str) -> list[int]:
    """Comma-separated numbers >= 1, at least one."""
    values = [positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values


def resolve_sizes(opts: argparse.Namespace, sizes: dict[str, tuple[object, object]]) -> None:
    """Each option named in `sizes` (``name: (quick, default)``) that was not given takes its
    ``--quick`` size when ``--quick`` is on, its default otherwise."""
    quick = getattr(opts, "quick", False)
    for name, (quick_size, default) in sizes.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick_size if quick else default)


def node_setting(text: str) -> tuple[str, str, object]:
    """``section.key=value`` (value as JSON, else as a string)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not section or not key:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, key, value


def add_numbers(parser: argparse.ArgumentParser, *rows: tuple[str, Callable[[str], object], object, str]) -> None:
    """Number options, one row each: flag, type (``positive_int``, ...), default, help."""
    for flag, kind, default, text in rows:
        parser.add_argument(flag, type=kind, default=default, help=text)


#: Client processes of a multi-process throughput variant, unless ``--processes`` says otherwise.
CLIENT_PROCESSES_DEFAULT = 4


def add_processes_option(parser: argparse.ArgumentParser) -> None:
    """``--processes N``: the client processes of a multi-process throughput variant."""
    text = f"client processes of the multi-process throughput variant (default {CLIENT_PROCESSES_DEFAULT})"
    add_numbers(parser, ("--processes", positive_int, CLIENT_PROCESSES_DEFAULT, text))


#: The fanout workload, the same for raftseq and its peers: subscribers, the processes they run
#: in, the one publisher's offered rate and how long it publishes.
FANOUT_SUBSCRIBERS_DEFAULT = 100
FANOUT_PROCESSES_DEFAULT = 4
FANOUT_RATE_DEFAULT = 10_000
FANOUT_SECONDS_DEFAULT = 10.0
FANOUT_SECONDS_QUICK = 1.0


def add_subscriber_options(parser: argparse.ArgumentParser, *, subscribers: str) -> None:
    """``--subscribers`` (`subscribers` says what one is) and ``--subscriber-processes`` of the
    fanout workload."""
    add_numbers(
        parser,
        ("--subscribers", positive_int, FANOUT_SUBSCRIBERS_DEFAULT, f"fanout: {subscribers} (default {FANOUT_SUBSCRIBERS_DEFAULT})"),
        (
            "--subscriber-processes",
            positive_int,
            FANOUT_PROCESSES_DEFAULT,
            f"fanout: processes the subscribers run in (default {FANOUT_PROCESSES_DEFAULT})",
        ),
    )


def add_publisher_options(parser: argparse.ArgumentParser) -> None:
    """``--fanout-rate`` and ``--fanout-seconds``: what the fanout workload's one publishing
    client offers, and for how long (``None`` until ``resolve_sizes``)."""
    add_numbers(
        parser,
        (
            "--fanout-rate",
            positive_int,
            FANOUT_RATE_DEFAULT,
            f"fanout: msg/s offered by the one publishing client (default {FANOUT_RATE_DEFAULT:,})",
        ),
        (
            "--fanout-seconds",
            positive_float,
            None,
            f"fanout: seconds of publishing (default {FANOUT_SECONDS_DEFAULT:g}; --quick {FANOUT_SECONDS_QUICK:g})",
        ),
    )


def add_report_options(parser: argparse.ArgumentParser, *, dir_help: str = "") -> None:
    """``--json FILE`` (the report) and ``--dir DIR`` (the parent of the temporary directory;
    `dir_help` says more), which every benchmark command takes."""
    parser.add_argument("--json", default="", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument(
        "--dir",
        default="",
        metavar="DIR",
        help="parent of the temporary directory (default: the system's)" + (f"; {dir_help}" if dir_help else ""),
    )


def terminate(signum: int, _frame: object) -> None:
    """A SIGTERM handler: unwinds through every ``finally`` that stops the servers."""
    raise SystemExit(128 + signum)


def write_report(path: str, report: dict, *, indent: int = 2) -> None:
    """The report as JSON in `path` (nothing when `path` is empty)."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump(report, f, indent=indent, default=str)
        f.write("\n")


def run_reported(
    opts: argparse.Namespace, measure: Callable[[argparse.Namespace, str], tuple[dict, int]], *, prefix: str, stopped: str
) -> int:
    """A benchmark command's run: `measure` works in a temporary directory below ``--dir``
    that is removed at the end and returns the report and the exit status. SIGTERM and Ctrl-C
    (even when started with SIGINT ignored, as a background job of a script) unwind through
    every ``finally`` that stops servers, and say so: "interrupted: `stopped`". The report
    goes to ``--json``."""
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if opts.dir:
            os.makedirs(opts.dir, exist_ok=True)
        root = tempfile.mkdtemp(prefix=prefix, dir=opts.dir or None)
    except OSError as exc:
        print(f"error: cannot make the benchmark's directory below {opts.dir or tempfile.gettempdir()}: {exc}", file=sys.stderr)
        return 2
    try:
        report, status = measure(opts, root)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {stopped}", file=sys.stderr)
        return 130
    except SystemExit:
        print(f"\nterminated: {stopped}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_report(opts.json, report)
    if opts.json:
        print(f"report    {opts.json}")
    return status


class Scoped:
    """Something a benchmark starts for a ``with`` block (servers, a filled stream): ``open``
    on entering, ``close`` on leaving, and ``close`` too when ``open`` fails half-way, so that
    nothing started is left running. ``close`` must be idempotent."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScopedDirectory(Scoped):
    """A ``Scoped`` that works in a temporary directory of its own below `root`: ``make_directory``
    (from ``open``) creates it, ``remove_directory`` (from ``close``) removes it, once."""

    def __init__(self, root: str, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.directory = ""

    def make_directory(self) -> str:
        self.directory = tempfile.mkdtemp(prefix=self.prefix, dir=self.root)
        return self.directory

    def remove_directory(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""
