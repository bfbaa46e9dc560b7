"""Receive pushes as a demo user of a running local Pylon (`pylon up` writes var/local.json).

    python sdk/python/examples/demo_client.py                 # until Ctrl-C
    python sdk/python/examples/demo_client.py --count 3       # exit after 3 messages
    python sdk/python/examples/demo_client.py --uid alice --local-json /path/to/local.json
    python sdk/python/examples/demo_client.py --dedupe-file var/demo-handled.db   # no repeats across restarts

Every message is printed on stdout as one line: ``<msg_id> <app> <payload>`` (the payload as
text when it is UTF-8, otherwise ``base64:<...>``), once per msg_id. With ``--dedupe-file`` the
handled ids are kept in that SQLite file, so a message printed before a restart of this client
is not printed again. Connection news goes to stderr. Push to it from another shell:

    curl -s -X POST $CENTER/v1/push -H "Authorization: Bearer $API_KEY" \\
         -d '{"app": "demo", "uids": ["demo-user"], "payload": "hello"}'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys

from pylon_sdk import AuthError, Kicked, Message, PylonClient, PylonError


def load_local(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"{path} not found: start Pylon with `pylon up` first, or pass --local-json") from None
    except ValueError as exc:
        raise SystemExit(f"{path} is not JSON: {exc}") from None
    for key in ("center", "dispatcher", "app"):
        if key not in data:
            raise SystemExit(f"{path} has no {key!r}")
    return data


async def mint_token(center: str, api_key: str, uid: str, device_id: str) -> str:
    import aiohttp

    url = f"{center.rstrip('/')}/v1/tokens"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(url, json={"uid": uid, "device_id": device_id},
                                 headers={"Authorization": f"Bearer {api_key}"}) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise SystemExit(f"POST {url} answered {resp.status}: {body[:300]}")
                return json.loads(body)["token"]
    except aiohttp.ClientError as exc:
        raise SystemExit(f"cannot reach center at {center}: {exc}") from None


def show(msg: Message) -> str:
    try:
        text = msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = "base64:" + base64.b64encode(msg.payload).decode()
    return f"{msg.msg_id} {msg.app} {text}"


async def run(args: argparse.Namespace) -> int:
    local = load_local(args.local_json)
    app = local["app"]
    token = await mint_token(local["center"], app["api_key"], args.uid, args.device_id)
    received = 0
    done = asyncio.Event()

    def on_message(msg: Message) -> None:
        nonlocal received
        print(show(msg), flush=True)
        received += 1
        if args.count and received >= args.count:
            done.set()

    def on_event(kind: str, data) -> None:
        if kind in ("connected", "disconnected", "kicked", "error"):
            print(f"[{kind}] {data}", file=sys.stderr, flush=True)

    client = PylonClient(local["dispatcher"], args.uid, token, device_id=args.device_id, apps=[app["id"]],
                         net=args.net, on_message=on_message, on_event=on_event, dedupe_path=args.dedupe_file,
                         tls_ca=local.get("tls_ca") or None)  # TLS to rooms that offer it, verified by the local CA
    try:
        await client.start(timeout=args.connect_timeout)
    except AuthError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except Kicked as exc:
        print(f"closed: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"could not connect within {args.connect_timeout} s", file=sys.stderr)
        await client.close()
        return 1
    print(f"connected as {args.uid} (session {client.session_id}{', TLS' if client.tls else ''}); waiting for messages",
          file=sys.stderr, flush=True)
    try:
        closed = asyncio.ensure_future(client.wait_closed())
        finished = asyncio.ensure_future(done.wait())
        await asyncio.wait({closed, finished}, return_when=asyncio.FIRST_COMPLETED)
        for f in (closed, finished):
            f.cancel()
        if client.close_reason and not done.is_set():
            print(f"closed: {client.close_reason}", file=sys.stderr)
            return 1
        return 0
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print every Pylon message a demo user receives.")
    p.add_argument("--local-json", default=os.environ.get("PYLON_LOCAL_JSON", "var/local.json"),
                   help="the file `pylon up` writes (default var/local.json)")
    p.add_argument("--uid", default="demo-user")
    p.add_argument("--device-id", default="demo-device")
    p.add_argument("--net", default="wifi", choices=["wifi", "cellular", "ethernet", ""])
    p.add_argument("--count", type=int, default=0, help="exit after N messages (0 = run until Ctrl-C)")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--dedupe-file", default=None, metavar="PATH",
                   help="SQLite file of handled message ids, so a restarted client prints no message twice")
    args = p.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0
    except PylonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
