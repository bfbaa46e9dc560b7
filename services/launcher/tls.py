"""A private CA and a room server certificate for a local system, made with the ``openssl`` CLI.

``ensure_certs(dir, hosts)`` keeps in ``dir`` (``var/tls/``):

- ``ca.pem`` / ``ca.key``: the CA (EC P-256, 10 years), made once; clients verify rooms against
  ``ca.pem`` (``tls_ca`` in ``var/local.json``);
- ``server.pem`` / ``server.key``: the rooms' certificate, signed by the CA, valid for every host
  name and IP address given (and ``localhost``, ``127.0.0.1``, ``::1``); made again when the
  hosts change or it is within 30 days of expiry, with the same CA.

Keys are written mode 0600. EC P-256 keeps a TLS handshake cheap on the room's one core (an
ECDSA signature costs a fraction of an RSA-2048 one).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time

CA_DAYS = 3650
SERVER_DAYS = 825           # the longest validity clients such as Apple's accept for a server certificate
RENEW_BEFORE_S = 30 * 86400
ALWAYS = ("localhost", "127.0.0.1", "::1")


class TlsSetupError(Exception):
    """openssl is missing or failed."""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


def _openssl(*args: str, cwd: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise TlsSetupError("the openssl command is needed to make the local TLS certificates (apt-get install openssl)")
    try:
        subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise TlsSetupError(f"openssl {args[0]} failed: {exc.stderr.decode(errors='replace').strip()}") from None


def subject_alt_names(hosts) -> list[str]:
    names: list[str] = []
    for host in [*hosts, *ALWAYS]:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            entry = f"IP:{ipaddress.ip_address(host)}"
        except ValueError:
            entry = f"DNS:{host.lower()}"
        if entry not in names:
            names.append(entry)
    return names


def _private(path: str) -> None:
    os.chmod(path, 0o600)


def _new_key(path: str, cwd: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path, cwd=cwd)
    _private(os.path.join(cwd, path))


def _make_ca(d: str) -> None:
    _new_key("ca.key.tmp", d)
    _openssl("req", "-x509", "-new", "-key", "ca.key.tmp", "-sha256", "-days", str(CA_DAYS),
             "-subj", "/CN=Pylon local CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem.tmp", cwd=d)
    os.replace(os.path.join(d, "ca.key.tmp"), os.path.join(d, "ca.key"))
    os.replace(os.path.join(d, "ca.pem.tmp"), os.path.join(d, "ca.pem"))


def _make_server(d: str, sans: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=d) as work:
        _new_key("server.key", work)
        _openssl("req", "-new", "-key", "server.key", "-subj", "/CN=pylon-room", "-out", "server.csr", cwd=work)
        with open(os.path.join(work, "ext.cnf"), "w") as fh:
            fh.write(f"subjectAltName={','.join(sans)}\nbasicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        serial = "0x" + os.urandom(16).hex()
        _openssl("x509", "-req", "-in", "server.csr", "-CA", os.path.join(d, "ca.pem"),
                 "-CAkey", os.path.join(d, "ca.key"), "-set_serial", serial, "-days", str(SERVER_DAYS),
                 "-sha256", "-extfile", "ext.cnf", "-out", "server.pem", cwd=work)
        # the key first: a room reloading between the two renames sees the old pair fail to
        # match at worst, and keeps its certificate in force (services/room/tls.py)
        os.replace(os.path.join(work, "server.key"), os.path.join(d, "server.key"))
        os.replace(os.path.join(work, "server.pem"), os.path.join(d, "server.pem"))
    meta = {"sans": sans, "expires": int(time.time()) + SERVER_DAYS * 86400}
    with open(os.path.join(d, "server.json"), "w") as fh:
        json.dump(meta, fh)


def _server_current(d: str, sans: list[str]) -> bool:
    try:
        with open(os.path.join(d, "server.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    if not all(os.path.exists(os.path.join(d, f)) for f in ("server.pem", "server.key")):
        return False
    return (isinstance(meta, dict) and meta.get("sans") == sans
            and isinstance(meta.get("expires"), int) and meta["expires"] - time.time() > RENEW_BEFORE_S)


def ensure_certs(tls_dir: str, hosts) -> TlsFiles:
    """The CA and a server certificate for ``hosts`` in ``tls_dir``, made or renewed as needed."""
    d = os.path.abspath(tls_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    files = TlsFiles(os.path.join(d, "ca.pem"), os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
    new_ca = not (os.path.exists(files.ca) and os.path.exists(os.path.join(d, "ca.key")))
    if new_ca:
        _make_ca(d)
    sans = subject_alt_names(hosts)
    if new_ca or not _server_current(d, sans):
        _make_server(d, sans)
    return files
