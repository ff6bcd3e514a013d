"""Named credentials: who may connect, in which roles, under which session names, at what rates.

A client presents a credential as its ordinary token, ``NAME:SECRET`` in ``Hello.token``: no
new field on the wire, so a client of 0.2.0 uses one by setting ``token=`` (or
``$RAFTSEQ_TOKEN``) and nothing else. The shared ``client_token`` keeps working beside them
(all roles, any session, no quotas): it stays the simple default of ``cluster up`` and is what
nodes use among themselves (catch-up).

The file (``credentials_file`` of the node config; ``raftseq cred`` edits it) is JSON, format
``CREDENTIALS_FORMAT_VERSION``: per credential its name, the scrypt hash of its secret with salt
and cost, its roles (``ROLES``: ``submit``, ``subscribe``, ``admin`` — admin holds both others),
the session-name prefixes it may use (``""``: any), ``priority`` (its submits take the
batcher's priority lane), its quotas (0: none) and ``revoked``. A node reads it at start (a bad
file stops it, exit 5) and again when its inode, size or mtime changes
(``CREDENTIALS_POLL_INTERVAL_S``); a bad file then keeps the credentials last read, and says so
in the log. A credential revoked, removed or given another secret ends at once: its
connections are told ``Rejected(auth_failed)`` and closed.

Refusals (``Rejected(auth_failed)`` with the reason in the detail, the one reason every client
release knows as "this token cannot do that"): an unknown credential or a wrong secret, a
revoked one, a session outside its prefixes (at hello), a submit without the submit role, a
subscription without the subscribe role (the connection is closed: nothing it sent is
sequenced). Over a quota: ``Busy`` with a retry hint (rates), or ``Busy`` and closed
(connections, sessions), as for the node's own limits; every refusal is counted per credential
(``quotas.RefusalCounts``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import msgspec

from raftseq.cluster.config import (
    BUSY_RETRY_AFTER_QUOTA_MS_MIN,
    CREDENTIAL_CHECKS_PER_S,
    CREDENTIAL_LABELS_MAX,
    CREDENTIAL_PREFIXES_MAX,
    CREDENTIAL_SCRYPT_N,
    CREDENTIAL_SCRYPT_P,
    CREDENTIAL_SCRYPT_R,
    CREDENTIAL_SECRET_BYTES,
    CREDENTIALS_FILE_BYTES_MAX,
    CREDENTIALS_MAX,
    CREDENTIALS_POLL_INTERVAL_S,
    OTHER_CREDENTIALS_LABEL,
)
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.cluster.quotas import (
    LIMIT_BYTES,
    LIMIT_CONNECTIONS,
    LIMIT_MESSAGES,
    LIMIT_SESSIONS,
    LIMIT_SUBSCRIPTIONS,
    REFUSED_PREFIX,
    REFUSED_REVOKED,
    REFUSED_ROLE,
    RefusalCounts,
    TokenBucket,
    Usage,
    burst_of,
    retry_after_ms,
)
from raftseq.sequencer import limits

if TYPE_CHECKING:
    from raftseq.cluster.config import NodeConfig

log = logging.getLogger("raftseq.credentials")

CREDENTIALS_FORMAT_VERSION = 1
ROLE_SUBMIT = "submit"
ROLE_SUBSCRIBE = "subscribe"
ROLE_ADMIN = "admin"
ROLES = (ROLE_SUBMIT, ROLE_SUBSCRIBE, ROLE_ADMIN)
#: A credential's name: what goes before the ``:`` of its token, and its metrics label.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Prefix = Annotated[str, msgspec.Meta(max_length=limits.SESSION_BYTES_MAX)]
Rate = Annotated[float, msgspec.Meta(ge=0)]
Bound = Annotated[int, msgspec.Meta(ge=0)]
Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32,128}\Z")]


class CredentialsError(Exception):
    """A credentials file that cannot be used, or a bad ``raftseq cred`` request (one line)."""


class Quotas(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A credential's limits on each node (0: none). Rates are token buckets holding
    ``CREDENTIAL_BURST_S`` of their rate."""

    messages_per_s: Rate = 0.0
    bytes_per_s: Rate = 0.0
    sessions_max: Bound = 0
    subscriptions_max: Bound = 0
    connections_max: Bound = 0


class Credential(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    salt: Hex
    #: scrypt(secret, salt, n, r, p), hex.
    secret_hash: Hex
    roles: list[str]
    prefixes: Annotated[list[Prefix], msgspec.Meta(min_length=1, max_length=CREDENTIAL_PREFIXES_MAX)] = msgspec.field(
        default_factory=lambda: [""]
    )
    priority: bool = False
    quotas: Quotas = Quotas()
    revoked: bool = False
    scrypt_n: int = CREDENTIAL_SCRYPT_N
    scrypt_r: int = CREDENTIAL_SCRYPT_R
    scrypt_p: int = CREDENTIAL_SCRYPT_P

    def secret_matches(self, secret: str) -> bool:
        digest = hash_secret(secret, bytes.fromhex(self.salt), self.scrypt_n, self.scrypt_r, self.scrypt_p)
        return hmac.compare_digest(digest, bytes.fromhex(self.secret_hash))


class CredentialsFile(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    credentials: Annotated[list[Credential], msgspec.Meta(max_length=CREDENTIALS_MAX)]


def hash_secret(
    secret: str, salt: bytes, n: int = CREDENTIAL_SCRYPT_N, r: int = CREDENTIAL_SCRYPT_R, p: int = CREDENTIAL_SCRYPT_P
) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + limits.MIB, dklen=32)


def new_credential(name: str, roles: Sequence[str], prefixes: Sequence[str], *, priority: bool, quotas: Quotas) -> tuple[Credential, str]:
    """A credential and its secret (shown once; the file keeps only its hash). Raises
    ``CredentialsError`` for a bad name, role or prefix."""
    secret = secrets.token_urlsafe(CREDENTIAL_SECRET_BYTES)
    salt = os.urandom(16)
    raw = {
        "name": name,
        "salt": salt.hex(),
        "secret_hash": hash_secret(secret, salt).hex(),
        "roles": list(roles),
        "prefixes": list(prefixes) or [""],
        "priority": priority,
        "quotas": msgspec.to_builtins(quotas),
    }
    try:
        credential = msgspec.convert(raw, Credential)
    except msgspec.ValidationError as exc:
        raise CredentialsError(str(exc)) from None
    problems = credential_problems(credential)
    if problems:
        raise CredentialsError("; ".join(problems))
    return credential, secret


def credential_problems(credential: Credential) -> list[str]:
    found = []
    if credential.name == OTHER_CREDENTIALS_LABEL:
        found.append(f"the name {OTHER_CREDENTIALS_LABEL!r} is the metrics label of credentials past the first {CREDENTIAL_LABELS_MAX}")
    if not credential.roles or any(role not in ROLES for role in credential.roles):
        found.append(f"credential {credential.name!r}: roles must be some of {', '.join(ROLES)}, got {credential.roles}")
    if (
        not credential.scrypt_n >= 2
        or credential.scrypt_n & (credential.scrypt_n - 1)
        or not 1 <= credential.scrypt_r * credential.scrypt_p <= 64
    ):
        found.append(
            f"credential {credential.name!r}: scrypt cost n={credential.scrypt_n} r={credential.scrypt_r} p={credential.scrypt_p} is not usable"
        )
    return found


def read_credentials(path: str) -> dict[str, Credential]:
    """The credentials of the file at `path`, by name. Raises ``CredentialsError`` (one line)."""
    try:
        with open(path, "rb") as f:
            data = f.read(CREDENTIALS_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise CredentialsError(f"credentials file {path}: cannot read it: {exc.strerror}") from None
    if len(data) > CREDENTIALS_FILE_BYTES_MAX:
        raise CredentialsError(f"credentials file {path}: larger than {CREDENTIALS_FILE_BYTES_MAX} bytes")
    try:
        parsed = msgspec.json.decode(data, type=CredentialsFile)
    except msgspec.DecodeError as exc:
        raise CredentialsError(f"credentials file {path}: {exc}") from None
    if parsed.version != CREDENTIALS_FORMAT_VERSION:
        raise CredentialsError(f"credentials file {path}: format {parsed.version}, this release reads {CREDENTIALS_FORMAT_VERSION}")
    found: dict[str, Credential] = {}
    for credential in parsed.credentials:
        problems = credential_problems(credential)
        if credential.name in found:
            problems.append(f"credential {credential.name!r} appears twice")
        if problems:
            raise CredentialsError(f"credentials file {path}: " + "; ".join(problems))
        found[credential.name] = credential
    return found


def write_credentials(path: str, credentials: Sequence[Credential]) -> None:
    """Replace the file at `path` atomically (a temporary file in the same directory, 0600,
    fsynced, renamed over it, the directory fsynced): a node reading it sees the old file or
    the new one, never half of one."""
    data = msgspec.json.format(msgspec.json.encode(CredentialsFile(CREDENTIALS_FORMAT_VERSION, list(credentials))))
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".credentials-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Grant:
    """What a connection authenticated as: one credential's rights and what it holds on this
    node (``quotas.Usage``). ``checked`` False (the shared token, or authentication off): no
    role, prefix or quota applies, and the gateway asks nothing more."""

    def __init__(self, credential: Credential | None, refusals: RefusalCounts, now_s: float) -> None:
        self.credential = credential
        self.checked = credential is not None
        self.name = credential.name if credential is not None else ""
        self.refusals = refusals
        self.revoked = ""
        #: A keyed digest of the secret last found matching (``Access``): checked again without scrypt.
        self.verified = b""
        self.usage = Usage(now_s)
        self.priority = False
        self.may_submit = self.may_subscribe = True
        if credential is not None:
            self.update(credential)

    def update(self, credential: Credential) -> None:
        """The credentials file changed this credential's rights (not its secret)."""
        self.credential = credential
        self.priority = credential.priority
        self.may_submit = bool({ROLE_SUBMIT, ROLE_ADMIN} & set(credential.roles))
        self.may_subscribe = bool({ROLE_SUBSCRIBE, ROLE_ADMIN} & set(credential.roles))
        quotas = credential.quotas
        usage = self.usage
        usage.messages.set_rate(quotas.messages_per_s, burst_of(quotas.messages_per_s, 1))
        usage.bytes.set_rate(quotas.bytes_per_s, burst_of(quotas.bytes_per_s, limits.PAYLOAD_BYTES_MAX))

    def refused(self, what: str, detail: str) -> str:
        self.refusals.count(self.name, what)
        return detail

    def session_refusal(self, session: str) -> str:
        """Why this credential may not use `session` ("" if it may)."""
        if self.revoked:
            return self.refused(REFUSED_REVOKED, self.revoked)
        if not self.checked or any(session.startswith(prefix) for prefix in self.credential.prefixes):
            return ""
        allowed = ", ".join(repr(p) for p in self.credential.prefixes[:4])
        return self.refused(REFUSED_PREFIX, f"credential {self.name!r} may not use session {session!r} (its prefixes: {allowed})")

    def role_refusal(self, submit: bool) -> str:
        """Why this credential may not submit (`submit`) or subscribe ("" if it may)."""
        if not self.checked or (self.may_submit if submit else self.may_subscribe):
            return ""
        role = ROLE_SUBMIT if submit else ROLE_SUBSCRIBE
        return self.refused(REFUSED_ROLE, f"credential {self.name!r} has no {role} role (roles: {', '.join(self.credential.roles)})")

    def connect(self, session: str) -> str:
        """Count a connection bound to `session`; or the limit it is over ("" when counted)."""
        if not self.checked:
            return ""
        quotas, usage = self.credential.quotas, self.usage
        if quotas.connections_max and usage.connections >= quotas.connections_max:
            return self.refused(LIMIT_CONNECTIONS, LIMIT_CONNECTIONS)
        if quotas.sessions_max and session not in usage.sessions and len(usage.sessions) >= quotas.sessions_max:
            return self.refused(LIMIT_SESSIONS, LIMIT_SESSIONS)
        usage.connections += 1
        usage.sessions[session] += 1
        return ""

    def disconnect(self, session: str, subscribed: bool) -> None:
        """A connection counted by ``connect`` closed (with a subscription counted by ``subscribe``)."""
        if not self.checked:
            return
        usage = self.usage
        usage.connections -= 1
        usage.sessions[session] -= 1
        if not usage.sessions[session]:
            del usage.sessions[session]
        if subscribed:
            usage.subscriptions -= 1
        assert usage.connections >= 0 and usage.subscriptions >= 0, f"credential {self.name!r} counts below zero"

    def subscribe(self) -> str:
        """Count a subscription; or the limit it is over ("" when counted)."""
        if not self.checked:
            return ""
        quotas = self.credential.quotas
        if quotas.subscriptions_max and self.usage.subscriptions >= quotas.subscriptions_max:
            return self.refused(LIMIT_SUBSCRIPTIONS, LIMIT_SUBSCRIPTIONS)
        self.usage.subscriptions += 1
        return ""

    def admit(self, payloads: Sequence[bytes], now_s: float) -> tuple[int, int, str]:
        """How many of `payloads` (in client_seq order) the rates let in now; when not all,
        the ``Busy`` retry hint in ms and the limit."""
        if not self.checked:
            return len(payloads), 0, ""
        admitted, wait_s, by_messages = self.usage.admit([len(p) for p in payloads], now_s)
        if admitted == len(payloads):
            return admitted, 0, ""
        limit = LIMIT_MESSAGES if by_messages else LIMIT_BYTES
        self.refusals.count(self.name, limit, len(payloads) - admitted)  # one per submit refused
        return admitted, retry_after_ms(wait_s, BUSY_RETRY_AFTER_QUOTA_MS_MIN), limit


class Access:
    """A node's credentials: checks tokens, hands out ``Grant``s, follows the file."""

    def __init__(self, config: NodeConfig, refusals: RefusalCounts, *, clock_s: Callable[[], float] = time.monotonic) -> None:
        self._token = config.client_token.encode()
        self.path = config.credentials_file
        self.refusals = refusals
        self._clock_s = clock_s
        #: A key of this process for the digests of secrets already checked (``Grant.verified``).
        self._digest_key = os.urandom(32)
        self.shared = Grant(None, refusals, clock_s())
        self._checks = TokenBucket(CREDENTIAL_CHECKS_PER_S, CREDENTIAL_CHECKS_PER_S, clock_s())
        self.grants: dict[str, Grant] = {}
        self._file_id: tuple[int, int, int] | None = None
        if self.path:
            try:
                self._load()
            except CredentialsError as exc:
                raise NodeCannotRun(NodeExit.INVALID_CONFIG, str(exc)) from None

    @property
    def required(self) -> bool:
        """Whether a hello must carry a token (the shared one or a credential)."""
        return bool(self._token) or bool(self.path)

    def authenticate(self, token: str, certificate_name: str = "") -> Grant | str | None:
        """The grant of `token`, or why it is refused; None when the node runs its most scrypt
        checks a second already (``CREDENTIAL_CHECKS_PER_S``): ``Busy``, try again. A hello
        without a token on a connection with a verified client certificate (mutual TLS,
        ``cluster.tls``) gets ``certificate_grant(certificate_name)``."""
        if not token and certificate_name:
            return self.certificate_grant(certificate_name)
        if self._token and hmac.compare_digest(token.encode(), self._token):
            return self.shared
        if not self.required:
            return self.shared
        name, colon, secret = token.partition(":")
        grant = self.grants.get(name) if colon else None
        if grant is None:
            return "wrong token" if token else ""
        digest = hmac.new(self._digest_key, secret.encode(), hashlib.sha256).digest()
        if not (grant.verified and hmac.compare_digest(digest, grant.verified)):
            if not self._checks.take(1, self._clock_s()):
                return None
            if not grant.credential.secret_matches(secret):
                return "wrong token"
            grant.verified = digest
        if grant.revoked:  # said only to a holder of the secret
            return grant.refused(REFUSED_REVOKED, grant.revoked)
        return grant

    def certificate_grant(self, name: str) -> Grant | str:
        """The grant of a verified client certificate whose subject CN is `name`: the
        credential of that name in the credentials file (its roles, prefixes and quotas apply as
        for its token), or why it is refused. A node without a credentials file trusts its
        client CA as it trusts the shared token: all roles, any session."""
        if not self.path:
            return self.shared
        grant = self.grants.get(name)
        if grant is None:
            return f"the client certificate names credential {name!r}, which the credentials file does not hold"
        if grant.revoked:
            return grant.refused(REFUSED_REVOKED, grant.revoked)
        return grant

    def _file_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> list[Grant]:
        """Read the file; the grants whose rights changed (those revoked included)."""
        identity = self._file_identity()
        credentials = read_credentials(self.path)
        self._file_id = identity
        changed = []
        now_s = self._clock_s()
        grants = {}
        for name, credential in credentials.items():
            old = self.grants.get(name)
            if old is not None and not old.revoked and not credential.revoked and credential.secret_hash == old.credential.secret_hash:
                if credential != old.credential:
                    old.update(credential)
                    changed.append(old)
                grants[name] = old
                continue
            grants[name] = Grant(credential, self.refusals, now_s)
            if credential.revoked:
                grants[name].revoked = f"credential {name!r} was revoked"
            if old is not None and not old.revoked:
                old.revoked = f"credential {name!r} was " + ("revoked" if credential.revoked else "given a new secret")
                changed.append(old)
        for name, old in self.grants.items():
            if name not in grants and not old.revoked:
                old.revoked = f"credential {name!r} was removed"
                changed.append(old)
        self.grants = grants
        return changed

    def reload_if_changed(self) -> list[Grant]:
        """Read the file again if it changed since it was read; the grants whose rights changed."""
        identity = self._file_identity() if self.path else None
        if not self.path or identity == self._file_id:
            return []
        try:
            changed = self._load()
        except CredentialsError as exc:
            # Logged once per change of the file. The identity is the one taken before the read:
            # a file fixed while the broken one was being read is a change, read at the next poll
            # (taken after, it was never read, and a revocation it made was never applied).
            self._file_id = identity
            log.error("%s; keeping the credentials read before", exc)
            return []
        log.info("credentials file %s read again: %d credentials, %d changed", self.path, len(self.grants), len(changed))
        return changed

    async def watch(self, on_change: Callable[[list[Grant]], None]) -> None:
        """Follow the file: `on_change` with the grants whose rights changed, at each change."""
        while True:
            await asyncio.sleep(CREDENTIALS_POLL_INTERVAL_S)
            changed = self.reload_if_changed()
            if changed:
                on_change(changed)
