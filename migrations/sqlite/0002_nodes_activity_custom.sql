-- Per-node lifecycle (each running process registers itself; a crash is recovered for that
-- node's users only), the offline numbering of restricted viewers, approximate last_seen and
-- custom statuses. Same meaning as migrations/mysql/0002.

ALTER TABLE presence ADD COLUMN offline_version INTEGER NOT NULL DEFAULT 0 CHECK (offline_version >= 0);
ALTER TABLE presence ADD COLUMN approx_last_seen INTEGER NOT NULL DEFAULT 1 CHECK (approx_last_seen IN (0, 1));
ALTER TABLE presence ADD COLUMN custom_text TEXT;
ALTER TABLE presence ADD COLUMN custom_emoji TEXT;
-- When the server clears the custom status; found by the expiry sweep through its index.
ALTER TABLE presence ADD COLUMN custom_expires_ms INTEGER;
-- The node that last wrote the row: a node's crash recovery touches the rows it left online.
ALTER TABLE presence ADD COLUMN node TEXT;

CREATE INDEX presence_custom_expiry ON presence (custom_expires_ms);
CREATE INDEX presence_online_node ON presence (is_online, node);

-- Users seen offline before have one offline transition behind them.
UPDATE presence SET offline_version = 1 WHERE last_seen_ms IS NOT NULL;

-- Every process that runs (or ran) on this database: started, last heartbeat, clean stop, and
-- who recovered it after a crash.
CREATE TABLE presence_nodes (
    node_id      TEXT    PRIMARY KEY,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    stopped_ms   INTEGER,
    recovered_by TEXT,
    recovered_ms INTEGER
) STRICT, WITHOUT ROWID;

-- A run from before this schema that did not stop cleanly is a crashed node like any other.
INSERT INTO presence_nodes (node_id, started_ms, heartbeat_ms)
    SELECT 'legacy', 0, 0 FROM presence_meta WHERE name = 'clean_shutdown' AND value = 0;
UPDATE presence SET node = 'legacy' WHERE is_online = 1;
DELETE FROM presence_meta WHERE name = 'clean_shutdown';
