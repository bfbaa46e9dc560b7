"""The room reads its accept-queue length from the kernel (TCP_INFO of a listening socket)."""

from __future__ import annotations

import socket
import time

from services.room.core import accept_queue_length, accept_wait_ms


def test_accept_queue_length_counts_connections_not_yet_accepted():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    clients = []
    try:
        assert accept_queue_length(lsock) == 0
        for _ in range(20):
            c = socket.create_connection(lsock.getsockname(), timeout=5)  # the kernel completes it
            clients.append(c)
        deadline = time.monotonic() + 5
        while accept_queue_length(lsock) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert accept_queue_length(lsock) == 20
        for _ in range(5):
            lsock.accept()[0].close()
        assert accept_queue_length(lsock) == 15
    finally:
        for c in clients:
            c.close()
        lsock.close()


def test_accept_wait_is_how_long_the_first_data_waited_for_accept():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    client = socket.create_connection(lsock.getsockname(), timeout=5)
    try:
        client.sendall(b"AUTH")
        time.sleep(0.3)
        conn, _ = lsock.accept()
        try:
            assert 250 <= accept_wait_ms(conn) < 5000
        finally:
            conn.close()
        fresh = socket.create_connection(lsock.getsockname(), timeout=5)
        try:
            fresh.sendall(b"AUTH")
            conn, _ = lsock.accept()
            assert accept_wait_ms(conn) < 250
            conn.close()
        finally:
            fresh.close()
    finally:
        client.close()
        lsock.close()
