"""cluster.processes: ending a child process, politely then by force."""

from __future__ import annotations

import subprocess
import sys
import time

from raftseq.cluster.processes import kill_process, stop_process, wait_or_kill

IGNORES_SIGTERM = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def _child(code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_stop_process_ends_a_child_with_sigterm():
    process = _child("import time; print('ready', flush=True); time.sleep(60)")
    stop_process(process, 30.0)
    assert process.returncode == -15
    process.stdout.close()


def test_stop_process_kills_a_child_that_ignores_sigterm_after_the_grace():
    process = _child(IGNORES_SIGTERM)
    started = time.monotonic()
    stop_process(process, 0.2)
    assert process.returncode == -9
    assert time.monotonic() - started < 30
    stop_process(process, 0.2)  # idempotent: already reaped
    assert process.returncode == -9
    process.stdout.close()


def test_wait_or_kill_waits_for_a_child_that_exits():
    process = _child("print('ready', flush=True)")
    wait_or_kill(process, 30.0)
    assert process.returncode == 0
    process.stdout.close()


def test_kill_process_kills_and_reaps_a_running_child_and_leaves_an_ended_one():
    process = _child(IGNORES_SIGTERM)
    kill_process(process)
    assert process.returncode == -9
    kill_process(process)  # idempotent: already reaped
    assert process.returncode == -9
    process.stdout.close()
