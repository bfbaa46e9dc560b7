"""Which message ids the app has already been handed (delivery is at-least-once; the app sees each once).

``RecentIds`` is the in-memory window every client has. ``HandledIdsFile`` is the optional
SQLite file behind it (``PylonClient(dedupe_path=...)``) so that a restarted app process still
knows what it handled before.
"""

from __future__ import annotations

import os
import sqlite3
from collections import OrderedDict

from pylon_sdk.errors import DedupeStoreError


class RecentIds:
    """An LRU set of the last ``capacity`` ids. A duplicate arrives soon after the original
    (a lost ACK, a reconnect), so remembering the recent ones is enough."""

    __slots__ = ("capacity", "_ids")

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self._ids

    def seen(self, msg_id: int) -> bool:
        """True if ``msg_id`` was added before; refreshes its place so a redelivered id stays known."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return True
        return False

    def add(self, msg_id: int) -> None:
        self._ids[msg_id] = None
        self._ids.move_to_end(msg_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (
    n      INTEGER PRIMARY KEY,          -- insertion order: the oldest row of a key is pruned first
    uid    TEXT NOT NULL,
    app    TEXT NOT NULL,
    msg_id INTEGER NOT NULL,             -- a u64 stored as its signed 64-bit twin (SQLite integers are signed)
    UNIQUE (uid, app, msg_id)
);
CREATE INDEX IF NOT EXISTS handled_order ON handled (uid, app, n);
"""

_BUSY_TIMEOUT_MS = 1000   # another process (a second copy of the app) holding the write lock briefly
_I64 = 1 << 63


def _signed(msg_id: int) -> int:
    return msg_id - (1 << 64) if msg_id >= _I64 else msg_id


class HandledIdsFile:
    """Ids handed to the app, per (uid, app), in one SQLite file (WAL).

    At most ``keep`` ids per (uid, app) are kept; beyond that the longest-ago handled go (checked
    every ``keep // 10`` records of a key, so the file holds up to 1.1 × ``keep`` per key). Every
    ``record`` is its own commit, so the id is in the file the moment the handler has returned.
    With ``fsync=False`` (SQLite ``synchronous=NORMAL``) a commit survives any crash or kill of
    the app process but can be rolled back by a power loss or OS crash; ``fsync=True``
    (``synchronous=FULL``) survives those too and costs an fsync per message.

    Constructing does no I/O; ``open()`` does. Errors are ``DedupeStoreError``.
    """

    __slots__ = ("path", "uid", "keep", "fsync", "_db", "_since_prune")

    def __init__(self, path: str | os.PathLike, uid: str, keep: int = 10_000, fsync: bool = False) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.path = os.fspath(path)
        self.uid = uid
        self.keep = keep
        self.fsync = fsync
        self._db: sqlite3.Connection | None = None
        self._since_prune: dict[str, int] = {}

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> None:
        if self._db is not None:
            return
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise DedupeStoreError(f"cannot open dedupe file {self.path}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DedupeStoreError(f"dedupe file {self.path}: journal mode is {mode}, WAL is needed")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise DedupeStoreError(f"cannot use dedupe file {self.path}: {exc}") from exc
        except DedupeStoreError:
            db.close()
            raise
        self._db = db
        self._since_prune.clear()

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                raise DedupeStoreError(f"closing dedupe file {self.path}: {exc}") from exc

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise DedupeStoreError(f"dedupe file {self.path} is not open")
        return self._db

    def contains(self, app: str, msg_id: int) -> bool:
        db = self._require()
        try:
            row = db.execute("SELECT 1 FROM handled WHERE uid = ? AND app = ? AND msg_id = ?",
                             (self.uid, app, _signed(msg_id))).fetchone()
        except sqlite3.Error as exc:
            raise DedupeStoreError(f"reading dedupe file {self.path}: {exc}") from exc
        return row is not None

    def record(self, app: str, msg_id: int) -> None:
        """Remember ``msg_id`` as handled (committed when this returns). An id recorded again
        becomes the newest, like ``RecentIds.seen``."""
        db = self._require()
        try:
            db.execute("INSERT OR REPLACE INTO handled (uid, app, msg_id) VALUES (?, ?, ?)",
                       (self.uid, app, _signed(msg_id)))
            count = self._since_prune.get(app)
            if count is None or count + 1 >= max(1, self.keep // 10):
                self._prune(db, app)   # the first record of a key after open() also prunes
                self._since_prune[app] = 0
            else:
                self._since_prune[app] = count + 1
        except sqlite3.Error as exc:
            raise DedupeStoreError(f"writing dedupe file {self.path}: {exc}") from exc

    def _prune(self, db: sqlite3.Connection, app: str) -> None:
        db.execute("DELETE FROM handled WHERE uid = ?1 AND app = ?2 AND n < (SELECT n FROM handled WHERE uid = ?1 "
                   "AND app = ?2 ORDER BY n DESC LIMIT 1 OFFSET ?3)", (self.uid, app, self.keep - 1))

    def count(self, app: str) -> int:
        db = self._require()
        try:
            return db.execute("SELECT count(*) FROM handled WHERE uid = ? AND app = ?", (self.uid, app)).fetchone()[0]
        except sqlite3.Error as exc:
            raise DedupeStoreError(f"reading dedupe file {self.path}: {exc}") from exc
