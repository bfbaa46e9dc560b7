-- Secret and API key rotation with an overlap: the value before the last rotation and until when
-- (unix seconds) it is still accepted. 0 / empty / NULL = no overlap.
ALTER TABLE apps
  ADD COLUMN IF NOT EXISTS previous_secret         VARCHAR(128) NOT NULL DEFAULT '',
  ADD COLUMN IF NOT EXISTS previous_secret_until   BIGINT       NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS previous_api_key_sha256 CHAR(64)     NULL DEFAULT NULL,
  ADD COLUMN IF NOT EXISTS previous_api_key_until  BIGINT       NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS apps_previous_api_key ON apps (previous_api_key_sha256);
