"""The HTTP guard: parser refusals classified into stable codes; warnings rate-limited."""

import logging

import pytest
from aiohttp import http_exceptions

from services.common.http_guard import RateLimitedWarning, classify


@pytest.mark.parametrize("exc,status,code", [
    (http_exceptions.LineTooLong(b"/v1/users/" + b"u" * 100, 8190), 414, "uri_too_long"),
    (http_exceptions.LineTooLong(bytearray(b"/x?a=1"), 8190), 414, "uri_too_long"),
    (http_exceptions.LineTooLong(b"http://example.com/" + b"x" * 90, 8190), 414, "uri_too_long"),
    (http_exceptions.LineTooLong(b"hhhhhhhh...", 8190), 431, "headers_too_large"),
    (http_exceptions.BadHttpMessage("Too many headers received"), 431, "headers_too_large"),
    (http_exceptions.BadHttpMessage("Content-Length overflow:\n\n  b'Content-Length: 9999'\n   ^"), 400, "bad_request"),
    (http_exceptions.BadHttpMethod("\x16\x03\x01"), 400, "bad_request"),
    (None, 400, "bad_request"),
])
def test_refusals_get_a_status_and_a_stable_code(exc, status, code):
    got_status, got_code, message = classify(exc)
    assert (got_status, got_code) == (status, code)
    assert message and "\n" not in message and len(message) < 200


def test_a_huge_offending_line_is_not_copied_into_the_message():
    _, _, message = classify(http_exceptions.BadHttpMessage("bad " + "x" * 100_000))
    assert len(message) < 200


def test_warnings_are_at_most_one_per_interval_and_count_the_skipped(caplog):
    now = [100.0]
    warn = RateLimitedWarning(logging.getLogger("test.guard"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.guard"):
        assert warn.warn("refused %s", "a")
        for _ in range(50):
            now[0] += 0.1
            assert not warn.warn("refused %s", "b")
        now[0] += 5.1
        assert warn.warn("refused %s", "c")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a", "refused c (and 50 more refused since the last such line)"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in caplog.records)
