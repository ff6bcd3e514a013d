"""Node configuration: one TOML file per node, checked before anything starts.

A node refuses a configuration it cannot run safely, and says which field is wrong: a missing
secret, a cluster that cannot form a majority, election timeouts out of order, a batch limit
that pysyncobj's chunked path would break, unknown keys, wrong types.
"""

from __future__ import annotations

import copy
import os
import tomllib

import msgspec
import pytest

from raftseq.cluster.config import BatcherConfig, ConfigError, NodeConfig, PeerConfig, RaftConfig, load_config, parse_config, to_toml
from raftseq.cluster.local import local_configs
from raftseq.sequencer import limits

# --- helpers: one per verb ------------------------------------------------------------------


def three_nodes() -> dict:
    """The raw TOML data of n1 in a valid three-node cluster."""
    return {
        "id": "n1",
        "data_dir": "/var/lib/raftseq/n1",
        "raft_address": "10.0.0.1:7101",
        "client_address": "10.0.0.1:7001",
        "metrics_address": "10.0.0.1:7201",
        "raft_password": "the raft secret of this cluster",
        "client_token": "client secret",
        "peers": [
            {"id": "n2", "raft_address": "10.0.0.2:7101", "client_address": "10.0.0.2:7001"},
            {"id": "n3", "raft_address": "10.0.0.3:7101", "client_address": "10.0.0.3:7001"},
        ],
    }


def changed(path: str, value) -> dict:
    """``three_nodes()`` with one setting changed; ``path`` is ``key`` or ``section.key``."""
    raw = three_nodes()
    *sections, key = path.split(".")
    target = raw
    for section in sections:
        target = target.setdefault(section, {})
    target[key] = value
    return raw


def without(key: str) -> dict:
    raw = three_nodes()
    del raw[key]
    return raw


def with_peer(peer: int, key: str, value) -> dict:
    """``three_nodes()`` with one setting of one of its peers changed (or added)."""
    raw = three_nodes()
    raw["peers"][peer][key] = value
    return raw


def refused(raw: dict) -> str:
    """The ConfigError text for ``raw``; fails the test when it is accepted."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return str(caught.value)


def write(tmp_path, text: str, name: str = "node.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


VALID_TOML = """
id = "n1"
data_dir = "/var/lib/raftseq/n1"
raft_address = "10.0.0.1:7101"
client_address = "10.0.0.1:7001"
raft_password = "the raft secret of this cluster"
client_token = "client secret"

[raft]
election_timeout_min_s = 0.5
election_timeout_max_s = 1.0

[batcher]
entries_max = 500

[journal]
fsync = "interval_ms=200"

[[peers]]
id = "n2"
raft_address = "10.0.0.2:7101"
client_address = "10.0.0.2:7001"

[[peers]]
id = "n3"
raft_address = "10.0.0.3:7101"
client_address = "10.0.0.3:7001"
"""


# --- a valid cluster ------------------------------------------------------------------------


def test_a_three_node_config_parses():
    config = parse_config(three_nodes())

    assert config.id == "n1"
    assert [p.id for p in config.peers] == ["n2", "n3"]
    assert config.insecure is False
    assert config.raft == RaftConfig()
    assert config.batcher == BatcherConfig()
    assert config.journal_dir == os.path.join("/var/lib/raftseq/n1", "journal")
    assert config.raft_dir == os.path.join("/var/lib/raftseq/n1", "raft")
    assert config.peer_client_address("10.0.0.3:7101") == "10.0.0.3:7001"
    assert config.peer_client_address("10.0.0.1:7101") == "10.0.0.1:7001"
    assert config.peer_client_address("10.0.0.9:7101") == ""


def test_a_toml_file_loads_with_its_sections(tmp_path):
    config = load_config(write(tmp_path, VALID_TOML))

    assert config.raft.election_timeout_min_s == 0.5
    assert config.raft.election_timeout_max_s == 1.0
    assert config.batcher.entries_max == 500
    assert config.batcher.bytes_max == BatcherConfig().bytes_max
    assert config.journal.fsync == "interval_ms=200"
    assert [p.raft_address for p in config.peers] == ["10.0.0.2:7101", "10.0.0.3:7101"]


@pytest.mark.parametrize("peers", [0, 2, 4])
def test_one_three_and_five_node_clusters_parse(peers):
    raw = three_nodes()
    raw["peers"] = [{"id": f"p{i}", "raft_address": f"10.0.1.{i}:7101", "client_address": f"10.0.1.{i}:7001"} for i in range(peers)]
    assert len(parse_config(raw).peers) == peers


def test_no_secrets_are_needed_when_insecure():
    raw = three_nodes()
    del raw["raft_password"], raw["client_token"]
    config = parse_config({**raw, "insecure": True})
    assert config.insecure and config.raft_password == "" and config.client_token == ""


def test_batch_bytes_may_grow_with_the_raft_chunk_size():
    raw = changed("raft.append_entries_batch_bytes", 256 * limits.KIB)
    raw["batcher"] = {"bytes_max": 255 * limits.KIB}
    assert parse_config(raw).batcher.bytes_max == 255 * limits.KIB


# --- each problem names its field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (without("raft_password"), "raft_password"),
        (without("client_token"), "client_token"),
        (changed("raft_password", ""), "raft_password"),
        (without("data_dir"), "data_dir"),
        (without("peers"), "peers"),
    ],
    ids=["no-raft-password", "no-client-token", "empty-raft-password", "no-data-dir", "no-peers"],
)
def test_a_missing_setting_is_named(raw, named):
    assert named in refused(raw)


@pytest.mark.parametrize("password", ["pw", "raft secret", "x" * 15])
def test_a_short_raft_password_is_refused_and_says_why(password):
    problem = refused(changed("raft_password", password))
    assert "raft_password must be at least 16 characters" in problem and f"got {len(password)}" in problem, problem


def test_a_raft_password_of_16_characters_is_accepted():
    assert parse_config(changed("raft_password", "p" * 16)).raft_password == "p" * 16


@pytest.mark.parametrize("salt", ["not hex", "00" * 15, "00" * 65])
def test_a_raft_salt_that_is_not_16_to_64_bytes_of_hex_is_refused(salt):
    assert "raft_salt must be 16 to 64 bytes in hex" in refused(changed("raft_salt", salt))


def test_a_local_cluster_gets_a_salt_of_its_own_shared_by_its_nodes_and_kept_on_restart(tmp_path):
    configs = local_configs(str(tmp_path), 31000, insecure=False)
    salts = {c.raft_salt for c in configs}
    assert len(salts) == 1 and len(bytes.fromhex(salts.pop())) == 16
    again = local_configs(
        str(tmp_path),
        31000,
        insecure=False,
        secrets_from={"raft_password": configs[0].raft_password, "raft_salt": configs[0].raft_salt, "client_token": "t"},
    )
    assert {c.raft_salt for c in again} == {configs[0].raft_salt}
    assert local_configs(str(tmp_path), 31000, insecure=False)[0].raft_salt != configs[0].raft_salt


def test_duplicate_node_ids_are_refused():
    assert "node ids must be unique" in refused(with_peer(1, "id", "n1"))


@pytest.mark.parametrize(
    ("peer", "field", "address"),
    [
        (0, "raft_address", "10.0.0.1:7101"),  # a peer's raft address is ours
        (1, "client_address", "10.0.0.2:7001"),  # two peers share one
        (0, "raft_address", "10.0.0.1:7001"),  # a peer's raft address is our client address
    ],
)
def test_duplicate_addresses_are_refused(peer, field, address):
    assert "raft_address and client_address must be unique" in refused(with_peer(peer, field, address))


@pytest.mark.parametrize("peers", [1, 3])
def test_an_even_node_count_is_refused(peers):
    raw = three_nodes()
    raw["peers"] = [{"id": f"p{i}", "raft_address": f"10.0.1.{i}:7101", "client_address": f"10.0.1.{i}:7001"} for i in range(peers)]
    assert f"this one has {peers + 1}" in refused(raw)


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.8, 0.4), (0.5, 0.5), (0.01, 0.3), (0.4, 61.0), (-1.0, 0.4), (float("nan"), 0.8)],
    ids=["min-above-max", "min-equals-max", "min-too-small", "max-too-large", "negative", "nan"],
)
def test_bad_election_timeouts_are_refused(low, high):
    raw = three_nodes()
    raw["raft"] = {"election_timeout_min_s": low, "election_timeout_max_s": high}
    assert "election timeouts" in refused(raw)


def test_batch_bytes_above_the_raft_chunk_size_are_refused():
    # pysyncobj sends an entry at or above append_entries_batch_bytes through a broken path;
    # a batch must stay 1 KiB below it.
    raw = three_nodes()
    raw["batcher"] = {"bytes_max": 64 * limits.KIB - limits.KIB + 1}
    assert "batcher.bytes_max" in refused(raw)

    raw["batcher"] = {"bytes_max": 64 * limits.KIB - limits.KIB}
    assert parse_config(raw).batcher.bytes_max == 63 * limits.KIB


def test_batch_bytes_below_one_largest_submit_are_refused():
    raw = changed("batcher.bytes_max", limits.PAYLOAD_BYTES_MAX)
    assert "batcher.bytes_max" in refused(raw)


def test_a_lowered_raft_chunk_size_drags_batch_bytes_down_with_it():
    raw = changed("raft.append_entries_batch_bytes", 32 * limits.KIB)
    text = refused(raw)
    assert "batcher.bytes_max" in text


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("raft.append_entries_batch_bytes", 8 * limits.KIB, "raft.append_entries_batch_bytes"),
        ("batcher.entries_max", 0, "batcher.entries_max"),
        ("batcher.entries_max", limits.BATCH_ENTRIES_MAX + 1, "batcher.entries_max"),
        ("batcher.in_flight_max", 0, "batcher.in_flight_max"),
        ("batcher.in_flight_max", 65, "batcher.in_flight_max"),
        ("batcher.queue_entries_max", 0, "batcher.queue_entries_max"),
        ("gateway.heartbeat_interval_ms", 50, "gateway.heartbeat_interval_ms"),
        ("gateway.heartbeat_interval_ms", 3000, "gateway.heartbeat_interval_ms"),
        ("gateway.subscriber_buffer_bytes_max", limits.FRAME_BYTES_MAX - 1, "gateway.subscriber_buffer_bytes_max"),
        ("journal.segment_bytes_max", limits.SEGMENT_BYTES_MIN - 1, "journal.segment_bytes_max"),
        ("gateway.in_flight_bytes_per_connection_max", limits.PAYLOAD_BYTES_MAX - 1, "one payload"),
        ("batcher.held_bytes_max", 60 * limits.KIB - 1, "one full batch"),
        ("journal.verify_on_open_bytes", -1, "journal.verify_on_open_bytes"),
        ("journal.scrub_bytes_per_s", -1, "journal.scrub_bytes_per_s"),
        ("journal.scrub_bytes_per_s", limits.SCRUB_STEP_BYTES - 1, "journal.scrub_bytes_per_s"),
        ("journal.scrub_bytes_per_s", 2 * limits.GIB, "journal.scrub_bytes_per_s"),
        ("journal.repair_attempts_max", 0, "journal.repair_attempts_max"),
        ("raft.append_entries_period_s", 0.07, "above 3 x raft.append_entries_period_s"),
        ("raft.commit_notify_delay_s", -0.001, "raft.commit_notify_delay_s"),
        ("raft.commit_notify_delay_s", 0.06, "raft.commit_notify_delay_s"),
        ("machine.sessions_max", 0, "sessions_max"),
        ("machine.dedup_window", 0, "dedup_window"),
        ("machine.session_idle_s", 0, "session_idle"),
        ("machine.session_table_bytes_max", 1000, "session_table_bytes_max"),
        ("machine.session_evict_idle_s", 0, "session_evict_idle"),
    ],
)
def test_a_bound_out_of_range_is_named(path, value, named):
    assert named in refused(changed(path, value))


@pytest.mark.parametrize(
    "path",
    [
        "batcher.commit_timeout_s",
        "raft.tick_period_s",
        "raft.connection_timeout_s",
        "raft.commands_queue_size",
        "gateway.connections_max",
        "gateway.preauth_connections_max",
        "gateway.in_flight_bytes_per_connection_max",
        "batcher.held_bytes_max",
    ],
)
def test_a_bound_of_zero_is_refused(path):
    # Every bound has a usable range (DESIGN.md section 6): a commit timeout of 0 answers
    # every submit as unknown, a tick period of 0 spins, no connections serves nobody.
    assert path.split(".")[-1] in refused(changed(path, 0))


@pytest.mark.parametrize("text", ["always", "interval_ms=0", "interval_ms=-5", "interval_ms=", "interval_ms=abc", "NEVER", ""])
def test_bad_fsync_text_is_refused(text):
    assert "journal.fsync" in refused(changed("journal.fsync", text))


@pytest.mark.parametrize("text", ["never", "batch", "interval_ms=1", "interval_ms=250"])
def test_fsync_policies_parse(text):
    assert parse_config(changed("journal.fsync", text)).journal.fsync == text


@pytest.mark.parametrize(
    ("path", "named"),
    [("raft_pasword", "raft_pasword"), ("raft.election_timeout_s", "election_timeout_s"), ("batcher.bytes", "bytes")],
)
def test_unknown_keys_are_refused(path, named):
    text = refused(changed(path, 1))
    assert "unknown field" in text and named in text


def test_unknown_keys_in_a_peer_are_refused():
    assert "metrics_address" in refused(with_peer(0, "metrics_address", "10.0.0.2:7201"))


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("batcher.entries_max", 1.5, "entries_max"),
        ("batcher.entries_max", "100", "entries_max"),
        ("batcher.entries_max", True, "entries_max"),
        ("raft.election_timeout_min_s", "0.4", "election_timeout_min_s"),
        ("raft.append_entries_use_batch", 1, "append_entries_use_batch"),
        ("raft_password", 1234, "raft_password"),
        ("peers", {"id": "n2"}, "peers"),
        ("raft", "fast", "raft"),
    ],
)
def test_wrong_types_are_refused(path, value, named):
    assert named in refused(changed(path, value))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("raft_address", "10.0.0.1"),
        ("client_address", "10.0.0.1 :7001"),
        ("raft_address", "10.0.0.1:123456"),
        ("id", "n 1"),
        ("id", "x" * 33),
    ],
)
def test_malformed_addresses_and_ids_are_refused(field, value):
    assert field in refused(changed(field, value))


@pytest.mark.parametrize("port", [0, 65536, 99999])
def test_a_port_outside_1_to_65535_is_refused(port):
    assert "raft_address" in refused(changed("raft_address", f"10.0.0.1:{port}"))


# --- the file -------------------------------------------------------------------------------


def test_a_missing_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path)
    assert path in str(caught.value)


def test_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


def test_invalid_toml_is_a_config_error(tmp_path):
    path = write(tmp_path, 'id = "n1"\n[raft\nelection_timeout_min_s = 0.4\n')
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(path)
    assert path in str(caught.value)


def test_a_file_error_names_the_file_and_the_field(tmp_path):
    path = write(tmp_path, VALID_TOML.replace("entries_max = 500", "entries_max = 0"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert path in str(caught.value) and "batcher.entries_max" in str(caught.value)


@pytest.mark.parametrize("value", ["true", "false"])
def test_insecure_in_the_file_is_refused(tmp_path, value):
    path = write(tmp_path, f"insecure = {value}\n" + VALID_TOML)
    with pytest.raises(ConfigError, match="insecure"):
        load_config(path)


# --- to_toml --------------------------------------------------------------------------------


def awkward_config() -> NodeConfig:
    """A config with non-default values in every section and strings that need escaping."""
    raw = three_nodes()
    raw["raft_password"] = 'pass "with" quotes \\ and \t tab, ünïcode'
    raw["client_token"] = "token#not-a-comment"
    raw["data_dir"] = "/data/raft seq/n1"
    raw["raft"] = {"election_timeout_min_s": 0.16, "election_timeout_max_s": 0.3, "append_entries_use_batch": True}
    raw["batcher"] = {"entries_max": 17, "commit_timeout_s": 2.5, "in_flight_max": 4}
    raw["gateway"] = {"heartbeat_interval_ms": 250}
    raw["journal"] = {"fsync": "interval_ms=50", "segment_bytes_max": 1 << 20}
    raw["machine"] = {"dedup_window": 64}
    return parse_config(raw)


def test_to_toml_round_trips_through_load_config(tmp_path):
    config = awkward_config()

    loaded = load_config(write(tmp_path, to_toml(config)))

    assert loaded == config


def test_to_toml_round_trips_apart_from_the_insecure_flag(tmp_path):
    # What ``raftseq cluster up`` does: the insecure line is dropped, the node gets --insecure.
    config = awkward_config()
    body = to_toml(config).replace("insecure = true\n", "").replace("insecure = false\n", "")

    # An unused [tls] is left out (the release before knows none); it reads back as the default.
    written = {k: v for k, v in msgspec.to_builtins(config).items() if k != "insecure" and (k != "tls" or any(v.values()))}
    assert tomllib.loads(body) == written
    assert load_config(write(tmp_path, body)) == config


def test_to_toml_writes_every_section_and_peer():
    text = to_toml(parse_config(three_nodes()))
    data = tomllib.loads(text)
    assert set(data) >= {"raft", "batcher", "gateway", "journal", "machine", "peers"}
    assert [p["id"] for p in data["peers"]] == ["n2", "n3"]


# --- local cluster configs ------------------------------------------------------------------


def test_local_configs_are_valid_and_use_distinct_ports(tmp_path):
    configs = local_configs(str(tmp_path), 31000, insecure=False)

    assert [c.id for c in configs] == ["n1", "n2", "n3"]
    addresses = [a for c in configs for a in (c.raft_address, c.client_address, c.metrics_address)]
    assert len(set(addresses)) == 9
    assert len({a.rsplit(":", 1)[1] for a in addresses}) == 9
    for config in configs:
        assert config.problems() == []
        assert parse_config(msgspec.to_builtins(config)) == config
        assert {p.id for p in config.peers} == {"n1", "n2", "n3"} - {config.id}
        assert config.raft_password and config.client_token
        assert config.data_dir == os.path.join(str(tmp_path), config.id)
    # One cluster shares its secrets.
    assert len({c.raft_password for c in configs}) == 1
    assert len({c.client_token for c in configs}) == 1
    # Every node sees the same membership.
    memberships = [sorted([c.raft_address] + [p.raft_address for p in c.peers]) for c in configs]
    assert memberships[0] == memberships[1] == memberships[2]


def test_local_configs_round_trip_through_their_files(tmp_path):
    for config in local_configs(str(tmp_path), 31000, insecure=False):
        assert load_config(write(tmp_path, to_toml(config), f"{config.id}.toml")) == config


def test_local_configs_reuse_given_secrets(tmp_path):
    configs = local_configs(
        str(tmp_path), 31000, insecure=False, secrets_from={"raft_password": "kept raft password", "client_token": "kept too"}
    )
    assert {(c.raft_password, c.client_token) for c in configs} == {("kept raft password", "kept too")}


def test_insecure_local_configs_carry_no_secrets(tmp_path):
    configs = local_configs(str(tmp_path), 31000, insecure=True, secrets_from={"raft_password": "ignored"})
    assert all(c.insecure and c.raft_password == "" and c.client_token == "" for c in configs)


def test_local_configs_apply_overrides(tmp_path):
    overrides = {
        "raft": {"log_compaction_min_entries": 50, "election_timeout_min_s": 0.2},
        "batcher": {"entries_max": 10},
        "metrics_address": "",
    }
    before = copy.deepcopy(overrides)

    configs = local_configs(str(tmp_path), 31000, insecure=True, overrides=overrides)

    for config in configs:
        assert config.raft.log_compaction_min_entries == 50
        assert config.raft.election_timeout_min_s == 0.2
        assert config.raft.election_timeout_max_s == RaftConfig().election_timeout_max_s
        assert config.batcher.entries_max == 10
        assert config.batcher.bytes_max == BatcherConfig().bytes_max
        assert config.metrics_address == ""
    assert overrides == before


def test_local_configs_refuse_overrides_that_break_a_rule(tmp_path):
    with pytest.raises(ValueError, match="election timeouts"):
        local_configs(str(tmp_path), 31000, insecure=True, overrides={"raft": {"election_timeout_min_s": 5.0}})


def test_peer_config_is_frozen():
    peer = PeerConfig("n2", "10.0.0.2:7101", "10.0.0.2:7001")
    with pytest.raises(AttributeError):
        peer.id = "n9"  # type: ignore[misc]


# --- node keys (raft_key_file, raft_public_key) ------------------------------------------------


def keyed(tmp_path, *, mode: int = 0o600, text: str | None = None) -> dict:
    """``three_nodes()`` with node keys: n1's key file (0600 unless `mode`) and every public key."""
    from raftseq.cluster.config import node_key_text
    from raftseq.cluster.raft.link_cipher import new_node_key

    seed, public_key = new_node_key()
    path = tmp_path / "n1.key"
    path.write_text(node_key_text(seed, public_key) if text is None else text)
    path.chmod(mode)
    raw = three_nodes()
    raw["raft_key_file"] = str(path)
    raw["raft_public_key"] = public_key.hex()
    for peer in raw["peers"]:
        peer["raft_public_key"] = new_node_key()[1].hex()
    return raw


def refused_file(tmp_path, raw: dict) -> str:
    """The ConfigError text of loading ``raw`` from a file (which reads the key file)."""
    body = to_toml(msgspec.convert(raw, NodeConfig))
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, body))
    return str(caught.value)


def test_a_config_with_node_keys_loads(tmp_path):
    raw = keyed(tmp_path)
    config = load_config(write(tmp_path, to_toml(parse_config(raw))))
    assert config.has_identity() and config.raft_public_key == raw["raft_public_key"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda raw: raw["peers"][1].pop("raft_public_key"), "missing peers[n3].raft_public_key"),
        (lambda raw: raw.pop("raft_key_file"), "missing raft_key_file"),
        (lambda raw: raw["peers"][0].update(raft_public_key="abc"), "peers[n2].raft_public_key must be 32 bytes in hex"),
        (lambda raw: raw["peers"][0].update(raft_public_key=raw["raft_public_key"]), "some nodes share one"),
        (lambda raw: raw.pop("raft_password"), "node identity needs raft_password"),
    ],
    ids=["a peer without a key", "no key file", "a key that is not hex", "a shared key", "no password"],
)
def test_node_key_settings_that_do_not_fit_are_one_clear_line(tmp_path, change, expected):
    raw = keyed(tmp_path)
    change(raw)
    text = refused(raw)
    assert expected in text and "\n" not in text, text


@pytest.mark.parametrize(
    "how, expected",
    [
        ("mode 0644", "mode 0644 lets others read the node's private key; chmod 600 it"),
        ("missing", "cannot read it: No such file or directory"),
        ("not a key file", "not a node key file"),
        ("another node's key", "not this node's raft_public_key"),
    ],
)
def test_a_node_key_file_that_cannot_be_used_is_one_clear_line(tmp_path, how, expected):
    raw = keyed(tmp_path, mode=0o644 if how == "mode 0644" else 0o600, text="garbage\n" if how == "not a key file" else None)
    if how == "missing":
        raw["raft_key_file"] = str(tmp_path / "no-such.key")
    if how == "another node's key":
        from raftseq.cluster.raft.link_cipher import new_node_key

        raw["raft_public_key"] = new_node_key()[1].hex()
    text = refused_file(tmp_path, raw)
    assert expected in text and "raft_key_file" in text and "\n" not in text, text


def test_a_local_cluster_has_node_keys_kept_across_restarts(tmp_path):
    configs = local_configs(str(tmp_path), 31000, insecure=False)
    public_keys = [c.raft_public_key for c in configs]
    assert len(set(public_keys)) == 3 and all(len(bytes.fromhex(key)) == 32 for key in public_keys)
    for config in configs:
        assert {p.raft_public_key for p in config.peers} == set(public_keys) - {config.raft_public_key}
        assert os.stat(config.raft_key_file).st_mode & 0o777 == 0o600
        assert load_config(write(tmp_path, to_toml(config), f"{config.id}.toml")) == config
    assert [c.raft_public_key for c in local_configs(str(tmp_path), 31000, insecure=False)] == public_keys
    assert not any(c.has_identity() for c in local_configs(str(tmp_path / "insecure"), 31000, insecure=True))


def test_local_cluster_secrets_never_start_with_a_dash(tmp_path, monkeypatch):
    """A local cluster's token is pasted after ``--token``; one starting with "-" (1 in 64 of
    ``token_urlsafe``) read as an option and failed a test now and then."""
    import secrets

    made = iter(["-password-dash-first", "password-without-dash", "-token-dash", "token-without-dash"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes: next(made))
    config = local_configs(str(tmp_path), 31000, insecure=False)[0]
    assert not config.client_token.startswith("-") and not config.raft_password.startswith("-")
    assert (config.raft_password, config.client_token) == ("password-without-dash", "token-without-dash")
