"""The audit line: one INFO line per operator action, always in this one format.

    audit actor=admin action=requeue msg_ids=3 requeued=2 skipped=1
    audit actor=demo action=kick uid=alice app=demo kicked=1

``actor`` says which key acted: ``admin`` for the admin key, else the app id of the API key (a
key itself is never logged, nor a secret or a payload). Values that are not plain words (spaces,
quotes, '=', non-ASCII) are written as JSON strings, and every value is cut to
``MAX_VALUE_CHARS``, so a line always parses back as ``key=value`` pairs whatever a caller sent.
Logger ``services.center.audit``: route it on its own with the logging config if wanted.
"""

from __future__ import annotations

import json
import logging
import re

from services.center.auth import Principal

log = logging.getLogger("services.center.audit")

MAX_VALUE_CHARS = 200
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,-]+")


def actor(principal: Principal) -> str:
    if principal.admin or principal.app is None:
        return "admin"
    return principal.app.id


def _value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(str(v) for v in value)
    elif value is None:
        text = "-"
    else:
        text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS - 3] + "..."
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def line(principal: Principal, action: str, **fields: object) -> str:
    """The audit line for ``action`` by ``principal`` (fields in the order given)."""
    parts = [f"actor={_value(actor(principal))}", f"action={_value(action)}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items()]
    return "audit " + " ".join(parts)


def record(principal: Principal, action: str, **fields: object) -> None:
    """Log an operator action that took effect, with who did it."""
    log.info("%s", line(principal, action, **fields))
