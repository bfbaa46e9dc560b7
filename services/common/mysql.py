"""MySQL/MariaDB access: connection pool and schema migrations.

Migrations are the numbered ``*.sql`` files in ``services/common/migrations``; each runs once,
recorded in ``schema_migrations``. Every process that owns tables (center, saver) runs
``migrate`` at start; a MySQL named lock keeps two starting processes from racing.
"""

from __future__ import annotations

import logging
import pathlib

import aiomysql

from services.common.config import CommonConfig

log = logging.getLogger(__name__)
MIGRATIONS = pathlib.Path(__file__).with_name("migrations")


async def connect_pool(cfg: CommonConfig, minsize: int = 1, maxsize: int = 4, create_db: bool = True) -> aiomysql.Pool:
    kwargs = dict(user=cfg.mysql_user, password=cfg.mysql_password, autocommit=True, charset="utf8mb4")
    if cfg.mysql_unix_socket:
        kwargs["unix_socket"] = cfg.mysql_unix_socket
    else:
        kwargs.update(host=cfg.mysql_host, port=cfg.mysql_port)
    if create_db:
        conn = await aiomysql.connect(**kwargs)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SET sql_notes = 0")  # "already exists" notes are expected, not warnings
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{cfg.mysql_database}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
    return await aiomysql.create_pool(minsize=minsize, maxsize=maxsize, db=cfg.mysql_database, **kwargs)


async def migrate(pool: aiomysql.Pool) -> list[str]:
    applied_now = []
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SET sql_notes = 0")
        await cur.execute("SELECT GET_LOCK('pylon_migrations', 30)")
        try:
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name VARCHAR(128) PRIMARY KEY, "
                "applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            await cur.execute("SELECT name FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for path in sorted(MIGRATIONS.glob("*.sql")):
                if path.name in done:
                    continue
                for statement in (s.strip() for s in _strip_comments(path.read_text()).split(";")):
                    if statement:
                        await cur.execute(statement)
                await cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied_now.append(path.name)
                log.info("applied migration %s", path.name)
        finally:
            await cur.execute("SELECT RELEASE_LOCK('pylon_migrations')")
            await cur.execute("SET sql_notes = 1")
    return applied_now


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
