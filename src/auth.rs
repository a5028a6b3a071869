//! Client authentication: `Authorization: Bearer <JWT>` verified against an
//! HS256 secret or a JWKS file (RS256 / ES256); `exp` always checked, `aud`
//! when configured.

use http::header::{self, HeaderMap};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::error::Error;

/// Verifies client JWTs.
pub struct Authenticator {
    keys: Vec<Key>,
    audience: Option<String>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The claims ssegate reads.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// The client identity `limits.streams_per_client` counts by.
    pub sub: Option<String>,
}

impl Authenticator {
    /// Builds the verifier; the error names the key and why.
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, (String, String)> {
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.jwt_hs256_secret {
            keys.push(Key { kid: None, alg: Algorithm::HS256, key: DecodingKey::from_secret(secret.0.as_bytes()) });
        }
        if let Some(path) = &cfg.jwks_file {
            let bad = |reason: String| ("auth.jwks_file".to_string(), format!("{}: {reason}", path.display()));
            let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS: {e}")))?;
            for jwk in &set.keys {
                let alg = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => return Err(bad("only RSA (RS256) and EC P-256 (ES256) keys are supported".into())),
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("unusable key: {e}")))?;
                keys.push(Key { kid: jwk.common.key_id.clone(), alg, key });
            }
            if keys.is_empty() {
                return Err(bad("holds no keys".into()));
            }
        }
        Ok(Authenticator { keys, audience: cfg.audience.clone() })
    }

    /// Verifies the request's bearer token.
    pub fn verify(&self, headers: &HeaderMap) -> Result<Claims, Error> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Unauthorized("missing Authorization: Bearer token".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| Error::Unauthorized("Authorization is not a Bearer token".into()))?;
        let head =
            jsonwebtoken::decode_header(token).map_err(|e| Error::Unauthorized(format!("malformed token: {e}")))?;
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.alg == head.alg && (head.kid.is_none() || k.kid.is_none() || k.kid == head.kid));
        let mut last = Error::Unauthorized(format!("no key for algorithm {:?}", head.alg));
        for key in candidates {
            let mut validation = Validation::new(key.alg);
            validation.leeway = 5;
            match &self.audience {
                Some(aud) => {
                    validation.set_required_spec_claims(&["exp", "aud"]);
                    validation.set_audience(&[aud]);
                }
                None => {
                    validation.set_required_spec_claims(&["exp"]);
                    validation.validate_aud = false;
                }
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = Error::Unauthorized(format!("invalid token: {e}")),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef-test-secret";

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn auth(audience: Option<&str>) -> Result<Authenticator, Box<dyn std::error::Error>> {
        let cfg = AuthConfig {
            jwt_hs256_secret: Some(Secret(SECRET.into())),
            jwks_file: None,
            audience: audience.map(str::to_string),
        };
        Authenticator::new(&cfg).map_err(|(k, r)| format!("{k}: {r}").into())
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn token(claims: serde_json::Value, secret: &str) -> Result<HeaderMap, Box<dyn std::error::Error>> {
        let jwt = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))?;
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {jwt}").parse()?);
        Ok(h)
    }

    #[test]
    fn valid_token_gives_its_subject() -> TestResult {
        let claims = auth(None)?.verify(&token(serde_json::json!({"sub": "alice", "exp": now() + 60}), SECRET)?)?;
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        Ok(())
    }

    #[test]
    fn expired_wrong_key_missing_exp_and_no_header_are_refused() -> TestResult {
        let a = auth(None)?;
        let refused = |h: HeaderMap| matches!(a.verify(&h), Err(Error::Unauthorized(_)));
        assert!(refused(token(serde_json::json!({"sub": "a", "exp": now() - 3600}), SECRET)?), "expired");
        assert!(refused(token(serde_json::json!({"sub": "a", "exp": now() + 60}), "another-secret-of-length")?));
        assert!(refused(token(serde_json::json!({"sub": "a"}), SECRET)?), "no exp");
        assert!(refused(HeaderMap::new()), "no header");
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse()?);
        assert!(refused(basic), "not a bearer token");
        Ok(())
    }

    #[test]
    fn audience_is_checked_when_configured() -> TestResult {
        let a = auth(Some("ssegate"))?;
        assert!(a.verify(&token(serde_json::json!({"aud": "ssegate", "exp": now() + 60}), SECRET)?).is_ok());
        assert!(a.verify(&token(serde_json::json!({"aud": "other", "exp": now() + 60}), SECRET)?).is_err());
        assert!(a.verify(&token(serde_json::json!({"exp": now() + 60}), SECRET)?).is_err());
        Ok(())
    }
}
