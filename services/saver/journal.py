"""MessageJournal: the saver's MySQL side (table ``messages``), written in multi-row batches.

Concurrent Store RPCs share INSERTs through a Batcher (up to ``mysql_batch_rows`` rows, flushed
after ``mysql_batch_delay_s``); acks and delivery counts (parks included) share batched UPDATEs
the same way: one statement for all the acks of a flush, one for all its deliveries, whatever
number of RPCs they came from. MySQL thus holds every state change a rebuild of Redis needs. Flushes never
raise into the Batcher: a failed statement hands its exception to every waiting item, and the
journal logs an outage once (OutageLog), not once per failed batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pymysql
from pymysql.converters import escape_string

from services.common.batching import Batcher, Overloaded
from services.common.outage import OutageLog
from services.saver import keys
from services.saver import metrics as m
from services.saver.config import SaverConfig
from services.saver.errors import BackendUnavailable
from services.saver.validation import Ref, StoreItem

log = logging.getLogger(__name__)

# errors that mean "MySQL is down or unreachable", as opposed to a bad statement (our bug)
UNAVAILABLE_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError, TimeoutError)

_INSERT_HEAD = "INSERT INTO messages (msg_id, uid, app, seq, payload, created_ms, expires_ms) VALUES "
# a retried Store of the same msg_id keeps one row, numbered by the latest attempt
_INSERT_TAIL = " ON DUPLICATE KEY UPDATE seq=VALUES(seq)"
_STORED = keys.STATE_CODES[keys.State.STORED]
_DELIVERED = keys.STATE_CODES[keys.State.DELIVERED]
_ACKED = keys.STATE_CODES[keys.State.ACKED]
_PARKED = keys.STATE_CODES[keys.State.PARKED]
_SCAN_COLUMNS = "msg_id, uid, app, seq, created_ms, expires_ms, state, attempts"


def insert_sql(rows: Sequence[tuple], escape: Callable[[str], str] = escape_string) -> str:
    """One multi-row INSERT with the values inlined. Payloads go as hex literals (X'..'): PyMySQL's
    bytes escaping costs ~16 us per 512-byte payload, bytes.hex() ~0.5 us, and at 500 rows per
    statement that difference is most of the saver's MySQL CPU. Integers pass through int(),
    strings through ``escape`` (the connection's escape_string, which knows the server's
    NO_BACKSLASH_ESCAPES mode, exactly as %s placeholders would use it)."""
    parts = []
    for msg_id, uid, app, seq, payload, created_ms, expires_ms in rows:
        parts.append(f"({int(msg_id)},'{escape(uid)}','{escape(app)}',{int(seq)},"
                     f"X'{payload.hex()}',{int(created_ms)},{int(expires_ms)})")
    return _INSERT_HEAD + ",".join(parts) + _INSERT_TAIL


def ack_sql(acks: Sequence[tuple[Ref, int]]) -> tuple[str, list]:
    """One UPDATE for a flush of (ref, acked_ms) acks. Owner-checked per row: a ref acks its row
    only if uid and app match byte for byte (BINARY: the columns' collation ignores case and
    trailing spaces, uids do not). It applies whether or not Redis still had the message, so an
    ack is never lost to a Redis that forgot it, and an acked row is never rebuilt into an inbox.
    An ack that also reports delivery attempts (``Ref.deliveries``) adds them to the row's; of
    two refs for one msg_id in a flush, the first one's count is taken, as Redis applies one."""
    when_acked: dict[int, int] = {}
    deliveries: dict[int, int] = {}
    owners: list = []
    for ref, acked_ms in acks:
        if ref.msg_id not in when_acked:
            when_acked[ref.msg_id] = acked_ms
            if ref.deliveries:
                deliveries[ref.msg_id] = ref.deliveries
        owners += (ref.msg_id, ref.uid, ref.app)
    ids = list(when_acked)
    case = " ".join(["WHEN %s THEN %s"] * len(ids))
    owned = " OR ".join(["(msg_id=%s AND BINARY uid=%s AND BINARY app=%s)"] * len(acks))
    args = [v for pair in when_acked.items() for v in pair]
    counted = ""
    if deliveries:
        counted = f", attempts=attempts+CASE msg_id {' '.join(['WHEN %s THEN %s'] * len(deliveries))} ELSE 0 END"
        args += [v for pair in deliveries.items() for v in pair]
    sql = (f"UPDATE messages SET state={_ACKED}, payload='', acked_ms=CASE msg_id {case} END{counted} "
           f"WHERE msg_id IN ({','.join(['%s'] * len(ids))}) AND state<>{_ACKED} AND ({owned})")
    return sql, args + ids + owners


def delivered_sql(deliveries: Sequence[tuple[int, int]]) -> tuple[str, list]:
    """One UPDATE for a flush of (msg_id, attempts) delivery counts from Redis (negative attempts:
    that delivery parked the message). A row goes stored → delivered (or parked) and its attempts
    only move up; an acked or parked row is left alone (an ack that raced the last delivery stays
    an ack). The owner was checked by Redis, which counted the delivery."""
    attempts: dict[int, int] = {}
    parked: set[int] = set()
    for msg_id, n in deliveries:
        if n < 0:
            parked.add(msg_id)
        attempts[msg_id] = max(attempts.get(msg_id, 0), abs(n))
    ids = list(attempts)
    case = " ".join(["WHEN %s THEN %s"] * len(ids))
    args: list = [v for pair in attempts.items() for v in pair]
    if parked:
        state = (f"CASE WHEN msg_id IN ({','.join(['%s'] * len(parked))}) THEN {_PARKED} "
                 f"WHEN state={_STORED} THEN {_DELIVERED} ELSE state END")
        args += sorted(parked)
    else:
        state = f"IF(state={_STORED}, {_DELIVERED}, state)"
    sql = (f"UPDATE messages SET attempts=GREATEST(attempts, CASE msg_id {case} END), state={state} "
           f"WHERE msg_id IN ({','.join(['%s'] * len(ids))}) AND state<{_ACKED}")
    return sql, args + ids


class MessageJournal:
    def __init__(self, pool, cfg: SaverConfig) -> None:
        self._pool = pool
        self.cfg = cfg
        self._inserts: Batcher[tuple] = Batcher(
            "saver_mysql_insert", self._flush_inserts, max_batch=cfg.mysql_batch_rows,
            delay_s=cfg.mysql_batch_delay_s, max_pending=cfg.mysql_max_pending_rows,
            max_concurrent_flushes=cfg.mysql_flush_concurrency)
        self._updates: Batcher[tuple] = Batcher(
            "saver_mysql_update", self._flush_updates, max_batch=cfg.mysql_batch_rows,
            delay_s=cfg.mysql_batch_delay_s, max_pending=cfg.mysql_max_pending_rows, max_concurrent_flushes=2)
        self._sweeper: asyncio.Task | None = None
        self.outage = OutageLog("MySQL")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        await self._inserts.drain(timeout_s)
        await self._updates.drain(timeout_s)

    # ------------------------------------------------------------------ writes
    async def insert(self, items: Sequence[StoreItem], seqs: Sequence[int]) -> None:
        rows = [(it.msg_id, it.uid, it.app, seq, it.payload, it.created_ms, it.expires_ms)
                for it, seq in zip(items, seqs, strict=True)]
        await self._submit(self._inserts, rows)

    async def mark_acked(self, refs: Sequence[Ref], acked_ms: int) -> None:
        """Record acks (owner-checked in the statement); returns once committed."""
        await self._submit(self._updates, [("ack", (ref, acked_ms)) for ref in refs])

    async def mark_delivered(self, deliveries: Sequence[tuple[int, int]]) -> None:
        """Record (msg_id, attempts) delivery counts, attempts < 0 for a park; returns once committed."""
        await self._submit(self._updates, [("deliver", d) for d in deliveries])

    async def _submit(self, batcher: Batcher, items: list) -> None:
        if not items:
            return
        if batcher.pending + len(items) > batcher.max_pending:
            # refuse the whole request up front rather than half of it
            raise Overloaded(f"{batcher.name}: {batcher.pending} rows waiting for MySQL (limit {batcher.max_pending})")
        fut = asyncio.get_running_loop().create_future()
        remaining = len(items)

        def done(result, error) -> None:
            nonlocal remaining
            if fut.done():
                return
            error = error or (result if isinstance(result, BaseException) else None)
            if error is not None:
                fut.set_exception(error)
                return
            remaining -= 1
            if remaining == 0:
                fut.set_result(None)

        submitted = time.perf_counter()
        lag = m.MYSQL_WRITE_LAG.labels(batcher.name.rsplit("_", 1)[-1])
        for item in items:
            batcher.submit(item, done)
        try:
            await asyncio.wait_for(fut, self.cfg.mysql_timeout_s)
            lag.observe(time.perf_counter() - submitted)
        except TimeoutError:
            lag.observe(time.perf_counter() - submitted)
            raise self._failed(BackendUnavailable("MySQL", f"no answer within {self.cfg.mysql_timeout_s:g}s")) from None

    def _failed(self, exc: BaseException) -> BaseException:
        """The exception to hand to the caller; an outage is logged once, a bad statement each time."""
        if isinstance(exc, BackendUnavailable):
            self.outage.failed(exc)
            return exc
        if isinstance(exc, UNAVAILABLE_ERRORS):
            exc = BackendUnavailable("MySQL", str(exc) or type(exc).__name__)
            self.outage.failed(exc)
            return exc
        log.error("MySQL statement failed: %r", exc)
        return exc

    @property
    def pool(self):
        return self._pool

    def failed(self, exc: BaseException) -> BaseException:
        return self._failed(exc)

    async def execute(self, op: str, sql: str | Callable[[Any], str], args: Sequence | None, rows: int) -> int:
        return await self._execute(op, sql, args, rows)

    async def _execute(self, op: str, sql: str | Callable[[Any], str], args: Sequence | None, rows: int) -> int:
        """Run one statement; ``sql`` may be built from the connection (for its escaping)."""
        started = time.perf_counter()
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            n = await cur.execute(sql(conn) if callable(sql) else sql, args)
        self.outage.ok()
        m.MYSQL_SECONDS.labels(op).observe(time.perf_counter() - started)
        m.MYSQL_BATCH_ROWS.labels(op).observe(rows)
        return n

    async def _flush_inserts(self, rows: list[tuple]) -> list:
        try:
            await self._execute("insert", lambda conn: insert_sql(rows, conn.escape_string), None, len(rows))
        except Exception as exc:
            return [self._failed(exc)] * len(rows)
        return [None] * len(rows)

    async def _flush_updates(self, items: list[tuple]) -> list:
        groups: dict[str, list] = {}
        for op, value in items:
            groups.setdefault(op, []).append(value)
        failed: dict[str, BaseException] = {}
        # acks first: a delivery count in the same flush must not win over them (it cannot: the
        # deliver statement skips acked rows, and an ack applies to delivered and parked ones)
        for op in sorted(groups):
            sql, args = ack_sql(groups[op]) if op == "ack" else delivered_sql(groups[op])
            try:
                await self._execute(op, sql, args, len(groups[op]))
            except Exception as exc:
                failed[op] = self._failed(exc)
        return [failed.get(op) for op, _ in items]

    # ------------------------------------------------------------------ reads
    async def get(self, msg_id: int) -> dict | None:
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(
                    "SELECT uid, app, seq, created_ms, expires_ms, state, attempts, acked_ms FROM messages "
                    "WHERE msg_id=%s", (msg_id,))
                row = await cur.fetchone()
        except UNAVAILABLE_ERRORS as exc:
            raise self._failed(exc) from None
        self.outage.ok()
        m.MYSQL_SECONDS.labels("get").observe(time.perf_counter() - started)
        if row is None:
            return None
        uid, app, seq, created_ms, expires_ms, state, attempts, acked_ms = row
        return {"uid": uid, "app": app, "seq": seq, "created_ms": created_ms, "expires_ms": expires_ms,
                "state": keys.state_from_code(state), "attempts": attempts, "acked_ms": acked_ms}

    async def scan(self, after_msg_id: int, now_ms: int, limit: int) -> list[tuple]:
        """Up to ``limit`` rows with msg_id above ``after_msg_id``, in msg_id order (keyset
        pagination on the primary key: each page is one index range, however large the table),
        for a rebuild of Redis: (msg_id, uid, app, seq, created_ms, expires_ms, state, attempts,
        payload). Every row counts for the sequence counters; the payload is read only for rows
        that go back into an inbox (not acked, not parked, not expired)."""
        return await self.select(
            "rebuild_scan", f"SELECT {_SCAN_COLUMNS}, IF(state<{_ACKED} AND expires_ms>%s, payload, '') FROM messages "
            "WHERE msg_id>%s ORDER BY msg_id LIMIT %s", (now_ms, after_msg_id, limit))

    async def select(self, op: str, sql: str, args: Sequence) -> list[tuple]:
        """The rows of one read; an unreachable MySQL is BackendUnavailable (its outage logged once)."""
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(sql, args)
                rows = await cur.fetchall()
        except UNAVAILABLE_ERRORS as exc:
            raise self._failed(exc) from None
        self.outage.ok()
        m.MYSQL_SECONDS.labels(op).observe(time.perf_counter() - started)
        return list(rows)

    async def tail(self, limit: int) -> list[tuple]:
        """The ``limit`` rows with the highest msg_ids (newest first; one backward range of the
        primary key): (msg_id, uid, app, seq, created_ms, expires_ms, state, attempts)."""
        try:
            async with self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"SELECT {_SCAN_COLUMNS} FROM messages ORDER BY msg_id DESC LIMIT %s", (limit,))
                rows = await cur.fetchall()
        except UNAVAILABLE_ERRORS as exc:
            raise self._failed(exc) from None
        self.outage.ok()
        return rows

    # ------------------------------------------------------------------ sweep
    async def sweep_once(self, now_ms: int) -> int:
        """Delete rows expired more than the ack retention ago, in LIMITed batches. One saver
        at a time (MySQL named lock); returns rows deleted (0 if another saver holds the lock)."""
        cutoff = now_ms - self.cfg.ack_retention_s * 1000
        batch = self.cfg.sweep_batch_rows
        total = 0
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK('pylon_saver_sweep', 0)")
            (got,) = await cur.fetchone()
            if got != 1:
                return 0
            try:
                # broadcasts: a user's acked set goes when its last broadcast expired, the
                # broadcast itself after the retention (GET of its state reads it meanwhile)
                for sql, before in (("DELETE FROM broadcast_acks WHERE expires_ms < %s LIMIT %s", now_ms),
                                    ("DELETE FROM broadcasts WHERE expires_ms < %s LIMIT %s", cutoff)):
                    while True:
                        n = await cur.execute(sql, (before, batch))
                        total += n
                        if n < batch:
                            break
                        await asyncio.sleep(0.05)
                while True:
                    started = time.perf_counter()
                    n = await cur.execute("DELETE FROM messages WHERE expires_ms < %s LIMIT %s", (cutoff, batch))
                    m.MYSQL_SECONDS.labels("sweep").observe(time.perf_counter() - started)
                    total += n
                    m.SWEPT.inc(n)
                    if n < batch:
                        break
                    await asyncio.sleep(0.05)  # leave MySQL room for the write path between batches
            finally:
                await cur.execute("SELECT RELEASE_LOCK('pylon_saver_sweep')")
        return total

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
            try:
                n = await self.sweep_once(int(time.time() * 1000))
                if n:
                    log.info("swept %d expired messages from MySQL", n)
            except UNAVAILABLE_ERRORS as exc:
                self._failed(exc)
            except Exception as exc:
                log.warning("MySQL sweep failed (next try in %.0fs): %r", self.cfg.sweep_interval_s, exc)
