"""The client's errors, in one place: every one is a ``SequencerError``.

* ``Rejected`` — the sequencer refused a submit or a request for good (``reason``). Its
  subclasses ``TokenRequired`` (this client sent no token; the cluster wants one) and
  ``TokenRejected`` (the cluster does not accept the token sent) are both
  ``AuthenticationError``: no other node would answer differently, so they are raised at once.
* ``NotConnected`` — no node could be reached; ``ClientClosed`` (a ``NotConnected``) — the
  client was closed and is not reopened by a later call.
  ``SessionConflict`` (a ``Rejected``): a submit under a client_seq the session already used
  for another payload (two clients on one session); ``SessionTakenOver`` (a ``Rejected``):
  another client said hello for this session since, and this one stops.
  ``SessionForgotten`` (a ``Rejected``): the cluster expects a client_seq this client already
  had acknowledged; the session's acknowledged submits are gone from it, and this client stops.
* ``Busy`` — the client's own window of in-flight submits is full.
* ``OutcomeUnknown`` — no answer within the deadline; the submit may still be sequenced.
* ``Truncated`` — a subscription asked for numbers that retention removed on every node it
  reached; ``first_seq`` is the first one still held (start from a snapshot, or an archive).
"""

from __future__ import annotations

from raftseq.sequencer.protocol import RejectReason


class SequencerError(Exception):
    """Base of the client's errors."""


class Rejected(SequencerError):
    """The sequencer refused a submit or request for good. ``reason`` is a ``RejectReason``."""

    def __init__(self, reason: RejectReason, detail: str = "", *, expected_client_seq: int = 0) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.expected_client_seq = expected_client_seq


class AuthenticationError(Rejected):
    """The cluster refused this client's token (``reason`` is ``AUTH_FAILED``): retrying, on
    this node or another, cannot help until the token is changed."""

    #: What the error says before the node's own detail.
    summary = "the cluster refused the client token"

    def __init__(self, detail: str = "") -> None:
        super().__init__(RejectReason.AUTH_FAILED, detail)

    def __str__(self) -> str:
        return f"{self.summary} ({super().__str__()})"


class TokenRequired(AuthenticationError):
    """The cluster requires a client token and this client sent none (``token=""``; set
    ``token=`` or ``$RAFTSEQ_TOKEN``)."""

    summary = "the cluster requires a client token and none was given"


class TokenRejected(AuthenticationError):
    """The cluster does not accept the token this client sent (a wrong or an old token)."""

    summary = "the cluster rejected the client token"


def authentication_error(token: str, detail: str = "") -> AuthenticationError:
    """The error for an ``AUTH_FAILED`` answer to a hello that carried `token`: whether a token
    was sent tells the two cases apart, whatever the node's version says in its detail."""
    return TokenRejected(detail) if token else TokenRequired(detail)


class SessionConflict(Rejected):
    """This submit's client_seq was already sequenced for the session with another payload:
    another client is using the same session name. Nothing was sequenced for this submit."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(RejectReason.SESSION_CONFLICT, detail)


class SessionTakenOver(Rejected):
    """Another client said hello for this session after this one, and took it over. This
    client stops (it does not reconnect): its submits not yet acknowledged fail with this
    error, and were not sequenced after the takeover (one may have been sequenced before it
    and its acknowledgement lost with the connection)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(RejectReason.SESSION_TAKEN_OVER, detail)


class SessionForgotten(Rejected):
    """The cluster no longer holds this session's acknowledged submits: it expects
    ``expected_client_seq`` next, and this client had client_seq up to ``last_acked``
    acknowledged. The sequencer forgets a session idle for ``session_idle_s`` (or evicted from
    a full table, ``docs/sessions.md``); a power cut of every node of a cluster in the
    ``crash`` durability loses what no node had fsynced (numbering then restarts lower).

    Resending cannot help (every submit would be refused as ``sequence_gap``), so the client
    stops: its unacknowledged submits fail with this error (none was sequenced under this
    session after the loss) and so does every later call. To go on, close it and make a new
    client, under the same session name or another: a new client starts at the client_seq
    the cluster expects. Whether acknowledged messages were lost is for the application to
    check (subscribe, and compare with what it was acknowledged)."""

    def __init__(self, session: str, expected_client_seq: int, last_acked: int) -> None:
        super().__init__(
            RejectReason.SEQUENCE_GAP,
            f"the cluster expects client_seq {expected_client_seq} of session {session!r}, which had up to "
            f"{last_acked} acknowledged: the session's acknowledged submits are gone from the cluster "
            "(forgotten after idling or eviction, or lost in a power cut of a cluster in the crash durability); "
            "make a new client to go on",
            expected_client_seq=expected_client_seq,
        )
        self.session = session
        self.last_acked = last_acked


def rejection(reason: RejectReason, detail: str = "", *, expected_client_seq: int = 0) -> Rejected:
    """The error for a ``Rejected`` frame: the typed subclass where there is one."""
    if reason is RejectReason.SESSION_CONFLICT:
        return SessionConflict(detail)
    if reason is RejectReason.SESSION_TAKEN_OVER:
        return SessionTakenOver(detail)
    return Rejected(reason, detail, expected_client_seq=expected_client_seq)


class NotConnected(SequencerError):
    """No node could be reached (or the client is closed: ``ClientClosed``)."""


class ClientClosed(NotConnected):
    """The client was closed (``close``): every call after it fails at once with this error; a
    closed client never connects again (make a new one)."""

    def __init__(self, detail: str = "the client is closed") -> None:
        super().__init__(detail)


class Busy(SequencerError):
    """The client's own window of in-flight submits is full (``in_flight_max``)."""


class OutcomeUnknown(SequencerError):
    """No answer within the deadline. The submit may still be sequenced (exactly once): the
    client keeps resubmitting it under the same client_seq while it runs."""

    def __init__(self, client_seq: int, waited_s: float) -> None:
        super().__init__(f"client_seq {client_seq}: no outcome after {waited_s:.1f} s")
        self.client_seq = client_seq


class Truncated(SequencerError):
    """The stream from ``from_seq`` is no longer held: retention removed every number before
    ``first_seq`` on each node asked (``protocol.Truncated``). Subscribing again from
    ``first_seq`` works; what came before is in the operators' archive, and a state machine can
    start from a snapshot (``clients.sm``'s late joiner does so by itself)."""

    def __init__(self, from_seq: int, first_seq: int) -> None:
        super().__init__(f"the stream from seq {from_seq} is truncated: the first number still held is {first_seq}")
        self.from_seq = from_seq
        self.first_seq = first_seq


__all__ = [
    "AuthenticationError",
    "Busy",
    "ClientClosed",
    "NotConnected",
    "OutcomeUnknown",
    "Rejected",
    "SequencerError",
    "SessionConflict",
    "SessionForgotten",
    "SessionTakenOver",
    "TokenRejected",
    "TokenRequired",
    "Truncated",
    "authentication_error",
    "rejection",
]
