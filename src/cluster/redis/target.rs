//! Where the backplane's Redis is: one instance (`redis://`), a Redis Cluster
//! (`redis+cluster://`) or a master found through Sentinel (`redis+sentinel://`). Parsed and
//! checked at start, so a typo stops the server naming REDIS_URL.
use std::fmt;

/// The Redis deployment a cluster of presence nodes shares.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://[user:pass@]host:port[/db]` or `rediss://…`: one instance.
    Single(String),
    /// `redis+cluster://[user:pass@]host:port,host:port,…`: seed nodes of a Redis Cluster
    /// (any reachable one is enough; the rest are found from it). Each as a `redis://` URL.
    Cluster(Vec<String>),
    /// `redis+sentinel://[user:pass@]host:port,host:port,…/MASTER[/db]`: the sentinels, and
    /// the name of the master they watch. The credentials are the master's.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        /// `redis://[user:pass@]` credentials and `/db` to use on the master.
        auth: Option<(Option<String>, String)>,
        db: i64,
    },
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTarget::Single(_) => f.write_str("Single"),
            RedisTarget::Cluster(seeds) => write!(f, "Cluster({} seeds)", seeds.len()),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => write!(
                f,
                "Sentinel({} sentinels, master {master:?})",
                sentinels.len()
            ),
        }
    }
}

impl RedisTarget {
    /// Parses REDIS_URL; the error says what is wrong (without the password).
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let url = url.trim();
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            redis::parse_redis_url(url).ok_or_else(|| "is not a valid redis:// URL".to_string())?;
            return Ok(RedisTarget::Single(url.to_string()));
        }
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            ("cluster", rest)
        } else if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            ("sentinel", rest)
        } else {
            return Err(
                "must start with redis://, rediss://, redis+cluster:// or redis+sentinel://".into(),
            );
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err("lists an empty host (hosts are host:port, separated by commas)".into());
        }
        for h in &hosts {
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(format!("host {h:?} has no port (host:port)"));
            };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("host {h:?} is not host:port"));
            }
        }
        let prefix = match userinfo {
            Some(u) => format!("redis://{u}@"),
            None => "redis://".to_string(),
        };
        match scheme {
            "cluster" => {
                if !path.is_empty() && path != "0" {
                    return Err("a Redis Cluster has only database 0".into());
                }
                Ok(RedisTarget::Cluster(
                    hosts.iter().map(|h| format!("{prefix}{h}")).collect(),
                ))
            }
            _ => {
                let mut parts = path.split('/');
                let master = parts.next().unwrap_or("").to_string();
                if master.is_empty() {
                    return Err(
                        "needs the master's name: redis+sentinel://HOST:PORT,…/MASTER".into(),
                    );
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(d) => d
                        .parse()
                        .map_err(|_| format!("database {d:?} is not a number"))?,
                };
                let auth = userinfo.map(|u| match u.split_once(':') {
                    Some((user, pass)) => (
                        Some(user.to_string()).filter(|u| !u.is_empty()),
                        pass.to_string(),
                    ),
                    None => (Some(u.to_string()), String::new()),
                });
                Ok(RedisTarget::Sentinel {
                    sentinels: hosts.iter().map(|h| format!("redis://{h}")).collect(),
                    master,
                    auth,
                    db,
                })
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }
}

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"p:u:{7}:123"), slot(b"{7}"));
    }

    #[test]
    fn urls_of_each_mode_parse_and_bad_ones_say_why() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001"),
            Ok(RedisTarget::Cluster(vec![
                "redis://u:pw@10.0.0.1:7000".into(),
                "redis://u:pw@10.0.0.2:7001".into()
            ]))
        );
        assert_eq!(
            RedisTarget::parse("redis+sentinel://:pw@s1:26379,s2:26379/presence/2"),
            Ok(RedisTarget::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master: "presence".into(),
                auth: Some((None, "pw".into())),
                db: 2,
            })
        );
        for (bad, says) in [
            ("http://x:1", "must start with"),
            ("redis+cluster://", "empty host"),
            ("redis+cluster://a:1,,b:2", "empty host"),
            ("redis+cluster://a", "no port"),
            ("redis+cluster://a:0", "not host:port"),
            ("redis+cluster://a:1/3", "only database 0"),
            ("redis+sentinel://a:1", "master's name"),
            ("redis+sentinel://a:1/m/x", "not a number"),
        ] {
            let err = RedisTarget::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
