-- Parked messages (state 3) by app, in msg_id order: the admin API's keyset pages
-- (GET /v1/admin/parked) and requeue by app read one range of this index, however large the
-- table. The user's own parked messages come from the existing inbox (uid, app, state) index.
CREATE INDEX IF NOT EXISTS parked ON messages (state, app, msg_id);
