"""The client library as a new user first meets it: no ``with``, endpoints as a string or from
the environment, a missing or a wrong token, a closed client.

Endpoint parsing and the closed client are unit tests; first use and the token errors run
against one real three-node cluster (``ClusterHarness``), each call bounded well below the
client's 30 s outcome deadline so that a client that waits instead of connecting fails fast.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from cluster_harness import ClusterHarness, RawConnection, module_cluster

from raftseq.clients import (
    DEFAULT_ENDPOINTS,
    AuthenticationError,
    BlockingSequencerClient,
    ClientClosed,
    NotConnected,
    Rejected,
    SequencerClient,
    TokenRejected,
    TokenRequired,
    subscribe,
)
from raftseq.clients.endpoints import (
    ENDPOINTS_ENV,
    TOKEN_ENV,
    endpoint_addresses,
    endpoints_from_env,
    format_endpoint,
    parse_endpoints,
    token_from_env,
)
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

#: What one call may take against a healthy local cluster; also the outcome deadline of the
#: clients below, so that one that waits instead of connecting fails in this time, not in 30 s.
CALL_BOUND_S = 10.0
#: A refused token is answered in the handshake: no retries, no waiting for a deadline.
REFUSAL_BOUND_S = 3.0
UNREACHABLE = "127.0.0.1:9"  # never dialled by the tests that use it


# --- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.1:7001,10.0.0.2:7002",
        " 10.0.0.1:7001 , 10.0.0.2:7002 ",
        ["10.0.0.1:7001", "10.0.0.2:7002"],
        [("10.0.0.1", 7001), ("10.0.0.2", 7002)],
        (("10.0.0.1", "7001"), "10.0.0.2:7002"),
    ],
)
def test_endpoints_are_a_comma_separated_string_a_list_of_strings_or_host_port_pairs(value):
    assert parse_endpoints(value) == [("10.0.0.1", 7001), ("10.0.0.2", 7002)]
    assert endpoint_addresses(value) == ["10.0.0.1:7001", "10.0.0.2:7002"]


def test_an_ipv6_endpoint_is_written_in_brackets():
    assert parse_endpoints("[::1]:7001,[fe80::2]:7002") == [("::1", 7001), ("fe80::2", 7002)]
    assert format_endpoint("::1", 7001) == "[::1]:7001"
    assert endpoint_addresses([("::1", 7001)]) == ["[::1]:7001"]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("a:1,b", "'b'"),
        ("a:1,,b:2", "empty endpoint"),
        ("", "no endpoints"),
        ([], "no endpoints"),
        (["a:1", "b:0"], "'b:0'"),
        (["a:1", "b:65536"], "'b:65536'"),
        (["a:1", "b:x"], "'b:x'"),
        (["a:1,b:2"], "'a:1,b:2'"),
        (["a b:1"], "'a b:1'"),
        ([":1"], "':1'"),
        (["::1:7001"], "brackets"),
        ([("a", 1, 2)], "('a', 1, 2)"),
        ([("a", True)], "('a', True)"),
        ([("", 1)], "('', 1)"),
        ([7001], "7001"),
        (7001, "7001"),
        (b"a:1", "b'a:1'"),
    ],
)
def test_a_bad_endpoint_is_a_value_error_that_names_it(value, named):
    with pytest.raises(ValueError) as bad:
        parse_endpoints(value)
    assert named in str(bad.value)


def test_the_environment_names_the_cluster_and_its_token_else_the_local_cluster():
    assert ENDPOINTS_ENV == "RAFTSEQ_ENDPOINTS" and TOKEN_ENV == "RAFTSEQ_TOKEN"
    assert DEFAULT_ENDPOINTS == "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    assert endpoints_from_env({}) == [("127.0.0.1", 7101), ("127.0.0.1", 7102), ("127.0.0.1", 7103)]
    assert token_from_env({}) == ""
    environ = {ENDPOINTS_ENV: "h1:7001,h2:7001", TOKEN_ENV: "s3cret"}
    assert endpoints_from_env(environ) == [("h1", 7001), ("h2", 7001)]
    assert token_from_env(environ) == "s3cret"
    for malformed in ("h1:7001,h2", ""):
        with pytest.raises(ValueError, match=r"\$RAFTSEQ_ENDPOINTS"):
            endpoints_from_env({ENDPOINTS_ENV: malformed})


def test_a_client_takes_its_endpoints_in_every_form_and_from_the_environment():
    assert SequencerClient("a:1,b:2", session="s").endpoints == ["a:1", "b:2"]
    assert SequencerClient([("a", 1), ("b", 2)], session="s").endpoints == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="'b'"):
        SequencerClient("a:1,b", session="s")

    environ = {ENDPOINTS_ENV: "h1:7001,h2:7001", TOKEN_ENV: "s3cret"}
    client = SequencerClient.from_env(session="s", environ=environ, in_flight_max=5)
    assert (client.endpoints, client.token, client.session, client.in_flight_max) == (["h1:7001", "h2:7001"], "s3cret", "s", 5)
    assert SequencerClient.from_env(session="s", environ=environ, token="given").token == "given"
    assert SequencerClient.from_env(session="s", environ={}).endpoints == DEFAULT_ENDPOINTS.split(",")
    with pytest.raises(ValueError, match=r"\$RAFTSEQ_ENDPOINTS"):
        SequencerClient.from_env(session="s", environ={ENDPOINTS_ENV: "h1"})

    blocking = BlockingSequencerClient("a:1,b:2", session="s")
    try:
        with pytest.raises(ValueError, match="'b'"):
            BlockingSequencerClient("a:1,b", session="s")
    finally:
        blocking.close()
    blocking = BlockingSequencerClient.from_env(session="s", environ=environ)
    blocking.close()


# --- before the first connection, after close -----------------------------------------------


def test_submit_nowait_before_the_first_connection_raises_not_connected_at_once():
    async def scenario() -> None:
        client = SequencerClient(UNREACHABLE, session="s")
        with pytest.raises(NotConnected, match="connect"):
            client.submit_nowait(b"x")
        with pytest.raises(NotConnected, match="connect"):
            client.submit_batch_nowait([b"x", b"y"])
        assert client.in_flight == 0 and client.next_client_seq == 1
        await client.close()

    asyncio.run(asyncio.wait_for(scenario(), REFUSAL_BOUND_S))


def test_a_closed_client_fails_every_call_at_once_and_never_reconnects():
    async def scenario() -> None:
        client = SequencerClient(UNREACHABLE, session="s")
        await client.close()
        await client.close()  # twice is harmless
        for call in (client.connect(), client.submit(b"x"), client.submit_batch([b"x"])):
            with pytest.raises(ClientClosed):
                await call
        with pytest.raises(ClientClosed):
            client.submit_nowait(b"x")
        with pytest.raises(ClientClosed):
            await anext(client.subscribe())
        assert issubclass(ClientClosed, NotConnected)

    asyncio.run(asyncio.wait_for(scenario(), REFUSAL_BOUND_S))

    blocking = BlockingSequencerClient(UNREACHABLE, session="s")
    blocking.close()
    blocking.close()
    began = time.monotonic()
    for call in (lambda: blocking.submit(b"x"), lambda: blocking.submit_many([b"x"]), blocking.connect, lambda: next(blocking.subscribe())):
        with pytest.raises(ClientClosed):
            call()
    assert time.monotonic() - began < REFUSAL_BOUND_S


# --- against a real cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> ClusterHarness:
    """One three-node cluster (with a token) for every test below; stopped at the end."""
    with module_cluster(str(tmp_path_factory.mktemp("first-use") / "c")) as harness:
        yield harness


def test_a_blocking_client_used_without_with_connects_on_first_use(cluster):
    # As the README shows it: made, used, closed; no ``with`` and no connect().
    options = {"token": cluster.token, "outcome_deadline_s": CALL_BOUND_S}
    client = BlockingSequencerClient(",".join(cluster.endpoints), session="first-blocking", **options)
    try:
        began = time.monotonic()
        first = client.submit(b"one")
        assert time.monotonic() - began < CALL_BOUND_S
        assert client.submit_many([b"two", b"three"]) == [first + 1, first + 2]
        assert [m.payload for m in client.subscribe(first, limit=3, timeout_s=CALL_BOUND_S)] == [b"one", b"two", b"three"]
    finally:
        client.close()

    client = BlockingSequencerClient(cluster.endpoints, session="first-blocking-many", **options)
    try:
        seqs = client.submit_many([b"a", b"b"])  # its first call
        assert seqs[1] == seqs[0] + 1
    finally:
        client.close()


def test_an_async_client_used_without_async_with_connects_on_first_use(cluster):
    options = {"token": cluster.token, "outcome_deadline_s": CALL_BOUND_S}

    async def scenario() -> None:
        client = SequencerClient(cluster.endpoints, session="first-async", **options)
        try:
            seq = await client.submit(b"one")
            assert client.connected
            assert await client.submit_batch([b"two", b"three"]) == [seq + 1, seq + 2]
            assert (await client.submit_nowait(b"four")) == seq + 3  # connected now: nowait works
        finally:
            await client.close()

        # Concurrent first calls share one connection: one session, numbered once.
        client = SequencerClient(cluster.endpoints, session="first-async-concurrent", **options)
        try:
            seqs = await asyncio.gather(*(client.submit(b"c%d" % i) for i in range(5)))
            assert len(set(seqs)) == 5 and client.next_client_seq == 6 and client.reconnects == 0
        finally:
            await client.close()

        # The batch call is a first use too, and so is a client built from the environment.
        environ = {"RAFTSEQ_ENDPOINTS": ",".join(cluster.endpoints), "RAFTSEQ_TOKEN": cluster.token}
        client = SequencerClient.from_env(session="first-env", environ=environ, outcome_deadline_s=CALL_BOUND_S)
        try:
            seqs = await client.submit_batch([b"x", b"y"])
            assert seqs[1] == seqs[0] + 1
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 3 * CALL_BOUND_S))


@pytest.mark.parametrize(("token", "error"), [("", TokenRequired), ("not-the-token", TokenRejected)])
def test_a_missing_and_a_wrong_token_are_different_errors_raised_at_once(cluster, token, error):
    async def refused(call) -> AuthenticationError:
        began = time.monotonic()
        with pytest.raises(error) as raised:
            await asyncio.wait_for(call, REFUSAL_BOUND_S)
        assert time.monotonic() - began < REFUSAL_BOUND_S
        return raised.value

    async def scenario() -> list[AuthenticationError]:
        client = SequencerClient(cluster.endpoints, session="intruder", token=token)
        try:
            errors = [await refused(client.connect()), await refused(client.submit(b"x"))]
            errors.append(await refused(anext(client.subscribe())))
        finally:
            await client.close()
        errors.append(await refused(anext(subscribe(cluster.endpoints, token=token))))
        return errors

    errors = asyncio.run(scenario())
    blocking = BlockingSequencerClient(cluster.endpoints, session="intruder", token=token)
    try:
        with pytest.raises(error) as raised:
            blocking.submit(b"x")
        errors.append(raised.value)
    finally:
        blocking.close()
    for refusal in errors:
        # Still a Rejected(auth_failed), as code written for earlier clients expects.
        assert isinstance(refusal, AuthenticationError) and isinstance(refusal, Rejected)
        assert refusal.reason is RejectReason.AUTH_FAILED
        assert not isinstance(refusal, NotConnected)
    other = TokenRejected if error is TokenRequired else TokenRequired
    assert not any(isinstance(refusal, other) for refusal in errors)


def test_a_hello_without_a_token_is_refused_as_every_client_version_knows_it(cluster):
    # The wire: one reason for both cases (an old client sees a refusal either way); the
    # detail tells them apart for people reading it.
    with RawConnection(cluster.endpoints[0]) as conn:
        answer = conn.hello("old-client", "")
        assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.AUTH_FAILED, answer
        assert "token is required" in answer.detail
        assert conn.frames_until_closed() == []
    with RawConnection(cluster.endpoints[0]) as conn:
        answer = conn.hello("old-client", "not-the-token")
        assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.AUTH_FAILED, answer
        assert answer.detail == "wrong token"
