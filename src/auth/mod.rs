//! Verified identities. Every call's metadata becomes an [`Identity`] here, before any state is
//! touched: from a signed JWT (HS256 shared secret and/or an RS256/ES256 public key), or, only in
//! development mode (no key configured and a loopback listener), from plain metadata headers.
//! The caller's identity never comes from a message body.
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::{UserId, printable};

/// Metadata naming the user a service acts for (and, in development mode, the user calling).
pub const USER_HEADER: &str = "x-presence-user-id";
/// Development mode only: metadata naming the calling service.
pub const SERVICE_HEADER: &str = "x-presence-service";

/// Who holds the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    User(UserId),
    Service(String),
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub credential: Credential,
    /// The user a service acts for (`x-presence-user-id`); it then sees what that user sees.
    pub acting_for: Option<UserId>,
    /// When the credential expires (Unix seconds); None in development mode.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// The user this call is about: the user holding the token, or the user a service acts for.
    pub fn user(&self) -> Option<UserId> {
        match &self.credential {
            Credential::User(u) => Some(*u),
            Credential::Service(_) => self.acting_for,
        }
    }

    /// Whether the caller is a service, acting for a user or not.
    pub fn is_service(&self) -> bool {
        matches!(self.credential, Credential::Service(_))
    }

    /// The caller's name for logs: `user:42`, `service:chat`, `service:chat as user:42`.
    pub fn describe(&self) -> String {
        match (&self.credential, self.acting_for) {
            (Credential::User(u), _) => format!("user:{u}"),
            (Credential::Service(s), None) => format!("service:{s}"),
            (Credential::Service(s), Some(u)) => format!("service:{s} as user:{u}"),
        }
    }
}

/// Why a call's credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credential, or one that fails verification: UNAUTHENTICATED.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential asking for something it may not do: PERMISSION_DENIED.
    #[error("{0}")]
    Forbidden(String),
}

/// Longest service name (a service token's `sub`, or `x-presence-service` in development mode).
pub const MAX_SERVICE_NAME: usize = 64;

/// Shortest HS256 secret accepted outside development mode.
pub const MIN_SECRET_BYTES: usize = 32;

/// A token's `aud`: one audience, or several (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// JWT claims we read and write.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Key material for verification.
#[derive(Clone, Default)]
pub struct KeyConfig {
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256).
    pub public_key_pem: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Longest token lifetime accepted (`exp` at most this far ahead).
    pub max_ttl: std::time::Duration,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "public_key_pem",
                &self.public_key_pem.as_ref().map(|_| "<pem>"),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("max_ttl", &self.max_ttl)
            .finish()
    }
}

impl KeyConfig {
    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.public_key_pem.is_none()
    }
}

/// Turns request metadata into an identity.
#[derive(Clone)]
pub enum Verifier {
    /// No key: metadata names the caller. Only allowed on a loopback listener.
    Development,
    Jwt(Box<JwtVerifier>),
}

#[derive(Clone)]
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    /// The public key and the one algorithm it verifies.
    public: Option<(DecodingKey, Algorithm)>,
    issuer: Option<String>,
    audience: Option<String>,
    max_ttl: u64,
}

/// Refuses a secret that is short or made of one repeated character: such a key is guessed,
/// and with it any identity forged.
fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "PRESENCE_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long (got {})",
            secret.len()
        ));
    }
    let mut chars = secret.chars();
    let first = chars.next();
    if chars.all(|c| Some(c) == first) {
        return Err("PRESENCE_JWT_SECRET is one character repeated: use random bytes".into());
    }
    let distinct: std::collections::HashSet<char> = secret.chars().collect();
    if distinct.len() < 8 {
        return Err(format!(
            "PRESENCE_JWT_SECRET has only {} distinct characters: use random bytes",
            distinct.len()
        ));
    }
    Ok(())
}

/// A service's name as it will appear in logs: bounded and printable.
fn service_name(raw: &str) -> Result<String, AuthError> {
    let name = raw.trim();
    if name.is_empty()
        || name.chars().count() > MAX_SERVICE_NAME
        || printable(name, MAX_SERVICE_NAME) != name
    {
        return Err(AuthError::Unauthenticated(format!(
            "a service name must be 1 to {MAX_SERVICE_NAME} printable characters, got {:?}",
            printable(raw, MAX_SERVICE_NAME)
        )));
    }
    Ok(name.to_string())
}

impl Verifier {
    /// Builds the verifier for the configured keys. Fails with a message naming the setting.
    pub fn from_keys(keys: &KeyConfig) -> Result<Verifier, String> {
        if keys.is_empty() {
            return Ok(Verifier::Development);
        }
        let hs256 = match &keys.secret {
            Some(s) => {
                check_secret(s)?;
                Some(DecodingKey::from_secret(s.as_bytes()))
            }
            None => None,
        };
        let public = match &keys.public_key_pem {
            None => None,
            Some(pem) => Some(
                DecodingKey::from_rsa_pem(pem)
                    .map(|k| (k, Algorithm::RS256))
                    .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| (k, Algorithm::ES256)))
                    .map_err(|e| {
                        format!("PRESENCE_JWT_PUBLIC_KEY is neither an RSA nor an EC public key in PEM: {e}")
                    })?,
            ),
        };
        Ok(Verifier::Jwt(Box::new(JwtVerifier {
            hs256,
            public,
            issuer: keys.issuer.clone(),
            audience: keys.audience.clone(),
            max_ttl: keys.max_ttl.as_secs(),
        })))
    }

    pub fn is_development(&self) -> bool {
        matches!(self, Verifier::Development)
    }

    /// Verifies a call. `get` reads one metadata value by (lower-case) name.
    pub fn verify<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> Result<Identity, AuthError> {
        let acting_for = get(USER_HEADER)
            .map(|v| {
                UserId::parse_str(v).map_err(|e| {
                    AuthError::Unauthenticated(format!("invalid {USER_HEADER} metadata: {e}"))
                })
            })
            .transpose()?;
        match self {
            Verifier::Development => match (get(SERVICE_HEADER), acting_for) {
                (Some(name), acting_for) if !name.trim().is_empty() => Ok(Identity {
                    credential: Credential::Service(service_name(name)?),
                    acting_for,
                    expires_at: None,
                }),
                (_, Some(user)) => Ok(Identity {
                    credential: Credential::User(user),
                    acting_for: None,
                    expires_at: None,
                }),
                _ => Err(AuthError::Unauthenticated(format!(
                    "missing identity: send {USER_HEADER} (a user) or {SERVICE_HEADER} (a service) metadata (development mode)"
                ))),
            },
            Verifier::Jwt(jwt) => {
                let token = bearer(get("authorization"))?;
                let claims = jwt.verify_token(token)?;
                let credential = if claims.role.as_deref() == Some("service") {
                    Credential::Service(service_name(&claims.sub)?)
                } else {
                    Credential::User(
                        UserId::parse_str(&claims.sub)
                            .map_err(|e| AuthError::Unauthenticated(format!("token sub: {e}")))?,
                    )
                };
                if let (Credential::User(me), Some(other)) = (&credential, acting_for)
                    && *me != other
                {
                    return Err(AuthError::Forbidden(format!(
                        "a user token cannot act for another user ({USER_HEADER}: {other}); only service tokens can"
                    )));
                }
                let acting_for = match credential {
                    Credential::Service(_) => acting_for,
                    Credential::User(_) => None,
                };
                Ok(Identity {
                    credential,
                    acting_for,
                    expires_at: Some(claims.exp),
                })
            }
        }
    }
}

impl Verifier {
    /// Verifies a service's bare token (a relay stream's refreshed credential): the service's
    /// name and when the token expires.
    pub fn verify_service_token(&self, token: &str) -> Result<(String, u64), AuthError> {
        let Verifier::Jwt(jwt) = self else {
            return Err(AuthError::Unauthenticated(
                "service_token needs a configured JWT key".into(),
            ));
        };
        let claims = jwt.verify_token(token)?;
        if claims.role.as_deref() != Some("service") {
            return Err(AuthError::Unauthenticated(
                "service_token is a user's token, not a service's".into(),
            ));
        }
        Ok((service_name(&claims.sub)?, claims.exp))
    }

    /// Verifies a user's bare token (a relay session's): the user and when the token expires.
    pub fn verify_user_token(&self, token: &str) -> Result<(UserId, u64), AuthError> {
        let Verifier::Jwt(jwt) = self else {
            return Err(AuthError::Unauthenticated(
                "user_token needs a configured JWT key; in development mode name the user with user_id".into(),
            ));
        };
        let claims = jwt.verify_token(token)?;
        if claims.role.as_deref() == Some("service") {
            return Err(AuthError::Unauthenticated(
                "user_token is a service token, not a user's".into(),
            ));
        }
        let user = UserId::parse_str(&claims.sub)
            .map_err(|e| AuthError::Unauthenticated(format!("token sub: {e}")))?;
        Ok((user, claims.exp))
    }
}

fn bearer(value: Option<&str>) -> Result<&str, AuthError> {
    let value = value.ok_or_else(|| {
        AuthError::Unauthenticated("missing authorization metadata: expected `Bearer <JWT>`".into())
    })?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(|| {
        AuthError::Unauthenticated("authorization metadata must be `Bearer <JWT>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Unauthenticated(
            "authorization metadata must be `Bearer <JWT>`".into(),
        ));
    }
    Ok(token.trim())
}

impl JwtVerifier {
    fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        let bad = |why: String| AuthError::Unauthenticated(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            alg => self
                .public
                .as_ref()
                .filter(|(_, a)| *a == alg)
                .map(|(k, _)| k),
        }
        .ok_or_else(|| bad(format!("algorithm {:?} is not accepted here", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not merely right when present.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| bad(e.to_string()))?;
        let longest = unix_now().saturating_add(self.max_ttl);
        if claims.exp > longest {
            return Err(bad(format!(
                "it expires more than {} s from now (PRESENCE_JWT_MAX_TTL_S)",
                self.max_ttl
            )));
        }
        Ok(claims)
    }
}

/// Signs a token with an HS256 secret: what `presence token` prints.
pub fn mint(
    secret: &str,
    subject: &str,
    service: bool,
    ttl: std::time::Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, String> {
    let now = unix_now();
    let claims = Claims {
        sub: subject.to_string(),
        exp: now + ttl.as_secs().max(1),
        role: service.then(|| "service".to_string()),
        iss: issuer.map(str::to_string),
        aud: audience.map(|a| Audience::One(a.to_string())),
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("could not sign the token: {e}"))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef-unit-test-secret-key";

    fn verifier() -> Verifier {
        Verifier::from_keys(&KeyConfig {
            secret: Some(SECRET.into()),
            max_ttl: Duration::from_secs(24 * 3600),
            ..Default::default()
        })
        .unwrap()
    }

    fn verify(v: &Verifier, md: &[(&str, &str)]) -> Result<Identity, AuthError> {
        let md: HashMap<String, String> = md
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.verify(|k| md.get(k).map(String::as_str))
    }

    #[test]
    fn a_signed_user_token_identifies_the_user() {
        let t = mint(SECRET, "42", false, Duration::from_secs(60), None, None).unwrap();
        let id = verify(&verifier(), &[("authorization", &format!("Bearer {t}"))]).unwrap();
        assert_eq!(id.user(), Some(UserId::parse(42).unwrap()));
        assert!(!id.is_service());
    }

    #[test]
    fn alg_none_and_foreign_signatures_are_refused() {
        let other = mint(
            "another-secret-of-enough-bytes-0123",
            "42",
            false,
            Duration::from_secs(60),
            None,
            None,
        )
        .unwrap();
        let err = verify(
            &verifier(),
            &[("authorization", &format!("Bearer {other}"))],
        );
        assert!(
            matches!(err, Err(AuthError::Unauthenticated(_))),
            "bad signature: {err:?}"
        );
        // {"alg":"none","typ":"JWT"} . {"sub":"42","exp":9999999999} .
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.";
        let err = verify(&verifier(), &[("authorization", &format!("Bearer {none}"))]);
        assert!(
            matches!(err, Err(AuthError::Unauthenticated(_))),
            "alg none: {err:?}"
        );
    }

    #[test]
    fn a_user_token_cannot_act_for_someone_else() {
        let t = mint(SECRET, "42", false, Duration::from_secs(60), None, None).unwrap();
        let err = verify(
            &verifier(),
            &[
                ("authorization", &format!("Bearer {t}")),
                (USER_HEADER, "7"),
            ],
        );
        assert!(matches!(err, Err(AuthError::Forbidden(_))), "{err:?}");
    }

    #[test]
    fn short_or_repetitive_secrets_are_refused() {
        for bad in [
            " ".repeat(16),
            "a".repeat(64),
            "abababababababababababababababab".into(),
            "short".into(),
        ] {
            let keys = KeyConfig {
                secret: Some(bad.clone()),
                ..Default::default()
            };
            assert!(
                Verifier::from_keys(&keys).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn subjects_must_be_canonical_and_lifetimes_bounded() {
        for sub in ["01", "+1", " 1 "] {
            let t = mint(SECRET, sub, false, Duration::from_secs(60), None, None).unwrap();
            assert!(
                verify(&verifier(), &[("authorization", &format!("Bearer {t}"))]).is_err(),
                "sub {sub:?} must be refused"
            );
        }
        let long = mint(
            SECRET,
            "42",
            false,
            Duration::from_secs(25 * 3600),
            None,
            None,
        )
        .unwrap();
        let err = verify(&verifier(), &[("authorization", &format!("Bearer {long}"))]);
        assert!(
            matches!(err, Err(AuthError::Unauthenticated(ref m)) if m.contains("PRESENCE_JWT_MAX_TTL_S")),
            "{err:?}"
        );
    }

    #[test]
    fn an_audience_array_is_accepted_per_rfc_7519() {
        let claims = Claims {
            sub: "42".into(),
            exp: unix_now() + 60,
            role: None,
            iss: None,
            aud: Some(Audience::Many(vec!["a".into(), "b".into()])),
            iat: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verify(&verifier(), &[("authorization", &format!("Bearer {t}"))]).is_ok());
    }

    #[test]
    fn development_mode_reads_metadata() {
        let v = Verifier::Development;
        let id = verify(&v, &[(SERVICE_HEADER, "chat"), (USER_HEADER, "5")]).unwrap();
        assert!(id.is_service());
        assert_eq!(id.user(), Some(UserId::parse(5).unwrap()));
        assert!(matches!(
            verify(&v, &[]),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            verify(&v, &[(USER_HEADER, "0")]),
            Err(AuthError::Unauthenticated(_))
        ));
    }
}
