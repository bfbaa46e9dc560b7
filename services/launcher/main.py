"""`pylon up`: run the whole system on this machine until Ctrl-C.

A process that dies while the system is up (a service, or the Redis/MariaDB it runs) is started
again with the same arguments after a backoff that grows while it keeps dying. Restarting on an
existing var dir keeps the demo app, its keys and the admin key (see ``cluster.py``)."""

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
    p.add_argument("--centers", type=int, default=1,
                   help="center processes sharing the center port (SO_REUSEPORT), one core each (default 1)")
    p.add_argument("--prometheus", action="store_true",
                   help="also run Prometheus (Debian package) scraping every process, data in <var>/prometheus")
    p.add_argument("--prometheus-port", type=int, default=0,
                   help="Prometheus's port with --prometheus (default 9090 if free, else any free port)")
    p.add_argument("--log-json", action="store_true",
                   help="services write JSON lines to <var>/logs (log_format = \"json\"; also PYLON_LOG_FORMAT=json)")


def main(args) -> int:
    from services.launcher.backing import BackingError
    from services.launcher.cluster import LocalCluster
    from services.room.config import RoomConfig

    rooms = args.rooms or RoomConfig(target_connections=args.connections, instances=0).instance_count()
    if not 1 <= args.centers <= 64:
        print("pylon up: --centers must be 1 .. 64", file=sys.stderr)
        return 1
    if not 0 <= args.prometheus_port < 65536:
        print("pylon up: --prometheus-port must be a TCP port", file=sys.stderr)
        return 1
    # the children's [pylon] section comes from the launcher's environment variables, which
    # would otherwise set log_format to the default whatever the shell says
    log_format = "json" if getattr(args, "log_json", False) else os.environ.get("PYLON_LOG_FORMAT")
    cluster = LocalCluster(args.var, room_instances=rooms, host=args.host, center_processes=args.centers,
                           prometheus_port=args.prometheus_port if args.prometheus else None,
                           env={"PYLON_LOG_FORMAT": log_format} if log_format else None,
                           progress=lambda line: print(line, flush=True))
    stopping = False

    def on_signal(_sig, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    centers = f", {args.centers} center processes" if args.centers > 1 else ""
    print(f"starting Redis, MariaDB and Pylon ({rooms} room instances{centers}) with data in {os.path.abspath(args.var)} ...",
          flush=True)
    try:
        cluster.start()
        app = cluster.ensure_demo_app()
    except (BackingError, RuntimeError) as exc:
        print(f"pylon up failed: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    path = os.path.join(args.var, "local.json")
    cluster.write_local_json(path)
    kept = "" if cluster.app_created else "  (kept from the previous run)"
    rooms_text = ", ".join(f"{h}:{p}" for h, p in cluster.room_addresses)
    tls_text = ", ".join(f"{h}:{p}" for h, p in cluster.room_tls_addresses)
    targets = os.path.join(args.var, "prometheus", "targets.json")
    monitoring = (f"  prometheus  {cluster.prometheus_url}    (scrapes every process listed in {targets})"
                  if cluster.prometheus_url else f"  targets     {targets}    (Prometheus file_sd; --prometheus runs one)")
    print(f"""
Pylon is up.
  center      {cluster.center_url}    (API, /dashboard, /metrics, /openapi.json)
  dispatcher  {cluster.dispatcher_url}
  rooms       {rooms_text}
  rooms TLS   {tls_text}    (CA: {cluster.tls_files.ca if cluster.tls_files else ""})
{monitoring}
  demo app    id={app['id']}{kept}
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
        watch(cluster, lambda: stopping, tick=cluster.refresh_targets)
    finally:
        print("\nstopping ...", flush=True)
        cluster.stop()
        print("stopped.")
    return 0


def watch(cluster, stopping, poll_s: float = 0.5, tick=None) -> None:
    """Until ``stopping()``: start again every process of ``cluster`` that died; call ``tick()``
    (if given) once per poll."""
    from services.launcher.procs import RestartBackoff, describe_exit

    # 1 s, doubling while it dies within a minute of its start, at most 30 s
    backoffs = {name: RestartBackoff(first_s=1.0, max_s=30.0, stable_s=60.0) for name in cluster.names()}
    due: dict[str, float] = {}  # name -> monotonic time of its pending restart
    while not stopping():
        now = time.monotonic()
        for name in cluster.names():
            if stopping():
                return
            if name in due:
                if now < due[name]:
                    continue
                del due[name]
                try:
                    cluster.restart(name)
                except Exception as exc:  # it died again while starting: try later
                    delay = backoffs[name].died(0.0)
                    due[name] = time.monotonic() + delay
                    _say(f"restarting {name} failed, next try in {delay:.0f} s: {exc}")
                else:
                    _say(f"{name} restarted")
                continue
            if not cluster.alive(name):
                lived = now - cluster.started_at.get(name, now)
                delay = backoffs[name].died(lived)
                due[name] = now + delay
                _say(f"{name} {describe_exit(cluster.exit_code(name))} after {lived:.0f} s; restarting it in "
                     f"{delay:.0f} s (log: {cluster.log_path(name)})")
        if tick is not None:
            tick()
        time.sleep(poll_s)


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)
