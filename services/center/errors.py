"""Errors of the center API, each with a stable code (the ``error.code`` of the JSON body).

Two families: the caller misused the API (4xx) and a backend is unavailable (503). Anything
else reaching the HTTP layer is our bug and becomes a logged 500.
"""

from __future__ import annotations


class CenterError(Exception):
    code = "error"
    retry_after_s: float | None = None  # sent as Retry-After when set

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidRequest(CenterError):
    code = "invalid_request"


class PayloadTooLarge(CenterError):
    code = "payload_too_large"


class Unauthenticated(CenterError):
    code = "unauthorized"


class Forbidden(CenterError):
    code = "forbidden"


class NotFound(CenterError):
    code = "not_found"


class Conflict(CenterError):
    code = "conflict"


class RateLimited(CenterError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(CenterError):
    code = "backend_unavailable"


class Overloaded(BackendUnavailable):
    """This center holds as much in-flight push data as it may; the caller should retry shortly."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
