"""Client tokens: JWT, HS256, signed with the app's secret (DESIGN.md §5).

Claims: ``sub`` = uid, ``dev`` = device id, ``app`` = app id, ``exp`` = expiry (unix seconds),
``iat`` = issued at. Any standard JWT library produces tokens this module accepts; this
implementation exists so that the room verifies without importing a JWT library per process.

Rotation: an app's secret may be a ``SigningSecret``, the current secret that also carries the
one it replaced and the end of their overlap window. Tokens are always signed with the current
one; ``check`` accepts a token signed with the previous one until the window ends, so every
verifier that calls ``check(app.secret)`` honours a rotation without knowing about it.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import time

_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
MAX_TOKEN_BYTES = 4096  # a token is a few hundred bytes; anything larger is garbage


class SigningSecret(str):
    """The current secret (the str value) plus ``previous``, still accepted until ``previous_until``
    (unix seconds). A plain str to everything that signs with it."""

    def __new__(cls, current: str, previous: str = "", previous_until: float = 0) -> SigningSecret:
        obj = super().__new__(cls, current)
        obj.previous = previous
        obj.previous_until = previous_until
        return obj

    def __reduce__(self):
        return (SigningSecret, (str(self), self.previous, self.previous_until))


class TokenError(Exception):
    """The token is not acceptable. ``expired`` tells apart a good-but-old token."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number a token may carry")


# NaN/Infinity would make an exp that never expires. One decoder for every call: json.loads with
# a keyword builds a new one each time (3x slower on the AUTH path)
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _json(data: bytes):
    try:
        return _DECODER.decode(data.decode())  # UnicodeDecodeError is a ValueError
    except RecursionError:  # deep nesting
        raise ValueError("nested too deeply") from None


def sign(secret: str, uid: str, app: str, ttl_s: int, device_id: str = "", now: float | None = None) -> tuple[str, int]:
    """Return (token, expires_at)."""
    issued = int(now if now is not None else time.time())
    exp = issued + int(ttl_s)
    claims = {"sub": uid, "app": app, "exp": exp, "iat": issued}
    if device_id:
        claims["dev"] = device_id
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = _HEADER + b"." + payload
    sig = _b64(hmac.digest(secret.encode(), signing_input, "sha256"))
    return (signing_input + b"." + sig).decode(), exp


class ParsedToken:
    """A token split and its claims decoded once; ``check`` verifies it against a secret."""

    __slots__ = ("signing_input", "signature", "header_b64", "claims")

    def __init__(self, token: str) -> None:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token too long")
        if not token.isascii():  # base64url and dots only; also keeps lone surrogates out of encode()
            raise TokenError("token is not a JWT")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("token is not a JWT")
        self.header_b64 = parts[0]
        self.signing_input = f"{parts[0]}.{parts[1]}".encode()
        self.signature = parts[2].encode()
        try:
            claims = _json(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenError("token payload is not JSON") from exc
        if not isinstance(claims, dict):
            raise TokenError("token payload is not an object")
        self.claims = claims

    @property
    def app(self) -> str:
        app = self.claims.get("app")
        if not isinstance(app, str) or not app:
            raise TokenError("token has no app claim")
        return app

    def check(self, secret: str, now: float | None = None, leeway_s: int = 30) -> dict:
        """Check algorithm, signature, expiry and subject; return the claims."""
        if self.header_b64.encode() != _HEADER:  # our own canonical header needs no JSON parse
            try:
                header = _json(_unb64(self.header_b64))
            except (ValueError, UnicodeDecodeError) as exc:
                raise TokenError("token header is not JSON") from exc
            if not isinstance(header, dict) or header.get("alg") != "HS256":
                raise TokenError("token algorithm must be HS256")
        now = now if now is not None else time.time()
        expected = _b64(hmac.digest(secret.encode(), self.signing_input, "sha256"))  # one-shot, in C
        if not hmac.compare_digest(expected, self.signature) and not self._signed_by_previous(secret, now):
            raise TokenError("bad token signature")
        claims = self.claims
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or not math.isfinite(exp):
            raise TokenError("token has no exp claim")
        if exp + leeway_s < now:
            raise TokenError("token expired", expired=True)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenError("token has no sub claim")
        return claims


    def _signed_by_previous(self, secret: str, now: float) -> bool:
        previous = getattr(secret, "previous", "")
        if not previous or now >= secret.previous_until:
            return False
        expected = _b64(hmac.digest(previous.encode(), self.signing_input, "sha256"))
        return hmac.compare_digest(expected, self.signature)


def unverified_app(token: str) -> str:
    """The ``app`` claim without checking the signature, to pick the secret to verify with."""
    return ParsedToken(token).app


def verify(token: str, secret: str, now: float | None = None, leeway_s: int = 30) -> dict:
    """Check signature, algorithm and expiry; return the claims."""
    return ParsedToken(token).check(secret, now, leeway_s)
