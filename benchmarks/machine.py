"""Facts about the machine and the code a benchmark measured, printed at the top of every
report: CPUs, load average, other raftseq nodes running, the git commit and a digest of the
source; CPU seconds of a process from /proc."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Sequence

import msgspec

#: The source checkout the benchmarks live in (they run from it: ``python -m benchmarks ...``).
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def process_cpu_s(pid: int | None) -> float:
    """User plus system CPU seconds of a process, from /proc (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def other_raftseq_nodes(own_pids: set[int]) -> int:
    """raftseq node processes on this machine that this benchmark did not start."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in own_pids:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if b"raftseq.cluster.cli" in cmdline and b"node" in cmdline:
            count += 1
    return count


def source_digest(directories: dict[str, str]) -> str:
    """A digest of the ``.py`` files of each directory, each named by its key (a prefix such as
    ``"sequencer/"``) and file name: equal digests, equal code."""
    digest = hashlib.sha256()
    for prefix, directory in directories.items():
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                digest.update(f"{prefix}{name}".encode() + b"\0")
                with open(os.path.join(directory, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def git_state(paths: Sequence[str]) -> tuple[str, bool | None]:
    """The checkout's commit, and whether `paths` hold uncommitted changes (``None`` when
    there is no git checkout to ask)."""
    commit, dirty = "", None
    try:
        git = ["git", "-C", REPO_DIR]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            status = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return commit, dirty


def code_under_test() -> dict:
    """The git commit, whether the packages a node runs have uncommitted changes, and a digest
    of their source (equal digests, equal code)."""
    packages = ("sequencer", "cluster", "clients")
    digest = source_digest({f"{package}/": os.path.join(REPO_DIR, package) for package in packages})
    commit, dirty = git_state(packages)
    return {"repo_dir": REPO_DIR, "git_commit": commit, "dirty": dirty, "source_sha256": digest}


def machine_facts(directory: str | None = None) -> dict:
    """CPUs, Python, platform; with `directory`, the file system it is on (``bench_core``'s
    fsync figures depend on it) and the msgspec version."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    facts = {
        "nproc": usable,
        "cpu_count": os.cpu_count() or 0,
        "cpu_model": cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
    }
    if directory is not None:
        facts["msgspec"] = msgspec.__version__
        facts["temp_dir_filesystem"] = filesystem_of(directory)
    return facts


def print_code_and_machine(directory: str, commit: str, dirty: bool | None, digest: str, facts: dict, *, runtime: str) -> None:
    """A report's first lines: the measured source (`directory`, its commit, whether it has
    uncommitted changes, `digest` as "<what> sha256 <hex>"), the machine's CPUs, and `runtime`
    (the Python and library versions that matter) with the platform."""
    changes = {True: ", with uncommitted changes", False: ", clean", None: ""}[dirty]
    print(f"code      {directory} ({commit or 'no git checkout'}{changes}; {digest})")
    print(f"machine   nproc {facts['nproc']} (of {facts['cpu_count']}), {facts['cpu_model']}")
    print(f"          {runtime}, {facts['platform']}")


def print_load(when: str) -> list[float]:
    load = load_average()
    print(f"load avg  {when} {' '.join(f'{x:.2f}' for x in load)} (1, 5, 15 min)", flush=True)
    return load


def filesystem_of(path: str) -> str:
    """The type of the file system holding `path` (``ext4``, ``tmpfs``, …), from /proc/mounts."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) > len(best):
                        best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def cpu_times(pids: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds so far of each named process, and of this one (``bench``)."""
    times = {name: process_cpu_s(pid) for name, pid in pids.items()}
    times["bench"] = time.process_time()
    return times


def cpu_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU share (1.0 = one core busy) of each process between two ``cpu_times``."""
    if seconds <= 0:
        return {}
    return {key: round((after.get(key, 0.0) - value) / seconds, 2) for key, value in before.items() if key in after}
