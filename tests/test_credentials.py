"""Named credentials (``cluster.credentials``) and ``raftseq cred``: the file, the token check,
roles, session prefixes, connection counts, reloading and revocation, without a cluster
(``tests/test_credentials_cluster.py`` runs them on real nodes)."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import pytest

from raftseq.cluster import credentials as credentials_module
from raftseq.cluster.cli.command import main
from raftseq.cluster.config import CREDENTIAL_CHECKS_PER_S
from raftseq.cluster.credentials import (
    Access,
    CredentialsError,
    Quotas,
    new_credential,
    read_credentials,
    write_credentials,
)
from raftseq.cluster.node_exit import NodeCannotRun
from raftseq.cluster.quotas import LIMIT_CONNECTIONS, LIMIT_MESSAGES, LIMIT_SESSIONS, REFUSED_PREFIX, REFUSED_ROLE, RefusalCounts

SHARED_TOKEN = "shared-token-of-the-cluster"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def make_file(path, *specs) -> dict[str, str]:
    """Write a credentials file of (name, roles, prefixes, options) specs; their tokens by name."""
    tokens = {}
    credentials = []
    for name, roles, prefixes, options in specs:
        credential, secret = new_credential(
            name, roles, prefixes, priority=options.get("priority", False), quotas=options.get("quotas", Quotas())
        )
        credentials.append(credential)
        tokens[name] = f"{name}:{secret}"
    write_credentials(str(path), credentials)
    return tokens


def access_of(path, *, token: str = SHARED_TOKEN, clock: Clock | None = None) -> Access:
    config = SimpleNamespace(client_token=token, credentials_file=str(path))
    return Access(config, RefusalCounts(), clock_s=clock or Clock())


@pytest.fixture
def creds(tmp_path):
    path = tmp_path / "credentials.json"
    tokens = make_file(
        path,
        ("oms", ["submit", "subscribe"], ["oms-"], {"quotas": Quotas(messages_per_s=5, connections_max=2, sessions_max=1)}),
        ("reader", ["subscribe"], [], {}),
        ("writer", ["submit"], [], {}),
        ("ops", ["admin"], [], {"priority": True}),
    )
    return path, tokens


def test_the_file_keeps_hashes_never_secrets_and_only_its_owner_reads_it(creds):
    path, tokens = creds
    text = path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for token in tokens.values():
        assert token.split(":", 1)[1] not in text
    assert json.loads(text)["version"] == 1
    assert set(read_credentials(str(path))) == {"oms", "reader", "writer", "ops"}


def test_a_credential_token_gets_its_grant_and_the_shared_token_still_works(creds):
    path, tokens = creds
    access = access_of(path)
    grant = access.authenticate(tokens["oms"])
    assert not isinstance(grant, str) and grant.name == "oms" and grant.checked
    assert access.authenticate(SHARED_TOKEN) is access.shared and not access.shared.checked
    assert access.authenticate(tokens["ops"]).priority


@pytest.mark.parametrize(
    "token, problem",
    [
        ("oms:not-the-secret", "wrong token"),
        ("nobody:whatever", "wrong token"),
        ("no-colon-at-all", "wrong token"),
        ("", ""),  # no token: the gateway says a token is required
    ],
)
def test_a_wrong_secret_an_unknown_name_or_no_token_is_refused(creds, token, problem):
    path, _ = creds
    assert access_of(path).authenticate(token) == problem


def test_a_secret_once_checked_is_checked_again_without_scrypt(creds, monkeypatch):
    path, tokens = creds
    access = access_of(path)
    assert not isinstance(access.authenticate(tokens["oms"]), str)
    monkeypatch.setattr("raftseq.cluster.credentials.hash_secret", lambda *a, **k: pytest.fail("scrypt ran again"))
    assert not isinstance(access.authenticate(tokens["oms"]), str)
    with pytest.raises(pytest.fail.Exception):
        access.authenticate("oms:another-secret")  # a different secret is checked in full


def test_scrypt_checks_are_bounded_per_second_and_verified_secrets_never_wait(creds):
    path, tokens = creds
    clock = Clock()
    access = access_of(path, clock=clock)
    assert not isinstance(access.authenticate(tokens["oms"]), str)
    refused = [access.authenticate(f"writer:guess-{i}") for i in range(CREDENTIAL_CHECKS_PER_S + 5)]
    assert refused.count("wrong token") == CREDENTIAL_CHECKS_PER_S - 1 and refused[-5:] == [None] * 5, "no Busy past the bound"
    assert access.authenticate(tokens["writer"]) is None, "an unverified secret waits for the bound too"
    assert access.authenticate(tokens["oms"]).name == "oms", "a verified secret waited for scrypt"
    clock.now_s += 1
    assert access.authenticate(tokens["writer"]).name == "writer"


def test_session_prefixes_and_roles(creds):
    path, tokens = creds
    access = access_of(path)
    oms, reader, writer, ops = (access.authenticate(tokens[n]) for n in ("oms", "reader", "writer", "ops"))
    assert oms.session_refusal("oms-1") == ""
    assert "may not use session 'risk-1'" in oms.session_refusal("risk-1")
    assert reader.session_refusal("anything") == ""
    assert "no submit role" in reader.role_refusal(submit=True) and reader.role_refusal(submit=False) == ""
    assert "no subscribe role" in writer.role_refusal(submit=False) and writer.role_refusal(submit=True) == ""
    assert ops.role_refusal(submit=True) == ops.role_refusal(submit=False) == "", "admin holds both roles"
    assert access.shared.role_refusal(submit=True) == access.shared.session_refusal("x") == ""
    assert access.refusals.counts[("oms", REFUSED_PREFIX)] == 1
    assert access.refusals.counts[("reader", REFUSED_ROLE)] == 1


def test_connections_and_sessions_are_counted_and_released(creds):
    path, tokens = creds
    oms = access_of(path).authenticate(tokens["oms"])
    assert oms.connect("oms-1") == ""
    assert oms.connect("oms-2") == LIMIT_SESSIONS, "sessions_max 1"
    assert oms.connect("oms-1") == "", "a second connection of the same session"
    assert oms.connect("oms-1") == LIMIT_CONNECTIONS, "connections_max 2"
    oms.disconnect("oms-1", subscribed=False)
    oms.disconnect("oms-1", subscribed=False)
    assert oms.connect("oms-2") == "", "the session was released with its last connection"
    assert oms.usage.connections == 1 and dict(oms.usage.sessions) == {"oms-2": 1}


def test_the_message_rate_admits_a_burst_then_refuses_until_the_clock_moves(creds):
    path, tokens = creds
    clock = Clock()
    oms = access_of(path, clock=clock).authenticate(tokens["oms"])
    assert oms.admit([b"x"] * 8, clock.now_s)[:1] == (5,)
    admitted, retry_ms, limit = oms.admit([b"x"], clock.now_s)
    # Retry once a quarter of the burst of 5 is back: 1.25 messages at 5 a second.
    assert (admitted, limit) == (0, LIMIT_MESSAGES) and retry_ms == 250
    clock.now_s += 0.4
    assert oms.admit([b"x"] * 3, clock.now_s)[0] == 2
    assert oms.refusals.counts[("oms", LIMIT_MESSAGES)] == 3 + 1 + 1, "one per submit refused"


def test_a_revoked_removed_or_re_keyed_credential_ends_and_a_changed_one_is_updated(creds):
    path, tokens = creds
    access = access_of(path)
    grants = {name: access.authenticate(token) for name, token in tokens.items()}
    credentials = read_credentials(str(path))
    credentials["oms"] = credentials["oms"].__class__(**{**_fields(credentials["oms"]), "revoked": True})
    del credentials["reader"]
    credentials["writer"] = new_credential("writer", ["submit"], [], priority=False, quotas=Quotas())[0]
    credentials["ops"] = credentials["ops"].__class__(**{**_fields(credentials["ops"]), "prefixes": ["ops-"]})
    write_credentials(str(path), list(credentials.values()))

    changed = access.reload_if_changed()
    assert set(changed) == set(grants.values())
    assert "revoked" in grants["oms"].revoked and "removed" in grants["reader"].revoked
    assert "new secret" in grants["writer"].revoked
    assert grants["ops"].revoked == "" and grants["ops"].session_refusal("x") != ""
    assert "revoked" in access.authenticate(tokens["oms"])
    assert access.authenticate(tokens["reader"]) == "wrong token"
    assert access.authenticate(tokens["writer"]) == "wrong token"
    assert access.reload_if_changed() == [], "an unchanged file is not read again"


def test_a_broken_file_stops_a_starting_node_and_is_ignored_by_a_running_one(creds, caplog):
    path, tokens = creds
    access = access_of(path)
    path.write_text('{"version": 1, "credentials": [{"name": "x"}]}')
    assert access.reload_if_changed() == []
    assert "keeping the credentials read before" in caplog.text
    assert not isinstance(access.authenticate(tokens["oms"]), str)
    with pytest.raises(NodeCannotRun):
        access_of(path)


def test_a_file_fixed_while_the_broken_one_was_read_is_read_at_the_next_poll(creds, monkeypatch):
    """The poll reads a file half written in place (or a bad one fixed at once) and the good
    one lands before the failed read is recorded: the good file is a change, read at the next
    poll. The failed read recorded the file as it was after the read, so the good file was never
    read, and the revocation it made never applied."""
    path, tokens = creds
    access = access_of(path)
    grant = access.authenticate(tokens["oms"])
    fixed = read_credentials(str(path))
    fixed["oms"] = fixed["oms"].__class__(**{**_fields(fixed["oms"]), "revoked": True})

    def read_half_then_the_writer_finishes(path_read: str):
        write_credentials(path_read, list(fixed.values()))
        raise CredentialsError("credentials file: truncated JSON")

    path.write_text("{")
    monkeypatch.setattr(credentials_module, "read_credentials", read_half_then_the_writer_finishes)
    assert access.reload_if_changed() == []
    monkeypatch.undo()
    assert access.reload_if_changed() == [grant]
    assert "revoked" in grant.revoked


@pytest.mark.parametrize(
    "name, roles",
    [("bad name", ["submit"]), ("-dash", ["submit"]), ("ok", ["root"]), ("ok", []), ("other", ["submit"])],
)
def test_bad_names_and_roles_are_refused(name, roles):
    with pytest.raises(CredentialsError):
        new_credential(name, roles, [], priority=False, quotas=Quotas())


def test_cli_add_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "c.json")
    assert main(["cred", "add", path, "risk", "--role", "submit", "--prefix", "risk-", "--priority", "--messages-per-s", "50"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("risk:") and len(token) > 40
    assert main(["cred", "add", path, "risk"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["cred", "list", path, "-o", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["credentials"]
    assert row["roles"] == ["submit"] and row["prefixes"] == ["risk-"] and row["priority"] and row["quotas"]["messages_per_s"] == 50
    assert token.split(":", 1)[1] not in open(path).read()
    assert main(["cred", "revoke", path, "risk"]) == 0
    assert main(["cred", "revoke", path, "nobody"]) == 1
    assert "no credential 'nobody'" in capsys.readouterr().err
    assert read_credentials(path)["risk"].revoked
    assert main(["cred", "list", path]) == 0
    assert "REVOKED" in capsys.readouterr().out
    assert main(["cred", "list", str(tmp_path / "missing.json")]) == 1


def _fields(credential) -> dict:
    return {name: getattr(credential, name) for name in credential.__struct_fields__}


@pytest.mark.parametrize("rate", ["inf", "nan", "-1", "lots"])
def test_cli_refuses_a_rate_that_is_not_a_finite_number_at_least_0(tmp_path, capsys, rate):
    # "inf" was taken as a quota of infinity per second.
    path = tmp_path / "c.json"
    with pytest.raises(SystemExit) as stopped:
        main(["cred", "add", str(path), "x", "--messages-per-s", rate])
    assert stopped.value.code == 2
    assert "--messages-per-s" in capsys.readouterr().err
    assert not path.exists()
