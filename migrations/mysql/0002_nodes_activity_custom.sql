-- Per-node lifecycle (each running process registers itself; a crash is recovered for that
-- node's users only), the offline numbering of restricted viewers, approximate last_seen and
-- custom statuses. Same meaning as migrations/sqlite/0002.

ALTER TABLE presence
    ADD COLUMN offline_version   BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN approx_last_seen  BOOLEAN         NOT NULL DEFAULT TRUE,
    ADD COLUMN custom_text       VARCHAR(400)    NULL,
    ADD COLUMN custom_emoji      VARCHAR(64)     NULL,
    -- When the server clears the custom status; found by the expiry sweep through its index.
    ADD COLUMN custom_expires_ms BIGINT          NULL,
    -- The node that last wrote the row: a node's crash recovery touches the rows it left online.
    ADD COLUMN node              VARCHAR(64)     NULL,
    ADD INDEX presence_custom_expiry (custom_expires_ms),
    ADD INDEX presence_online_node (is_online, node);

-- Users seen offline before have one offline transition behind them.
UPDATE presence SET offline_version = 1 WHERE last_seen_ms IS NOT NULL;

-- Every process that runs (or ran) on this database: started, last heartbeat, clean stop, and
-- who recovered it after a crash.
CREATE TABLE presence_nodes (
    node_id      VARCHAR(64) NOT NULL PRIMARY KEY,
    started_ms   BIGINT      NOT NULL,
    heartbeat_ms BIGINT      NOT NULL,
    stopped_ms   BIGINT      NULL,
    recovered_by VARCHAR(64) NULL,
    recovered_ms BIGINT      NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- A run from before this schema that did not stop cleanly is a crashed node like any other.
INSERT INTO presence_nodes (node_id, started_ms, heartbeat_ms)
    SELECT 'legacy', 0, 0 FROM presence_meta WHERE name = 'clean_shutdown' AND value = 0;
UPDATE presence SET node = 'legacy' WHERE is_online = TRUE;
DELETE FROM presence_meta WHERE name = 'clean_shutdown';
