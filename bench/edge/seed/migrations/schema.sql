-- The seed's schema (shared/seed/presence-system.md, "Database Schema"), plus the table behind
-- getUserContacts ("people they've chatted with"), which the seed doc names but does not show.
-- Applied by setup.js to its own database (SEED_DATABASE_URL, default seed_bench).
CREATE TABLE IF NOT EXISTS users (
  id INT PRIMARY KEY AUTO_INCREMENT,
  name VARCHAR(255) NOT NULL,
  phone_number VARCHAR(20) UNIQUE NOT NULL,
  profile_pic TEXT,
  status VARCHAR(50),              -- 'online', 'offline', 'away', 'busy'
  last_seen DATETIME,              -- Timestamp of last activity
  is_online BOOLEAN DEFAULT FALSE, -- Redundant flag (optional)
  created_at DATETIME DEFAULT NOW(),
  INDEX idx_users_status (status),
  INDEX idx_users_online (is_online)
) ENGINE=InnoDB;

-- One row per direction: user_id has chatted with contact_id.
CREATE TABLE IF NOT EXISTS contacts (
  user_id INT NOT NULL,
  contact_id INT NOT NULL,
  created_at DATETIME DEFAULT NOW(),
  PRIMARY KEY (user_id, contact_id)
) ENGINE=InnoDB;
