-- Apps: owned by center. The API key is stored as its SHA-256; the secret signs client tokens and webhooks.
CREATE TABLE IF NOT EXISTS apps (
  id             VARCHAR(64)  NOT NULL PRIMARY KEY,
  secret         VARCHAR(128) NOT NULL,
  api_key_sha256 CHAR(64)     NOT NULL UNIQUE,
  webhook_url    VARCHAR(1024) NOT NULL DEFAULT '',
  status_events  TINYINT(1)   NOT NULL DEFAULT 0,
  push_rate_per_s INT         NOT NULL DEFAULT 0,
  created_at     TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Durable message log: owned by saver, written in multi-row batches; rebuilds Redis after a loss.
-- state: 0 stored, 1 delivered, 2 acked, 3 parked (expired is derived from expires_ms).
CREATE TABLE IF NOT EXISTS messages (
  msg_id      BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  uid         VARCHAR(128)    NOT NULL,
  app         VARCHAR(64)     NOT NULL,
  seq         BIGINT UNSIGNED NOT NULL DEFAULT 0,
  payload     MEDIUMBLOB      NOT NULL,
  created_ms  BIGINT UNSIGNED NOT NULL,
  expires_ms  BIGINT UNSIGNED NOT NULL,
  state       TINYINT         NOT NULL DEFAULT 0,
  attempts    INT UNSIGNED    NOT NULL DEFAULT 0,
  acked_ms    BIGINT UNSIGNED NOT NULL DEFAULT 0,
  KEY inbox (uid, app, state),
  KEY expiry (expires_ms)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
