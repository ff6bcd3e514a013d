"""A fresh virtual environment with raftseq installed from the checkout (``pip install .``, not
editable), used from a directory that holds a user's own ``clients.py``, ``cluster/`` and
``sequencer/``: the documented import works, ``raftseq --version`` answers, and ``raftseq cluster
up`` starts three nodes that sequence and serve a message. The user's files would break every
import if they were found first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import pytest

from raftseq.clients import NotConnected, SequencerClient, subscribe
from raftseq.cluster.local import free_base_port
from raftseq.sequencer.version import __version__

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30

SHADOWS = {
    "clients.py": "raise ImportError('the user clients.py was imported')\n",
    "cluster/__init__.py": "raise ImportError('the user cluster/ was imported')\n",
    "cluster/cli.py": "raise ImportError('the user cluster/cli.py was imported')\n",
    "sequencer/__init__.py": "raise ImportError('the user sequencer/ was imported')\n",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding raftseq as a built wheel would install it; returns its bin directory."""
    where = tmp_path_factory.mktemp("install")
    source = _copy_of_the_checkout(where / "source")
    venv.EnvBuilder(with_pip=True).create(where / "venv")
    bin_dir = where / "venv" / "bin"
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", str(source)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return bin_dir


def _copy_of_the_checkout(target: Path) -> Path:
    """The files git would commit, as they are now: the build writes into its source folder, and
    the checkout stays as it was."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.fixture()
def user_dir(tmp_path) -> Path:
    for name, text in SHADOWS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_install_is_not_the_checkout(installed):
    # Not vacuous: the venv's raftseq lives in its site-packages, not in this repository.
    done = subprocess.run(
        [str(installed / "python"), "-c", "import raftseq.cluster; print(raftseq.cluster.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout and str(ROOT) not in done.stdout


def test_a_users_clients_py_and_cluster_folder_do_not_shadow_the_install(installed, user_dir):
    code = (
        "from raftseq.clients import SequencerClient, BlockingSequencerClient\n"
        "import raftseq.cluster.cli, raftseq.sequencer, raftseq.clients.sm\n"
        "print(raftseq.clients.__version__)\n"
    )
    done = subprocess.run([str(installed / "python"), "-c", code], cwd=user_dir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == __version__
    # The planted files do shadow a bare import: the check above would catch a regression.
    done = subprocess.run([str(installed / "python"), "-c", "import cluster"], cwd=user_dir, capture_output=True, text=True, timeout=60)
    assert "the user cluster/ was imported" in done.stderr


def test_raftseq_version(installed, user_dir):
    done = subprocess.run([str(installed / "raftseq"), "--version"], cwd=user_dir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"raftseq {__version__}"


def test_cluster_up_from_a_shadowing_directory_starts_three_serving_nodes(installed, user_dir):
    base_port = free_base_port()
    endpoints = [f"127.0.0.1:{base_port + i}" for i in (1, 2, 3)]
    up = subprocess.Popen(
        [
            str(installed / "raftseq"),
            "cluster",
            "up",
            "--data-dir",
            str(user_dir / "data"),
            "--base-port",
            str(base_port),
            "--no-restart",
            "--insecure",
        ],
        cwd=user_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seqs = asyncio.run(asyncio.wait_for(_submit_and_read_everywhere(endpoints), START_TIMEOUT_S))
        assert seqs == [1, 1, 1], seqs
        assert up.poll() is None, up.stdout.read()
    finally:
        _stop(up)
    output = up.stdout.read()
    for node in ("n1", "n2", "n3"):
        log = (user_dir / "data" / f"{node}.log").read_text(errors="replace")
        assert "No module named" not in log and "the user" not in log, log
    assert "No module named" not in output, output


async def _submit_and_read_everywhere(endpoints: list[str]) -> list[int]:
    """Submit one message (retrying until the cluster has a leader), then read it back from each
    node on its own: every node must be up and serving."""
    while True:
        try:
            async with SequencerClient(endpoints, session="install-test", token="") as client:
                await client.submit(b"hello")
            break
        except (OSError, NotConnected):
            await asyncio.sleep(0.2)  # nodes still starting: no leader yet
    seqs = []
    for endpoint in endpoints:
        async for message in subscribe([endpoint], from_seq=1):
            assert message.payload == b"hello"
            seqs.append(message.seq)
            break
    return seqs


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C the cluster (it stops its nodes), and kill its process group if it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(STOP_TIMEOUT_S)


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (the package-dir mapping rules out discovery):
    a new subpackage left off the list would be missing from every install."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        "raftseq." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("sequencer", "cluster", "clients")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == folders
    assert {name: ROOT / path for name, path in setuptools["package-dir"].items()} == {
        name: ROOT / name.removeprefix("raftseq.").replace(".", "/") for name in folders
    }
