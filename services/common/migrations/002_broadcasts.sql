-- Broadcasts: owned by saver. One row per broadcast (not per user); live until expires_ms.
CREATE TABLE IF NOT EXISTS broadcasts (
  id          BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  app         VARCHAR(64)     NOT NULL,
  payload     MEDIUMBLOB      NOT NULL,
  created_ms  BIGINT UNSIGNED NOT NULL,
  expires_ms  BIGINT UNSIGNED NOT NULL,
  KEY live (app, expires_ms),
  KEY expiry (expires_ms)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- What each (uid, app) acked of the live broadcasts: one row per user, not per broadcast.
-- acked: packed (broadcast id, its expires_ms) pairs, 16 bytes each, big-endian, appended by each
-- ack (a union: order does not matter; bounded, the oldest pairs go first); expires_ms = the
-- latest expiry among them (the row is swept after it, and starts afresh when acked again).
CREATE TABLE IF NOT EXISTS broadcast_acks (
  app         VARBINARY(64)   NOT NULL,  -- binary: uids differ by case and trailing spaces
  uid         VARBINARY(512)  NOT NULL,  -- 128 characters of utf8mb4
  acked       BLOB            NOT NULL,
  expires_ms  BIGINT UNSIGNED NOT NULL,
  PRIMARY KEY (app, uid),
  KEY expiry (expires_ms)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
