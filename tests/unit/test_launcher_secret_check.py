"""The launcher's demo app after its secret was rotated elsewhere: center never shows a secret
again, so the launcher checks its stored one against a token center mints, and rotates the
secret to learn a working one only when the stored one no longer signs (no network)."""

from __future__ import annotations

from services.common import tokens
from services.launcher.cluster import LocalCluster, read_json, write_private_json


class SigningCenter(LocalCluster):
    """A center with one app whose tokens are real JWTs signed with its current secret."""

    def __init__(self, var: str, secret: str) -> None:
        super().__init__(var)
        self.admin_key = "ak_test_admin_key"
        self.secret = secret
        self.calls: list[tuple[str, str]] = []

    def api(self, method, path, body=None, key=None):
        self.calls.append((method, path))
        if method == "GET" and path == "/v1/apps/demo":
            return 200, {"id": "demo", "webhook_url": ""}  # no secret, no key
        if method == "POST" and path == "/v1/tokens" and key == "pk_demo":
            return 200, {"token": tokens.sign(self.secret, body["uid"], "demo", 60)[0]}
        if method == "POST" and path == "/v1/apps/demo/rotate-secret":
            self.secret = "rotated-by-the-launcher"
            return 200, {"id": "demo", "secret": self.secret, "previous_secret_until": 0}
        raise AssertionError((method, path))


def _remember(tmp_path, secret: str) -> None:
    write_private_json(str(tmp_path / "identity.json"),
                       {"admin_key": "ak_test_admin_key", "app": {"id": "demo", "secret": secret, "api_key": "pk_demo"}})


def test_a_stored_secret_that_still_signs_is_kept(tmp_path):
    _remember(tmp_path, "s1")
    c = SigningCenter(str(tmp_path), "s1")
    assert c.ensure_demo_app() == {"id": "demo", "secret": "s1", "api_key": "pk_demo"}
    assert ("POST", "/v1/apps/demo/rotate-secret") not in c.calls


def test_a_secret_rotated_elsewhere_is_replaced_by_a_new_one_that_signs(tmp_path):
    _remember(tmp_path, "s1")
    c = SigningCenter(str(tmp_path), "someone-rotated-it")
    app = c.ensure_demo_app()
    assert app == {"id": "demo", "secret": "rotated-by-the-launcher", "api_key": "pk_demo"} and not c.app_created
    assert read_json(str(tmp_path / "identity.json"))["app"] == app
    assert tokens.verify(tokens.sign(c.secret, "u", "demo", 60)[0], app["secret"])
