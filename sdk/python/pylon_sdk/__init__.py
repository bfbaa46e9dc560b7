"""Pylon client SDK for Python (asyncio).

    from pylon_sdk import PylonClient

    async def on_message(msg):          # each msg_id once; recorded and acked when this returns
        print(msg.msg_id, msg.app, msg.text)

    client = PylonClient("http://dispatcher:8080", uid="alice", token=token, apps=["myapp"],
                         on_message=on_message)
    await client.start()
    accepted = await client.send_upstream("myapp", "chat", b"hello")
    ...
    await client.close()

See sdk/python/README.md for the full API and proto/WIRE.md for the protocol.
"""

from pylon_sdk.client import PylonClient, State
from pylon_sdk.errors import (
    AuthError,
    ClientClosed,
    ConnectionLost,
    DedupeStoreError,
    FrameTooLarge,
    Kicked,
    NotConnected,
    ProtocolError,
    PylonError,
    ReplyTimeout,
    RouteError,
    SendQueueFull,
    ServerError,
    TlsError,
    UpstreamTimeout,
)
from pylon_sdk.frames import SDK_VERSION
from pylon_sdk.heartbeat import HeartbeatPolicy
from pylon_sdk.message import Message
from pylon_sdk.routing import Address

__version__ = "0.1.0"

__all__ = [
    "Address", "AuthError", "ClientClosed", "ConnectionLost", "DedupeStoreError", "FrameTooLarge", "HeartbeatPolicy",
    "Kicked", "Message", "NotConnected", "ProtocolError", "PylonClient", "PylonError", "ReplyTimeout", "RouteError", "SDK_VERSION", "SendQueueFull",
    "ServerError", "State", "TlsError", "UpstreamTimeout", "__version__",
]
