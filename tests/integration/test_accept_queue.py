"""The room reads its accept-queue length from the kernel (TCP_INFO of a listening socket)."""

from __future__ import annotations

import socket
import time

from services.room.core import accept_queue_length


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
