"""The saver's error kinds: the caller's fault, a backend's, or overload (the adapter maps each to a gRPC status)."""

from __future__ import annotations

from services.common.batching import Overloaded  # noqa: F401  (re-exported: the third kind)
from services.saver.validation import RequestError  # noqa: F401


class BackendUnavailable(Exception):
    """Redis or MySQL could not be reached or did not answer in time."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} unavailable: {detail}")
        self.backend = backend


class EpochMissing(Exception):
    """Redis refused a write or read because its epoch is gone (it lost the saver's data) or
    changed since the operation began. Nothing was numbered or changed by the refused part; the
    store waits for the rebuild from MySQL and runs it again."""
