"""Errors raised or reported by the SDK. Each says whose fault it is:

- the caller misused the API: ``FrameTooLarge``, ``NotConnected``, ``ClientClosed``, ``SendQueueFull``
- the server refused or failed: ``ServerError`` (``AuthError`` when it is permanent)
- the network or the server misbehaved: ``ConnectionLost``, ``ReplyTimeout`` (``UpstreamTimeout``),
  ``ProtocolError``, ``RouteError``, ``TlsError``
- the server ended the session: ``Kicked`` (a ``ClientClosed``)
- the local dedupe file failed: ``DedupeStoreError``
"""

from __future__ import annotations

from services.common.codec import ErrorCode

# The server will give the same answer however often we ask: stop instead of reconnect-looping.
PERMANENT_CODES = frozenset({ErrorCode.BAD_TOKEN, ErrorCode.TOKEN_EXPIRED, ErrorCode.UNKNOWN_APP, ErrorCode.UID_MISMATCH})
# The server is busy: come back after retry_after_ms.
RETRY_LATER_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE,
                               ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.INSTANCE_FULL, ErrorCode.ACCESS_DENIED})


class PylonError(Exception):
    """Base class of every SDK error."""


class ClientClosed(PylonError):
    """The client is closed (``close()``, a kick or a permanent error); create a new one."""


class Kicked(ClientClosed):
    """The server ended the session with KICK and the client does not reconnect. ``reason`` is the
    server's word for it: ``replaced`` when another connection of the same uid and device_id took
    the session over (a second copy of the app), otherwise what the app server or operator gave."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"kicked: {reason}" if reason else "kicked")
        self.reason = reason


class DedupeStoreError(PylonError):
    """The dedupe file (``dedupe_path``) cannot be opened, read or written (disk, permissions, lock)."""


class NotConnected(PylonError):
    """No session right now (connecting or reconnecting); try again once ``connected`` is true."""


class ConnectionLost(PylonError):
    """The connection dropped before the server answered this request."""


class FrameTooLarge(PylonError, ValueError):
    """The request would not fit in one frame of the negotiated maximum; nothing was sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the server's maximum of {limit} bytes")
        self.size = size
        self.limit = limit


class SendQueueFull(PylonError):
    """Too many frames or requests are waiting to be sent or answered; slow down."""


class ReplyTimeout(PylonError, TimeoutError):
    """The server did not answer a request in time."""


class UpstreamTimeout(ReplyTimeout):
    """No UPSTREAM_ACK within the timeout. The data may or may not have reached the app server."""


class ProtocolError(PylonError):
    """The server sent something that is not valid protocol; the connection is dropped and retried."""


class RouteError(PylonError):
    """The dispatcher could not be asked or gave an unusable answer."""


class TlsError(PylonError):
    """A room's TLS certificate did not verify against the CA the client was given (``tls_ca``),
    or no address offered TLS while ``tls_only`` is set. The address is skipped and retried with
    backoff like any that cannot be reached; a wrong CA or a man in the middle never gets AUTH."""


class ServerError(PylonError):
    """An ERROR frame: ``code`` (an ``ErrorCode`` when known), ``message``, ``fatal``, ``retry_after_ms``."""

    def __init__(self, code: int, message: str, fatal: bool = False, retry_after_ms: int = 0) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass
        name = code.name if isinstance(code, ErrorCode) else str(code)
        super().__init__(f"{name}: {message}" if message else name)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.retry_after_ms = retry_after_ms

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_CODES

    @property
    def retry_later(self) -> bool:
        return self.code in RETRY_LATER_CODES


class AuthError(ServerError):
    """The server refused this client for good (bad or expired token, unknown app, uid mismatch)."""
