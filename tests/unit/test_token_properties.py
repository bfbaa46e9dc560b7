"""Property tests of client-token parsing: any string a client sends as a token is either a token
signed with the secret (claims come back) or refused with TokenError, never another exception.

Examples are derandomized (fixed seed, no example database) so CI runs the same cases every time.
"""

from __future__ import annotations

import base64
import hmac
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.common import tokens

PROPERTY = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000
SECRET = "s" * 43


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims_json: bytes, secret: str = SECRET, header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> str:
    signing_input = f"{b64(header)}.{b64(claims_json)}"
    return f"{signing_input}.{b64(hmac.digest(secret.encode(), signing_input.encode(), 'sha256'))}"


def parse_and_check(token: str, secret: str = SECRET, now: float = NOW):
    """The room's two steps: parse (to find the app), then check with that app's secret."""
    try:
        parsed = tokens.ParsedToken(token)
        try:
            assert isinstance(parsed.app, str)
        except tokens.TokenError:
            pass
        return parsed.check(secret, now=now)
    except tokens.TokenError as exc:
        assert str(exc)
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
claim_sets = st.dictionaries(st.sampled_from(["sub", "app", "exp", "iat", "dev", "x"]),
                             json_values | st.integers(NOW - 100, NOW + 10**6), max_size=6)
uids = st.text(min_size=1, max_size=40)


def all_finite(value) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    return True


@PROPERTY
@given(st.text(max_size=600))
def test_any_text_is_a_token_or_a_token_error(text):
    assert parse_and_check(text) is None  # nobody guesses the signature


@PROPERTY
@given(st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=80),
                min_size=1, max_size=5))
def test_dotted_base64_garbage_is_a_token_error(parts):
    assert parse_and_check(".".join(parts)) is None


@PROPERTY
@given(json_values, st.sampled_from([b'{"alg":"HS256","typ":"JWT"}', b'{"alg":"HS256"}', b'{"alg":"none"}',
                                     b"[1]", b"null", b"{", b"\xff"]))
def test_signed_payloads_of_any_json_are_claims_only_when_well_formed(payload, header):
    raw = json.dumps(payload, allow_nan=True).encode()
    claims = parse_and_check(signed(raw, header=header))
    if claims is not None:
        assert header in (b'{"alg":"HS256","typ":"JWT"}', b'{"alg":"HS256"}')
        assert isinstance(claims["sub"], str) and claims["sub"]
        assert isinstance(claims["exp"], int | float) and claims["exp"] + 30 >= NOW


@PROPERTY
@given(claim_sets)
def test_signed_claim_sets_verify_only_with_a_subject_and_a_finite_future_exp(claims):
    got = parse_and_check(signed(json.dumps(claims, allow_nan=True).encode()))
    exp = claims.get("exp")
    good = (isinstance(claims.get("sub"), str) and claims["sub"] != "" and all_finite(claims)
            and isinstance(exp, int | float) and not isinstance(exp, bool) and exp + 30 >= NOW)
    assert (got is not None) == good
    if good:
        assert got == claims


@PROPERTY
@given(st.integers(1, 3000), st.sampled_from(["[", "{\"a\":"]))
def test_deeply_nested_payloads_are_refused_before_any_secret_is_used(depth, opener):
    token = f"{b64(b'{}')}.{b64((opener * depth).encode())}.sig"
    assert parse_and_check(token) is None


@PROPERTY
@given(uids, st.text(min_size=1, max_size=64), st.text(max_size=20), st.integers(1, 10**6), st.text(min_size=1))
def test_sign_then_verify_round_trips(uid, app, device, ttl, secret):
    token, exp = tokens.sign(secret, uid, app, ttl, device_id=device, now=NOW)
    assert tokens.unverified_app(token) == app
    claims = tokens.verify(token, secret, now=NOW)
    assert claims["sub"] == uid and claims["app"] == app and claims["exp"] == exp == NOW + ttl
    assert claims.get("dev", "") == device


@PROPERTY
@given(uids, st.data())
def test_any_one_character_change_is_refused(uid, data):
    token, _ = tokens.sign(SECRET, uid, "demo", 600, now=NOW)
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.characters(codec="ascii"))
    assume(c != token[i])
    assert parse_and_check(token[:i] + c + token[i + 1:]) is None


@PROPERTY
@given(uids, st.integers(-100, 100))
def test_a_rotated_secret_accepts_the_previous_one_only_inside_its_window(uid, offset):
    old, new = "old-secret", "new-secret"
    until = NOW + 50
    rotated = tokens.SigningSecret(new, old, until)
    by_old, _ = tokens.sign(old, uid, "demo", 3600, now=NOW)
    by_new, _ = tokens.sign(rotated, uid, "demo", 3600, now=NOW)
    assert tokens.verify(by_new, new, now=NOW) == tokens.verify(by_new, rotated, now=NOW + offset)
    assert (parse_and_check(by_old, rotated, now=NOW + 50 + offset) is not None) == (offset < 0)
    assert parse_and_check(by_old, new) is None
    assert parse_and_check(tokens.sign("third", uid, "demo", 3600, now=NOW)[0], rotated) is None


def test_signing_secret_is_a_plain_string_to_signers():
    rotated = tokens.SigningSecret("new", "old", NOW)
    assert rotated == "new" and str(rotated) == "new" and type(str(rotated)) is str
    assert json.dumps({"s": rotated}) == '{"s": "new"}'
    import copy
    import pickle
    for clone in (copy.deepcopy(rotated), pickle.loads(pickle.dumps(rotated))):
        assert clone == "new" and clone.previous == "old" and clone.previous_until == NOW


@pytest.mark.parametrize("token", ["\udc80.a.b", "é.a.b", "a." + b64(b'{"exp":NaN,"sub":"u"}') + ".c"])
def test_non_ascii_and_nan_tokens_are_refused(token):
    assert parse_and_check(token) is None
