"""EpochGuard: knows whether Redis still holds the saver's data, and has it rebuilt when not.

Redis holds an epoch key (``keys.EPOCH_KEY``) for as long as it holds the saver's data: it is
written once, at the end of a complete rebuild (or of the first start on an empty Redis), and
goes only with the data (FLUSHALL, FLUSHDB, a restart without persistence, a new server). The
loss is noticed three ways: at start, by a check about every ``check_interval_s``, and at once
on the write path, where the scripts refuse to number, store or count without an epoch (and the
store calls ``lost()``).

Then exactly one saver rebuilds: the one that takes the rebuild lock (SET NX with a TTL, renewed
by every page of the rebuild; a saver that dies mid-rebuild frees it within the TTL and another
takes over). The others poll until the new epoch shows up. While this saver rebuilds or waits,
``wait()`` holds RPCs until the data is whole again, up to their deadline, and then answers
UNAVAILABLE: nothing is served from half-built data.

A Redis that restarted (its run_id changed; also the first look at start) and kept its epoch may
still have lost its last writes, if its host crashed between two fsyncs of its append-only file.
The newest rows of the MySQL log tell (``RedisRebuild.find_tail_loss``): if a counter is behind
or settled messages are missing, the epoch is dropped and Redis rebuilt like after any loss.

States: ready (epoch seen; RPCs pass) → recovering (epoch missing: rebuilding or waiting for the
saver that is) → ready. While a Redis not seen before (a restart, or this saver's start) is being
compared with MySQL's newest rows, RPCs wait too, also while MySQL cannot be read for that. While
Redis cannot be reached, RPCs pass: they fail on Redis by themselves, or meet the scripts' atomic
epoch check.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.outage import OutageLog
from services.common.redis_scripts import run_pipeline
from services.saver import metrics as m
from services.saver.errors import BackendUnavailable
from services.saver.keys import EPOCH_KEY, REBUILD_LOCK_KEY
from services.saver.lua import EPOCH_DROP, EPOCH_PUBLISH, LOCK_RELEASE
from services.saver.rebuild import RebuildLockLost, RedisRebuild

log = logging.getLogger(__name__)

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
# while another saver rebuilds, how often to look for its epoch (and for its lock gone stale)
_POLL_S = 0.1


def new_epoch() -> str:
    """Time-ordered and unique: ``<ms since 1970>-<8 random hex digits>``."""
    return f"{int(time.time() * 1000)}-{secrets.token_hex(4)}"


class EpochGuard:
    def __init__(self, redis, rebuild: RedisRebuild, *, check_interval_s: float, lock_ttl_s: float,
                 tail_check_rows: int) -> None:
        self._redis = redis
        self._rebuild = rebuild
        self.check_interval_s = check_interval_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.tail_check_rows = tail_check_rows
        self.epoch: bytes | None = None
        self.redis_run_id: str | None = None  # the Redis server process the tail was checked against
        self._whole = asyncio.Event()  # set while no recovery or first check of a Redis runs
        self._whole.set()
        self._recovery: asyncio.Task | None = None
        self._checker: asyncio.Task | None = None
        # not "Redis unavailable": the RPCs' own outage line says that, once
        self.outage = OutageLog("Redis (epoch check)")

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """First check (starts a rebuild if Redis has no epoch), then the periodic check."""
        try:
            await self.check()
        except _UNREACHABLE as exc:
            self.outage.failed(exc)
        except BackendUnavailable:
            pass  # MySQL, for the tail check: logged by the journal, checked again in a second
        self._checker = asyncio.get_running_loop().create_task(self._check_loop())

    async def close(self) -> None:
        for task in (self._checker, self._recovery):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._checker = self._recovery = None

    # ------------------------------------------------------------------ API for the store
    def lost(self) -> None:
        """Redis refused an operation for want of (or for a changed) epoch: recover."""
        m.EPOCH_REFUSALS.inc()
        self._start_recovery()

    async def wait(self, timeout_s: float) -> None:
        """Return at once unless a recovery runs; then wait for it up to ``timeout_s``."""
        if self._whole.is_set():
            return
        try:
            await asyncio.wait_for(self._whole.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            raise BackendUnavailable(
                "Redis", f"inboxes are being rebuilt from MySQL, not done within {timeout_s:.1f}s") from None

    # ------------------------------------------------------------------ detection
    async def check(self) -> None:
        epoch = await self._redis.get(EPOCH_KEY)
        run_id = (await self._redis.info("server")).get("run_id")
        self.outage.ok()
        if epoch is None:
            self._start_recovery()
            return
        if self.recovering:
            return
        if run_id != self.redis_run_id:
            # a Redis we have not compared with MySQL yet (a restart, or our own start): calls
            # wait until we have, so nothing is numbered from a counter its last writes may
            # have lost (if MySQL cannot be read now, they wait for the next check, a second on)
            self._whole.clear()
            if await self._tail_lost(epoch):
                return
            self.redis_run_id = run_id
        self._adopt(epoch)

    async def _tail_lost(self, epoch: bytes) -> bool:
        """True (and a recovery started) if Redis kept its epoch but lost its newest writes."""
        behind, missing = await self._rebuild.find_tail_loss(self.tail_check_rows)
        if not behind and not missing:
            return False
        log.warning("Redis came back without its latest writes (%d sequence counters behind MySQL, %d stored "
                    "messages missing among the newest %d rows): dropping epoch %s to rebuild from MySQL",
                    behind, missing, self.tail_check_rows, epoch.decode())
        await run_pipeline(self._redis, lambda pipe: EPOCH_DROP.queue(pipe, [EPOCH_KEY], [epoch]), (EPOCH_DROP,))
        self._start_recovery()
        return True

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            if self.recovering:
                continue
            try:
                await self.check()
            except _UNREACHABLE as exc:
                self.outage.failed(exc)
            except BackendUnavailable:
                pass  # MySQL, for the tail check: logged by the journal
            except Exception:
                log.exception("epoch check failed")

    def _adopt(self, epoch: bytes) -> None:
        if epoch != self.epoch:
            if self.epoch is not None:
                log.info("Redis epoch is now %s (was %s)", epoch.decode(), self.epoch.decode())
            self.epoch = epoch
        self._whole.set()

    # ------------------------------------------------------------------ recovery
    def _start_recovery(self) -> None:
        if self.recovering:
            return
        self._whole.clear()
        m.REBUILDING.set(1)
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        try:
            while True:
                try:
                    if await self._recover_once():
                        return
                    await asyncio.sleep(_POLL_S)
                except _UNREACHABLE as exc:
                    self.outage.failed(exc)
                    await asyncio.sleep(0.5)
                except BackendUnavailable:
                    await asyncio.sleep(0.5)  # MySQL: the journal logs its outages
                except RebuildLockLost as exc:
                    m.REBUILDS.labels("lock_lost").inc()
                    log.warning("rebuild of Redis from MySQL abandoned (%s); starting again", exc)
                except Exception:
                    m.REBUILDS.labels("failed").inc()
                    log.exception("rebuild of Redis from MySQL failed; trying again in 1s")
                    await asyncio.sleep(1.0)
        finally:
            m.REBUILDING.set(0)
            self._whole.set()

    async def _recover_once(self) -> bool:
        """One look: True once Redis has an epoch again (found, or published by this saver)."""
        epoch = await self._redis.get(EPOCH_KEY)
        self.outage.ok()
        if epoch is not None:
            self._adopt(epoch)
            return True
        token = new_epoch()
        if not await self._redis.set(REBUILD_LOCK_KEY, token, nx=True, px=self.lock_ttl_ms):
            return False  # another saver rebuilds; its epoch will show up
        try:
            log.warning("Redis has no saver epoch (its data was lost or is new): rebuilding from MySQL")
            stats = await self._rebuild.run(token)
            published = await run_pipeline(
                self._redis, lambda pipe: EPOCH_PUBLISH.queue(pipe, [REBUILD_LOCK_KEY, EPOCH_KEY], [token, token]),
                (EPOCH_PUBLISH,))
            if published[0] != 1:
                raise RebuildLockLost("the rebuild lock was gone when the epoch was to be set")
        except BaseException:
            try:
                await run_pipeline(self._redis, lambda pipe: LOCK_RELEASE.queue(pipe, [REBUILD_LOCK_KEY], [token]),
                                   (LOCK_RELEASE,))
            except Exception as exc:  # the lock's TTL frees it anyway
                log.debug("rebuild lock not released: %r", exc)
            raise
        m.REBUILDS.labels("done").inc()
        m.REBUILD_SECONDS.observe(stats.seconds)
        log.info("rebuilt Redis from MySQL in %.2fs: %d rows scanned, %d messages back in their inboxes, "
                 "%d sequence counter updates; epoch %s", stats.seconds, stats.rows_scanned,
                 stats.messages_restored, stats.counters_raised, token)
        self._adopt(token.encode())
        return True
