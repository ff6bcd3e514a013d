"""``raftseq cred add|list|revoke FILE``: edit a credentials file (``cluster.credentials``).

Every edit replaces the file atomically, under a lock (``FILE.lock``) so that two edits at once
do not lose one; the nodes that name the file read it again within
``CREDENTIALS_POLL_INTERVAL_S`` of the change (no restart).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Callable

import msgspec

from raftseq.cluster.cli.args import EXIT_FAILED, EXIT_OK, add_command, add_output_option, command_group, non_negative, non_negative_rate


def _edit(path: str, change: Callable[[dict], str]) -> int:
    """Read the file at `path` (none yet: empty), apply `change` to its credentials by name,
    write it back; `change` returns an error to print ("" when it made its change)."""
    from raftseq.cluster.credentials import CredentialsError, read_credentials, write_credentials
    from raftseq.cluster.data_dir import open_private

    try:
        lock_fd = open_private(path + ".lock", os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        print(f"raftseq cred: cannot lock {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            credentials = read_credentials(path) if os.path.exists(path) else {}
        except CredentialsError as exc:
            print(f"raftseq cred: {exc}", file=sys.stderr)
            return EXIT_FAILED
        problem = change(credentials)
        if problem:
            print(f"raftseq cred: {problem}", file=sys.stderr)
            return EXIT_FAILED
        try:
            write_credentials(path, list(credentials.values()))
        except OSError as exc:
            print(f"raftseq cred: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILED
    finally:
        os.close(lock_fd)
    return EXIT_OK


def cmd_cred_add(args: argparse.Namespace) -> int:
    """Add a credential and print its token (NAME:SECRET) once: the file keeps only a hash of
    the secret. A client presents the token as its --token (or $RAFTSEQ_TOKEN)."""
    from raftseq.cluster.credentials import CredentialsError, Quotas, new_credential

    quotas = Quotas(args.messages_per_s, args.bytes_per_s, args.sessions_max, args.subscriptions_max, args.connections_max)
    try:
        credential, secret = new_credential(
            args.name, args.role or ["submit", "subscribe"], args.prefix, priority=args.priority, quotas=quotas
        )
    except CredentialsError as exc:
        print(f"raftseq cred: {exc}", file=sys.stderr)
        return EXIT_FAILED

    def add(credentials: dict) -> str:
        if args.name in credentials:
            return f"credential {args.name!r} exists in {args.file} (a revoked name is not reused)"
        credentials[args.name] = credential
        return ""

    code = _edit(args.file, add)
    if code == EXIT_OK:
        print(f"added credential {args.name!r} to {args.file}; its token (shown only now):", file=sys.stderr)
        print(f"{args.name}:{secret}")
    return code


def cmd_cred_revoke(args: argparse.Namespace) -> int:
    """Revoke a credential: the nodes refuse it and close its connections (Rejected
    auth_failed) once they read the file again, within a second."""

    def revoke(credentials: dict) -> str:
        credential = credentials.get(args.name)
        if credential is None:
            return f"no credential {args.name!r} in {args.file}"
        credentials[args.name] = msgspec.structs.replace(credential, revoked=True)
        return ""

    code = _edit(args.file, revoke)
    if code == EXIT_OK:
        print(f"revoked credential {args.name!r} in {args.file}", file=sys.stderr)
    return code


def cmd_cred_list(args: argparse.Namespace) -> int:
    """List the credentials of FILE: name, roles, session prefixes, priority, quotas (0: none),
    revoked. Never their secrets (the file holds only hashes)."""
    from raftseq.cluster.credentials import CredentialsError, read_credentials

    try:
        credentials = read_credentials(args.file)
    except CredentialsError as exc:
        print(f"raftseq cred: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rows = [
        {
            "name": c.name,
            "roles": c.roles,
            "prefixes": c.prefixes,
            "priority": c.priority,
            "quotas": msgspec.to_builtins(c.quotas),
            "revoked": c.revoked,
        }
        for c in credentials.values()
    ]
    if args.output == "json":
        print(msgspec.json.encode({"credentials": rows}).decode())
        return EXIT_OK
    for row in rows:
        quotas = " ".join(f"{k}={v:g}" for k, v in row["quotas"].items() if v)
        prefixes = ",".join(repr(p) for p in row["prefixes"])
        flags = ("priority " if row["priority"] else "") + ("REVOKED" if row["revoked"] else "")
        print(f"{row['name']:<24} {','.join(row['roles']):<24} prefixes={prefixes} {quotas or 'no quotas'} {flags}".rstrip())
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    from raftseq.cluster.credentials import ROLES

    csub = command_group(
        sub,
        "cred",
        help="edit a credentials file (roles, session prefixes, quotas, priority)",
        description="Edit the credentials file that nodes name as credentials_file; nodes read it again within a second "
        "of a change. See docs/operating.md, Credentials and quotas.",
    )
    add = add_command(csub, "add", cmd_cred_add, help="add a credential and print its token")
    add.add_argument("file", metavar="FILE", help="the credentials file (made if missing, mode 0600)")
    add.add_argument("name", metavar="NAME", help="the credential's name (letters, digits, . _ -)")
    add.add_argument("--role", action="append", choices=ROLES, help="a role (repeat for several; default submit and subscribe)")
    add.add_argument("--prefix", action="append", default=[], metavar="P", help="a session-name prefix it may use (repeat; default any)")
    add.add_argument("--priority", action="store_true", help="its submits take the priority lane (control traffic)")
    add.add_argument("--messages-per-s", type=non_negative_rate, default=0.0, metavar="N", help="submits a second (0: no limit)")
    add.add_argument("--bytes-per-s", type=non_negative_rate, default=0.0, metavar="N", help="payload bytes a second (0: no limit)")
    add.add_argument("--sessions-max", type=non_negative, default=0, metavar="N", help="sessions at once per node (0: no limit)")
    add.add_argument("--subscriptions-max", type=non_negative, default=0, metavar="N", help="subscriptions per node (0: no limit)")
    add.add_argument("--connections-max", type=non_negative, default=0, metavar="N", help="connections per node (0: no limit)")
    listing = add_command(csub, "list", cmd_cred_list, help="list the credentials (never their secrets)")
    listing.add_argument("file", metavar="FILE", help="the credentials file")
    add_output_option(listing)
    revoke = add_command(csub, "revoke", cmd_cred_revoke, help="revoke a credential (its connections are closed)")
    revoke.add_argument("file", metavar="FILE", help="the credentials file")
    revoke.add_argument("name", metavar="NAME", help="the credential to revoke")
