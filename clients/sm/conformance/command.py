"""What ``raftseq sm record|verify|show`` print, and their exit codes (the options are
``cluster.cli.sm``'s, with the other ``raftseq`` commands': ``clients`` does not import
``cluster``). Every function returns the exit code: 0 done, 1 the reference stopped or the
implementation does not match, 2 the cluster, the file or the machine cannot be used."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from raftseq.clients.client import Rejected
from raftseq.clients.sm.conformance.record import RecordError, record
from raftseq.clients.sm.conformance.recording import ConformanceFileError, scan_file
from raftseq.clients.sm.conformance.replay import MachineLoadError
from raftseq.clients.sm.conformance.verify import verify
from raftseq.clients.tls import TlsError

_json = msgspec.json.Encoder()


def run_record(endpoints: Sequence[str], machine: str, out: str, *, prog: str, **options: Any) -> int:
    """``record`` (`options` are its keyword options), and one line saying what was written."""
    try:
        result = asyncio.run(record(endpoints, machine, out, **options))
    except (ConnectionError, Rejected, TlsError) as exc:  # the cluster cannot be used: like a failed check
        print(f"{prog} record: {exc}", file=sys.stderr)
        return 1
    except (MachineLoadError, OSError, ValueError) as exc:  # the machine or the output file: usage
        print(f"{prog} record: {exc}", file=sys.stderr)
        return 2
    except RecordError as exc:
        print(f"{prog} record: {exc}", file=sys.stderr)
        return 1
    h = result.header
    print(
        f"recorded {h.sm_type!r} seq {h.from_seq}..{h.to_seq}: {result.entries} messages with digests in {result.path} "
        f"({os.path.getsize(result.path)} bytes, {result.seconds:.1f} s); start: {h.start_from}; final digest {result.final_digest}"
    )
    return 0


def run_verify(path: str, machine: str, *, prog: str, json_report: bool = False, progress: bool = True) -> int:
    """``verify``, and its report: the first mismatch or error, or OK (one JSON object with
    `json_report`)."""
    try:
        result = asyncio.run(verify(path, machine, progress=progress))
    except (ConformanceFileError, MachineLoadError) as exc:
        if json_report:
            print(_json.encode({"ok": False, "file": path, "unusable": str(exc)}).decode())
        print(f"{prog} verify: {exc}", file=sys.stderr)
        return 2
    h = result.header
    if json_report:
        report = {
            "ok": result.ok, "file": result.path, "machine": result.machine, "reference": h.machine, "sm_type": h.sm_type,
            "from_seq": h.from_seq, "to_seq": h.to_seq, "checked": result.checked, "last_seq": result.last_seq,
            "mismatch": None if result.mismatch is None else result.mismatch.__dict__, "error": result.error or None,
            "error_seq": result.error_seq or None, "seconds": round(result.seconds, 3),
        }  # fmt: skip
        print(json.dumps(report))
    elif result.mismatch is not None:
        m = result.mismatch
        print(m.describe())
        if m.message:
            print(f"  message: {m.message}")
        print(
            f"  last matching seq: {m.last_matching_seq if m.last_matching_seq >= h.from_seq else 'none'} ({result.checked} recorded messages compared; slice {h.from_seq}..{h.to_seq})"
        )
    elif result.error:
        print(f"FAILED: {result.error}")
        print(f"  {result.checked} recorded messages matched before it (slice {h.from_seq}..{h.to_seq})")
    else:
        print(
            f"OK: {machine} matches {h.machine} on {result.checked} messages of {h.sm_type!r}, seq {h.from_seq}..{h.to_seq} "
            f"({result.seconds:.1f} s); final digest {result.final_digest}"
        )
    return 0 if result.ok else 1


def run_show(path: str, *, prog: str) -> int:
    """``show``: check the file end to end and print its header and counts as JSON."""
    try:
        summary = scan_file(path)
    except ConformanceFileError as exc:
        print(f"{prog} show: {exc}", file=sys.stderr)
        return 2
    report = {
        "header": msgspec.to_builtins(summary.header),
        "messages": summary.entries,
        "first_message_seq": summary.first_entry_seq,
        "final_digest": summary.footer.final_digest,
    }
    print(json.dumps(report, indent=2))
    return 0
