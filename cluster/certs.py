"""Certificates for a local TLS cluster (``raftseq cluster up --tls``): a CA, one certificate
per node or relay, one client certificate, all in PEM in one directory.

Made with ``cryptography`` (a dependency already, for the Raft links). For local use and tests:
production clusters bring certificates from their own CA (docs/operating.md, "TLS"). Keys are
ECDSA P-256 (cheap handshakes), written 0600; a certificate is valid for
``CERT_VALID_DAYS`` from an hour before it was made (clocks a little apart still accept it).
Node certificates name ``localhost`` and ``127.0.0.1`` and serve both ends (server and client:
a node is a client of its peers' ports in catch-up); a client certificate's CN names the
credential it stands for (``cluster.credentials``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Days a certificate made here is valid.
CERT_VALID_DAYS = 365
#: A certificate is valid from this long before it was made (clock skew between hosts).
CERT_BACKDATE = datetime.timedelta(hours=1)
#: What node certificates name by default: a local cluster's hosts.
LOCAL_NAMES = ("localhost", "127.0.0.1")
CA_FILE = "ca.pem"
CLIENT_CN = "client"


class CertPair(NamedTuple):
    cert_file: str
    key_file: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace `path` whole (a temporary file renamed over it): a node reloading its
    certificate reads the old file or the new one, never half of one."""
    temporary = f"{path}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class CertificateAuthority:
    """A CA of this directory: its key signs the certificates ``issue`` makes."""

    def __init__(self, directory: str, name: str = "raftseq local CA") -> None:
        self.directory = directory
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = subject
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CERT_BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.ca_file = os.path.join(directory, CA_FILE)
        _write(self.ca_file, self.certificate.public_bytes(serialization.Encoding.PEM), 0o644)

    def issue(self, stem: str, common_name: str, *, names: Sequence[str] = (), server: bool = True, client: bool = True) -> CertPair:
        """A certificate for `common_name` (with `names` as subject alternative names) and its
        key, written as ``STEM.pem`` and ``STEM-key.pem`` in the directory."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CERT_BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if names:
            builder = builder.add_extension(_subject_alt_names(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        pair = CertPair(os.path.join(self.directory, f"{stem}.pem"), os.path.join(self.directory, f"{stem}-key.pem"))
        _write(pair.key_file, _key_pem(key), 0o600)
        _write(pair.cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return pair


#: The directory of a local cluster's certificates, in its data directory.
LOCAL_TLS_DIR = "tls"
NODE_STEM = "node"
CLIENT_STEM = "client"


def local_cluster_tls(data_dir: str, *, mutual: bool = False) -> dict:
    """The ``[tls]`` settings of a local cluster's nodes (``cluster up --tls``): a CA, one
    certificate the nodes share (``localhost``, ``127.0.0.1``) and a client certificate (CN
    ``client``), in ``DATA_DIR/tls``; made once, kept across restarts. `mutual`: the nodes ask
    clients for a certificate from that CA."""
    directory = os.path.join(data_dir, LOCAL_TLS_DIR)
    node = CertPair(os.path.join(directory, f"{NODE_STEM}.pem"), os.path.join(directory, f"{NODE_STEM}-key.pem"))
    client = client_pair(data_dir)
    ca_file = os.path.join(directory, CA_FILE)
    if not all(os.path.exists(path) for path in (ca_file, *node, *client)):
        ca = CertificateAuthority(directory)
        ca.issue(NODE_STEM, "raftseq-node", names=LOCAL_NAMES)
        ca.issue(CLIENT_STEM, CLIENT_CN, server=False)
    settings = {"cert_file": node.cert_file, "key_file": node.key_file, "ca_file": ca_file}
    if mutual:
        settings["client_ca_file"] = ca_file
    return settings


def client_pair(data_dir: str) -> CertPair:
    """The client certificate of the local cluster in `data_dir` (``local_cluster_tls``)."""
    directory = os.path.join(data_dir, LOCAL_TLS_DIR)
    return CertPair(os.path.join(directory, f"{CLIENT_STEM}.pem"), os.path.join(directory, f"{CLIENT_STEM}-key.pem"))


__all__ = [
    "CA_FILE",
    "CERT_VALID_DAYS",
    "CLIENT_CN",
    "LOCAL_NAMES",
    "LOCAL_TLS_DIR",
    "CertPair",
    "CertificateAuthority",
    "client_pair",
    "local_cluster_tls",
]
