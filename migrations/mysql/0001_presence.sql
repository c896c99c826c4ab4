-- Presence rows, the symmetric contact graph and the run bookkeeping (epoch, clean shutdown).
-- Same column meaning as migrations/sqlite. Runs on MySQL 8 and MariaDB 10.11; utf8mb4_bin is
-- known to both and compares the enum-like strings exactly, as SQLite does.

CREATE TABLE presence (
    user_id              BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    -- The status the user chose ('online', 'away', 'busy', 'offline'), not the effective one.
    status               VARCHAR(16)     NOT NULL,
    is_online            BOOLEAN         NOT NULL,
    -- Milliseconds since the Unix epoch, UTC; NULL = never seen.
    last_seen_ms         BIGINT          NULL,
    version              BIGINT UNSIGNED NOT NULL,
    epoch                BIGINT UNSIGNED NOT NULL,
    online_visibility    VARCHAR(16)     NOT NULL DEFAULT 'contacts',
    last_seen_visibility VARCHAR(16)     NOT NULL DEFAULT 'contacts',
    -- "Still online at", refreshed while the user is online; becomes last_seen after a crash.
    checkpoint_ms        BIGINT          NULL,
    -- For people reading the table; the service never reads it.
    updated_at           DATETIME(3)     NOT NULL
                         DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    INDEX presence_status (status),
    -- Crash recovery finds the rows left online through this index.
    INDEX presence_is_online (is_online)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Both directions of every pair are stored, so the contacts of a user are one range of the
-- primary key.
CREATE TABLE contacts (
    user_id    BIGINT UNSIGNED NOT NULL,
    contact_id BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (user_id, contact_id),
    INDEX contacts_by_contact (contact_id, user_id),
    CONSTRAINT contacts_not_self CHECK (user_id <> contact_id)
) ENGINE = InnoDB;

-- Named numbers: 'epoch' and 'clean_shutdown'.
CREATE TABLE presence_meta (
    name  VARCHAR(64) NOT NULL PRIMARY KEY,
    value BIGINT      NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
