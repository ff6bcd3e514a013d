"""What recording and verifying share: loading ``MODULE:CLASS``, a runner over a machine, the
starting state put where the runner restores it, the digest after each message, progress lines."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from raftseq.clients.sm import formats
from raftseq.clients.sm.machine import StateMachine, full_digest
from raftseq.clients.sm.runner import LOCAL_STATE_FORMAT, LocalState, StateMachineRunner
from raftseq.clients.tls import ClientTls
from raftseq.sequencer import protocol

#: Seconds between progress lines on stderr.
PROGRESS_INTERVAL_S = 2.0

_encoder = msgspec.msgpack.Encoder()


class MachineLoadError(Exception):
    """A ``MODULE:CLASS`` that does not name a usable state machine (exit 2)."""


def load_machine_class(spec: str) -> type[StateMachine]:
    """The ``StateMachine`` subclass `spec` (``"package.module:Class"``) names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise MachineLoadError(f"--machine {spec!r}: expected MODULE:CLASS, e.g. examples.refdata.machine:ReferenceData")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - anything the user's module does on import
        raise MachineLoadError(
            f"--machine {spec!r}: cannot import {module_name!r}: {exc!r} (run from the directory that holds it, or set PYTHONPATH)"
        ) from None
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise MachineLoadError(f"--machine {spec!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, StateMachine)):
        raise MachineLoadError(f"--machine {spec!r}: {cls!r} is not a clients.sm.StateMachine subclass")
    return cls


def new_machine(cls: type[StateMachine], spec: str) -> StateMachine:
    try:
        return cls()
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise MachineLoadError(
            f"--machine {spec!r}: {cls.__name__}() raised {exc!r} (the machine must be constructible without arguments)"
        ) from None


def envelope_of(payload: bytes) -> formats.SmEnvelope | None:
    try:
        return formats.decode_sm_envelope(payload)
    except protocol.SmFormatError:
        return None


class DigestTracker:
    """The machine's full digest after each message, recomputed only when the state may have
    changed: after an ``apply`` (the runner's ``messages_applied`` moved) or when the SDK's part
    (behaviour version, pending activations) moved. A state machine changes only in ``apply``."""

    def __init__(self, runner: StateMachineRunner, machine: StateMachine) -> None:
        self.runner = runner
        self.machine = machine
        self.reset()

    def reset(self) -> None:
        self._applied = self.runner.messages_applied
        self._sdk = (self.machine.active_version, self.machine.pending_activations)
        self.digest = full_digest(self.machine)

    def after_message(self) -> bool:
        """Update ``digest``; True when it changed."""
        sdk = (self.machine.active_version, self.machine.pending_activations)
        if self.runner.messages_applied == self._applied and sdk == self._sdk:
            return False
        self._applied = self.runner.messages_applied
        self._sdk = sdk
        before, self.digest = self.digest, full_digest(self.machine)
        return before != self.digest


def _ignore_divergence(divergence: formats.Divergence) -> None:
    """Other replicas' checkpoints in the slice disagreeing is not what is checked here."""


class StartState(NamedTuple):
    """A snapshot of the machine to start from: its bytes, digest, and what it covers."""

    data: bytes
    digest: str
    covered_seq: int
    schema_version: int


def sm_runner(
    machine: StateMachine,
    *,
    endpoints: Sequence[str],
    token: str = "",
    state_dir: str,
    start: StartState | None = None,
    subscribe_fn: Callable | None = None,
    tls: ClientTls = None,
) -> StateMachineRunner:
    """A runner of `machine` alone. With `start`, that state is put in `state_dir` (a fresh
    directory) where the runner restores it (and checks its digest): the runner then starts
    right after ``start.covered_seq``; without it, from a fresh machine. `tls`: as the
    runner's (``clients.tls``)."""
    if start is not None:
        cls = type(machine)
        state = LocalState(LOCAL_STATE_FORMAT, cls.TYPE, start.schema_version, start.covered_seq, start.digest, start.data)
        with open(os.path.join(state_dir, f"{cls.TYPE}.sm"), "wb") as f:
            f.write(_encoder.encode(state))
    return StateMachineRunner(
        list(endpoints),
        [machine],
        token=token,
        state_dir=state_dir if start is not None else None,
        on_divergence=_ignore_divergence,
        subscribe_fn=subscribe_fn,
        tls=tls,
    )


class Progress:
    def __init__(self, verb: str, first: int, last: int, *, enabled: bool) -> None:
        self.verb = verb
        self.first = first
        self.last = last
        self.enabled = enabled
        self.started = time.monotonic()
        self.next_at = self.started + PROGRESS_INTERVAL_S
        self.count = 0

    def tick(self, seq: int) -> None:
        self.count += 1
        if not self.enabled or self.count & 255:
            return
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + PROGRESS_INTERVAL_S
        done = seq - self.first + 1
        total = max(1, self.last - self.first + 1)
        rate = self.count / max(1e-9, now - self.started)
        print(f"{self.verb}: seq {seq} ({done} of {total}, {100 * done // total}%), {rate:,.0f} messages/s", file=sys.stderr, flush=True)
