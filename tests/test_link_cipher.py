"""The Raft links' cipher (``cluster.raft.link_cipher``): pysyncobj's encryptor interface on AES-GCM."""

from __future__ import annotations

import struct

import pytest
from cryptography.exceptions import InvalidTag

import pysyncobj.syncobj

from raftseq.cluster import raft
from raftseq.cluster.raft.link_cipher import LinkCipher, LinkCipherError, LinkPassword


@pytest.fixture(scope="module")
def cipher() -> LinkCipher:
    return LinkCipher("the cluster's raft password")


def test_round_trip_keeps_data_and_the_message_numbers_rise(cipher):
    numbers = []
    for data in (b"", b"x", bytes(range(256)) * 300):
        token = cipher.encrypt_at_time(data, 1234)
        numbers.append(cipher.extract_timestamp(token))
        assert cipher.decrypt(token) == data
        assert len(data) < 100 or data[:100] not in token
    assert numbers == sorted(set(numbers)), numbers


def test_a_framed_message_is_the_length_prefix_and_the_token_and_reads_from_a_view(cipher):
    """``encrypt_framed`` (what a link sends): the prefix names the token's length, the token
    decrypts like ``encrypt_at_time``'s, also read in place from a view of a larger buffer."""
    prefix = struct.Struct("i")
    for data in (b"", b"x", bytes(range(256)) * 300):
        framed = cipher.encrypt_framed(data, prefix)
        (length,) = prefix.unpack_from(framed)
        assert length == len(framed) - prefix.size == len(cipher.encrypt_at_time(data, 0))
        received = bytearray(b"before") + framed + b"after"
        with memoryview(received) as view:
            token = view[6 + prefix.size : 6 + prefix.size + length]
            assert cipher.decrypt(token) == data
            del token


def test_the_same_message_twice_gives_different_bytes(cipher):
    assert cipher.encrypt_at_time(b"same", 7) != cipher.encrypt_at_time(b"same", 7)


def test_another_password_cannot_read_it(cipher):
    token = cipher.encrypt_at_time(b"secret", 1)
    with pytest.raises(InvalidTag):
        LinkCipher("another password").decrypt(token)


@pytest.mark.parametrize("where", ["version", "timestamp", "nonce", "ciphertext", "tag"])
def test_every_changed_byte_is_refused(cipher, where):
    token = bytearray(cipher.encrypt_at_time(b"a raft message", 99))
    at = {"version": 0, "timestamp": 5, "nonce": 12, "ciphertext": 23, "tag": len(token) - 1}[where]
    token[at] ^= 0x01
    with pytest.raises((InvalidTag, LinkCipherError)):
        cipher.decrypt(bytes(token))


def test_a_changed_timestamp_fails_authentication(cipher):
    """pysyncobj reads the timestamp before decrypting; decrypt must then refuse a forged one."""
    token = bytearray(cipher.encrypt_at_time(b"m", 10))
    number = cipher.extract_timestamp(bytes(token))
    token[8] ^= 0x01  # the number's last byte
    assert cipher.extract_timestamp(bytes(token)) == number ^ 0x01
    with pytest.raises(InvalidTag):
        cipher.decrypt(bytes(token))


@pytest.mark.parametrize("token", [b"", b"\x01" + b"\x00" * 20, b"gAAAAA" + b"=" * 80])
def test_short_or_foreign_messages_are_refused(cipher, token):
    with pytest.raises(LinkCipherError):
        cipher.extract_timestamp(token)
    with pytest.raises(LinkCipherError):
        cipher.decrypt(token)


def test_pysyncobj_builds_it_from_the_password():
    raft.install()  # as a node does when it starts
    assert pysyncobj.syncobj.getEncryptor is LinkCipher


def test_a_link_message_of_the_previous_release_is_refused_and_the_log_says_why(cipher, caplog):
    """raftseq 0.1 spoke link version 2 with these very bytes; its nodes would skip this release's
    fenced batches (their journals would lose messages), so its links are refused by version."""
    ours = cipher.encrypt_at_time(b"an AppendEntries", 5)
    assert ours[0] == 3
    previous = b"\x02" + ours[1:]
    with caplog.at_level("WARNING", logger="raftseq.raft"), pytest.raises(LinkCipherError, match="version 2"):
        cipher.extract_timestamp(previous)
    assert any("raftseq 0.1" in r.getMessage() and "one raftseq version" in r.getMessage() for r in caplog.records)


def test_the_cluster_salt_keys_the_link_and_a_plain_password_keeps_the_constant_salt(cipher):
    password = "the cluster's raft password"
    salted = LinkCipher(LinkPassword(password, bytes(range(16))))
    other_cluster = LinkCipher(LinkPassword(password, bytes(range(1, 17))))
    token = salted.encrypt_at_time(b"an AppendEntries", 1)
    assert salted.decrypt(token) == b"an AppendEntries"
    with pytest.raises(InvalidTag):
        other_cluster.decrypt(token)  # the same password, another cluster
    with pytest.raises(InvalidTag):
        cipher.decrypt(token)  # the same password, no salt
    # A config without raft_salt (made before 0.2): the constant salt, as before.
    assert LinkCipher(LinkPassword(password, b"")).decrypt(cipher.encrypt_at_time(b"m", 1)) == b"m"


def keyed_cipher(password: str = "the cluster's raft password") -> LinkCipher:
    from raftseq.cluster.raft.link_cipher import NodeIdentity, new_node_key

    seed, public_key = new_node_key()
    return LinkCipher(LinkPassword(password, b"", NodeIdentity("10.0.0.1:7101", seed, {"10.0.0.1:7101": public_key})))


def test_a_node_without_node_keys_speaks_link_version_3_unchanged_and_one_with_them_version_4(cipher):
    """Upgrades (docs/operating.md): a node of this release without node keys must speak to
    raftseq 0.2 nodes, so its links are version 3 byte for byte (0.2's key derivation too); a
    node with node keys speaks version 4, and each refuses the other's by version."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key_a, key_b = bytes(32), bytes([1]) * 32
    link = cipher.for_link(key_a, key_b)
    assert link.encrypt_at_time(b"m", 0)[0] == cipher.encrypt_at_time(b"m", 0)[0] == 3
    v3_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"raftseq raft link key v3" + key_a + key_b).derive(cipher._key)
    assert link._key == v3_key, "the link key of version 3 changed: raftseq 0.2 nodes could not read it"
    keyed = keyed_cipher()
    assert keyed.encrypt_at_time(b"m", 0)[0] == keyed.for_link(key_a, key_b, b"s" * 32).encrypt_at_time(b"m", 0)[0] == 4
    with pytest.raises(LinkCipherError, match="version 3, this node reads 4"):
        keyed.extract_timestamp(cipher.encrypt_at_time(b"m", 0))
    with pytest.raises(LinkCipherError, match="version 4, this node reads 3"):
        cipher.extract_timestamp(keyed.encrypt_at_time(b"m", 0))


def test_a_link_key_with_node_keys_needs_the_ends_secret():
    """With node keys the link key comes from the cluster key and the two ends' X25519 secret:
    a holder of the password who saw both random keys derives another key."""
    keyed = keyed_cipher()
    key_a, key_b = bytes(32), bytes([1]) * 32
    token = keyed.for_link(key_a, key_b, b"secret of the two ends".ljust(32)).encrypt_at_time(b"an AppendEntries", 0)
    with pytest.raises(InvalidTag):
        keyed.for_link(key_a, key_b, b"a guess".ljust(32)).decrypt(token)
