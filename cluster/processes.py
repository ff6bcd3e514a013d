"""Ending the child processes that local clusters, relays, tests and benchmarks start."""

from __future__ import annotations

import subprocess


def wait_or_kill(process: subprocess.Popen, timeout_s: float) -> None:
    """Wait up to `timeout_s` for `process` to exit; SIGKILL it after that, and reap it."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_process(process: subprocess.Popen) -> None:
    """SIGKILL `process` if it still runs, and reap it; idempotent."""
    if process.poll() is None:
        process.kill()
    process.wait()


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM `process` if it still runs, SIGKILL after `grace_s`; idempotent."""
    if process.poll() is None:
        process.terminate()
        wait_or_kill(process, grace_s)
