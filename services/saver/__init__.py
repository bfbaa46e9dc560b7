"""saver: store-before-send message storage (DESIGN.md §4).

Redis (hot, what delivery reads):
  ``pylon:m:{msg_id}``       HASH  uid, app, payload, created_ms, expires_ms, seq, state, attempts, acked_ms;
                                   EXPIRE ttl + ack retention (acked: ack retention, payload dropped)
  ``pylon:in:{uid}:{app}``   ZSET  msg_id scored by seq (the inbox; lowest seq is delivered first)
  ``pylon:seq:{uid}:{app}``  counter of the per-(user, app) sequence
  ``pylon:saver:{epoch}``    the epoch: present while Redis holds the saver's data (epoch.py)
  ``pylon:saver:{epoch}:rebuild-lock``  held by the one saver rebuilding Redis from MySQL
MySQL (durable log, table ``messages``): written in multi-row batches; acks, delivery counts and
parks are batched UPDATEs, so the log holds every state a rebuild needs (rebuild.py); a
background sweep deletes rows expired longer than the ack retention.
"""
