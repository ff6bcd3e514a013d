"""What applications use to talk to a raftseq cluster. Imports ``sequencer.protocol`` only.

from raftseq.clients import SequencerClient
async with SequencerClient("127.0.0.1:7101,127.0.0.1:7102", session="oms-1", token="...") as client:
    seq = await client.submit(b"payload")
    async for m in client.subscribe(from_seq=1):
        ...

``SequencerClient.from_env(session=...)`` reads ``$RAFTSEQ_ENDPOINTS`` and ``$RAFTSEQ_TOKEN``
(``clients.endpoints``). Errors are ``SequencerError``s (``clients.errors``); a refused token is
an ``AuthenticationError``: ``TokenRequired`` or ``TokenRejected``. ``tls=TlsOptions(...)``
reaches TLS ports (``clients.tls``).
"""

from raftseq.clients.blocking import BlockingSequencerClient
from raftseq.clients.client import Message, SequencerClient, subscribe
from raftseq.clients.connection import Connection, open_connection
from raftseq.clients.endpoints import DEFAULT_ENDPOINTS, ENDPOINTS_ENV, TOKEN_ENV, endpoints_from_env, parse_endpoints, token_from_env
from raftseq.clients.errors import (
    AuthenticationError,
    Busy,
    ClientClosed,
    NotConnected,
    OutcomeUnknown,
    Rejected,
    SequencerError,
    SessionConflict,
    SessionForgotten,
    SessionTakenOver,
    TokenRejected,
    TokenRequired,
    Truncated,
)
from raftseq.clients.tls import TlsError, TlsHandshakeFailed, TlsNotOffered, TlsOptions, TlsRequired, tls_from_env
from raftseq.sequencer.version import __version__

__all__ = [
    "__version__",
    "AuthenticationError",
    "BlockingSequencerClient",
    "Busy",
    "ClientClosed",
    "Connection",
    "DEFAULT_ENDPOINTS",
    "ENDPOINTS_ENV",
    "Message",
    "NotConnected",
    "OutcomeUnknown",
    "Rejected",
    "SequencerClient",
    "SequencerError",
    "SessionConflict",
    "SessionForgotten",
    "SessionTakenOver",
    "TOKEN_ENV",
    "TlsError",
    "TlsHandshakeFailed",
    "TlsNotOffered",
    "TlsOptions",
    "TlsRequired",
    "TokenRejected",
    "TokenRequired",
    "Truncated",
    "endpoints_from_env",
    "open_connection",
    "parse_endpoints",
    "subscribe",
    "tls_from_env",
    "token_from_env",
]
