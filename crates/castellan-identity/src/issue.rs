//! Issuing castellan's JWT access tokens: ES256 signing keys with their public JWKs, and
//! short-lived tokens carrying `iss sub aud exp iat nbf jti` plus caller-chosen claims.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use rcgen::KeyPair;
use serde_json::{Map, Value, json};

/// Why a token could not be issued (ours, never the client's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// Key generation or loading failed.
    #[error("signing key: {0}")]
    Key(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// An ES256 token-signing key.
pub struct SigningKey {
    kid: String,
    key: KeyPair,
    // The same key parsed once for signing: parsing PKCS#8 on every token would cost more than
    // the signature itself.
    signer: EcdsaKeyPair,
    // `{"alg":"ES256","kid":…,"typ":"JWT"}`, base64url, computed once.
    header_b64: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new P-256 key with a random `kid`.
    pub fn generate() -> Result<SigningKey, IssueError> {
        let key = KeyPair::generate().map_err(|e| IssueError::Key(e.to_string()))?;
        let mut id = [0u8; 12];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| IssueError::Key("no randomness".to_owned()))?;
        SigningKey::from_pkcs8(&URL_SAFE_NO_PAD.encode(id), &key.serialize_der())
    }

    /// A key loaded from storage.
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> Result<SigningKey, IssueError> {
        let key = KeyPair::try_from(pkcs8).map_err(|e| IssueError::Key(e.to_string()))?;
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| IssueError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        Ok(SigningKey {
            kid: kid.to_owned(),
            key,
            signer,
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key, PKCS#8 DER: seal it before storing.
    pub fn pkcs8(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The public key as a JWK (`kty EC`, `crv P-256`, `alg ES256`, `use sig`, `kid`).
    pub fn jwk(&self) -> Result<Jwk, IssueError> {
        let raw = self.key.public_key_raw();
        let (Some(x), Some(y)) = (raw.get(1..33), raw.get(33..65)) else {
            return Err(IssueError::Key(
                "not an uncompressed P-256 point".to_owned(),
            ));
        };
        serde_json::from_value(json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }))
        .map_err(|e| IssueError::Key(e.to_string()))
    }
}

/// A JWKS of public keys, as served at `/.well-known/jwks.json`.
pub fn jwks(keys: &[&SigningKey]) -> Result<JwkSet, IssueError> {
    Ok(JwkSet {
        keys: keys.iter().map(|k| k.jwk()).collect::<Result<_, _>>()?,
    })
}

/// Signs an access token for `sub` and `aud`, valid from `now` for `ttl_secs`, with `extra`
/// claims (which cannot override the registered ones).
pub fn issue_token(
    key: &SigningKey,
    issuer: &str,
    sub: &str,
    aud: &str,
    now: i64,
    ttl_secs: i64,
    extra: &Map<String, Value>,
) -> Result<String, IssueError> {
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).map_err(|_| IssueError::Sign("no randomness".to_owned()))?;
    let mut claims = extra.clone();
    for (k, v) in [
        ("iss", json!(issuer)),
        ("sub", json!(sub)),
        ("aud", json!(aud)),
        ("iat", json!(now)),
        ("nbf", json!(now)),
        ("exp", json!(now.saturating_add(ttl_secs))),
        ("jti", json!(URL_SAFE_NO_PAD.encode(jti))),
    ] {
        claims.insert(k.to_owned(), v);
    }
    key.sign_jws(&Value::Object(claims))
}

impl SigningKey {
    /// Signs `claims` as a compact JWS with this key's ES256 header.
    pub fn sign_jws(&self, claims: &Value) -> Result<String, IssueError> {
        let payload = serde_json::to_vec(claims).map_err(|e| IssueError::Sign(e.to_string()))?;
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 90);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = self
            .signer
            .sign(&SystemRandom::new(), out.as_bytes())
            .map_err(|_| IssueError::Sign("ECDSA signing failed".to_owned()))?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }
}
