"""From internal batches to webhook events: which items an app wants, and which the queue takes."""

from __future__ import annotations

import logging
from typing import Protocol

from services.common.apps import App
from services.coordinator import events as ev
from services.coordinator import metrics as m
from services.coordinator.webhooks import WebhookDelivery

log = logging.getLogger(__name__)


class AppLookup(Protocol):
    async def get_many(self, app_ids: list[str]) -> dict[str, App | None]: ...


class EventIntake:
    """Upstream items and status events in, ``WebhookDelivery.offer`` calls out. Awaits only the
    app directory (a local cache in front of Redis), never HTTP."""

    def __init__(self, apps: AppLookup, delivery: WebhookDelivery, max_payload: int = 64 * 1024) -> None:
        self.apps = apps
        self.delivery = delivery
        self.max_payload = max_payload

    async def upstream(self, items) -> list[bool]:
        """One verdict per ``internal_pb2.UpstreamItem``: True once the event is queued for the app's webhook."""
        apps = await self.apps.get_many([it.app for it in items])
        out: list[bool] = []
        for it in items:
            app = apps.get(it.app)
            if app is None:
                m.EVENTS_DROPPED.labels("no_app").inc()
                out.append(False)
            elif len(it.payload) > self.max_payload:
                m.EVENTS_DROPPED.labels("too_large").inc()
                out.append(False)
            else:
                out.append(self.delivery.offer(app, ev.upstream_event(it), "upstream"))
        return out

    async def status(self, events) -> int:
        """Queue online/offline events for the apps that asked for them; return how many were queued.

        Apps without ``status_events`` (or without a webhook) are skipped silently: a session is
        bound to many apps and most of them do not care. The skips are counted.
        """
        wanted = {a for e in events for a in e.apps}
        apps = await self.apps.get_many(list(wanted)) if wanted else {}
        queued = 0
        for e in events:
            encoded: bytes | None = None
            for app_id in dict.fromkeys(e.apps):
                app = apps.get(app_id)
                if app is None or not app.status_events or not app.webhook_url:
                    m.EVENTS_DROPPED.labels("not_subscribed").inc()
                    continue
                if encoded is None:
                    encoded = ev.status_event(e)
                queued += self.delivery.offer(app, encoded, "status")
        return queued
