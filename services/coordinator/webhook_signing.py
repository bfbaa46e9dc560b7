"""Webhook signatures: HMAC-SHA256 over ``"{timestamp}." + raw body`` with the app's secret.

Every webhook request carries::

    X-Pylon-Timestamp: 1700000000                  (unix seconds when the request was signed)
    X-Pylon-Signature: sha256=<hex HMAC-SHA256(secret, b"1700000000." + raw_body)>

How an app server verifies a request (any language; Python shown)::

    import hashlib, hmac, time

    def verify(secret: str, raw_body: bytes, headers) -> bool:
        ts = headers["X-Pylon-Timestamp"]
        sig = headers["X-Pylon-Signature"]
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:   # older than 5 minutes: replay
            return False
        mac = hmac.new(secret.encode(), ts.encode() + b"." + raw_body, hashlib.sha256).hexdigest()
        return hmac.compare_digest("sha256=" + mac, sig)

Rules: sign the *raw* body bytes exactly as received (not re-serialised JSON); compare in
constant time; reject timestamps more than 5 minutes away from your clock. Every retry is
signed afresh, so a retried request always carries a current timestamp. A retried batch keeps
its ``X-Pylon-Delivery`` id: delivery is at-least-once, so an app server that must not see an
event twice remembers recent delivery ids.

This module is pure: no clock is read unless the caller leaves ``now`` out.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Pylon-Timestamp"
SIGNATURE_HEADER = "X-Pylon-Signature"
SCHEME = "sha256="
DEFAULT_TOLERANCE_S = 300  # 5 minutes: clocks of app servers drift; replays older than this are refused


class SignatureError(Exception):
    """A webhook request failed verification. ``reason`` is a stable short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Pylon-Signature`` header value for ``body`` signed at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def sign(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two signature headers for ``body``."""
    ts = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: signature(secret, ts, body)}


def verify(secret: str, body: bytes, timestamp: str | None, sig: str | None, now: float | None = None,
           tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Check a request's headers; return the timestamp or raise ``SignatureError``."""
    if not timestamp or not sig:
        raise SignatureError("missing", "signature headers missing")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("bad_timestamp", f"timestamp {timestamp[:20]!r} is not unix seconds")
    ts = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError("stale", f"timestamp is {int(current - ts)} s away from now (limit {int(tolerance_s)} s)")
    if not sig.startswith(SCHEME):
        raise SignatureError("bad_scheme", "signature must start with 'sha256='")
    if not hmac.compare_digest(signature(secret, ts, body).encode(), sig.encode()):
        raise SignatureError("mismatch", "signature does not match the body")
    return ts
