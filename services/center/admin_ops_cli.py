"""``pylon admin``: the operator routes of center in a terminal.

    pylon admin parked [--app A] [--uid U] [--limit N] [--all]   parked messages
    pylon admin requeue <msg_id>...                             put them back and deliver them again
    pylon admin requeue --app A [--uid U]                       every parked message of an app (or user)
    pylon admin user <uid> [--app A] [--payload]                sessions, inboxes, broadcast position
    pylon admin drain <instance> [--no-restart]                 drain one room instance

Like ``pylon status`` it reads the center URL and admin key from ``var/local.json`` (or
``--center`` / ``--admin-key``). ``--json`` prints center's answer as it is. Errors go to stderr
with exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from services.center.status_cli import REQUEST_TIMEOUT_S, StatusError, target

# pages `parked --all` follows at most (1,000 messages each)
MAX_PAGES = 100


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="admin_command", metavar="action")
    sub.required = True

    def action(name: str, help_text: str):
        a = sub.add_parser(name, help=help_text)
        a.add_argument("--local", default=os.path.join("var", "local.json"),
                       help="the launcher's local.json (center URL and admin key; default var/local.json)")
        a.add_argument("--center", help="center URL (instead of the one in local.json)")
        a.add_argument("--admin-key", help="admin key (instead of the one in local.json)")
        a.add_argument("--json", action="store_true", help="print center's answer as JSON")
        return a

    a = action("parked", "list parked messages (delivered max_attempts times without an ack)")
    a.add_argument("--app", help="only this app's")
    a.add_argument("--uid", help="only this user's")
    a.add_argument("--limit", type=int, default=100, help="messages per page (1-1000, default 100)")
    a.add_argument("--after", help="start after this cursor (the \"next\" of a previous page)")
    a.add_argument("--all", action="store_true", help="follow every page")
    a = action("requeue", "put parked messages back in their inboxes and deliver them again")
    a.add_argument("msg_ids", nargs="*", help="message ids")
    a.add_argument("--app", help="every parked message of this app (instead of ids)")
    a.add_argument("--uid", help="with --app: only this user's")
    a = action("user", "a user's sessions, inboxes and broadcast position")
    a.add_argument("uid")
    a.add_argument("--app", help="only this app")
    a.add_argument("--limit", type=int, default=100, help="inbox entries per app (1-1000, default 100)")
    a.add_argument("--payload", action="store_true", help="show payloads")
    a = action("drain", "drain a room instance as on SIGTERM (its clients move to other instances)")
    a.add_argument("instance", help="room instance id, as `pylon status` lists it")
    a.add_argument("--no-restart", action="store_true",
                   help="leave its slot empty afterwards (default: a fresh instance takes its ports)")


def call(center: str, key: str, method: str, path: str, query: dict | None = None, body: dict | None = None) -> Any:
    """One request to center (``path`` already quoted); its JSON answer, or StatusError."""
    query = {k: v for k, v in (query or {}).items() if v is not None}
    url = center + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read() or b"{}").get("error", {})
        except (ValueError, AttributeError):
            err = {}
        what = f"{err.get('message', exc.reason)} ({err.get('code', 'http_error')}, HTTP {exc.code})"
        if exc.code in (401, 403):
            raise StatusError(f"center refused the admin key: {what}") from exc
        raise StatusError(f"center answered {what}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StatusError(f"cannot reach center at {center}: {getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:
        raise StatusError(f"center sent something that is not JSON: {exc}") from exc


def _segment(text: str) -> str:
    """One path segment: a uid may hold '/', '?' or '#'."""
    return urllib.parse.quote(text, safe="")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else "-"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in (headers, *rows)]


def render_parked(messages: list[dict], next_cursor: str | None) -> str:
    if not messages:
        return "no parked messages"
    rows = [[m["msg_id"], m["app"], m["uid"], str(m["seq"]), str(m["attempts"]), _when(m["created_ms"]),
             _when(m["expires_ms"])] for m in messages]
    out = table(["msg_id", "app", "uid", "seq", "attempts", "created (UTC)", "expires (UTC)"], rows)
    if next_cursor:
        out.append(f"more: --after {next_cursor} (or --all)")
    return "\n".join(out)


def render_user(u: dict) -> str:
    out = [f"user {u['uid']}: {'online' if u['online'] else 'offline'}"]
    if u["sessions"]:
        out += table(["session", "instance", "apps", "device", "net", "connected (UTC)"],
                     [[s["session_id"], s["instance"], ",".join(s["apps"]), s["device_id"] or "-", s["net"] or "-",
                       _when(s["connected_ms"])] for s in u["sessions"]])
    if not u["inboxes"]:
        out.append("no inbox with anything in it")
    for box in u["inboxes"]:
        out += ["", f"app {box['app']}: {box['pending']} in the inbox"]
        if box["messages"]:
            headers = ["msg_id", "state", "seq", "attempts", "created (UTC)", "expires (UTC)"]
            rows = [[m["msg_id"], m["state"], str(m["seq"]), str(m["attempts"]), _when(m["created_ms"]),
                     _when(m["expires_ms"])] for m in box["messages"]]
            if any("payload_b64" in m for m in box["messages"]):
                headers.append("payload (base64)")
                for row, m in zip(rows, box["messages"], strict=True):
                    row.append(m.get("payload_b64", "")[:60])
            out += table(headers, rows)
        live = box["broadcasts"]
        out.append(f"  broadcasts: {len(live)} live, {box['broadcasts_acked']} acked by this user")
        if live:
            out += table(["broadcast", "expires (UTC)", "acked"],
                         [[b["broadcast_id"], _when(b["expires_ms"]), "yes" if b["acked"] else "no"] for b in live])
    if u.get("apps_truncated"):
        out += ["", "(more apps exist than were looked at: name one with --app)"]
    return "\n".join(out)


def run(args, center: str, key: str) -> str:
    cmd = args.admin_command
    as_json = args.json
    if cmd == "parked":
        messages, after, pages = [], args.after, 0
        while True:
            page = call(center, key, "GET", "/v1/admin/parked",
                        {"app": args.app, "uid": args.uid, "limit": args.limit, "after": after})
            messages += page["messages"]
            after, pages = page["next"], pages + 1
            if not (args.all and after) or pages >= MAX_PAGES:
                break
        if as_json:
            return json.dumps({"messages": messages, "next": after}, indent=2)
        return render_parked(messages, after)
    if cmd == "requeue":
        if bool(args.msg_ids) == bool(args.app):
            raise StatusError("give message ids, or --app (and optionally --uid)")
        if args.uid and not args.app:
            raise StatusError("--uid needs --app")
        body = {"msg_ids": args.msg_ids} if args.msg_ids else {"app": args.app, **({"uid": args.uid} if args.uid else {})}
        reply = call(center, key, "POST", "/v1/admin/parked/requeue", body=body)
        if as_json:
            return json.dumps(reply, indent=2)
        out = f"requeued {len(reply['requeued'])}: {' '.join(reply['requeued']) or '-'}"
        if reply["skipped"]:
            out += f"\nskipped {len(reply['skipped'])} (not parked, expired or unknown): {' '.join(reply['skipped'])}"
        return out
    if cmd == "user":
        reply = call(center, key, "GET", f"/v1/admin/users/{_segment(args.uid)}",
                     {"app": args.app, "limit": args.limit, "payload": "true" if args.payload else None})
        return json.dumps(reply, indent=2) if as_json else render_user(reply)
    reply = call(center, key, "POST", f"/v1/admin/rooms/{_segment(args.instance)}/drain", body={"restart": not args.no_restart})
    if as_json:
        return json.dumps(reply, indent=2)
    if reply["already_draining"]:
        return f"{reply['instance']} is draining already"
    then = "a fresh instance takes its ports" if reply["restart"] else "its slot stays empty"
    return f"draining {reply['instance']}: {reply['sessions']} sessions move to other instances; then {then}"


def main(args) -> int:
    try:
        center, key = target(args)
        print(run(args, center, key), flush=True)
        return 0
    except StatusError as exc:
        print(f"pylon admin: {exc}", file=sys.stderr)
        return 1
