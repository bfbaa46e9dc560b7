"""Checks on internal batch requests shared by the gRPC services (register, saver)."""

from __future__ import annotations

MAX_UID_LEN = 128  # register's keys and saver's messages.uid (VARCHAR(128)) both hold at most this


class RequestError(Exception):
    """The caller sent a request this service refuses (gRPC INVALID_ARGUMENT)."""


def check_count(what: str, n: int, max_items: int) -> None:
    if n > max_items:
        raise RequestError(f"{what}: {n} items in one request, the limit is {max_items}; split the batch")


def check_uid(uid: str) -> None:
    if not uid:
        raise RequestError("uid must not be empty")
    if len(uid) > MAX_UID_LEN:
        raise RequestError(f"uid {uid[:32]!r}... is longer than {MAX_UID_LEN} characters")
