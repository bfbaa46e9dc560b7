"""TLS for the room's client port (DESIGN.md §5, proto/WIRE.md §1).

``ServerTls.context`` is what ``loop.create_server(..., ssl=...)`` gets. It serves no certificate
itself: its SNI callback, which OpenSSL runs for every ClientHello (with or without a server
name), switches the handshake to the context holding the certificate and key in force. A reload
(SIGHUP) builds a complete new context from the files and swaps it in only if it loaded, so a
half-written or mismatched key pair never reaches a handshake; connections already open keep
the context they were made with, and none is dropped.
"""

from __future__ import annotations

import logging
import ssl

from services.room import metrics as m

log = logging.getLogger(__name__)


class TlsConfigError(Exception):
    """The certificate or key cannot be used (unreadable, not PEM, not a pair)."""


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # a session does not need compression (CRIME) nor renegotiation; each costs memory per link
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS certificate {cert} and key {key}: {exc}") from None
    return ctx


class ServerTls:
    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.current = _server_context(cert, key)
        self.context = _server_context(cert, key)  # the listener's; its callback picks ``current``
        self.context.sni_callback = self._pick
        self.reloads = 0

    def _pick(self, sslobj, _server_name, _ctx) -> None:
        sslobj.context = self.current
        return None

    def reload(self) -> bool:
        """Read the certificate and key again; True if the new pair is in force for new handshakes."""
        try:
            fresh = _server_context(self.cert, self.key)
        except TlsConfigError as exc:
            m.TLS_RELOADS.labels("failed").inc()
            log.error("TLS reload failed, keeping the certificate in force: %s", exc)
            return False
        self.current = fresh
        self.reloads += 1
        m.TLS_RELOADS.labels("ok").inc()
        log.info("TLS certificate and key reloaded from %s and %s", self.cert, self.key)
        return True
