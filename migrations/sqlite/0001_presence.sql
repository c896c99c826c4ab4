-- Presence rows, the symmetric contact graph and the run bookkeeping (epoch, clean shutdown).
-- Same column meaning as migrations/mysql. Ids and versions are u64 in Rust, stored as INTEGER
-- (i64): user ids and versions stay far below 2^63.

CREATE TABLE presence (
    user_id              INTEGER PRIMARY KEY,
    -- The status the user chose ('online', 'away', 'busy', 'offline'), not the effective one.
    status               TEXT    NOT NULL,
    is_online            INTEGER NOT NULL CHECK (is_online IN (0, 1)),
    -- Milliseconds since the Unix epoch, UTC; NULL = never seen.
    last_seen_ms         INTEGER,
    version              INTEGER NOT NULL CHECK (version >= 0),
    epoch                INTEGER NOT NULL CHECK (epoch >= 0),
    online_visibility    TEXT    NOT NULL DEFAULT 'contacts',
    last_seen_visibility TEXT    NOT NULL DEFAULT 'contacts',
    -- "Still online at", refreshed while the user is online; becomes last_seen after a crash.
    checkpoint_ms        INTEGER,
    -- For people reading the table; the service never reads it.
    updated_at           TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
) STRICT;

CREATE INDEX presence_status ON presence (status);
-- Crash recovery finds the rows left online through this index.
CREATE INDEX presence_is_online ON presence (is_online);

-- Both directions of every pair are stored, so the contacts of a user are one range of the
-- primary key.
CREATE TABLE contacts (
    user_id    INTEGER NOT NULL,
    contact_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, contact_id),
    CHECK (user_id <> contact_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX contacts_by_contact ON contacts (contact_id, user_id);

-- Named numbers: 'epoch' and 'clean_shutdown'.
CREATE TABLE presence_meta (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
