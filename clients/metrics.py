"""Opt-in Prometheus metrics of raftseq clients: reconnects, resubmits, failovers and their
duration, silent leaders left, submit outcomes, subscription resumes.

The only module of ``clients/`` that imports ``prometheus_client``; ``import clients`` does not
import it. Clients count in plain integers on themselves (see ``clients.client``); a
``ClientMetricsCollector`` reads those counters when it is scraped and adds up every client
given to it, so nothing on a client's hot path touches a metrics library or a lock.

Usage — create one collector, register it with your registry, give it to your clients::

    from prometheus_client import REGISTRY
    from raftseq.clients import SequencerClient
    from raftseq.clients.metrics import ClientMetricsCollector
    collector = ClientMetricsCollector()  # aggregates every client given it
    REGISTRY.register(collector)  # or your own CollectorRegistry
    client = SequencerClient(endpoints, session="oms-1", token=token, metrics=collector)

``subscribe(endpoints, ..., metrics=collector)`` counts that subscription's resumes (a
client's own ``client.subscribe`` reports to the client's collector). ``BlockingSequencerClient``
passes ``metrics=`` through to its ``SequencerClient``.

Labels are bounded: never a session name. To tell groups of clients apart, declare the values
of a ``client`` label up front, ``ClientMetricsCollector(client_labels=("oms", "router"))``, and
give each client ``metrics=collector.labelled("oms")``; every sample then carries ``client``
(clients given the collector itself carry ``client=""``, which Prometheus reads as no label).

Counters stay monotonic: a closed client's counts are folded into the collector's totals. A
client attached and never closed stays referenced by the collector (as it does by its own
connection task). ``METRICS`` lists every family exported (name, type, labels besides
``client``, help).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from raftseq.clients.client import FAILOVER_BUCKETS_S, ClientMetricsSink, SequencerClient
from raftseq.sequencer.protocol import RejectReason

#: At most this many values of the ``client`` label per collector.
CLIENT_LABELS_MAX = 32
#: At most this many characters in a ``client`` label value.
CLIENT_LABEL_CHARS_MAX = 64

REJECT_REASONS = tuple(reason.value for reason in RejectReason)


class MetricSpec(NamedTuple):
    name: str
    type: str  # "gauge", "counter" or "histogram"
    labels: tuple[str, ...]  # besides "client" (when declared) and "le" of a histogram
    help: str


METRICS = (
    MetricSpec("raftseq_client_reconnects_total", "counter", (), "Times a client lost its leader connection and began to reconnect"),
    MetricSpec(
        "raftseq_client_resubmits_total",
        "counter",
        (),
        "Submits sent again under their client_seq (after a lost connection, NotLeader, Busy, OutcomeUnknown or a sequence gap)",
    ),
    MetricSpec(
        "raftseq_client_failovers_total",
        "counter",
        (),
        "Times a client, having lost its leader connection, was connected to a leader again",
    ),
    MetricSpec(
        "raftseq_client_failover_duration_seconds",
        "histogram",
        (),
        "From noticing a lost leader connection to being connected to a leader again",
    ),
    MetricSpec(
        "raftseq_client_silent_leaders_left_total",
        "counter",
        (),
        "Leader connections left because the other nodes named another leader while this one acknowledged nothing",
    ),
    MetricSpec("raftseq_client_submits_acked_total", "counter", (), "Submits acknowledged with a sequence number"),
    MetricSpec(
        "raftseq_client_submits_outcome_unknown_total",
        "counter",
        (),
        "Submits whose caller got OutcomeUnknown (no outcome in outcome_deadline_s; still resubmitted, may yet be acknowledged)",
    ),
    MetricSpec("raftseq_client_submits_rejected_total", "counter", ("reason",), "Submits refused for good by the sequencer, by reason"),
    MetricSpec(
        "raftseq_client_subscription_resumes_total",
        "counter",
        (),
        "Times an interrupted subscription reached a node again and asked for the stream from its next number",
    ),
    MetricSpec("raftseq_client_sessions", "gauge", (), "Clients attached to this collector and not closed"),
    MetricSpec("raftseq_client_sessions_connected", "gauge", (), "Attached clients connected to the leader now"),
    MetricSpec("raftseq_client_in_flight_submits", "gauge", (), "Submits of attached clients not yet acknowledged or failed"),
)

_SPECS = {spec.name: spec for spec in METRICS}
_FAMILY_TYPES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


class _Totals:
    """The counts of one ``client`` label value, summed over clients."""

    __slots__ = (
        "reconnects",
        "resubmits",
        "failovers",
        "silent_leaders_left",
        "failover_counts",
        "failover_sum_s",
        "acked",
        "outcome_unknown",
        "rejected",
    )

    def __init__(self) -> None:
        self.reconnects = 0
        self.resubmits = 0
        self.failovers = 0
        self.silent_leaders_left = 0
        self.failover_counts = [0] * (len(FAILOVER_BUCKETS_S) + 1)
        self.failover_sum_s = 0.0
        self.acked = 0
        self.outcome_unknown = 0
        self.rejected = dict.fromkeys(RejectReason, 0)

    def copy(self) -> _Totals:
        other = _Totals()
        other.add(self)
        return other

    def add(self, other: _Totals) -> None:
        self.reconnects += other.reconnects
        self.resubmits += other.resubmits
        self.failovers += other.failovers
        self.silent_leaders_left += other.silent_leaders_left
        self.failover_counts = [a + b for a, b in zip(self.failover_counts, other.failover_counts)]
        self.failover_sum_s += other.failover_sum_s
        self.acked += other.acked
        self.outcome_unknown += other.outcome_unknown
        for reason, count in other.rejected.items():
            self.rejected[reason] += count

    @classmethod
    def of(cls, client: SequencerClient) -> _Totals:
        """The counts of one client, read from its plain counters (from any thread)."""
        totals = cls()
        totals.reconnects = client.reconnects
        totals.resubmits = client.resubmits
        totals.failovers = client.failovers
        totals.silent_leaders_left = client.silent_leaders_left
        histogram = client.failover_durations
        totals.failover_counts = list(histogram.counts)
        totals.failover_sum_s = histogram.sum_s
        totals.acked = client.submits_acked
        totals.outcome_unknown = client.submits_outcome_unknown
        for reason, count in client.submits_rejected.items():
            totals.rejected[reason] += count
        return totals


class _Labelled:
    """A view of a collector that attaches clients (and counts resumes) under one ``client``
    label value."""

    def __init__(self, collector: ClientMetricsCollector, label: str) -> None:
        self._collector = collector
        self.label = label

    def attach(self, client: SequencerClient) -> None:
        self._collector._attach(client, self.label)

    def detach(self, client: SequencerClient) -> None:
        self._collector._detach(client)

    def subscription_resumed(self) -> None:
        self._collector._resumed(self.label)

    def __repr__(self) -> str:
        return f"<ClientMetricsCollector view client={self.label!r}>"


class ClientMetricsCollector:
    """A prometheus_client custom collector over any number of raftseq clients.

    Pass it (or, with ``client_labels``, ``labelled(value)``) as ``metrics=`` to
    ``SequencerClient`` and ``subscribe``, and register it with a registry. Thread-safe: clients
    on any event loop or thread may share one collector; the scrape may run on another thread.
    """

    def __init__(self, *, client_labels: Sequence[str] = ()) -> None:
        if isinstance(client_labels, str):
            raise TypeError("client_labels is a sequence of label values, not one string")
        labels = tuple(client_labels)
        if len(labels) > CLIENT_LABELS_MAX:
            raise ValueError(f"{len(labels)} client labels exceed CLIENT_LABELS_MAX {CLIENT_LABELS_MAX}")
        for label in labels:
            if not isinstance(label, str) or not 1 <= len(label) <= CLIENT_LABEL_CHARS_MAX or not label.isprintable():
                raise ValueError(f"client label {label!r} must be 1..{CLIENT_LABEL_CHARS_MAX} printable characters")
        if len(set(labels)) != len(labels):
            raise ValueError(f"client labels repeat: {labels}")
        self.client_labels = labels
        # Clients given the collector itself are kept under the key "" (client="" if labelled).
        keys = ("", *labels)
        self._lock = threading.Lock()
        self._clients: dict[int, tuple[str, SequencerClient]] = {}
        self._retired = {key: _Totals() for key in keys}
        self._resumes = dict.fromkeys(keys, 0)
        self._bare_used = not labels
        self._views = {label: _Labelled(self, label) for label in labels}

    def labelled(self, client: str) -> ClientMetricsSink:
        """The sink that files clients under ``client=<client>`` (a declared label value)."""
        try:
            return self._views[client]
        except KeyError:
            raise ValueError(f"client label {client!r} was not declared (client_labels={self.client_labels})") from None

    # --- the sink (ClientMetricsSink), unlabelled ---------------------------------------------

    def attach(self, client: SequencerClient) -> None:
        self._attach(client, "")

    def detach(self, client: SequencerClient) -> None:
        self._detach(client)

    def subscription_resumed(self) -> None:
        self._resumed("")

    def _attach(self, client: SequencerClient, key: str) -> None:
        with self._lock:
            self._clients[id(client)] = (key, client)
            self._bare_used |= key == ""

    def _detach(self, client: SequencerClient) -> None:
        """Fold the client's final counts into the totals, so that counters never go down."""
        with self._lock:
            entry = self._clients.pop(id(client), None)
            if entry is not None:
                self._retired[entry[0]].add(_Totals.of(client))

    def _resumed(self, key: str) -> None:
        with self._lock:
            self._resumes[key] += 1
            self._bare_used |= key == ""

    def _keys(self) -> tuple[str, ...]:
        """The label values exported: every declared one, and "" once a client or subscription
        was given the collector itself (always, when no label is declared)."""
        return ("", *self.client_labels) if self._bare_used else self.client_labels

    # --- the prometheus_client collector ------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The families without samples (what a registry checks names against)."""
        for spec in METRICS:
            yield _FAMILY_TYPES[spec.type](spec.name, spec.help, labels=self._label_names(spec))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            keys = self._keys()
            totals = {key: retired.copy() for key, retired in self._retired.items()}
            resumes = dict(self._resumes)
            sessions = dict.fromkeys(totals, 0)
            connected = dict.fromkeys(totals, 0)
            in_flight = dict.fromkeys(totals, 0)
            for key, client in self._clients.values():
                totals[key].add(_Totals.of(client))
                sessions[key] += 1
                connected[key] += 1 if client.connected else 0
                in_flight[key] += client.in_flight

        def family(name: str, values: dict[str, float]) -> Metric:
            spec = _SPECS[name]
            result = _FAMILY_TYPES[spec.type](name, spec.help, labels=self._label_names(spec))
            for key in keys:
                result.add_metric(self._label_values(key), values[key])
            return result

        yield family("raftseq_client_reconnects_total", {k: t.reconnects for k, t in totals.items()})
        yield family("raftseq_client_resubmits_total", {k: t.resubmits for k, t in totals.items()})
        yield family("raftseq_client_failovers_total", {k: t.failovers for k, t in totals.items()})
        yield family("raftseq_client_silent_leaders_left_total", {k: t.silent_leaders_left for k, t in totals.items()})
        spec = _SPECS["raftseq_client_failover_duration_seconds"]
        histogram = HistogramMetricFamily(spec.name, spec.help, labels=self._label_names(spec))
        for key in keys:
            t = totals[key]
            cumulative, running = [], 0
            for bound, count in zip(FAILOVER_BUCKETS_S, t.failover_counts):
                running += count
                cumulative.append((floatToGoString(bound), running))
            cumulative.append(("+Inf", running + t.failover_counts[-1]))
            histogram.add_metric(self._label_values(key), cumulative, sum_value=t.failover_sum_s)
        yield histogram
        yield family("raftseq_client_submits_acked_total", {k: t.acked for k, t in totals.items()})
        yield family("raftseq_client_submits_outcome_unknown_total", {k: t.outcome_unknown for k, t in totals.items()})
        spec = _SPECS["raftseq_client_submits_rejected_total"]
        rejected = CounterMetricFamily(spec.name, spec.help, labels=self._label_names(spec))
        for key in keys:
            for reason, count in totals[key].rejected.items():
                rejected.add_metric([*self._label_values(key), reason.value], count)
        yield rejected
        yield family("raftseq_client_subscription_resumes_total", resumes)
        yield family("raftseq_client_sessions", sessions)
        yield family("raftseq_client_sessions_connected", connected)
        yield family("raftseq_client_in_flight_submits", in_flight)

    def _label_names(self, spec: MetricSpec) -> list[str]:
        return (["client"] if self.client_labels else []) + list(spec.labels)

    def _label_values(self, key: str) -> list[str]:
        return [key] if self.client_labels else []
