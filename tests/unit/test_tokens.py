import jwt  # PyJWT: tokens from any standard library must verify, and ours must verify there
import pytest

from services.common import tokens


def test_sign_and_verify():
    token, exp = tokens.sign("s3cret", "alice", "demo", 60, device_id="d1", now=1_000_000)
    claims = tokens.verify(token, "s3cret", now=1_000_030)
    assert claims["sub"] == "alice" and claims["app"] == "demo" and claims["dev"] == "d1" and claims["exp"] == exp


def test_interoperates_with_pyjwt():
    KEY = "k" * 32
    ours, _ = tokens.sign(KEY, "bob", "app1", 60)
    assert jwt.decode(ours, KEY, algorithms=["HS256"])["sub"] == "bob"
    theirs = jwt.encode({"sub": "carol", "app": "app1", "exp": 4_000_000_000}, KEY, algorithm="HS256")
    assert tokens.verify(theirs, KEY)["sub"] == "carol"
    assert tokens.unverified_app(theirs) == "app1"


def test_expired_token_is_flagged_expired():
    token, _ = tokens.sign("k", "u", "a", 10, now=1000)
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(token, "k", now=1000 + 10 + 31)
    assert err.value.expired
    tokens.verify(token, "k", now=1000 + 10 + 29)  # inside the leeway


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
    lambda t: t.split(".")[0] + "." + t.split(".")[1],
    lambda t: "garbage",
    lambda t: "a.b.c",
    lambda t: "x" * 5000,
])
def test_bad_tokens_rejected(mutate):
    token, _ = tokens.sign("k", "u", "a", 60)
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(mutate(token), "k")
    assert not err.value.expired


def test_wrong_secret_and_alg_none_rejected():
    token, _ = tokens.sign("k", "u", "a", 60)
    with pytest.raises(tokens.TokenError):
        tokens.verify(token, "other")
    none_token = jwt.encode({"sub": "u", "app": "a", "exp": 4_000_000_000}, None, algorithm="none")
    with pytest.raises(tokens.TokenError):
        tokens.verify(none_token, "k")
