"""Webhook delivery core against an in-memory transport: batching, signing, retry, drops,
bounds, per-app isolation, rate limit, shutdown. No network."""

import asyncio
import base64
import json
import time

import pytest

from services.common.apps import App
from services.common.pb import internal_pb2 as pb
from services.coordinator import events as ev
from services.coordinator.intake import EventIntake
from services.coordinator.webhook_signing import verify
from services.coordinator.webhooks import DeliverySettings, WebhookDelivery, WebhookResponse

FAST = dict(backoff_base_s=0.01, backoff_cap_s=0.05, batch_delay_s=0.01, rate_per_s=10_000)


class FakeServer:
    """Answers from a script (status codes or WebhookResponse), then 200; records every request."""

    def __init__(self, script=(), hang: asyncio.Event | None = None):
        self.script = list(script)
        self.requests: list[tuple[str, bytes, dict]] = []
        self.hang = hang
        self.arrived = asyncio.Event()

    async def __call__(self, url, body, headers):
        self.requests.append((url, body, headers))
        self.arrived.set()
        if self.hang is not None:
            await self.hang.wait()
        item = self.script.pop(0) if self.script else 200
        return item if isinstance(item, WebhookResponse) else WebhookResponse(item)

    def events(self):
        return [e for _, body, _ in self.requests for e in json.loads(body)["events"]]


def app(name="a1", secret="s3cret", url="http://hook.test/x", status_events=False):
    return App(id=name, secret=secret, webhook_url=url, status_events=status_events)


async def until(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def upstream_item(uid="u1", app_id="a1", payload=b"hi", kind="chat"):
    return pb.UpstreamItem(uid=uid, app=app_id, kind=kind, payload=payload, session_id="s1", device_id="d1",
                           ts_ms=1234)


async def test_batches_are_signed_and_split_at_the_event_limit():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(batch_max_events=100, **FAST))
    a = app()
    for i in range(250):
        assert d.offer(a, ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream")
    await until(lambda: len(server.events()) == 250)
    sizes = sorted(len(json.loads(b)["events"]) for _, b, _ in server.requests)
    assert sizes == [50, 100, 100]
    for url, body, headers in server.requests:
        assert url == "http://hook.test/x"
        assert headers["Content-Type"] == "application/json"
        verify("s3cret", body, headers["X-Pylon-Timestamp"], headers["X-Pylon-Signature"])
        assert json.loads(body)["app"] == "a1"
    assert sorted(e["uid"] for e in server.events()) == sorted(f"u{i}" for i in range(250))
    await d.close(1)


async def test_byte_limit_splits_batches():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(batch_max_bytes=4096, **FAST))
    for _ in range(10):
        d.offer(app(), ev.upstream_event(upstream_item(payload=b"x" * 1500)), "upstream")
    await until(lambda: len(server.events()) == 10)
    assert all(len(b) <= 4096 for _, b, _ in server.requests)
    assert len(server.requests) >= 5
    await d.close(1)


async def test_single_event_waits_for_the_batch_window_only():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "batch_delay_s": 0.05}))
    started = time.monotonic()
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: server.requests)
    assert 0.04 <= time.monotonic() - started < 1.0
    (event,) = server.events()
    assert event == {"type": "upstream", "uid": "u1", "device_id": "d1", "session_id": "s1", "kind": "chat",
                     "payload_b64": base64.b64encode(b"hi").decode(), "ts_ms": 1234}
    await d.close(1)


async def test_5xx_is_retried_with_the_same_delivery_id_and_fresh_signature():
    server = FakeServer([500, 503, 200])
    d = WebhookDelivery(server, DeliverySettings(**FAST))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: len(server.requests) == 3)
    await until(lambda: d.depth("a1") == 0)
    ids = {h["X-Pylon-Delivery"] for _, _, h in server.requests}
    assert len(ids) == 1
    assert [h["X-Pylon-Attempt"] for _, _, h in server.requests] == ["1", "2", "3"]
    await d.close(1)


@pytest.mark.parametrize("answer", [408, 429, WebhookResponse(None, error="timeout")])
async def test_other_retryable_answers(answer):
    server = FakeServer([answer, 200])
    d = WebhookDelivery(server, DeliverySettings(**FAST))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: len(server.requests) == 2 and d.depth("a1") == 0)
    await d.close(1)


@pytest.mark.parametrize("answer", [400, 403, 404, 302, WebhookResponse(None, error="bad url", permanent=True)])
async def test_4xx_is_dropped_after_one_attempt(answer):
    server = FakeServer([answer])
    d = WebhookDelivery(server, DeliverySettings(**FAST))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: d.depth("a1") == 0)
    await asyncio.sleep(0.1)
    assert len(server.requests) == 1
    await d.close(1)


async def test_gives_up_after_max_attempts():
    server = FakeServer([503] * 10)
    d = WebhookDelivery(server, DeliverySettings(max_attempts=4, **FAST))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: d.depth("a1") == 0)
    await asyncio.sleep(0.1)
    assert len(server.requests) == 4
    await d.close(1)


async def test_retry_after_is_honoured():
    server = FakeServer([WebhookResponse(429, retry_after_s=0.2), 200])
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "backoff_cap_s": 1.0}))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: len(server.requests) == 1)
    started = time.monotonic()
    await until(lambda: len(server.requests) == 2)
    assert time.monotonic() - started >= 0.15
    await d.close(1)


async def test_queue_is_bounded_including_in_flight_events():
    release = asyncio.Event()
    server = FakeServer(hang=release)
    d = WebhookDelivery(server, DeliverySettings(queue_per_app=10, batch_max_events=5, concurrency_per_app=1, **FAST))
    results = [d.offer(app(), ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream") for i in range(15)]
    assert results == [True] * 10 + [False] * 5
    await until(lambda: server.requests)
    assert d.offer(app(), b"{}", "upstream") is False   # 5 in flight + 5 queued still count
    release.set()
    await until(lambda: d.depth("a1") == 0)
    assert len(server.events()) == 10
    assert d.offer(app(), ev.upstream_event(upstream_item()), "upstream") is True
    await d.close(1)


async def test_a_hanging_app_server_does_not_hold_up_another_app():
    hang = asyncio.Event()
    slow = FakeServer(hang=hang)
    fast = FakeServer()

    async def route(url, body, headers):
        return await (slow if "slow" in url else fast)(url, body, headers)

    d = WebhookDelivery(route, DeliverySettings(concurrency_per_app=2, **FAST))
    for i in range(50):
        d.offer(app("slowapp", url="http://slow.test/"), ev.upstream_event(upstream_item(app_id="slowapp")), "upstream")
        d.offer(app("fastapp", url="http://fast.test/"), ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream")
    await until(lambda: len(fast.events()) == 50)
    assert len(slow.requests) <= 2  # at most its concurrency, all still hanging
    hang.set()
    await until(lambda: len(slow.events()) == 50)
    await d.close(1)


async def test_rate_limit_per_app():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "rate_per_s": 10.0, "batch_max_events": 1}))
    started = time.monotonic()
    for i in range(13):
        d.offer(app(), ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream")
    await until(lambda: len(server.requests) == 13)
    # a burst of 10 tokens, then one request per 0.1 s
    assert time.monotonic() - started >= 0.25
    await d.close(1)


async def test_new_secret_and_url_apply_to_the_next_attempt():
    server = FakeServer([500, 200])
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "backoff_base_s": 0.1, "backoff_cap_s": 0.1}))
    d.offer(app(secret="old"), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: len(server.requests) == 1)
    d.offer(app(secret="new", url="http://hook.test/new"), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: d.depth("a1") == 0)
    url, body, h = server.requests[1]
    assert url == "http://hook.test/new"
    verify("new", body, h["X-Pylon-Timestamp"], h["X-Pylon-Signature"])
    await d.close(1)


async def test_close_flushes_what_it_can_and_counts_the_rest():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "batch_delay_s": 1.0}))
    for i in range(5):
        d.offer(app(), ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream")
    assert await d.close(2) == 0          # the batch window is skipped at shutdown
    assert len(server.events()) == 5
    assert d.offer(app(), b"{}", "upstream") is False

    hang = asyncio.Event()
    stuck = WebhookDelivery(FakeServer(hang=hang), DeliverySettings(**FAST))
    for i in range(7):
        stuck.offer(app(), ev.upstream_event(upstream_item(uid=f"u{i}")), "upstream")
    started = time.monotonic()
    assert await stuck.close(0.2) == 7
    assert time.monotonic() - started < 1.0


async def test_failing_server_at_shutdown_is_not_retried_past_the_grace():
    d = WebhookDelivery(FakeServer([503] * 100), DeliverySettings(**{**FAST, "backoff_base_s": 5, "backoff_cap_s": 5}))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await d.close(0.5)
    assert time.monotonic() - started < 0.5


async def test_idle_app_queue_is_forgotten():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**{**FAST, "idle_s": 0.05}))
    d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: server.requests)
    await until(lambda: not d._queues)
    assert d.offer(app(), ev.upstream_event(upstream_item()), "upstream")
    await until(lambda: len(server.requests) == 2)
    await d.close(1)


class FakeApps:
    def __init__(self, *apps):
        self.apps = {a.id: a for a in apps}

    async def get_many(self, ids):
        return {i: self.apps.get(i) for i in ids}


async def test_intake_upstream_verdicts():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**FAST))
    intake = EventIntake(FakeApps(app("hooked"), app("nohook", url="")), d, max_payload=10)
    items = [upstream_item(app_id="hooked"), upstream_item(app_id="nohook"), upstream_item(app_id="ghost"),
             upstream_item(app_id="hooked", payload=b"x" * 11), upstream_item(app_id="")]
    assert await intake.upstream(items) == [True, False, False, False, False]
    await until(lambda: server.requests)
    await d.close(1)


async def test_intake_status_only_for_subscribed_apps():
    server = FakeServer()
    d = WebhookDelivery(server, DeliverySettings(**FAST))
    intake = EventIntake(FakeApps(app("watch", status_events=True), app("quiet"),
                                  app("watch-nohook", url="", status_events=True)), d)
    events = [pb.StatusEvent(uid="u1", apps=["watch", "quiet", "ghost", "watch-nohook"], online=True, session_id="s1",
                             device_id="d1", ts_ms=5, instance="room-1"),
              pb.StatusEvent(uid="u1", apps=["quiet"], online=False, session_id="s1")]
    assert await intake.status(events) == 1
    await until(lambda: server.requests)
    assert server.events() == [{"type": "online", "uid": "u1", "device_id": "d1", "session_id": "s1",
                                "instance": "room-1", "ts_ms": 5}]
    assert json.loads(server.requests[0][1])["app"] == "watch"
    await d.close(1)
