"""``raftseq keygen FILE``: make a node key (``raft_key_file``) and print its public key."""

from __future__ import annotations

import argparse
import os
import sys

from raftseq.cluster.cli.args import add_command


def cmd_keygen(args: argparse.Namespace) -> int:
    from raftseq.cluster.config import ConfigError, node_key_text, read_node_key
    from raftseq.cluster.data_dir import write_private

    path = args.file
    if args.show:
        try:
            public_key = read_node_key(path)[1]
        except ConfigError as exc:
            print(f"raftseq keygen: {exc}", file=sys.stderr)
            return 1
    else:
        # A node's key is its identity to the others: replacing one locks the node out until every
        # config names the new public key, so an existing file is never overwritten.
        if os.path.lexists(path):
            print(f"raftseq keygen: {path} exists; a node key is never overwritten (--show prints its public key)", file=sys.stderr)
            return 1
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            print(f"raftseq keygen: {directory} is not a directory", file=sys.stderr)
            return 1
        from raftseq.cluster.raft.link_cipher import new_node_key  # the crypto library lives in the Raft adapter

        seed, public_key = new_node_key()
        try:
            write_private(path, node_key_text(seed, public_key))
        except OSError as exc:
            print(f"raftseq keygen: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {path} (mode 0600): this node's raft_key_file", file=sys.stderr)
    # What goes into this node's config (raft_public_key) and every peer's [[peers]] entry for it.
    print(f'raft_public_key = "{public_key.hex()}"')
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    keygen = add_command(
        sub,
        "keygen",
        cmd_keygen,
        help="make a node key (raft_key_file) and print its public key",
        description="Make a node's Ed25519 key in FILE (mode 0600; an existing file is never overwritten) and print "
        "the raft_public_key line that this node's config and every peer's [[peers]] entry for it name. "
        "See docs/operating.md, node keys.",
    )
    keygen.add_argument("file", metavar="FILE", help="the key file to make (the node's raft_key_file)")
    keygen.add_argument("--show", action="store_true", help="do not make a key: print the public key of the existing FILE")
