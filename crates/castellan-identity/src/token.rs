//! Verification of castellan's JWT access tokens and context tokens (JWS compact, ES256 or
//! EdDSA): strict about the encoding, the header and the claims' JSON types before the signature
//! is checked (jsonwebtoken), and about time, issuer and audience after.
//!
//! Refused, each with its own error: `alg: none` and every algorithm but ES256/EdDSA (so no
//! HS256 keyed with a public key), a `kid` that is unknown or not a plain identifier, `jku`,
//! `x5u`, `jwk`, `x5c` and `x5t` headers (keys are never fetched or taken from the token), any
//! `crit` header, claims of the wrong JSON type (`"exp": "9999999999"`), expiry and not-before
//! beyond the leeway, another issuer, another audience or several audiences, a bad or all-zero
//! signature, tokens over 8 KiB, and anything after the signature.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The largest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Headers that would let a token choose its own key or demand extensions we do not implement.
const FORBIDDEN_HEADERS: [&str; 7] = ["jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256", "crit"];

/// The default clock skew allowed on `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: i64 = 30;

/// Why a token was refused. Every variant is the presenter's fault except [`TokenError::Keys`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not three base64url segments, or a segment does not decode.
    #[error("token is not a JWS compact serialization: {0}")]
    Malformed(&'static str),
    /// The header or claims are not a JSON object.
    #[error("token {0} is not a JSON object")]
    NotJson(&'static str),
    /// `alg` is missing, `none`, or not one this verifier accepts.
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(String),
    /// A header that would let the token choose its own key or extensions.
    #[error("header {0:?} is not accepted")]
    ForbiddenHeader(&'static str),
    /// `kid` missing, not a plain identifier, or unknown.
    #[error("unknown or invalid key id")]
    UnknownKey,
    /// The key with this `kid` is for another algorithm.
    #[error("key {0:?} is not an {1} key")]
    KeyAlgorithmMismatch(String, String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A claim has the wrong JSON type, or a required claim is missing.
    #[error("claim {0:?} is missing or of the wrong type")]
    ClaimType(&'static str),
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the expected issuer.
    #[error("token issuer is not trusted")]
    WrongIssuer,
    /// `aud` does not name this audience.
    #[error("token audience does not include this service")]
    WrongAudience,
    /// `aud` names several audiences; a token for several services could be replayed to each.
    #[error("token names several audiences")]
    MultipleAudiences,
    /// The verifier's key set is unusable (configuration, not the presenter).
    #[error("invalid key set: {0}")]
    Keys(String),
}

/// A token whose signature, time, issuer and audience were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The key that signed it.
    pub kid: String,
    /// All claims, with their JSON types checked for the registered ones.
    pub claims: Map<String, Value>,
}

impl VerifiedToken {
    /// `sub`, if present.
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }
}

struct VerifyingKey {
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens of one issuer for one audience.
pub struct TokenVerifier {
    issuer: String,
    // `None` only for the issuer checking its own tokens (see `for_issuer`).
    audience: Option<String>,
    keys: HashMap<String, VerifyingKey>,
    leeway: i64,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn is_accepted_alg(alg: &str) -> Option<Algorithm> {
    match alg {
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

fn is_plain_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 128
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !kid.contains("..")
}

impl TokenVerifier {
    /// A verifier for tokens from `issuer` for `audience`, with the keys of a JWKS. Every key
    /// must have a plain `kid` and `alg` ES256 or EdDSA.
    pub fn new(issuer: &str, audience: &str, jwks: &JwkSet) -> Result<TokenVerifier, TokenError> {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            let (kid, alg) = key_identity(jwk)?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Keys(e.to_string()))?;
            keys.insert(kid, VerifyingKey { alg, key });
        }
        if keys.is_empty() {
            return Err(TokenError::Keys("no keys".to_owned()));
        }
        Ok(TokenVerifier {
            issuer: issuer.to_owned(),
            audience: Some(audience.to_owned()),
            keys,
            leeway: DEFAULT_LEEWAY_SECS,
        })
    }

    /// A verifier that accepts any single audience: only for the issuer reading back its own
    /// tokens (introspection, token exchange), which reports `aud` instead of enforcing it. A
    /// resource server must use [`TokenVerifier::new`].
    pub fn for_issuer(issuer: &str, jwks: &JwkSet) -> Result<TokenVerifier, TokenError> {
        let mut v = TokenVerifier::new(issuer, "", jwks)?;
        v.audience = None;
        Ok(v)
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three segments"));
        };
        let header = decode_object(h64, "header")?;
        let claims = decode_object(p64, "claims")?;
        if s64.is_empty() || !s64.bytes().all(is_b64url) {
            return Err(TokenError::Malformed("signature is not base64url"));
        }

        for forbidden in FORBIDDEN_HEADERS {
            if header.contains_key(forbidden) {
                return Err(TokenError::ForbiddenHeader(forbidden));
            }
        }
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let alg =
            is_accepted_alg(alg_name).ok_or_else(|| TokenError::Algorithm(alg_name.to_owned()))?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .filter(|k| is_plain_kid(k))
            .ok_or(TokenError::UnknownKey)?;
        let key = self.keys.get(kid).ok_or(TokenError::UnknownKey)?;
        if key.alg != alg {
            return Err(TokenError::KeyAlgorithmMismatch(
                kid.to_owned(),
                alg_name.to_owned(),
            ));
        }
        let sig_len = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?
            .len();
        if sig_len != 64 {
            return Err(TokenError::BadSignature);
        }
        let signed = token.get(..h64.len() + 1 + p64.len()).unwrap_or_default();
        match jsonwebtoken::crypto::verify(s64, signed.as_bytes(), &key.key, alg) {
            Ok(true) => {}
            _ => return Err(TokenError::BadSignature),
        }

        check_claim_types(&claims)?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(TokenError::ClaimType("exp"))?;
        if now > exp.saturating_add(self.leeway) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
            && now < nbf.saturating_sub(self.leeway)
        {
            return Err(TokenError::NotYetValid);
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        let aud = match claims.get("aud") {
            Some(Value::String(a)) => Some(a.as_str()),
            Some(Value::Array(list)) if list.len() > 1 => {
                return Err(TokenError::MultipleAudiences);
            }
            Some(Value::Array(list)) => list.first().and_then(Value::as_str),
            _ => None,
        };
        match (aud, &self.audience) {
            (Some(a), Some(want)) if a == want => {}
            (Some(_), None) => {}
            _ => return Err(TokenError::WrongAudience),
        }
        Ok(VerifiedToken {
            kid: kid.to_owned(),
            claims,
        })
    }
}

fn key_identity(jwk: &Jwk) -> Result<(String, Algorithm), TokenError> {
    let kid = jwk
        .common
        .key_id
        .clone()
        .filter(|k| is_plain_kid(k))
        .ok_or_else(|| TokenError::Keys("every key needs a plain kid".to_owned()))?;
    let alg = match jwk.common.key_algorithm {
        Some(jsonwebtoken::jwk::KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(jsonwebtoken::jwk::KeyAlgorithm::EdDSA) => Algorithm::EdDSA,
        _ => {
            return Err(TokenError::Keys(format!(
                "key {kid:?} must say alg ES256 or EdDSA"
            )));
        }
    };
    Ok((kid, alg))
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn decode_object(seg: &str, what: &'static str) -> Result<Map<String, Value>, TokenError> {
    if seg.is_empty() || !seg.bytes().all(is_b64url) {
        return Err(TokenError::Malformed("segment is not base64url"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| TokenError::Malformed("segment is not base64url"))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TokenError::NotJson(what)),
    }
}

/// Registered claims must have their registered JSON types; a wrong type is an error, never a
/// claim silently skipped (jsonwebtoken CVE-2026-25537).
/// A check of one claim's JSON type.
type TypeCheck = fn(&Value) -> bool;

fn check_claim_types(claims: &Map<String, Value>) -> Result<(), TokenError> {
    if claims.get("exp").and_then(Value::as_i64).is_none() {
        return Err(TokenError::ClaimType("exp"));
    }
    let is_aud =
        |a: &Value| a.is_string() || a.as_array().is_some_and(|l| l.iter().all(Value::is_string));
    let checks: [(&'static str, TypeCheck); 7] = [
        ("nbf", |v| v.as_i64().is_some()),
        ("iat", |v| v.as_i64().is_some()),
        ("iss", Value::is_string),
        ("sub", Value::is_string),
        ("jti", Value::is_string),
        ("scope", Value::is_string),
        ("aud", is_aud),
    ];
    for (name, ok) in checks {
        if claims.get(name).is_some_and(|v| !ok(v)) {
            return Err(TokenError::ClaimType(name));
        }
    }
    Ok(())
}
