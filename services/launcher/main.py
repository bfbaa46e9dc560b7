"""`pylon up`: run the whole system on this machine until Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import time


def add_arguments(p) -> None:
    p.add_argument("--var", default="var", help="data, logs and PID files (default ./var)")
    p.add_argument("--rooms", type=int, default=0, help="room instances (default: sized for --connections)")
    p.add_argument("--connections", type=int, default=100_000, help="connections the room tier is sized for")
    p.add_argument("--host", default="127.0.0.1")


def main(args) -> int:
    from services.launcher.backing import BackingError
    from services.launcher.cluster import LocalCluster
    from services.room.config import RoomConfig

    rooms = args.rooms or RoomConfig(target_connections=args.connections, instances=0).instance_count()
    cluster = LocalCluster(args.var, room_instances=rooms, host=args.host)
    stopping = False

    def on_signal(_sig, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting Redis, MariaDB and Pylon ({rooms} room instances) with data in {os.path.abspath(args.var)} ...",
          flush=True)
    try:
        cluster.start()
        app = cluster.create_demo_app()
    except (BackingError, RuntimeError) as exc:
        print(f"pylon up failed: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    path = os.path.join(args.var, "local.json")
    cluster.write_local_json(path)
    rooms_text = ", ".join(f"{h}:{p}" for h, p in cluster.room_addresses)
    print(f"""
Pylon is up.
  center      {cluster.center_url}    (API, /dashboard, /metrics, /openapi.json)
  dispatcher  {cluster.dispatcher_url}
  rooms       {rooms_text}
  demo app    id={app['id']}
              api_key={app['api_key']}
              secret={app['secret']}
  admin key   {cluster.admin_key}
  written to  {path}

In another terminal, start the demo client:
  .venv/bin/python sdk/python/examples/demo_client.py --uid alice

Then push it a message:
  curl -s -X POST {cluster.center_url}/v1/push -H 'Authorization: Bearer {app['api_key']}' \\
       -H 'Content-Type: application/json' -d '{{"app": "{app['id']}", "uids": ["alice"], "payload": "hello from curl"}}'

Ctrl-C stops everything.""", flush=True)
    try:
        while not stopping:
            for name, sp in cluster.services.items():
                if not sp.alive():
                    print(f"{name} exited unexpectedly (code {sp.proc.returncode}); see {sp.log_path}", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("\nstopping ...", flush=True)
        cluster.stop()
        print("stopped.")
    return 0
