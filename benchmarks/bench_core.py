"""Throughput of the sequencer core in one process: journal append, journal replay, apply.

Run from the repository root::

    python benchmarks/bench_core.py [--messages N] [--runs R] [--json FILE] [--quick]

Every figure is messages per second over ``--runs`` runs: the median is the figure, min and max
show the spread. Baselines that move the same bytes in the same batch sizes (``os.write``, a
plain ``file.read`` loop) run interleaved with the figures they bound, so the raftseq/baseline
ratios stay meaningful on a busy machine. ``benchmarks/README.md`` says what each figure covers.
This is a measurement, not a test: it exits 0 whether or not a goal is met, and 1 when a
workload produced the wrong result (a count or a sequence number that does not add up).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial


from benchmarks.machine import git_state, machine_facts, print_code_and_machine, print_load, source_digest
from benchmarks.options import add_report_options, non_negative_int, positive_int, resolve_sizes, terminate, write_report

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.journal import FsyncPolicy, Journal, list_segment_files
from raftseq.sequencer.machine import SequencerMachine

MESSAGES_DEFAULT = 1_000_000
FSYNC_MESSAGES_DEFAULT = 200_000
QUICK_MESSAGES = 20_000
QUICK_FSYNC_MESSAGES = 5_000
#: Records per ``read_frames`` call, as ``Journal.records`` asks for.
FRAMES_PER_READ_DEFAULT = 4096
#: Log time of the first batch; each later batch is stamped one millisecond after the previous.
LOG_TIME_START_NS = 1_700_000_000_000_000_000
LOG_TIME_STEP_NS = 1_000_000
#: Most memory the pre-encoded input may take (records and Raft batches, held for the whole run).
FIXTURE_BYTES_MAX = 4 * 1024**3
#: A goal met by less than this margin is reported as close.
GOAL_CLOSE_MARGIN = 0.10


class BenchError(Exception):
    """A workload did something other than what it was asked (wrong count, wrong numbers)."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


# --- the data every workload shares -------------------------------------------------------


@dataclass
class Fixture:
    """Pre-encoded input, built once, outside every measurement."""

    root: str  # the temporary directory; everything the benchmark writes is below it
    messages: int
    #: Journal records as ``SequencerMachine.apply`` produces them: (frames, first_seq, last_seq).
    record_batches: list[tuple[bytes, int, int]]
    #: The same messages as Raft log entries (``protocol.encode_batch``), for ``apply``.
    entry_batches: list[bytes]
    #: The first ``--fsync-messages`` of ``record_batches``, for the fsync workloads.
    fsync_batches: list[tuple[bytes, int, int]]
    frames_per_read: int
    replay_journal: Journal | None = None
    replay_segment_paths: list[str] = field(default_factory=list)
    _serial: int = 0

    @property
    def record_bytes(self) -> int:
        return sum(len(records) for records, _, _ in self.record_batches)

    @property
    def fsync_messages(self) -> int:
        return self.fsync_batches[-1][2] if self.fsync_batches else 0

    @property
    def fsync_bytes(self) -> int:
        return sum(len(records) for records, _, _ in self.fsync_batches)

    def fresh_dir(self, name: str) -> str:
        self._serial += 1
        path = os.path.join(self.root, f"{name}-{self._serial}")
        os.mkdir(path)
        return path


def build_fixture(root: str, sizes: argparse.Namespace) -> Fixture:
    """The command's ``--messages`` from ``--sessions`` sessions in turn (``--run`` in a row each),
    ``--batch`` to a batch, each payload ``--payload-bytes`` long; as journal records and as Raft log entries
    (``--entries``: as clients of this release send them, with owner and payload digest, or as
    older clients do, the machine then computing each digest)."""
    messages, batch, sessions, payload_bytes = sizes.messages, sizes.batch, sizes.sessions, sizes.payload_bytes
    payload = bytes((i * 7 + 13) % 256 for i in range(payload_bytes))
    names = [f"bench-{k}" for k in range(sessions)]
    client_seqs = [0] * sessions
    encode_delivered = protocol.encode_delivered
    fenced = sizes.entries == "fenced"
    digest = protocol.payload_digest(payload)
    record_batches: list[tuple[bytes, int, int]] = []
    entry_batches: list[bytes] = []
    seq = 1
    batch_index = 0
    while seq <= messages:
        log_time_ns = LOG_TIME_START_NS + batch_index * LOG_TIME_STEP_NS
        last = min(seq + batch - 1, messages)
        frames = []
        entries = []
        for s in range(seq, last + 1):
            k = (s - 1) // sizes.run % sessions
            client_seqs[k] += 1
            frames.append(encode_delivered(s, log_time_ns, names[k], client_seqs[k], payload))
            if fenced:
                entries.append(protocol.FencedEntry(names[k], client_seqs[k], payload, k + 1, client_seqs[k] == 1, digest))
            else:
                entries.append(protocol.Entry(names[k], client_seqs[k], payload))
        record_batches.append((b"".join(frames), seq, last))
        entry_batches.append(protocol.encode_batch(log_time_ns, entries, fenced=fenced))
        if batch_index == 0 and len(entry_batches[0]) > limits.BATCH_BYTES_MAX:
            raise BenchError(
                f"a batch of {batch} entries of {payload_bytes}-byte payloads encodes to {len(entry_batches[0])} bytes, "
                f"above BATCH_BYTES_MAX ({limits.BATCH_BYTES_MAX}): lower --batch or --payload-bytes"
            )
        seq = last + 1
        batch_index += 1
    # The records must be exactly what the machine writes, or the journal figures would
    # measure some other stream.
    first = SequencerMachine().apply(entry_batches[0])
    expect(not first.error, f"the first batch does not apply: {first.error}")
    expect(first.records == record_batches[0][0], "pre-encoded records differ from what SequencerMachine.apply produces")
    fsync_batches = []
    for item in record_batches:
        if item[1] > sizes.fsync_messages:
            break
        fsync_batches.append(item)
    return Fixture(root, messages, record_batches, entry_batches, fsync_batches, sizes.frames_per_read)


def build_replay_journal(fx: Fixture) -> float:
    """The journal every replay workload reads: all messages, default segment size, reopened
    (so its tail was scanned as on a restart). Returns the seconds the reopen took."""
    directory = fx.fresh_dir("replay")
    with Journal.open(directory) as journal:
        for records, first, last in fx.record_batches:
            journal.append(records, first, last)
    started = time.perf_counter()
    fx.replay_journal = Journal.open(directory, readonly=True)
    reopen_s = time.perf_counter() - started
    expect(fx.replay_journal.last_seq == fx.messages, "replay journal does not hold every message")
    fx.replay_segment_paths = [path for _, path in list_segment_files(directory)]
    return reopen_s


# --- workloads ----------------------------------------------------------------------------
#
# A workload's ``prepare(fx)`` does the untimed set-up and returns ``run`` (timed; returns the
# messages and bytes it handled) and ``done`` (untimed; checks the outcome, cleans up and
# returns extra facts for the report).

Run = Callable[[], tuple[int, int]]
Done = Callable[[], dict]


def write_baseline(fx: Fixture, *, fsync: bool) -> tuple[Run, Done]:
    """``os.write`` of the same bytes in the same batches to one file: the I/O ceiling."""
    batches = fx.fsync_batches if fsync else fx.record_batches
    directory = fx.fresh_dir("write")
    fd = os.open(os.path.join(directory, "baseline.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def run() -> tuple[int, int]:
        write = os.write
        sync = os.fsync
        written = 0
        for records, _, _ in batches:
            n = write(fd, records)
            expect(n == len(records), "short write")
            written += n
            if fsync:
                sync(fd)
        return batches[-1][2], written

    def done() -> dict:
        os.close(fd)
        shutil.rmtree(directory)
        return {}

    return run, done


def append_journal(fx: Fixture, *, fsync: bool) -> tuple[Run, Done]:
    """``Journal.append`` of pre-encoded records, a fresh journal per run."""
    batches = fx.fsync_batches if fsync else fx.record_batches
    directory = fx.fresh_dir("append")
    policy = FsyncPolicy("batch") if fsync else FsyncPolicy("never")
    journal = Journal.open(directory, fsync=policy, clock_ns=time.monotonic_ns)
    size = sum(len(records) for records, _, _ in batches)

    def run() -> tuple[int, int]:
        append = journal.append
        for records, first, last in batches:
            append(records, first, last)
        return batches[-1][2], size

    def done() -> dict:
        expect(journal.last_seq == batches[-1][2], f"journal ends at {journal.last_seq}, expected {batches[-1][2]}")
        expect(journal.size_bytes == size, "journal size differs from the bytes appended")
        extras = {"segments": journal.segment_count}
        if fsync:
            extras["fsyncs"] = journal.fsync_count
            extras["fsync_ms_mean"] = 1000 * journal.fsync_seconds_total / max(journal.fsync_count, 1)
        journal.close()
        shutil.rmtree(directory)
        return extras

    return run, done


def read_baseline(fx: Fixture, *, crc: bool) -> tuple[Run, Done]:
    """A plain loop of ``file.read`` over the replay journal's segments (the read ceiling);
    with ``crc``, one ``zlib.crc32`` over each chunk as well (the checksum ceiling)."""
    paths = fx.replay_segment_paths
    chunk_bytes = limits.READ_CHUNK_BYTES

    def run() -> tuple[int, int]:
        total = 0
        checksum = 0
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                read = f.read
                while chunk := read(chunk_bytes):
                    total += len(chunk)
                    if crc:
                        checksum = zlib.crc32(chunk, checksum)
        return fx.messages, total

    def done() -> dict:
        return {}

    return run, done


def replay_cursor(fx: Fixture, *, frames: bool, verify: bool) -> tuple[Run, Done]:
    """Read the whole replay journal from seq 1 through one ``JournalCursor``: ``read_frames``
    (one bytes object per record) or ``read_block`` (whole records as one string)."""
    journal = fx.replay_journal
    assert journal is not None
    limit_seq = journal.last_seq
    frames_per_read = fx.frames_per_read
    chunk_bytes = limits.READ_CHUNK_BYTES
    seen: dict[str, int] = {}

    def run() -> tuple[int, int]:
        count = 0
        size = 0
        with journal.cursor(1, verify=verify) as cursor:
            if frames:
                read_frames = cursor.read_frames
                while got := read_frames(limit_seq, frames_per_read):
                    count += len(got)
            else:
                read_block = cursor.read_block
                while True:
                    n, block = read_block(limit_seq, chunk_bytes)
                    if not n:
                        break
                    count += n
                    size += len(block)
            seen["next_seq"] = cursor.next_seq
        return count, size if size else journal.size_bytes

    def done() -> dict:
        expect(seen.get("next_seq") == limit_seq + 1, f"replay stopped before seq {seen.get('next_seq')}")
        return {}

    return run, done


def decode_only(fx: Fixture) -> tuple[Run, Done]:
    """``protocol.decode_batch`` of every entry batch: the decoding inside ``apply``."""
    batches = fx.entry_batches

    def run() -> tuple[int, int]:
        decode = protocol.decode_batch
        count = 0
        for data in batches:
            count += len(decode(data).entries)
        return count, sum(map(len, batches))

    def done() -> dict:
        return {}

    return run, done


def applying(apply: Callable[[bytes], object], fx: Fixture) -> Run:
    """A run that hands every entry batch of the fixture to `apply`, in order."""
    batches = fx.entry_batches

    def run() -> tuple[int, int]:
        for data in batches:
            apply(data)
        return fx.messages, sum(map(len, batches))

    return run


def apply_machine(fx: Fixture) -> tuple[Run, Done]:
    """``SequencerMachine.apply`` alone: decode, dedup, numbering, record encoding."""
    machine = SequencerMachine()
    run = applying(machine.apply, fx)

    def done() -> dict:
        expect(machine.last_seq == fx.messages, f"machine numbered {machine.last_seq} messages, expected {fx.messages}")
        return {}

    return run, done


def apply_core(fx: Fixture) -> tuple[Run, Done]:
    """``SequencedStream.apply``: the machine plus ``Journal.append`` (fsync never), fresh journal."""
    directory = fx.fresh_dir("core")
    journal = Journal.open(directory)
    core = SequencedStream(SequencerMachine(), journal)
    run = applying(core.apply, fx)

    def done() -> dict:
        expect(core.machine.last_seq == fx.messages, f"machine numbered {core.machine.last_seq} messages")
        expect(journal.last_seq == fx.messages, f"journal ends at {journal.last_seq}, expected {fx.messages}")
        expect(core.records_appended == fx.messages, "not every record was appended")
        journal.close()
        shutil.rmtree(directory)
        return {}

    return run, done


@dataclass(frozen=True)
class Workload:
    key: str  # printed first on the figure's line; the JSON report's key
    title: str
    prepare: Callable[[Fixture], tuple[Run, Done]]
    goal_per_s: int = 0
    baseline: str = ""  # key of the baseline this figure is divided by
    is_baseline: bool = False


def replay_workload(*, frames: bool, verify: bool) -> Workload:
    """``JournalCursor.read_frames`` or ``read_block`` over the replay journal, checksums verified
    or not, against the plain read loop; the goal is for the verified reads."""
    method = "read_frames" if frames else "read_block"
    return Workload(
        f"replay_{'frames' if frames else 'block'}{'' if verify else '_noverify'}",
        f"JournalCursor.{method}, {'checksums verified' if verify else 'verify=False'}",
        partial(replay_cursor, frames=frames, verify=verify),
        goal_per_s=1_000_000 if verify else 0,
        baseline="read_ceiling",
    )


@dataclass(frozen=True)
class Section:
    title: str
    workloads: tuple[Workload, ...]


def append_section(title: str, *, fsync: bool, baseline_title: str, policy: str, goal_per_s: int = 0) -> Section:
    """``Journal.append`` with one fsync policy against ``os.write`` of the same bytes in the
    same batches (with ``os.fsync`` per batch when `fsync`)."""
    baseline = f"write_{'fsync' if fsync else 'never'}"
    return Section(
        title,
        (
            Workload(baseline, baseline_title, partial(write_baseline, fsync=fsync), is_baseline=True),
            Workload(
                f"append_{'fsync' if fsync else 'never'}",
                f"Journal.append, FsyncPolicy({policy!r})",
                partial(append_journal, fsync=fsync),
                goal_per_s=goal_per_s,
                baseline=baseline,
            ),
        ),
    )


SECTIONS = (
    append_section(
        "1. journal append, fsync never",
        fsync=False,
        baseline_title="baseline: os.write, same bytes and batches",
        policy="never",
        goal_per_s=500_000,
    ),
    append_section(
        "2. journal append, fsync per batch", fsync=True, baseline_title="baseline: os.write + os.fsync per batch", policy="batch"
    ),
    Section(
        "3. replay from seq 1 (raw records, warm page cache)",
        (
            Workload(
                "read_ceiling",
                "baseline: file.read loop over the segments",
                partial(read_baseline, crc=False),
                is_baseline=True,
            ),
            Workload(
                "read_crc_ceiling",
                "baseline: file.read + crc32 per chunk",
                partial(read_baseline, crc=True),
                is_baseline=True,
            ),
            *(replay_workload(frames=frames, verify=verify) for verify in (True, False) for frames in (True, False)),
        ),
    ),
    Section(
        "4. apply (+ append)",
        (
            Workload("decode_only", "protocol.decode_batch alone", decode_only),
            Workload("apply_only", "SequencerMachine.apply, no journal", apply_machine),
            Workload(
                "apply_append",
                "SequencedStream.apply: machine + Journal.append (never)",
                apply_core,
                goal_per_s=300_000,
                baseline="write_never",
            ),
        ),
    ),
)

WORKLOADS = {w.key: w for section in SECTIONS for w in section.workloads}


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Figure:
    workload: Workload
    messages_per_s: list[float] = field(default_factory=list)
    bytes_per_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    #: CPU time of this process during each run: well below ``seconds`` for CPU-bound work
    #: means other processes took the CPU.
    cpu_seconds: list[float] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.messages_per_s)

    @property
    def cpu_share(self) -> float:
        """Median over runs of CPU seconds per wall-clock second."""
        return statistics.median(c / s for c, s in zip(self.cpu_seconds, self.seconds) if s > 0)


def measure_once(workload: Workload, fx: Fixture) -> tuple[float, float, int, int, dict]:
    """Seconds of wall clock and of this process's CPU time, messages, bytes, extra facts."""
    run, done = workload.prepare(fx)
    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter_ns()
    messages, size = run()
    elapsed_s = (time.perf_counter_ns() - started) / 1e9
    cpu_s = time.process_time() - cpu_started
    return elapsed_s, cpu_s, messages, size, done()


def measure_section(section: Section, fx: Fixture, runs: int, warmup_runs: int, figures: dict[str, Figure]) -> None:
    # Run i of every workload of the section before run i + 1 of any: a burst of load from
    # elsewhere then hits a figure and its baseline alike. Warm-up runs (first touch of page
    # cache pages and of the allocator) are measured like the others and thrown away.
    for workload in section.workloads:
        figures[workload.key] = Figure(workload)
    for _ in range(warmup_runs):
        for workload in section.workloads:
            measure_once(workload, fx)
    for _ in range(runs):
        for workload in section.workloads:
            elapsed_s, cpu_s, messages, size, extras = measure_once(workload, fx)
            figure = figures[workload.key]
            figure.seconds.append(elapsed_s)
            figure.cpu_seconds.append(cpu_s)
            figure.messages_per_s.append(messages / elapsed_s)
            figure.bytes_per_s.append(size / elapsed_s)
            figure.extras.append(extras)


def goal_status(figure: Figure) -> str:
    goal = figure.workload.goal_per_s
    if not goal:
        return ""
    if figure.median < goal:
        return "MISSED"
    if figure.median < goal * (1 + GOAL_CLOSE_MARGIN):
        return "close"
    return "met"


def ratio(figure: Figure, figures: dict[str, Figure]) -> float | None:
    base = figures.get(figure.workload.baseline)
    if base is None or not base.median:
        return None
    return figure.median / base.median


def figure_line(figure: Figure, figures: dict[str, Figure]) -> str:
    w = figure.workload
    rates = figure.messages_per_s
    mb_s = statistics.median(figure.bytes_per_s) / 1e6
    line = (
        f"  {w.key:<23} {figure.median:>12,.0f} msg/s {mb_s:>8.1f} MB/s"
        f"   min {min(rates):>11,.0f}  max {max(rates):>11,.0f}  cpu {100 * figure.cpu_share:>3.0f}%"
    )
    notes = []
    r = ratio(figure, figures)
    if r is not None:
        notes.append(f"{r:.2f} x {w.baseline}")
    if w.goal_per_s:
        notes.append(f"goal >= {w.goal_per_s:,}: {goal_status(figure)}")
    fsync_ms = [e["fsync_ms_mean"] for e in figure.extras if "fsync_ms_mean" in e]
    if fsync_ms:
        notes.append(f"fsync {statistics.median(fsync_ms):.2f} ms mean")
    return line + ("   " + "; ".join(notes) if notes else "") + f"\n  {'':<23} {w.title}"


def split_line(figures: dict[str, Figure]) -> str:
    """Where the time of one message goes in ``apply_append``, in microseconds."""
    decode_us = 1e6 / figures["decode_only"].median
    machine_us = 1e6 / figures["apply_only"].median
    core_us = 1e6 / figures["apply_append"].median
    return (
        f"  split per message: decode {decode_us:.2f} us, rest of the machine {machine_us - decode_us:.2f} us, "
        f"journal append and core {core_us - machine_us:.2f} us; total {core_us:.2f} us"
    )


# --- machine facts ------------------------------------------------------------------------


def code_under_test() -> dict:
    """Which ``sequencer`` is measured: its directory, the git commit, whether ``sequencer/``
    has uncommitted changes, and a digest of its source files (equal digests, equal code)."""
    import raftseq.sequencer as sequencer

    package_dir = os.path.dirname(os.path.abspath(sequencer.__file__))
    commit, dirty = git_state([package_dir])
    return {
        "sequencer_dir": package_dir,
        "git_commit": commit,
        "sequencer_dirty": dirty,
        "sequencer_sha256": source_digest({"": package_dir}),
    }


# --- the command --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_core.py",
        description="Throughput of the sequencer core (journal append, replay, apply) with same-run baselines.",
    )
    add = parser.add_argument
    add(
        "--messages",
        type=positive_int,
        default=None,
        help=f"messages per workload and records in the replay journal (default {MESSAGES_DEFAULT:,}; with --quick {QUICK_MESSAGES:,})",
    )
    add(
        "--fsync-messages",
        type=positive_int,
        default=None,
        help=f"messages of the fsync-per-batch workloads, at most --messages "
        f"(default {FSYNC_MESSAGES_DEFAULT:,}; with --quick {QUICK_FSYNC_MESSAGES:,})",
    )
    add("--runs", type=positive_int, default=5, help="measured runs of each workload; the median is the figure (default 5)")
    add("--warmup-runs", type=non_negative_int, default=1, help="runs of each section thrown away first (default 1)")
    add(
        "--payload-bytes",
        type=non_negative_int,
        default=100,
        help=f"bytes of each payload, at most {limits.PAYLOAD_BYTES_MAX} (default 100)",
    )
    add(
        "--batch",
        type=positive_int,
        default=1000,
        help=f"messages per append and per Raft batch, at most {limits.BATCH_ENTRIES_MAX} (default 1000)",
    )
    add("--sessions", type=positive_int, default=8, help="client sessions the messages come from, in turn (default 8)")
    add(
        "--run",
        type=positive_int,
        default=1,
        help="messages of one session in a row before the next session's, as a SubmitBatch frame brings them (default 1)",
    )
    add(
        "--entries",
        choices=("fenced", "plain"),
        default="fenced",
        help="Raft entries as this release's clients make them (fenced: owner and payload digest) or as older "
        "clients do (plain: the machine computes each digest) (default fenced)",
    )
    add(
        "--frames-per-read",
        type=positive_int,
        default=FRAMES_PER_READ_DEFAULT,
        help=f"records asked of each read_frames call (default {FRAMES_PER_READ_DEFAULT}, as Journal.records asks)",
    )
    add_report_options(parser, dir_help="use the disk a journal would live on")
    add("--quick", action="store_true", help="small sizes for a smoke run (the figures mean little against the goals)")
    add("--only", default="", metavar="KEYS", help="comma-separated workload keys: measure only the sections holding them")
    add(
        "--profile",
        default="",
        metavar="KEY",
        help="instead of measuring, run workload KEY once under cProfile and print its top functions",
    )
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    resolve_sizes(args, {"messages": (QUICK_MESSAGES, MESSAGES_DEFAULT), "fsync_messages": (QUICK_FSYNC_MESSAGES, FSYNC_MESSAGES_DEFAULT)})
    args.fsync_messages = min(args.fsync_messages, args.messages)
    fixture_bytes = 2 * args.messages * (args.payload_bytes + 48)  # records + Raft batches, roughly
    if fixture_bytes > FIXTURE_BYTES_MAX:
        parser.error(
            f"--messages {args.messages:,} of --payload-bytes {args.payload_bytes:,} need about "
            f"{fixture_bytes / 2**30:.1f} GiB of pre-encoded input, above {FIXTURE_BYTES_MAX / 2**30:.0f} GiB: lower one of them"
        )
    if args.payload_bytes > limits.PAYLOAD_BYTES_MAX:
        parser.error(f"--payload-bytes must be at most {limits.PAYLOAD_BYTES_MAX}")
    if args.batch > limits.BATCH_ENTRIES_MAX:
        parser.error(f"--batch must be at most {limits.BATCH_ENTRIES_MAX}")
    if args.profile and args.profile not in WORKLOADS:
        parser.error(f"--profile: unknown workload {args.profile}; known: {', '.join(WORKLOADS)}")
    args.only_keys = [k for k in args.only.split(",") if k]
    unknown = [k for k in args.only_keys if k not in WORKLOADS]
    if unknown:
        parser.error(f"--only: unknown workload {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")


def profile(workload: Workload, fx: Fixture) -> None:
    run, done = workload.prepare(fx)
    profiler = cProfile.Profile()
    gc.collect()
    started = time.perf_counter()
    profiler.enable()
    messages, _ = run()
    profiler.disable()
    elapsed = time.perf_counter() - started
    done()
    print(f"profile of {workload.key} ({workload.title}): {messages:,} messages in {elapsed:.2f} s under cProfile")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(25)


def bench(args: argparse.Namespace, root: str) -> dict:
    facts = machine_facts(root)
    code = code_under_test()
    print("raftseq core benchmark")
    digest = f"source sha256 {code['sequencer_sha256']}"
    runtime = f"{facts['python']}, msgspec {facts['msgspec']}"
    print_code_and_machine(code["sequencer_dir"], code["git_commit"], code["sequencer_dirty"], digest, facts, runtime=runtime)
    print(f"          temporary directory {root} on {facts['temp_dir_filesystem']}")
    if facts["temp_dir_filesystem"] in ("tmpfs", "ramfs"):
        print("          (fsync is free on a memory file system: use --dir on a real disk for the fsync figures)")
    load_start = print_load("at start")

    started = time.perf_counter()
    fx = build_fixture(root, args)
    encode_s = time.perf_counter() - started
    record_mean = fx.record_bytes / fx.messages
    print(
        f"settings  {args.messages:,} messages ({fx.fsync_messages:,} with fsync) of {args.payload_bytes} B payload "
        f"from {args.sessions} sessions ({args.run} in a row), {args.batch:,} per batch, {args.entries} entries; "
        f"records {record_mean:.1f} B each"
    )
    print(
        f"          runs {args.runs} (+{args.warmup_runs} warm-up), median (min, max) of each"
        + ("; QUICK: sizes too small for the goals to mean much" if args.quick else "")
    )
    sections = [s for s in SECTIONS if not args.only_keys or any(w.key in args.only_keys for w in s.workloads)]
    if args.profile:
        sections = [s for s in SECTIONS if any(w.key == args.profile for w in s.workloads)]
    needs_replay = any(s is SECTIONS[2] for s in sections)
    reopen_s = build_replay_journal(fx) if needs_replay else 0.0
    print(
        f"setup     encoded in {encode_s:.2f} s"
        + (
            f"; replay journal {fx.replay_journal.size_bytes / 1e6:.1f} MB in {fx.replay_journal.segment_count} segments, "
            f"reopened (tail checked) in {reopen_s:.2f} s"
            if needs_replay
            else ""
        ),
        flush=True,
    )

    if args.profile:
        profile(WORKLOADS[args.profile], fx)
        return {}

    figures: dict[str, Figure] = {}
    for section in sections:
        print(f"\n{section.title}", flush=True)
        measure_section(section, fx, args.runs, args.warmup_runs, figures)
        for workload in section.workloads:
            print(figure_line(figures[workload.key], figures), flush=True)
        if section is SECTIONS[3]:
            print(split_line(figures))

    print()
    load_end = print_load("at end")
    goals = [(f.workload.key, goal_status(f)) for f in figures.values() if f.workload.goal_per_s]
    print("goals     " + ", ".join(f"{key} {status}" for key, status in goals))
    if fx.replay_journal is not None:
        fx.replay_journal.close()

    return {
        "benchmark": "raftseq core",
        "code": code,
        "machine": facts,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "settings": {
            "messages": args.messages,
            "fsync_messages": fx.fsync_messages,
            "payload_bytes": args.payload_bytes,
            "batch": args.batch,
            "sessions": args.sessions,
            "run": args.run,
            "entries": args.entries,
            "runs": args.runs,
            "warmup_runs": args.warmup_runs,
            "frames_per_read": args.frames_per_read,
            "record_bytes_mean": record_mean,
            "quick": args.quick,
        },
        "workloads": {
            key: {
                "title": f.workload.title,
                "baseline": f.workload.is_baseline,
                "messages_per_s_median": f.median,
                "messages_per_s_min": min(f.messages_per_s),
                "messages_per_s_max": max(f.messages_per_s),
                "messages_per_s_runs": f.messages_per_s,
                "bytes_per_s_median": statistics.median(f.bytes_per_s),
                "seconds_runs": f.seconds,
                "cpu_seconds_runs": f.cpu_seconds,
                "goal_messages_per_s": f.workload.goal_per_s or None,
                "goal_status": goal_status(f) or None,
                "ratio_to": f.workload.baseline or None,
                "ratio": ratio(f, figures),
                "extras": f.extras,
            }
            for key, f in figures.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(args, parser)
    signal.signal(signal.SIGTERM, terminate)
    root = tempfile.mkdtemp(prefix="raftseq-bench-", dir=args.dir or None)
    try:
        report = bench(args, root)
    except BenchError as exc:
        print(f"bench_core: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json and report:
        write_report(args.json, report)
        print(f"report    {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
