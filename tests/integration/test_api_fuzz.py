"""Hostile HTTP against real center and dispatcher processes.

- schemathesis generates requests from each service's own OpenAPI document (valid and invalid
  bodies, parameters and headers); every answer must be a non-5xx that matches the document
  (status, content type, body schema). Examples are derandomized and bounded, so CI runs the
  same few hundred requests every time (``PYLON_FUZZ_EXAMPLES`` raises the bound).
- Raw sockets send what no HTTP library will: a URL or header over aiohttp's 8,190-byte line
  limit, too many headers, a Content-Length of 10^12 or one that overflows 64 bits, bytes that
  are not HTTP. Each gets a JSON 4xx; the service's log holds no traceback and at most one
  rate-limited warning per 10 s however many arrive.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.launcher.cluster import LocalCluster, Ports
from tests.stores import own_stores

ROOT = pathlib.Path(__file__).parents[2]
CENTER_SCHEMA = schemathesis.openapi.from_path(str(ROOT / "services" / "center" / "openapi.json"))
DISPATCHER_SCHEMA = schemathesis.openapi.from_path(str(ROOT / "services" / "dispatcher" / "openapi.json"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# 25 examples per operation keep the module well under a minute; PYLON_FUZZ_EXAMPLES=500 digs deeper
FUZZ = settings(max_examples=int(os.environ.get("PYLON_FUZZ_EXAMPLES", "25")), derandomize=True, database=None,
                deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def system(backing_stores):
    cfg, tmp = backing_stores
    common = own_stores(cfg, "api_fuzz", mysql_database="pylon_api_fuzz")
    c = LocalCluster(os.path.join(tmp, "api-fuzz"), Ports.free(1), room_instances=1, common=common,
                     env={"PYLON_LOG_LEVEL": "INFO"})
    c.start()
    try:
        c.create_demo_app()
        yield c
    finally:
        c.stop()
    for name in ("center", "dispatcher"):
        log = c.services[name].log_text() if name in c.services else ""
        assert "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------- schemathesis


def _auth(system: LocalCluster, path: str) -> dict[str, str]:
    admin = path.startswith(("/v1/apps", "/v1/admin"))
    return {"Authorization": f"Bearer {system.admin_key if admin else system.app['api_key']}"}


@CENTER_SCHEMA.parametrize()
@FUZZ
def test_center_answers_every_generated_request_as_documented(case, system):
    case.call_and_validate(base_url=system.center_url, headers=_auth(system, case.operation.path), checks=CHECKS,
                           timeout=30)


@CENTER_SCHEMA.parametrize()
@settings(FUZZ, max_examples=5)
def test_center_answers_requests_with_wrong_or_no_keys_as_documented(case, system):
    # the app's key on admin routes (403), an unknown key (401), none at all (401)
    for headers in ({"Authorization": f"Bearer {system.app['api_key']}"}, {"Authorization": "Bearer pk_not_a_key"},
                    {"Authorization": ""}):
        case.call_and_validate(base_url=system.center_url, headers=headers, checks=CHECKS, timeout=30)


@DISPATCHER_SCHEMA.parametrize()
@FUZZ
def test_dispatcher_answers_every_generated_request_as_documented(case, system):
    case.call_and_validate(base_url=system.dispatcher_url, checks=CHECKS, timeout=30)


# ---------------------------------------------------------------- oversized and malformed requests

BIG = 20_000  # over aiohttp's 8,190-byte limit for a request line or one header

HOSTILE = {
    "long URL": (b"GET /v1/users/" + b"u" * BIG + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "long query": (b"GET /v1/route?uid=" + b"u" * BIG + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "huge header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * BIG + b"\r\n\r\n", 431,
                    "headers_too_large"),
    "huge header name": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X" * BIG + b": 1\r\n\r\n", 431,
                         "headers_too_large"),
    "too many headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
                         + b"\r\n", 431, "headers_too_large"),
    "Content-Length overflow": (b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                                400, "bad_request"),
    "Content-Length not a number": (b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", 400,
                                    "bad_request"),
    "TLS hello on the HTTP port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400, "bad_request"),
    "binary garbage": (bytes(range(256)) * 4, 400, "bad_request"),
}
# a declared body over the limit is refused before any of it is sent (the server must not wait for it)
TOO_LONG = {
    "center": b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n",
    "dispatcher": b"POST /v1/routes HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
}


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection; (status, headers, body) of the one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything; the answer is still there
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        want = int(headers.get("content-length", "0"))
        while len(body) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body[:want]


def assert_json_error(status, headers, body, want_status, want_code):
    assert status == want_status, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == want_code and error["message"], error


def refused_lines(log: str) -> int:
    return sum(1 for line in log.splitlines() if "refused a request" in line)


def refused_counts(port: int) -> dict[str, float]:
    """``pylon_http_refused_total`` by code, from the service's own /metrics."""
    _, _, body = raw_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("pylon_http_refused_total{"):
            labels, _, value = line.rpartition(" ")
            counts[labels.split('code="')[1].split('"')[0]] = float(value)
    return counts


@pytest.mark.parametrize("service", ["center", "dispatcher"])
def test_oversized_and_malformed_requests_get_json_4xx_and_no_log_flood(system, service):
    port = system.ports.center if service == "center" else system.ports.dispatcher
    log_before = system.services[service].log_text()
    counts_before = refused_counts(port)
    started = time.monotonic()
    rounds = 5
    for _ in range(rounds):
        for name, (data, want_status, want_code) in HOSTILE.items():
            status, headers, body = raw_request(port, data)
            try:
                assert_json_error(status, headers, body, want_status, want_code)
            except AssertionError as exc:
                raise AssertionError(f"{service}, {name}: {exc}") from None
        assert_json_error(*raw_request(port, TOO_LONG[service]), 413, "body_too_large")
    elapsed = time.monotonic() - started
    # the service still answers normally on a new connection
    status, headers, body = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"
    log = system.services[service].log_text()[len(log_before):]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    # every refusal counted by its code ...
    counts = refused_counts(port)
    wanted: dict[str, int] = {"body_too_large": rounds}
    for _, _, code in HOSTILE.values():
        wanted[code] = wanted.get(code, 0) + rounds
    assert {code: counts.get(code, 0) - counts_before.get(code, 0) for code in wanted} == wanted
    # ... but at most one warning line per 10 s, however many arrive
    assert refused_lines(log) <= 2 + int(elapsed / 10), log[-3000:]
