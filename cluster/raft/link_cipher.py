"""The Raft links: AES-256-GCM keyed from the Raft password in place of Fernet, and no zlib.

pysyncobj protects its links with the cluster password through an *encryptor* object (it calls
``encrypt_at_time``, ``extract_timestamp`` and ``decrypt``), which it builds with Fernet:
AES-128-CBC plus HMAC-SHA256 plus base64, done partly in Python. Measured here, a 60 KB batch
cost 155 µs to encrypt and 430 µs to decrypt (every batch is encrypted once per follower and
decrypted on each), and a 200-byte message 6.6 / 10.7 µs; AES-GCM does both in about 7 µs and
1 µs. ``raft.patches.install()`` makes pysyncobj build a ``LinkCipher`` instead.

What stays the same: the key comes from the password (PBKDF2-HMAC-SHA256, 100 000 rounds);
every message is encrypted and authenticated, its header included; each connection is bound
to random keys exchanged inside the first encrypted messages. The header's "timestamp" is a
message number that rises with every message a node sends (pysyncobj's was whole seconds, so
a message replayed within the same second was taken): the link guard refuses a message whose
number does not rise above the last one on its link. A message that fails authentication raises,
and pysyncobj drops the connection.

pysyncobj also compresses every message with ``zlib`` (level 3). Measured here, that cost 40 µs
for a one-entry AppendEntries (310 bytes, saving 35) and 13 µs for its 92-byte reply, on every
message of every Raft round; and 880 µs for a 60 KB batch of incompressible payloads, once per
follower. Batches are compact msgpack already: ``raft.patches.install()`` sends messages
uncompressed (``Uncompressed``).

Wire format of one message: ``version (1 byte) | timestamp (u64 big-endian) | nonce (12
random bytes) | ciphertext and 16-byte tag``; version and timestamp are authenticated as
associated data. Version 2 carries uncompressed pickles (version 1 carried zlib). Version 3 has
the bytes of version 2: raftseq 0.2 raised it to keep nodes of 0.1 (version 2) out of its
clusters, because a 0.1 node would skip the batches of session fencing (batch format 2) and
could not read the machine snapshots of 0.2 (format 3): its journal would lose messages the
others have. Every node of a cluster runs one raftseq version; a node refuses the links of
another version, and says so in its log.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

VERSION = 3
#: Link versions of earlier raftseq releases, named in the refusal (version -> release).
_EARLIER_VERSIONS = {1: "raftseq before 0.1", 2: "raftseq 0.1"}
_HEADER = struct.Struct(">BQ")
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MIN_BYTES = _HEADER.size + _NONCE_BYTES + _TAG_BYTES
_SALT = b"raftseq raft links, AES-256-GCM, v1"
_KDF_ROUNDS = 100_000


log = logging.getLogger("raftseq.raft")


class LinkCipherError(ValueError):
    """A message that is not one of ours (too short, unknown version)."""


class LinkCipher:
    """pysyncobj's encryptor interface over AES-256-GCM."""

    def __init__(self, password: str | bytes) -> None:
        secret = password.encode() if isinstance(password, str) else bytes(password)
        key = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_SALT, iterations=_KDF_ROUNDS).derive(secret)
        self._aead = AESGCM(key)
        # From the monotonic clock in ns: above every number this node sent before a restart
        # (the receiver's check is per link, and a link does not outlive the process anyway).
        self._message_numbers = itertools.count(time.monotonic_ns())

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        """`current_time` (pysyncobj's whole seconds) is not used: the header carries a number
        that rises with every message this node sends, so that a receiver refuses any message
        that does not come after the last one it took on that link (a replay, a duplicate)."""
        header = _HEADER.pack(VERSION, next(self._message_numbers))
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, data, header)

    def extract_timestamp(self, data: bytes) -> int:
        """The (not yet authenticated) timestamp; ``decrypt`` authenticates it."""
        if len(data) < _MIN_BYTES:
            raise LinkCipherError(f"{len(data)} bytes is too short for a link message")
        version, timestamp = _HEADER.unpack_from(data)
        if version != VERSION:
            if version in _EARLIER_VERSIONS:
                log.warning(
                    "refused a Raft link message of link version %d (%s); this node speaks version %d: every node "
                    "of a cluster must run one raftseq version (docs/operating.md, upgrades)",
                    version,
                    _EARLIER_VERSIONS[version],
                    VERSION,
                )
            raise LinkCipherError(f"link message version {version}, this node reads {VERSION}")
        return timestamp

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext; raises on anything not encrypted under this key (``InvalidTag``)."""
        self.extract_timestamp(data)
        header = data[: _HEADER.size]
        nonce = data[_HEADER.size : _HEADER.size + _NONCE_BYTES]
        return self._aead.decrypt(nonce, data[_HEADER.size + _NONCE_BYTES :], header)


class Uncompressed:
    """Stands in for the ``zlib`` module in pysyncobj's connection code."""

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return data

    @staticmethod
    def decompress(data: bytes) -> bytes:
        return data
