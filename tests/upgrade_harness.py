"""The previous release of raftseq as running code, for the rolling-upgrade test: its tree taken
from this checkout's git history (``git archive``, no pip install: it runs with the
dependencies installed here), importable as ``raftseq`` through a ``PYTHONPATH`` of its own,
and a cluster whose nodes run either release on the same config files and data directories.

The package maps ``raftseq.<folder>`` to the repository's folders (pyproject's package-dir),
so a directory holding one symlink ``raftseq`` -> the old tree, first on ``PYTHONPATH``, makes
``python -P -m raftseq.cluster.cli`` run the old code; the editable install's finder comes after
the path on ``sys.meta_path``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

from raftseq.cluster.config import load_config
from raftseq.cluster.local import POLL_INTERVAL_S, ClusterTimeout, die_with_parent, source_checkout
from raftseq.cluster.status import answered
from cluster_harness import ClusterHarness

#: The release a rolling upgrade starts from, and its commit (CHANGELOG.md).
PREVIOUS_RELEASE = "0.2.0"
PREVIOUS_RELEASE_COMMIT = "2084ea2"
#: For ``git archive`` of the whole tree and for one run of the old code's Python.
GIT_TIMEOUT_S = 60.0
PYTHON_TIMEOUT_S = 30.0


#: The previous release's client under load (run by ``Release.start_client_load``).
CLIENT_LOAD = """
import asyncio, json, sys, time
from raftseq.clients import SequencerClient

async def main(endpoints, token, rate_per_s, count_max, timeout_s):
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    async with SequencerClient(endpoints.split(","), session="previous-release-client", token=token) as client:
        futures = []
        began = time.monotonic()
        while not stop.is_set() and len(futures) < count_max:
            await asyncio.wait_for(client.wait_for_room(), timeout_s)
            futures.append(client.submit_nowait(b"old-%08d" % len(futures)))
            ahead_s = len(futures) / rate_per_s - (time.monotonic() - began)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
        print(json.dumps(list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
"""


@dataclass
class Release:
    version: str
    commit: str
    #: The extracted tree, and the directory to put on PYTHONPATH (holds ``raftseq`` -> tree).
    tree: str
    python_path: str

    def run_python(self, code: str, *args: str) -> str:
        """Run `code` with this release as ``raftseq``; its stdout. AssertionError when it fails."""
        result = subprocess.run(
            [sys.executable, "-P", "-c", code, *args],
            env={**os.environ, "PYTHONPATH": self.python_path},
            capture_output=True,
            text=True,
            timeout=PYTHON_TIMEOUT_S,
        )
        assert result.returncode == 0, f"raftseq {self.version} ({self.commit}) failed: {result.stderr.strip()}"
        return result.stdout

    def start_client_load(self, endpoints: list[str], *, token: str, rate_per_s: int, count_max: int) -> subprocess.Popen:
        """This release's client library in a process of its own, submitting ``old-NNNNNNNN``
        payloads at `rate_per_s` (at most `count_max`) until its stdin is closed; it then
        prints the sequence numbers (JSON, by index) once every submit is acknowledged."""
        return subprocess.Popen(
            [sys.executable, "-P", "-c", CLIENT_LOAD, ",".join(endpoints), token, str(rate_per_s), str(count_max), str(PYTHON_TIMEOUT_S)],
            env={**os.environ, "PYTHONPATH": self.python_path},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )

    def node_command_prefix(self) -> list[str]:
        """What ``LocalNode.command_prefix`` takes: ``env`` execs the node with this release."""
        return ["env", f"PYTHONPATH={self.python_path}"]


def materialise(commit: str, version: str, directory: str) -> Release:
    """The tree of `commit` from the git history of the checkout this code runs from, in
    `directory`. Fails (never skips) when git or the commit is missing: a shallow clone or a
    source distribution cannot run the rolling upgrade."""
    repo = source_checkout()
    try:
        archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit], capture_output=True, timeout=GIT_TIMEOUT_S)
    except OSError as exc:
        raise AssertionError(f"cannot run git to take raftseq {version} ({commit}) from {repo}: {exc}") from exc
    assert archive.returncode == 0, (
        f"cannot take raftseq {version} ({commit}) from the git history of {repo} (a full clone is needed, not a shallow one): "
        f"{archive.stderr.decode(errors='replace').strip()}"
    )
    tree = os.path.join(directory, f"raftseq-{version}")
    python_path = os.path.join(directory, "path")
    os.makedirs(tree)
    os.makedirs(python_path)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    os.symlink(tree, os.path.join(python_path, "raftseq"))
    release = Release(version, commit, tree, python_path)
    found = release.run_python(
        "import raftseq.cluster.cli, raftseq.sequencer.version as v; print(v.__version__); print(raftseq.cluster.cli.__file__)"
    ).split()
    assert found[0] == version, f"{commit} says it is raftseq {found[0]}, not {version}"
    assert found[1].startswith(python_path + os.sep), f"PYTHONPATH={python_path} still imports {found[1]}, not raftseq {version}"
    return release


@dataclass
class Step:
    """One node replaced: stopped at ``stopped_at``, started again at ``started_at`` (its
    downtime is between), caught up at ``caught_up_at`` (monotonic seconds)."""

    node_id: str
    was_leader: bool
    stopped_at: float
    started_at: float = 0.0
    caught_up_at: float = 0.0
    notes: list[str] = field(default_factory=list)


class MixedCluster(ClusterHarness):
    """A three-node local cluster whose nodes run either `release` or this checkout, on config
    files written by `release` (an upgrade keeps the operator's config) and the same data
    directories throughout."""

    def __init__(self, data_dir: str, base_port: int, *, seed: int, release: Release) -> None:
        super().__init__(data_dir, base_port, seed=seed)
        self.release = release
        release.run_python(
            "import os, sys\n"
            "from raftseq.cluster.config import to_toml\n"
            "from raftseq.cluster.local import local_configs\n"
            "for c in local_configs(sys.argv[1], int(sys.argv[2]), insecure=False):\n"
            "    fd = os.open(os.path.join(sys.argv[1], c.id + '.toml'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)\n"
            "    os.write(fd, to_toml(c).encode())\n"
            "    os.close(fd)\n",
            self.data_dir,
            str(base_port),
        )
        for node in self.nodes:
            node.config = load_config(node.config_path)
            node.command_prefix = release.node_command_prefix()

    def runs_release(self, node_id: str) -> bool:
        return bool(self.node(node_id).command_prefix)

    def use_release(self, node_id: str, *, previous: bool) -> None:
        """The code `node_id` runs from its next start: the previous release or this checkout."""
        self.node(node_id).command_prefix = self.release.node_command_prefix() if previous else []

    def wait_caught_up(self, node_id: str, *, timeout_s: float) -> dict:
        """Until `node_id` answers, names the leader and holds every message the leader held
        when the wait began. Its status entry."""
        leader = self.wait_for_leader(timeout_s=timeout_s, majority=True)
        target = leader["last_seq"]
        deadline = time.monotonic() + timeout_s
        while True:
            entry = self.status(nodes=[node_id])["nodes"][0]
            if answered(entry) and entry["leader"] and entry["last_seq"] >= target:
                return entry
            if time.monotonic() >= deadline:
                raise ClusterTimeout(f"{node_id} did not reach last_seq {target} within {timeout_s} s: {entry}\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL_S)
