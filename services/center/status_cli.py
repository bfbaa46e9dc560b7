"""``pylon status``: the cluster overview in a terminal (instances, connections, rates, health).

Reads the center URL and admin key from ``var/local.json`` (written by ``pylon up``) and prints
what ``GET /v1/admin/overview`` answers: the same figures as the dashboard. Errors go to stderr
with exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

REQUEST_TIMEOUT_S = 10.0


class StatusError(Exception):
    """Something the operator can fix: no local.json, center unreachable, key refused."""


def add_arguments(p) -> None:
    p.add_argument("--local", default=os.path.join("var", "local.json"),
                   help="the launcher's local.json (center URL and admin key; default var/local.json)")
    p.add_argument("--center", help="center URL (instead of the one in local.json)")
    p.add_argument("--admin-key", help="admin key (instead of the one in local.json)")
    p.add_argument("--json", action="store_true", help="print the overview as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS until Ctrl-C")


def target(args) -> tuple[str, str]:
    center, key = args.center, args.admin_key
    if not (center and key):
        try:
            with open(args.local) as fh:
                local = json.load(fh)
        except FileNotFoundError as exc:
            raise StatusError(f"{args.local} not found: start the system with `pylon up`, "
                              "or give --center and --admin-key") from exc
        except (OSError, ValueError) as exc:
            raise StatusError(f"cannot read {args.local}: {exc}") from exc
        if not isinstance(local, dict):
            raise StatusError(f"{args.local} does not hold a JSON object")
        center = center or local.get("center")
        key = key or local.get("admin_key")
    if not isinstance(center, str) or not center:
        raise StatusError("no center URL (local.json has no \"center\")")
    if not isinstance(key, str) or not key:
        raise StatusError("no admin key (local.json has no \"admin_key\")")
    return center.rstrip("/"), key


def fetch(center: str, key: str) -> dict[str, Any]:
    req = urllib.request.Request(center + "/v1/admin/overview", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read() or b"{}").get("error", {})
        except ValueError:
            err = {}
        what = f"{err.get('message', exc.reason)} ({err.get('code', 'http_error')}, HTTP {exc.code})"
        if exc.code in (401, 403):
            raise StatusError(f"center refused the admin key: {what}") from exc
        raise StatusError(f"center answered {what}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach center at {center}: {reason}") from exc
    except ValueError as exc:
        raise StatusError(f"center sent something that is not JSON: {exc}") from exc


def _n(v: float) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"
    return f"{int(v):,}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return [line(headers), *(line(r) for r in rows)]


def render(o: dict[str, Any], center: str) -> str:
    t, r = o["totals"], o["rates"]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(o["time_ms"] / 1000))
    fill = f"{100 * t['sessions'] / t['capacity']:.1f} %" if t["capacity"] else "-"
    out = [f"Pylon cluster  {center}  {when}  (answered by {o.get('center', '?')}, sampled every {o['sample_s']:g} s)",
           "",
           "instances   " + " · ".join(f"{s} {n}" for s, n in o["instances"].items()),
           f"sessions    {_n(t['sessions'])} of {_n(t['capacity'])} ({fill}) · connections {_n(t['connections'])}"
           f" · held for resume {_n(t['detached'])} · rooms {t['rooms']} ({t['rooms_draining']} draining)",
           "per second  " + " · ".join(f"{label} {_n(r.get(key + '_per_s', 0.0))}" for label, key in (
               ("messages", "messages"), ("delivered", "delivered"), ("acks", "acks"), ("logins", "connects"),
               ("broadcasts", "broadcasts"), ("errors", "errors"))),
           "", "health"]
    for name in ("redis", "mysql", "saver", "register", "coordinator", "webhooks"):
        h = o["health"].get(name, {"state": "down", "detail": "not reported"})
        count = f"×{h['instances']}" if "instances" in h else ""
        out.append(f"  {name:<12} {h['state']:<5} {count:<4} {h.get('detail', '')}".rstrip())
    out += ["", "room instances"]
    rooms = [[x["id"], f"{x['host']}:{x['port']}", x["region"], _n(x["sessions"]), _n(x.get("connections", 0)),
              _n(x["capacity"]), f"{100 * x['fill']:.1f} %", x["state"]] for x in o["rooms"]]
    out += _table(["instance", "address", "region", "sessions", "conns", "capacity", "fill", "state"], rooms,
                  {3, 4, 5, 6}) if rooms else ["  none in discovery"]
    out += ["", "apps" + ("  (online estimated from a sample)" if o.get("apps_source", {}).get("online_estimated") else "")]
    apps = [[a["app"], _n(a["online"]), _n(a["messages_per_s"]), _n(a["broadcasts_per_s"]), _n(a["parked"]),
             _n(a["webhook_queue"])] for a in o["apps"]]
    out += _table(["app", "online", "msg/s", "bcast/s", "parked", "webhook queue"], apps, {1, 2, 3, 4, 5}) \
        if apps else ["  none yet"]
    failed = o.get("scrape", {}).get("failed", [])
    if failed:
        out += ["", f"not answering /metrics ({len(failed)} of {o['scrape']['targets']})"]
        out += [f"  {f['service']} {f['id']}: {f['error']}" for f in failed]
    return "\n".join(out)


def main(args) -> int:
    try:
        center, key = target(args)
        if args.watch is not None and args.watch <= 0:
            raise StatusError("--watch must be > 0 seconds")
        while True:
            overview = fetch(center, key)
            text = json.dumps(overview, indent=2) if args.json else render(overview, center)
            if args.watch is not None and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(text, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except StatusError as exc:
        print(f"pylon status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
