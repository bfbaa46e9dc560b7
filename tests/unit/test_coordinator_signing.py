"""Webhook signatures: a fixed vector (checked with `openssl dgst -sha256 -hmac`), round trips, refusals."""

import pytest

from services.coordinator.webhook_signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    sign,
    signature,
    verify,
)

SECRET = "whsec_test"
BODY = b'{"app":"demo","events":[]}'
TS = 1_700_000_000
# printf '1700000000.{"app":"demo","events":[]}' | openssl dgst -sha256 -hmac whsec_test
KNOWN = "sha256=3beee130e755ecba42a494dcf39c26ca71d3b3a43d0f328ddeae74fb24782258"


def test_known_vector():
    assert signature(SECRET, TS, BODY) == KNOWN
    assert sign(SECRET, BODY, now=TS + 0.9) == {TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: KNOWN}


def test_round_trip_and_tolerance():
    headers = sign(SECRET, BODY, now=TS)
    assert verify(SECRET, BODY, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], now=TS + 299) == TS
    with pytest.raises(SignatureError) as e:
        verify(SECRET, BODY, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], now=TS + 301)
    assert e.value.reason == "stale"
    with pytest.raises(SignatureError):  # from the future, too
        verify(SECRET, BODY, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], now=TS - 301)


@pytest.mark.parametrize("secret,body,ts,sig,reason", [
    ("other", BODY, "1700000000", KNOWN, "mismatch"),
    (SECRET, BODY + b" ", "1700000000", KNOWN, "mismatch"),
    (SECRET, BODY, "1700000001", KNOWN, "mismatch"),          # the timestamp is signed too
    (SECRET, BODY, "1700000000", KNOWN.replace("sha256=", "sha1="), "bad_scheme"),
    (SECRET, BODY, "-1700000000", KNOWN, "bad_timestamp"),
    (SECRET, BODY, "17e8", KNOWN, "bad_timestamp"),
    (SECRET, BODY, None, KNOWN, "missing"),
    (SECRET, BODY, "1700000000", "", "missing"),
])
def test_refusals(secret, body, ts, sig, reason):
    with pytest.raises(SignatureError) as e:
        verify(secret, body, ts, sig, now=TS)
    assert e.value.reason == reason
