"""Logging setup: one line per event, the service name on every line.

Two formats (``[pylon] log_format``, env ``PYLON_LOG_FORMAT``, ``pylon up --log-json``):
  - ``text`` (the default): ``time LEVEL service logger: message``, and ``request_id=`` /
    ``request_ids=`` at the end of a line written while handling a request.
  - ``json``: one JSON object per line with ``time`` (UTC, ISO 8601, ms), ``level``,
    ``service``, ``instance``, ``pid``, ``logger``, ``message``, ``request_id`` /
    ``request_ids`` when known, ``traceback`` for a logged exception, and every field a caller
    passed as ``extra=``.

Request ids (README "Logs"): center gives every HTTP request an id (``REQUEST_ID``) and sends
the ids of the requests an RPC carries to the server in one metadata entry, ``x-request-ids``
(``REQUEST_IDS``: comma-separated, at most ``MAX_IDS`` of them, then ``+N`` for the rest). A
shared batch carries items of many requests, so it carries the list: noted once per submitting
request (``RequestIdSet``), never per item, joined once per flush, and split into a list only
when a JSON line is written.
The gRPC server side (services/common/rpc.py) sets ``REQUEST_IDS`` from the metadata for the
call's task, so every line logged while handling it, and every call it makes onward, carries them.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterable

# gRPC metadata key of the request ids an internal call carries (lowercase: HTTP/2 header)
METADATA_KEY = "x-request-ids"
# HTTP header in and out of center
HEADER = "X-Request-Id"
# A caller's X-Request-Id is taken when it is 1-64 of these characters (a UUID is 36); anything
# else is replaced by our own: it ends up in log lines and metadata, so no spaces, quotes or commas.
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Ids named in one call's metadata; a batch of more requests names these and "+N". 16 ids of
# 64 characters keep the entry near 1 KiB, well inside gRPC's 8 KiB default header budget.
MAX_IDS = 16
# A metadata value longer than this is not ours (MAX_IDS x 65 + the "+N" tail) and is ignored.
MAX_METADATA_CHARS = MAX_IDS * 65 + 16

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pylon_request_id", default=None)
REQUEST_IDS: contextvars.ContextVar[str | None] = contextvars.ContextVar("pylon_request_ids", default=None)

FORMATS = ("text", "json")

_service = ""
_instance: str | None = None

# LogRecord attributes that are the record itself, not a caller's ``extra=``
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                   "request_id", "request_ids"}


def sane_request_id(value: str | None) -> str | None:
    """``value`` if it is an id we can log and forward as is, else None."""
    if value and _SANE_ID.fullmatch(value):
        return value
    return None


class RequestIdSet:
    """The request ids a batch carries, bounded: the first MAX_IDS distinct ones (and at most
    MAX_METADATA_CHARS of them), then a count of the other additions. A batcher adds one tag per
    submitting call, not per item, so a batch of 500 one-message requests costs 500 adds of a
    few hundred ns and one join per flush (a pass over 500 per-item tags took 20-30 us here)."""

    __slots__ = ("ids", "chars", "more")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.chars = 0
        self.more = 0  # additions past the bound (not told apart: an upper bound of the others)

    def add(self, tag: str) -> None:
        if self.more:
            self.more += 1  # full: counted, not compared
        elif tag not in self.ids:
            if len(self.ids) < MAX_IDS and self.chars + len(tag) <= MAX_METADATA_CHARS - 16:
                self.ids.append(tag)
                self.chars += len(tag) + 1
            else:
                self.more = 1

    def joined(self) -> str | None:
        if not self.ids:
            return None
        if self.more:
            return ",".join(self.ids) + f",+{self.more}"
        return ",".join(self.ids)


def join_ids(tags: Iterable[str | None]) -> str | None:
    """The metadata value naming ``tags`` (None skipped): RequestIdSet's bounds."""
    ids = RequestIdSet()
    for tag in tags:
        if tag is not None:
            ids.add(tag)
    return ids.joined()


def incoming_ids(metadata) -> str | None:
    """The request ids of an incoming gRPC call, from its invocation metadata (None: none, or not ours)."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == METADATA_KEY:
            if isinstance(value, str) and len(value) <= MAX_METADATA_CHARS:
                return value
            return None
    return None


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata for a call made now: the ids of the batch or request being worked on."""
    ids = REQUEST_IDS.get()
    if ids is None:
        ids = REQUEST_ID.get()
        if ids is None:
            return None
    return ((METADATA_KEY, ids),)


def _clear_ids() -> None:
    REQUEST_ID.set(None)
    REQUEST_IDS.set(None)


def without_request_ids() -> contextvars.Context:
    """A copy of the current context with no request ids: for a task started while handling one
    request that goes on to work for others (``loop.create_task(coro, context=...)``), whose log
    lines and calls would otherwise name that first request."""
    ctx = contextvars.copy_context()
    ctx.run(_clear_ids)
    return ctx


def set_instance(instance: str) -> None:
    """Name this process's instance on every JSON line (called once its id is known)."""
    global _instance
    _instance = instance


class _ContextFilter(logging.Filter):
    """Puts the request id(s) of the running task on each record written (only those written)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.request_ids = REQUEST_IDS.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        rids = getattr(record, "request_ids", None)
        if rid is None and rids is None:
            return line
        tail = (f" request_id={rid}" if rid else "") + (f" request_ids={rids}" if rids else "")
        if record.exc_info or record.stack_info:
            first, nl, rest = line.partition("\n")  # the ids on the message line, above the traceback
            return first + tail + nl + rest
        return line + tail


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "instance": _instance,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        rids = getattr(record, "request_ids", None)
        if rids:
            out["request_ids"] = rids.split(",")
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(service: str, log_format: str = "text") -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(service)
    if log_format == "text":
        return TextFormatter(service)
    raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")


def setup(service: str, level: str = "INFO", log_format: str = "text") -> None:
    global _service
    _service = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, log_format))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp access logs are noise at INFO
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
