"""Room metrics: plain integer counts on the hot path, turned into Prometheus families at scrape
time.

A room counts several things per connect and two per PING (frame in, frame out). A
prometheus-client ``Counter.inc`` takes a lock and checks observability on every call (~1.5 µs);
a room instance is one thread, so a slotted int that the scrape reads is enough (~0.1 µs). Label
children are resolved once here, not per frame. Exported names and labels are the usual ones:
``pylon_room_frames_in_total{op="PING"}`` and so on.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from services.common.codec import ErrorCode, Op


class Count:
    """One labelled value. ``inc``/``dec`` have prometheus-client's signatures."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def dec(self, amount: int = 1) -> None:
        self.n -= amount


class Family:
    """A metric with at most one label; children made by ``labels(value)`` are kept for export."""

    def __init__(self, name: str, doc: str, label: str | None = None, gauge: bool = False) -> None:
        self.name, self.doc, self.label, self.gauge = name, doc, label, gauge
        self.children: dict[str, Count] = {}
        if label is None:
            self.children[""] = Count()

    def labels(self, value: str) -> Count:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = Count()
        return child

    # the unlabelled form: Family.inc() / .dec()
    def inc(self, amount: int = 1) -> None:
        self.children[""].n += amount

    def dec(self, amount: int = 1) -> None:
        self.children[""].n -= amount

    def set(self, value: int) -> None:
        """The unlabelled gauge's value."""
        self.children[""].n = value

    def value(self, label: str = "") -> int:
        child = self.children.get(label)
        return child.n if child is not None else 0

    def export(self):
        if self.gauge:
            fam = GaugeMetricFamily(self.name, self.doc, labels=[self.label] if self.label else None)
        else:
            fam = CounterMetricFamily(self.name.removesuffix("_total"), self.doc,
                                      labels=[self.label] if self.label else None)
        for value, child in list(self.children.items()):
            fam.add_metric([value] if self.label else [], child.n)
        return fam


class Buckets:
    """An unlabelled histogram kept as plain int bucket counts (the same reason as ``Count``)."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le semantics: value <= bound
        self.sum += value

    def export(self):
        fam = HistogramMetricFamily(self.name, self.doc)
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        fam.add_metric([], buckets, self.sum)
        return fam


class _Collector:
    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self):
        for fam in self.families:
            yield fam.export()

    def describe(self):
        return []  # no samples at registration time: families are built per scrape


CONNECTIONS = Family("pylon_room_connections", "Open TCP connections (any state)", gauge=True)
SESSIONS = Family("pylon_room_sessions", "Authenticated sessions", gauge=True)
ACCEPT_QUEUE = Family("pylon_room_accept_queue",
                      "Connections completed by the kernel and not yet accepted (read once a second)", gauge=True)
ACCEPT_WAITS = Family("pylon_room_accept_wait_sampled_total",
                      "1 in 16 accepted connections, by how long their first data had waited for accept()",
                      "waited")
OVERDUE = Family("pylon_room_overdue_handshakes",
                 "Connections past their handshake deadline and still open (a check on the timing wheel; 0)",
                 gauge=True)
ACCEPT_SHEDDING = Family("pylon_room_accept_shedding",
                         "1 while AUTHs are refused OVERLOADED because the accept queue is seconds deep", gauge=True)
AUTHS = Family("pylon_room_auths_total", "AUTH attempts by result", "result")
FRAMES_IN = Family("pylon_room_frames_in_total", "Frames received by op", "op")
FRAMES_OUT = Family("pylon_room_frames_out_total", "Frames sent by op", "op")
MESSAGES_OUT = Family("pylon_room_messages_delivered_total", "Messages written to clients", "kind")
ACKS = Family("pylon_room_acks_total", "Message ids acked by clients")
CLOSED = Family("pylon_room_closed_total", "Connections closed by reason", "reason")
UPSTREAM = Family("pylon_room_upstream_total", "UPSTREAM frames by outcome", "outcome")
DETACHED = Family("pylon_room_detached_sessions",
                  "Sessions whose link dropped, held for a resume (resume_grace_s)", gauge=True)
RESUMES = Family("pylon_room_resumes_total",
                 "AUTHs carrying a resume_token, by outcome (same_instance, taken: from another instance; "
                 "not_found, invalid: fell back to a normal login)", "outcome")
TAKEN = Family("pylon_room_sessions_taken_total", "Sessions handed over to another instance the client resumed on")
REPLACED = Family("pylon_room_sessions_replaced_total",
                  "Sessions closed with KICK replaced: a new login of the same uid and device_id")
EPOCHS = Family("pylon_room_register_epochs_total",
                "Register epochs changed (its data was lost): every session was registered again")
REREGISTERED = Family("pylon_room_reregistered_total", "Sessions registered again after a register epoch change")
REGISTRY.register(_Collector([CONNECTIONS, SESSIONS, ACCEPT_QUEUE, ACCEPT_SHEDDING, ACCEPT_WAITS, OVERDUE, AUTHS,
                              FRAMES_IN, FRAMES_OUT, MESSAGES_OUT, ACKS, CLOSED, UPSTREAM, DETACHED, RESUMES, TAKEN,
                              REPLACED, EPOCHS, REREGISTERED]))

CAPACITY = Family("pylon_room_connection_capacity",
                  "Connections this instance is sized for (per_instance_connections; also its discovery capacity)",
                  gauge=True)
AUTH_SECONDS = Buckets("pylon_room_auth_seconds",
                       "AUTH received to AUTH_OK sent for new sessions (token check, register write)",
                       (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ACCESS_REFUSED = Family("pylon_room_access_refused_total",
                        "Connections refused at accept by the access policy (ERROR with retry-after, then closed), "
                        "by reason: instance_full, denied, rate, per_source, preauth", "reason")
TRACKED_SOURCES = Family("pylon_room_access_tracked_sources",
                         "Source addresses the access policy remembers (buckets and counts; bounded by max_tracked_ips)",
                         gauge=True)
CONNECTION_CAP = Family("pylon_room_connection_cap",
                        "Connections this instance accepts before answering INSTANCE_FULL (max_connections)", gauge=True)
TLS_CONNECTIONS = Family("pylon_room_tls_connections", "Open connections on the TLS port (after the TLS handshake)",
                         gauge=True)
TLS_RELOADS = Family("pylon_room_tls_reloads_total", "Certificate and key reloads (SIGHUP) by result", "result")
REGISTRY.register(_Collector([CAPACITY, AUTH_SECONDS, ACCESS_REFUSED, TRACKED_SOURCES, CONNECTION_CAP,
                              TLS_CONNECTIONS, TLS_RELOADS]))

frames_in = {int(op): FRAMES_IN.labels(op.name) for op in Op}
frames_out = {int(op): FRAMES_OUT.labels(op.name) for op in Op}
auth_result = {code: AUTHS.labels(code.name.lower()) for code in ErrorCode}
auth_ok = AUTHS.labels("ok")
unicast_out = MESSAGES_OUT.labels("unicast")
broadcast_out = MESSAGES_OUT.labels("broadcast")
closed = {code: CLOSED.labels(code.name.lower()) for code in ErrorCode}
closed_by_peer = CLOSED.labels("peer")
closed_kick = CLOSED.labels("kick")
closed_drain = CLOSED.labels("drain")
closed_replaced = CLOSED.labels("replaced")
closed_taken = CLOSED.labels("taken")
closed_resume_expired = CLOSED.labels("resume_expired")
access_refused = {reason: ACCESS_REFUSED.labels(reason)
                  for reason in ("instance_full", "denied", "rate", "per_source", "preauth")}
for _outcome in ("ok", "failed"):
    TLS_RELOADS.labels(_outcome)
for _outcome in ("same_instance", "taken", "not_found", "invalid"):
    RESUMES.labels(_outcome)
for _outcome in ("not_bound", "accepted", "rejected"):
    UPSTREAM.labels(_outcome)


class _AppSessions:
    """``pylon_room_app_sessions{app}``: OPEN and DETACHED sessions bound to each app, read from
    the room's app index at scrape time (nothing on the hot path). At most MAX_APPS apps, the
    largest first."""

    MAX_APPS = 1000

    def __init__(self, room) -> None:
        self.room = room

    def collect(self):
        fam = GaugeMetricFamily("pylon_room_app_sessions", "Sessions bound to each app (OPEN and DETACHED)",
                                labels=["app"])
        sizes = sorted(((len(members), app) for app, members in list(self.room.by_app.items())), reverse=True)
        for n, app in sizes[:self.MAX_APPS]:
            fam.add_metric([app], n)
        yield fam

    def describe(self):
        return []


def export_app_sessions(room) -> None:
    """Export the per-app session counts of ``room`` (one room instance per process)."""
    REGISTRY.register(_AppSessions(room))
