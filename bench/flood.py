"""A connect flood from one address against a room, while another address logs in; prints JSON.

    .venv/bin/python bench/flood.py --seconds 20

Starts a private system with one room instance and the room's default access policy (the local
launcher's loopback exemption removed), then measures logins (connect, AUTH, AUTH_OK, close; one
at a time) from 127.0.0.3: first alone, then while --flooders processes connect from 127.0.0.2
as fast as they can (up to --inflight connects each in flight; each connection waits for the
room's first bytes up to 0.2 s, then closes). Reports the flood's connects per second by
outcome (RATE_LIMITED, admitted), the room's CPU, and the logins' latency (p50, p99, max) in
both phases. Bounded: every phase has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLOODER, PROBER = "127.0.0.2", "127.0.0.3"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _open(source: str, host: str, port: int):
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def flood(host: str, port: int, seconds: float, inflight: int) -> dict:
    from services.common.codec import ErrorCode, FrameDecoder, Op
    from services.common.pb import client_pb2 as cpb

    counts: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def one_loop() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await _open(FLOODER, host, port)
            except OSError as exc:
                kind = f"connect_{type(exc).__name__}"
                counts[kind] = counts.get(kind, 0) + 1
                await asyncio.sleep(0.01)
                continue
            kind = "admitted"
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.2)
                frames = FrameDecoder(1 << 20).feed(data) if data else []
                if frames and frames[0].op == Op.ERROR:
                    kind = ErrorCode(cpb.Error.FromString(frames[0].body).code).name
                elif not data:
                    kind = "closed"
            except TimeoutError:
                pass
            except (ConnectionResetError, ValueError):
                kind = "reset"
            writer.close()
            counts[kind] = counts.get(kind, 0) + 1

    await asyncio.gather(*(one_loop() for _ in range(inflight)))
    return counts


async def probe(cluster, port: int, n: int, deadline_s: float) -> dict:
    from services.common import tokens
    from services.common.codec import FrameDecoder, Op, encode
    from services.common.pb import client_pb2 as cpb

    app = cluster.app
    lat, failed = [], {}
    end = time.monotonic() + deadline_s
    for i in range(n):
        if time.monotonic() > end:
            break
        uid = f"probe-{os.getpid()}-{time.monotonic_ns()}-{i}"
        frame = encode(Op.AUTH, cpb.Auth(token=tokens.sign(app["secret"], uid, app["id"], 600)[0],
                                         uid=uid).SerializeToString(), 1)
        t0 = time.perf_counter()
        try:
            reader, writer = await _open(PROBER, cluster.host, port)
            writer.write(frame)
            data = await asyncio.wait_for(reader.read(4096), 15)
            f = FrameDecoder(1 << 20).feed(data)[0] if data else None
            if f is not None and f.op == Op.AUTH_OK:
                lat.append(time.perf_counter() - t0)
            else:
                kind = "closed" if f is None else f"op_{f.op}"
                failed[kind] = failed.get(kind, 0) + 1
            writer.close()
        except (OSError, TimeoutError, IndexError, ValueError) as exc:
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

    return {"logins": len(lat), "failed": failed, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20, help="length of the flood")
    p.add_argument("--flooders", type=int, default=1, help="flooding processes, all from 127.0.0.2")
    p.add_argument("--inflight", type=int, default=200, help="connects in flight per flooder")
    p.add_argument("--logins", type=int, default=300, help="logins per phase from 127.0.0.3")
    p.add_argument("--flood-worker", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.flood_worker:
        host, port = args.flood_worker[0], int(args.flood_worker[1])
        print(json.dumps(uvloop.run(flood(host, port, args.seconds, args.inflight))), flush=True)
        return 0

    from services.launcher.cluster import LocalCluster, Ports
    from services.launcher.procs import children

    tmp = tempfile.mkdtemp(prefix="pylon-flood-")
    cluster = LocalCluster(tmp, Ports.free(1), room_instances=1,
                           env={"PYLON_LOG_LEVEL": "WARNING", "PYLON_ROOM_ACCESS_EXEMPT_CIDRS": ""})
    result: dict = {"bench": "flood", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                    "seconds": args.seconds, "flooders": args.flooders, "inflight": args.inflight}
    try:
        cluster.start()
        cluster.create_demo_app()
        host, port = cluster.room_addresses[0]
        room_pid = (children(cluster.services["room"].pid) or [cluster.services["room"].pid])[0]
        result["baseline"] = uvloop.run(probe(cluster, port, args.logins, 60))
        c0, t0 = cpu_s(room_pid), time.monotonic()
        workers = [subprocess.Popen([sys.executable, __file__, "--flood-worker", host, str(port),
                                     "--seconds", str(args.seconds), "--inflight", str(args.inflight)],
                                    stdout=subprocess.PIPE, cwd=ROOT) for _ in range(args.flooders)]
        time.sleep(1)  # the flood under way
        result["during_flood"] = uvloop.run(probe(cluster, port, args.logins, args.seconds - 2))
        counts: dict[str, int] = {}
        for w in workers:
            out, _ = w.communicate(timeout=args.seconds + 60)
            for k, v in json.loads(out).items():
                counts[k] = counts.get(k, 0) + v
        elapsed = time.monotonic() - t0
        result["flood_outcomes"] = counts
        result["flood_connects_per_s"] = round(sum(counts.values()) / elapsed)
        result["room_cpu_pct_during_flood"] = round(100 * (cpu_s(room_pid) - c0) / elapsed, 1)
        import urllib.request

        metrics_host = next(i for i in _rooms(cluster))
        with urllib.request.urlopen(f"http://{metrics_host}/metrics", timeout=5) as r:
            text = r.read().decode()
        result["room_refused"] = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                                  for line in text.splitlines()
                                  if line.startswith("pylon_room_access_refused_total{")}
    finally:
        cluster.stop()
    print(json.dumps(result, indent=1))
    return 0


def _rooms(cluster):
    import redis

    client = redis.Redis.from_url(cluster.common.redis_url)
    try:
        for raw in client.hvals("pylon:discinfo:room"):
            yield json.loads(raw)["metrics"]
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
