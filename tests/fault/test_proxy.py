"""The fault tests' TCP proxy against a loopback echo server: forwards, cuts, black-holes."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from services.launcher.backing import free_port
from tests.fault.proxy import ProxyLoop, TcpProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loop = ProxyLoop()
    p = TcpProxy(loop, "echo", ("127.0.0.1", free_port()), server.server_address).start()
    try:
        yield p
    finally:
        p.stop()
        loop.close()
        server.shutdown()
        server.server_close()


def _connect(p: TcpProxy) -> socket.socket:
    s = socket.create_connection(p.listen, timeout=2)
    s.settimeout(2)
    return s


def _echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _wait_open(p: TcpProxy, n: int) -> None:
    deadline = time.monotonic() + 2
    while p.open_connections != n:
        assert time.monotonic() < deadline, f"proxy holds {p.open_connections} connections, expected {n}"
        time.sleep(0.01)


@pytest.fixture
def sockets():
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def test_forwards_and_cut_closes_every_connection(proxy, sockets):
    a, b = _connect(proxy), _connect(proxy)
    sockets += [a, b]
    assert _echo(a, b"one") == b"one" and _echo(b, b"two") == b"two"
    assert proxy.cut() == 2
    assert _closed(a) and _closed(b)
    c = _connect(proxy)  # no black hole: the path works again at once
    sockets.append(c)
    assert _echo(c, b"three") == b"three"


def test_blackhole_holds_new_connections_then_drops_them(proxy, sockets):
    a = _connect(proxy)
    sockets.append(a)
    assert _echo(a, b"x") == b"x"
    proxy.cut(blackhole_s=0.5)
    assert _closed(a)
    held = _connect(proxy)  # accepted by the kernel, but nothing is forwarded
    sockets.append(held)
    held.sendall(b"lost")
    held.settimeout(0.2)
    with pytest.raises(TimeoutError):
        held.recv(1)
    held.settimeout(2)
    assert _closed(held)  # aborted when the black hole ends
    after = _connect(proxy)
    sockets.append(after)
    assert _echo(after, b"back") == b"back"
    _wait_open(proxy, 1)
