//! Values that must not reach a log: a secret, and URLs that may carry a password. Their
//! `Debug` (and so the settings' `Debug`) shows that something is set, never what.
use std::fmt;
use std::str::FromStr;

/// A secret (the JWT signing key). `Debug` prints `Secret(***)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// A connection URL (database, Redis) whose password, if any, `Debug` and `Display` hide:
/// `mysql://app:***@db:3306/presence`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password of its `user:password@` part replaced by `***`. Lenient on
    /// purpose (a password may hold `/`, a URL may lack its `//`): the userinfo is whatever lies
    /// between the scheme and the last `@`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let (Some(scheme_end), Some(at)) = (url.find(':'), url.rfind('@')) else {
            return url.clone();
        };
        if at < scheme_end {
            return url.clone();
        }
        let start = scheme_end + 1 + url[scheme_end + 1..].len()
            - url[scheme_end + 1..].trim_start_matches('/').len();
        let userinfo = &url[start..at];
        match userinfo.find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..start], &userinfo[..colon], &url[at..]),
            None => url.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl(s.to_string()))
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        SecretUrl(s.to_string())
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        SecretUrl(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let cases = [
            (
                "mysql://app:hunter2@db:3306/presence",
                "mysql://app:***@db:3306/presence",
            ),
            (
                "redis://:hunter2@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("sqlite://presence.db", "sqlite://presence.db"),
            ("mysql://root@127.0.0.1/test", "mysql://root@127.0.0.1/test"),
            (
                "redis+cluster://u:hunter2@h1:1,h2:2",
                "redis+cluster://u:***@h1:1,h2:2",
            ),
            (
                "mysql:/app:hunter2@db/presence",
                "mysql:/app:***@db/presence",
            ),
            ("redis:/:hunter2@cache", "redis:/:***@cache"),
            (
                "postgres://app:hun/ter2hunter2@db/p",
                "postgres://app:***@db/p",
            ),
            ("mysql://app:p@ss:hunter2@db/p", "mysql://app:***@db/p"),
        ];
        for (url, shown) in cases {
            let u = SecretUrl::from(url);
            assert_eq!(u.redacted(), shown);
            assert!(!format!("{u:?}{u}").contains("hunter2"));
        }
        assert_eq!(format!("{:?}", Secret::from("hunter2")), "Secret(***)");
    }
}
