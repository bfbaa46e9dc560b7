"""TLS pieces without a network: route entries with tls_port (dispatcher and SDK), the SDK's
choice of TLS ports, the launcher's CA and certificate files, the room's reload."""

from __future__ import annotations

import json
import os
import ssl

import pytest
from pylon_sdk import PylonClient
from pylon_sdk.errors import RouteError
from pylon_sdk.routing import Address, FixedRoutes, parse_route_reply

from services.common.discovery import Instance
from services.dispatcher import routing
from services.launcher import tls
from services.room.tls import ServerTls, TlsConfigError


def test_route_entries_carry_tls_port_only_when_the_room_serves_tls():
    rooms = [Instance("room", "r1", host="10.0.0.1", port=7100, tls_port=7300),
             Instance("room", "r2", host="10.0.0.2", port=7100)]
    route = routing.choose(rooms, routing.RouteQuery(uid="u", net="", region="default", exclude=frozenset(), count=2))
    view = {r["instance"]: r for r in routing.route_view(route)["rooms"]}
    assert view["r1"]["tls_port"] == 7300 and "tls_port" not in view["r2"]
    assert Instance.from_json(rooms[0].to_json()).tls_port == 7300
    assert Instance.from_json('{"service": "room", "id": "old"}').tls_port == 0  # records of older rooms


def test_sdk_reads_tls_port_from_routes_and_rejects_a_bad_one():
    body = json.dumps({"rooms": [{"host": "h", "port": 1, "tls_port": 2}, {"host": "g", "port": 3}]}).encode()
    assert parse_route_reply(body) == [Address("h", 1, 2), Address("g", 3, 0)]
    for bad in (0.5, "7300", 70000, True, -1):
        with pytest.raises(RouteError):
            parse_route_reply(json.dumps({"rooms": [{"host": "h", "port": 1, "tls_port": bad}]}).encode())
    assert FixedRoutes([("h", 1, 2), ("g", 3)]).addresses == [Address("h", 1, 2), Address("g", 3)]
    assert str(Address("h", 1, 2)) == "h:1"  # its name (exclude, RECONNECT) stays the plain port


def test_sdk_prefers_tls_ports_fills_them_in_for_redirects_and_tls_only_skips_the_rest(tmp_path):
    files = tls.ensure_certs(str(tmp_path), ["127.0.0.1"])
    client = PylonClient(uid="u", token="t", addresses=[("h", 1, 2)], tls_ca=files.ca)
    assert client._tls_addresses([Address("h", 1, 2), Address("g", 3)]) == [Address("h", 1, 2), Address("g", 3)]
    assert client._tls_addresses([Address("h", 1)]) == [Address("h", 1, 2)]  # COMMAND RECONNECT names port 1
    strict = PylonClient(uid="u", token="t", addresses=[("h", 1, 2)], tls_ca=files.ca, tls_only=True)
    assert strict._tls_addresses([Address("h", 1, 2), Address("g", 3)]) == [Address("h", 1, 2)]
    plain = PylonClient(uid="u", token="t", addresses=[("h", 1, 2)])
    assert plain._tls is None and plain._tls_addresses([Address("g", 3)]) == [Address("g", 3)]
    with pytest.raises(ValueError):
        PylonClient(uid="u", token="t", addresses=[("h", 1)], tls_only=True)
    with pytest.raises(ValueError):
        PylonClient(uid="u", token="t", addresses=[("h", 1)], tls_ca=files.ca, ssl_context=ssl.create_default_context())


def test_launcher_ca_and_certificate_made_once_and_again_when_the_hosts_change(tmp_path):
    d = str(tmp_path / "tls")
    files = tls.ensure_certs(d, ["10.1.2.3", "room.example"])
    assert oct(os.stat(files.key).st_mode & 0o777) == "0o600" and oct(os.stat(os.path.join(d, "ca.key")).st_mode
                                                                       & 0o777) == "0o600"
    ctx = ssl.create_default_context(cafile=files.ca)
    ctx.load_cert_chain(files.cert, files.key)  # a pair, chained to the CA
    stamp = os.stat(files.cert).st_mtime_ns, os.stat(files.ca).st_mtime_ns
    assert tls.ensure_certs(d, ["10.1.2.3", "room.example"]) == files
    assert (os.stat(files.cert).st_mtime_ns, os.stat(files.ca).st_mtime_ns) == stamp  # kept
    tls.ensure_certs(d, ["10.9.9.9"])
    assert os.stat(files.ca).st_mtime_ns == stamp[1] and os.stat(files.cert).st_mtime_ns != stamp[0]
    with open(os.path.join(d, "server.json")) as fh:
        assert json.load(fh)["sans"] == ["IP:10.9.9.9", "DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    assert tls.subject_alt_names(["[::1]", "Room.Example", ""]) == ["IP:::1", "DNS:room.example", "DNS:localhost",
                                                                    "IP:127.0.0.1"]


def test_room_tls_reload_keeps_the_pair_in_force_when_the_new_one_does_not_load(tmp_path):
    files = tls.ensure_certs(str(tmp_path / "a"), ["127.0.0.1"])
    with pytest.raises(TlsConfigError):
        ServerTls(files.cert, str(tmp_path / "missing.key"))
    server = ServerTls(files.cert, files.key)
    before = server.current
    assert server.reload() and server.current is not before and server.reloads == 1
    other = tls.ensure_certs(str(tmp_path / "b"), ["127.0.0.1"])
    server.key = other.key  # a key that is not the certificate's
    in_force = server.current
    assert not server.reload() and server.current is in_force
