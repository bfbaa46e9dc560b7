"""The ops dashboard in a real headless Chromium against the running cluster under a little load,
and ``pylon status`` against the same cluster.

Chromium (the Debian package) is driven over the DevTools protocol with aiohttp's websocket client:
no browser download, nothing from the internet. The screenshot is kept in $PYLON_TEST_ARTIFACTS
(or the test's tmp dir) and its path printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from tests.wire_client import WireClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium is not installed (apt-get install chromium; CI installs it)")
WAIT_S = 60.0  # bounded waits: the page polls every 2 s, the center samples every 5 s


class DevTools:
    """A headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        assert CHROMIUM, "chromium is not installed"
        profile = os.path.join(self.workdir, "profile")
        os.makedirs(profile, exist_ok=True)
        self.log = open(os.path.join(self.workdir, "chromium.log"), "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1400,1700", "about:blank"],
            stdout=self.log, stderr=self.log)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start (exit {self.proc.poll()}); see {self.log.name}")
            await asyncio.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        self._http = aiohttp.ClientSession()
        page = None
        while page is None:
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next((t for t in await r.json() if t.get("type") == "page"), None)
            if page is None:
                if time.monotonic() > deadline:
                    raise AssertionError("chromium has no page target")
                await asyncio.sleep(0.1)
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id"), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(AssertionError(f"DevTools error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(AssertionError("the DevTools connection closed"))

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 30)

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('cards')", "page load")

    async def reload(self) -> None:
        await self.evaluate("delete document.body.dataset.polls; location.reload(); true")
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('cards')", "reload")

    async def wait_for(self, expression: str, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(AssertionError):  # the page may be between documents
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                state = await self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"the dashboard never showed {what} within {timeout:.0f} s; page text:\n{state}")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: str) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


class Load:
    """A few clients of one app connected to both rooms; pushes to them until stopped, acked."""

    def __init__(self, cluster, app: dict, users: int = 4) -> None:
        self.cluster, self.app = cluster, app
        self.uids = [f"dash-{uuid.uuid4().hex[:10]}" for _ in range(users)]
        self.clients: list[WireClient] = []
        self.tasks: list[asyncio.Task] = []
        self.pushed = 0

    async def start(self) -> None:
        rooms = self.cluster.room_addresses
        for i, uid in enumerate(self.uids):
            token, _ = tokens.sign(self.app["secret"], uid, self.app["id"], 300, device_id="d")
            host, port = rooms[i % len(rooms)]
            c = await WireClient.connect(host, port)
            await c.auth(token, uid, device_id="d", net="wifi")
            self.clients.append(c)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._push()), *(loop.create_task(self._ack(c)) for c in self.clients)]

    async def _push(self) -> None:
        headers = {"Authorization": f"Bearer {self.app['api_key']}"}
        async with aiohttp.ClientSession() as s:
            while True:
                body = {"app": self.app["id"], "uids": self.uids, "payload": "tick"}
                async with s.post(self.cluster.center_url + "/v1/push", json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                self.pushed += len(self.uids)
                await asyncio.sleep(0.2)

    @staticmethod
    async def _ack(c: WireClient) -> None:
        while True:
            frame, body = await c.recv(timeout=30)
            if frame.op == Op.PUSH:
                c.send(Op.ACK, cpb.Ack(msg_ids=[m.msg_id for m in body.messages]))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()


def artifacts_dir(tmp_path) -> str:
    path = os.environ.get("PYLON_TEST_ARTIFACTS") or str(tmp_path / "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


def app_cell(app_id: str, column: int) -> str:
    """JS: the number in one column of the app's row (NaN while the row is missing)."""
    return (f"(() => {{ const r = document.querySelector('#apps tr[data-app=\"{app_id}\"]'); "
            f"return r ? Number(r.children[{column}].textContent.replace(/[^0-9.]/g, '')) : NaN; }})()")


async def broadcast_if_listed(cluster, app: dict) -> str | None:
    """A broadcast to ``app``'s clients if center lists broadcasts (GET /v1/admin/broadcasts), else None."""
    async with aiohttp.ClientSession() as s:
        async with s.get(cluster.center_url + "/v1/admin/broadcasts?limit=5",
                         headers={"Authorization": f"Bearer {cluster.admin_key}"}) as r:
            if r.status == 404:
                return None
            assert r.status == 200, await r.text()
        async with s.post(cluster.center_url + "/v1/broadcast", json={"app": app["id"], "payload": "all", "ttl_s": 120},
                          headers={"Authorization": f"Bearer {app['api_key']}"}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["broadcast_id"]


async def test_dashboard_shows_the_cluster_live_and_remembers_the_key(cluster, tmp_path):
    app = cluster.create_app(f"dash-{uuid.uuid4().hex[:8]}")
    load = Load(cluster, app)
    browser = DevTools(str(tmp_path))
    await load.start()
    try:
        await browser.start()
        await browser.open(f"{cluster.center_url}/dashboard#key={cluster.admin_key}")
        # the key left the address bar and stayed in the browser
        assert await browser.evaluate("location.hash") == ""
        assert await browser.evaluate("localStorage.getItem('pylon-admin-key')") == cluster.admin_key

        await browser.wait_for("Number(document.body.dataset.polls || 0) >= 1", "a first overview")
        # both room instances, live, with the sessions this test holds
        await browser.wait_for(
            "document.querySelectorAll('#rooms tr[data-state=\"live\"]').length >= 2", "two live room instances")
        room_ids = await browser.evaluate(
            "[...document.querySelectorAll('#rooms tr[data-room]')].map(r => r.dataset.room)")
        assert len(room_ids) >= 2 and all(r.startswith("room-") for r in room_ids)
        await browser.wait_for(
            f"Number(document.getElementById('v-sessions').textContent.replace(/[^0-9]/g, '')) >= {len(load.uids)}",
            f"at least {len(load.uids)} sessions")
        # this app's row: its online sessions and a message rate (rates need two samples)
        await browser.wait_for(f"{app_cell(app['id'], 1)} >= {len(load.uids)}", f"{len(load.uids)} online in {app['id']}")
        await browser.wait_for(f"{app_cell(app['id'], 2)} > 0", f"a message rate for {app['id']}")
        await browser.wait_for("Number(document.getElementById('v-delivered').textContent.replace(/[^0-9.]/g, '')) > 0",
                               "a cluster-wide delivery rate")
        # the charts hold history drawn in the page, and every health check is answered
        await browser.wait_for("Number(document.querySelector('#c-messages svg').dataset.points) >= 2 && "
                               "!!document.querySelector('#c-messages svg polyline[data-series=\"delivered_per_s\"]')",
                               "a drawn delivery chart")
        states = await browser.wait_for(
            "(() => { const s = {}; for (const n of ['redis','mysql','saver','register','coordinator','webhooks'])"
            " { const e = document.getElementById('h-' + n); if (!e) return null; s[n] = e.dataset.state; } return s; })()",
            "the health checks")
        assert states["redis"] == "ok" and states["mysql"] == "ok", states
        for name in ("saver", "register", "coordinator"):
            assert states[name] in ("ok", "warn"), states
        # broadcasts: listed with a progress bar where this center lists them, a clear note where not
        bid = await broadcast_if_listed(cluster, app)
        if bid is not None:
            row = await browser.wait_for(
                f"(() => {{ const r = document.querySelector('#broadcasts tr[data-broadcast=\"{bid}\"]');"
                " return r && r.querySelector('.bar') ? r.innerText : ''; })()", f"broadcast {bid} with progress")
            assert app["id"] in row
        else:
            note = await browser.wait_for("document.getElementById('bc-note').textContent", "the broadcasts note")
            assert "does not list broadcasts" in note, note
        assert await browser.evaluate("document.body.dataset.notice || ''") == ""

        shot = os.path.join(artifacts_dir(tmp_path), "dashboard.png")
        await browser.screenshot(shot)
        assert os.path.getsize(shot) > 10_000
        print(f"dashboard screenshot: {shot}")

        # a reload finds the key in the browser: no key in the URL, data again, no notice
        await browser.reload()
        await browser.wait_for("Number(document.body.dataset.polls || 0) >= 1", "data after a reload")
        assert await browser.evaluate("document.body.dataset.notice || ''") == ""

        # a wrong key: a clear message, not a blank page
        await browser.open(f"{cluster.center_url}/dashboard#key=not-the-admin-key")
        notice = await browser.wait_for("document.body.dataset.notice", "the refused-key message")
        assert "refused" in notice
        text = await browser.evaluate("document.getElementById('notice').innerText")
        assert "invalid admin key" in text and "#key=" in text
    finally:
        await browser.close()
        await load.stop()


async def test_overview_route_refuses_missing_wrong_and_app_keys(cluster):
    async with aiohttp.ClientSession() as s:
        for headers, status, code in (({}, 401, "missing_api_key"),
                                      ({"Authorization": "Bearer wrong-key"}, 401, "invalid_api_key"),
                                      ({"Authorization": f"Bearer {cluster.app['api_key']}"}, 403, "admin_required")):
            async with s.get(cluster.center_url + "/v1/admin/overview", headers=headers) as r:
                assert r.status == status
                assert (await r.json())["error"]["code"] == code


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pylon_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "status", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_pylon_status_prints_the_cluster(cluster, tmp_path):
    local = tmp_path / "local.json"
    cluster.write_local_json(str(local))
    deadline = time.monotonic() + WAIT_S
    while True:  # the app table is read with every sample (5 s): the demo app may be newer than the last one
        as_json = pylon_status("--local", str(local), "--json")
        assert as_json.returncode == 0, as_json.stderr
        overview = json.loads(as_json.stdout)
        if cluster.app["id"] in {a["app"] for a in overview["apps"]}:
            break
        assert time.monotonic() < deadline, f"pylon status never listed {cluster.app['id']}: {overview['apps']}"
        time.sleep(1)
    assert overview["instances"]["room"] >= 2

    out = pylon_status("--local", str(local))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for room_host, room_port in cluster.room_addresses:
        assert f"{room_host}:{room_port}" in text
    for word in ("sessions", "redis", "mysql", "saver", "register", "coordinator", "webhooks", cluster.app["id"]):
        assert word in text, text

    broken = tmp_path / "bad.json"
    broken.write_text(json.dumps({**cluster.local_json(), "admin_key": "not-the-admin-key"}))
    refused = pylon_status("--local", str(broken))
    assert refused.returncode == 1 and "invalid admin key" in refused.stderr and "Traceback" not in refused.stderr
    missing = pylon_status("--local", str(tmp_path / "nothing.json"))
    assert missing.returncode == 1 and "not found" in missing.stderr and "Traceback" not in missing.stderr
