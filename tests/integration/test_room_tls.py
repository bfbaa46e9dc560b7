"""TLS for clients on real processes: route entries carry tls_port, the SDK connects over TLS
verified by the launcher's CA and gets a push; a client given another CA fails verification and
never authenticates; SIGHUP makes new handshakes use a new certificate while open connections
stay, and a broken key pair on reload keeps the certificate in force."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import urllib.request
import uuid

from pylon_sdk import PylonClient, TlsError

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from services.launcher import backing, procs, tls
from tests.integration.conftest import TEST_ENV
from tests.wire_client import WireClient


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def _until(check, what: str, timeout_s: float = 15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_sdk_over_tls_gets_a_push_and_a_wrong_ca_fails_verification(cluster, tmp_path):
    local = cluster.local_json()
    assert local["tls_ca"] == cluster.tls_files.ca and os.path.exists(local["tls_ca"])
    uid = "tls-" + uuid.uuid4().hex[:8]
    route = _get(f"{cluster.dispatcher_url}/v1/route?uid={uid}")
    tls_ports = {p for _, p in cluster.room_tls_addresses}
    assert route["rooms"] and all(r["tls_port"] in tls_ports for r in route["rooms"])

    app = cluster.app
    token = tokens.sign(app["secret"], uid, app["id"], 300)[0]
    got: asyncio.Queue = asyncio.Queue()
    client = PylonClient(cluster.dispatcher_url, uid, token, apps=[app["id"]], on_message=got.put,
                         tls_ca=local["tls_ca"], tls_only=True)
    await client.start(timeout=20)
    try:
        assert client.tls and client.address.tls_port in tls_ports
        status, body = cluster.api("POST", "/v1/push", {"app": app["id"], "uids": [uid], "payload": "over tls"},
                                   key=app["api_key"])
        assert status == 200, body
        msg = await asyncio.wait_for(got.get(), 10)
        assert msg.text == "over tls" and str(msg.msg_id) == body["msg_ids"][0]
    finally:
        await client.close()

    # a CA that did not sign the rooms' certificate: every TLS handshake fails, AUTH is never sent
    other = tls.ensure_certs(str(tmp_path / "other-ca"), ["127.0.0.1"])
    errors: asyncio.Queue = asyncio.Queue()
    stranger = PylonClient(cluster.dispatcher_url, uid, token, apps=[app["id"]], tls_ca=other.ca, tls_only=True,
                           on_event=lambda kind, data: errors.put_nowait(data) if kind == "error" else None,
                           reconnect_min_s=0.05, reconnect_max_s=0.2)
    try:
        starting = asyncio.ensure_future(stranger.start(timeout=15))
        err = await asyncio.wait_for(errors.get(), 15)
        assert isinstance(err, TlsError) and "did not verify" in str(err)
        assert not stranger.connected and not starting.done()
    finally:
        await stranger.close()
        await asyncio.gather(starting, return_exceptions=True)


async def _tls_client(host: str, port: int, ca: str) -> WireClient:
    ctx = ssl.create_default_context(cafile=ca)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 5)
    return WireClient(reader, writer)


async def _verifies(host: str, port: int, ca: str) -> bool:
    try:
        c = await _tls_client(host, port, ca)
    except ssl.SSLCertVerificationError:
        return False
    await c.close()
    return True


async def test_sighup_reloads_the_certificate_without_dropping_connections(cluster, tmp_path):
    first = tls.ensure_certs(str(tmp_path / "first"), ["127.0.0.1"])
    second = tls.ensure_certs(str(tmp_path / "second"), ["127.0.0.1"])
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "server.pem"), str(live / "server.key")
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)

    host = cluster.host
    port, tls_port, grpc_port, metrics_port = (backing.free_port() for _ in range(4))
    env = procs.common_env(cluster.common, TEST_ENV)
    room = procs.start("room-tls-reload", ["room", "--host", host, "--port", str(port), "--grpc-port", str(grpc_port),
                                           "--metrics-port", str(metrics_port), "--instances", "1",
                                           "--tls-port", str(tls_port), "--tls-cert", cert, "--tls-key", key],
                       env, os.path.join(cluster.var, "logs"), wait_for=[(host, port), (host, tls_port)])
    try:
        app = cluster.app
        uid = "tls-reload-" + uuid.uuid4().hex[:8]
        token = tokens.sign(app["secret"], uid, app["id"], 300)[0]
        old = await _tls_client(host, tls_port, first.ca)
        await old.auth(token, uid)
        assert not await _verifies(host, tls_port, second.ca)

        # a new pair in place, then SIGHUP: new handshakes get it, the open session stays
        os.replace(second.key, key)
        os.replace(second.cert, cert)
        room.signal(signal.SIGHUP)
        await _until(lambda: _verifies(host, tls_port, second.ca), "the new certificate in new handshakes")
        assert not await _verifies(host, tls_port, first.ca)
        old.send(Op.PING)
        await old.expect(Op.PONG)
        fresh = await _tls_client(host, tls_port, second.ca)
        await fresh.auth(tokens.sign(app["secret"], uid + "-2", app["id"], 300)[0], uid + "-2")

        # a key that does not match the certificate: the reload fails and the pair in force stays
        with open(key, "w") as fh:
            fh.write("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        room.signal(signal.SIGHUP)

        async def reload_failed() -> bool:
            return 'pylon_room_tls_reloads_total{result="failed"} 1.0' in _metrics(metrics_port)

        await _until(reload_failed, "the failed reload to be counted")
        assert 'pylon_room_tls_reloads_total{result="ok"} 1.0' in _metrics(metrics_port)

        async def two_open() -> bool:  # old and fresh (the probes' closes may still be in flight)
            return "pylon_room_tls_connections 2.0" in _metrics(metrics_port)

        await _until(two_open, "the TLS connection gauge to count the two open sessions")
        assert await _verifies(host, tls_port, second.ca)
        for c in (old, fresh):
            c.send(Op.PING)
            await c.expect(Op.PONG)
            await c.close()
        # the plain port is unaffected
        plain = await WireClient.connect(host, port)
        plain.send(Op.AUTH, cpb.Auth(token=token, uid=uid))
        await plain.expect(Op.AUTH_OK)
        await plain.close()
    finally:
        room.stop()


async def test_sighup_to_the_room_supervisor_reloads_every_instance(cluster):
    import redis

    from services.launcher.procs import children

    sup = cluster.services["room"]
    before = sorted(children(sup.pid))
    client = redis.Redis.from_url(cluster.common.redis_url)
    try:
        records = [json.loads(raw) for raw in client.hvals("pylon:discinfo:room")]
    finally:
        client.close()
    ids = {f"room-{h}:{p}" for h, p in cluster.room_addresses}  # not rooms other tests started
    ours = [r["metrics"] for r in records if r["id"] in ids]
    assert len(ours) == cluster.room_instances

    def reloads(address: str) -> float:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('pylon_room_tls_reloads_total{result="ok"} '):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    start = {m: reloads(m) for m in ours}
    sup.signal(signal.SIGHUP)

    async def all_reloaded() -> bool:
        return all(reloads(m) > start[m] for m in ours)

    await _until(all_reloaded, "every instance to reload its certificate")
    assert sup.alive() and sorted(children(sup.pid)) == before  # nobody restarted or died
