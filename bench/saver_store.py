"""Store and LoadInbox throughput of a real saver process; prints JSON.

    .venv/bin/python bench/saver_store.py                       # defaults: 100k messages of 512 B
    .venv/bin/python bench/saver_store.py --messages 200000 --concurrency 8

Starts its own Redis and MariaDB on free ports in a temp dir and a `pylon saver` process, then:
  1. store:     Store RPCs of --batch messages (default 500) from --concurrency callers;
  2. load:      LoadInbox RPCs of --load-keys uids each (every inbox holds a few messages);
  3. coalesce:  many small Store RPCs (--small-batch, default 20) from 32 callers, once with the
                default MySQL batch delay and once with the delay at 0, reporting rows per INSERT
                (read from the saver's /metrics) — what sharing INSERTs across RPCs buys.
CPU seconds of the saver process are reported per phase (the box is shared with Redis, MariaDB
and this client, so CPU per message is the figure that survives the noise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from services.common.config import CommonConfig  # noqa: E402
from services.common.ids import IdGenerator  # noqa: E402
from services.launcher import backing, procs  # noqa: E402


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def scrape(metrics_port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("pylon_saver_mysql_batch_rows_") and 'op="insert"' in line and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0].rsplit("_", 1)[1]] = float(value)
    return out


def start_saver(cfg: CommonConfig, tmp: str, name: str, extra: dict[str, str]):
    port, mport = backing.free_port(), backing.free_port()
    env = procs.common_env(cfg, {"PYLON_LOG_LEVEL": "WARNING", **extra})
    proc = procs.start(name, ["saver", "--grpc-port", str(port), "--metrics-port", str(mport)], env=env,
                       log_dir=tmp, wait_for=[("127.0.0.1", port)], timeout_s=60)
    return proc, port, mport


async def store_phase(stub, pb, ids: IdGenerator, total: int, batch: int, concurrency: int, uids: int,
                      payload: bytes, app: str) -> dict:
    n_batches = (total + batch - 1) // batch
    next_batch = iter(range(n_batches))
    latencies: list[float] = []
    counter = [0]

    async def caller() -> None:
        for _ in next_batch:
            now = int(time.time() * 1000)
            msgs = []
            for _ in range(batch):
                i = counter[0]
                counter[0] += 1
                msgs.append(pb.StoredMessage(msg_id=ids.next(), uid=f"bench-{i % uids}", app=app, payload=payload,
                                             created_ms=now, ttl_s=3600))
            started = time.perf_counter()
            await stub.Store(pb.StoreRequest(messages=msgs), timeout=30)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"messages": counter[0], "rpcs": len(latencies), "seconds": round(elapsed, 3),
            "messages_per_s": round(counter[0] / elapsed),
            "rpc_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "rpc_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)}


async def load_phase(stub, pb, uids: int, keys_per_rpc: int, concurrency: int, rounds: int, app: str) -> dict:
    chunks = [list(range(i, min(i + keys_per_rpc, uids))) for i in range(0, uids, keys_per_rpc)] * rounds
    work = iter(chunks)
    totals = {"messages": 0, "inboxes": 0, "rpcs": 0}

    async def caller() -> None:
        for chunk in work:
            reply = await stub.LoadInbox(pb.LoadRequest(
                keys=[pb.InboxKey(uid=f"bench-{i}", apps=[app]) for i in chunk], limit_per_inbox=100), timeout=30)
            totals["messages"] += sum(len(ib.messages) for ib in reply.inboxes)
            totals["inboxes"] += len(chunk)
            totals["rpcs"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {**totals, "seconds": round(elapsed, 3), "messages_per_s": round(totals["messages"] / elapsed),
            "inboxes_per_s": round(totals["inboxes"] / elapsed)}


async def run(args: argparse.Namespace, cfg: CommonConfig, tmp: str) -> dict:
    import grpc

    from services.common.pb import internal_pb2 as pb
    from services.common.pb import internal_pb2_grpc as pbg

    payload = os.urandom(args.payload_bytes)
    ids = IdGenerator(node=7)
    result: dict = {"batch": args.batch, "concurrency": args.concurrency, "payload_bytes": args.payload_bytes,
                    "cpus": os.cpu_count()}

    proc, port, mport = start_saver(cfg, tmp, "saver-bench", {})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.SaverStub(channel)
            await store_phase(stub, pb, ids, 2000, args.batch, 2, args.uids, payload, "warmup")
            cpu0 = cpu_s(proc.pid)
            store = await store_phase(stub, pb, ids, args.messages, args.batch, args.concurrency, args.uids,
                                      payload, "bench")
            cpu1 = cpu_s(proc.pid)
            store["saver_cpu_s"] = round(cpu1 - cpu0, 2)
            store["saver_cpu_us_per_message"] = round((cpu1 - cpu0) * 1e6 / store["messages"], 1)
            rows = scrape(mport)
            store["mysql_rows_per_insert"] = round(rows["sum"] / rows["count"], 1) if rows.get("count") else None
            result["store"] = store

            load = await load_phase(stub, pb, args.uids, args.load_keys, args.concurrency, args.load_rounds, "bench")
            cpu2 = cpu_s(proc.pid)
            load["saver_cpu_s"] = round(cpu2 - cpu1, 2)
            load["saver_cpu_us_per_message"] = round((cpu2 - cpu1) * 1e6 / max(1, load["messages"]), 1)
            result["load_inbox"] = load
    finally:
        proc.stop()

    coalesce = {}
    for label, delay in (("shared_inserts", "0.002"), ("no_delay", "0")):
        proc, port, mport = start_saver(cfg, tmp, f"saver-bench-{label}", {"PYLON_SAVER_MYSQL_BATCH_DELAY_S": delay})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pbg.SaverStub(channel)
                before = scrape(mport)
                phase = await store_phase(stub, pb, ids, args.small_messages, args.small_batch, 32, args.uids,
                                          payload, "small")
                after = scrape(mport)
                inserts = after.get("count", 0) - before.get("count", 0)
                phase["mysql_inserts"] = int(inserts)
                phase["mysql_rows_per_insert"] = round((after["sum"] - before.get("sum", 0)) / inserts, 1)
                coalesce[label] = phase
        finally:
            proc.stop()
    result["small_batches"] = {"batch": args.small_batch, "concurrency": 32, **coalesce}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--uids", type=int, default=20_000, help="distinct users the messages are spread over")
    p.add_argument("--payload-bytes", type=int, default=512)
    p.add_argument("--load-keys", type=int, default=500, help="uids per LoadInbox RPC")
    p.add_argument("--load-rounds", type=int, default=3, help="how many times every inbox is loaded")
    p.add_argument("--small-batch", type=int, default=20)
    p.add_argument("--small-messages", type=int, default=40_000)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args()

    backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
    tmp = tempfile.mkdtemp(prefix="pylon-bench-saver-")
    rport, mport = backing.free_port(), backing.free_port()
    redis = backing.start_redis(os.path.join(tmp, "redis"), rport)
    maria = backing.start_mariadb(os.path.join(tmp, "mariadb"), mport)
    cfg = CommonConfig(redis_url=f"redis://127.0.0.1:{rport}/0", mysql_port=mport, mysql_database="pylon_bench")
    try:
        import uvloop

        result = uvloop.run(run(args, cfg, tmp))
    finally:
        maria.stop()
        redis.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
