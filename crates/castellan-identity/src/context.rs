//! User-context tokens: what the gateway learned about the end user, carried to every hop as a
//! compact JWS signed with the gateway's own SVID key (`x5c` holds its SVID chain), so each
//! sidecar verifies it locally against the trust bundle — no shared secret, no remote call.
//! Whether the signer may mint context at all is policy (MeshConfig `contextIssuers`), checked by
//! the caller with the signer's SPIFFE ID returned here.

use crate::spiffe::SpiffeId;
use crate::svid::{SvidUsage, SvidValidator};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{Map, Value, json};

/// The header `typ` of a context token.
pub const CONTEXT_TYP: &str = "castellan-context+jwt";
/// Longest accepted context token.
pub const MAX_CONTEXT_LEN: usize = 8192;
/// Longest lifetime a context token may claim (product.md §3: ≤ 5 min).
pub const MAX_CONTEXT_TTL: i64 = 300;
/// Clock skew tolerated.
const LEEWAY: i64 = 30;

/// Why a context token was refused (the presenter's fault) or could not be made (ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Not a well-formed compact JWS with JSON header and claims.
    #[error("malformed context token: {0}")]
    Malformed(&'static str),
    /// Too large.
    #[error("context token larger than {MAX_CONTEXT_LEN} bytes")]
    TooLarge,
    /// A header other than alg ES256, typ and x5c.
    #[error("context token header not accepted: {0}")]
    Header(String),
    /// The x5c chain is not a valid SVID of this trust domain.
    #[error("context token signer: {0}")]
    Signer(String),
    /// The signature does not verify with the x5c leaf's key.
    #[error("context token signature does not verify")]
    BadSignature,
    /// A claim is missing, mistyped or wrong.
    #[error("context token claim {0}")]
    Claim(&'static str),
    /// Expired, not yet valid, or claiming a lifetime over the maximum.
    #[error("context token is expired or not yet valid")]
    Time,
    /// Presented by a workload that is neither its signer calling its audience, nor its
    /// audience making one onward call: a replay.
    #[error(
        "context token presented by {presenter}, who may not present it (signed by {signer} for {aud})"
    )]
    Presenter {
        /// Who presented it (the mTLS peer).
        presenter: String,
        /// Who signed it.
        signer: String,
        /// Whom it was minted for.
        aud: String,
    },
    /// Signing failed (ours).
    #[error("cannot sign context token: {0}")]
    Sign(String),
}

/// What a verified context token says.
#[derive(Debug, Clone, PartialEq)]
pub struct UserContext {
    /// The workload that signed it.
    pub signer: SpiffeId,
    /// The end user.
    pub sub: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// Selected claims.
    pub claims: Map<String, Value>,
    /// The request it was minted for.
    pub txn: String,
    /// Expiry.
    pub exp: i64,
    /// The workload it was minted for (the destination of the signer's call).
    pub aud: SpiffeId,
    /// Who acted on the user's behalf before the signer (from an exchanged token's `act`),
    /// nearest last.
    pub act: Vec<String>,
}

impl UserContext {
    /// The last second this token, verified with `signer`, stays acceptable: its expiry with
    /// the leeway verification allows, and never past the signer's certificate. A verified
    /// token kept in a cache is used only until then.
    pub fn usable_until(&self, signer: &ValidatedSigner) -> i64 {
        (self.exp + LEEWAY).min(signer.not_after)
    }

    /// Binds the token to the connection it arrived on (product.md §3): accepted from its
    /// signer calling the audience (`me`) — a direct call, empty `act` — or from the audience
    /// itself making one onward call on the user's behalf — `act` = [the audience]. Anyone
    /// else presenting it is replaying it.
    pub fn presented_by(
        &self,
        presenter: &SpiffeId,
        me: &SpiffeId,
    ) -> Result<Vec<String>, ContextError> {
        if *presenter == self.signer && self.aud == *me {
            return Ok(self.act.clone());
        }
        if *presenter == self.aud && presenter != me {
            let mut act = self.act.clone();
            act.push(presenter.as_str().to_owned());
            return Ok(act);
        }
        Err(ContextError::Presenter {
            presenter: presenter.to_string(),
            signer: self.signer.to_string(),
            aud: self.aud.to_string(),
        })
    }
}

/// Signs context tokens with a workload's SVID key.
pub struct ContextSigner {
    id: SpiffeId,
    key: EcdsaKeyPair,
    header_b64: String,
}

impl std::fmt::Debug for ContextSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSigner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ContextSigner {
    /// A signer for the SVID `chain` (leaf first) whose P-256 key is `key_pkcs8`.
    pub fn new(
        id: SpiffeId,
        chain: &[CertificateDer<'_>],
        key_pkcs8: &[u8],
    ) -> Result<ContextSigner, ContextError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key_pkcs8)
            .map_err(|e| ContextError::Sign(format!("not a P-256 PKCS#8 key: {e}")))?;
        let x5c: Vec<String> = chain.iter().map(|c| STANDARD.encode(c.as_ref())).collect();
        let header = json!({"alg": "ES256", "typ": CONTEXT_TYP, "x5c": x5c});
        Ok(ContextSigner {
            id,
            key,
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
        })
    }

    /// The signer's SPIFFE ID (`iss` of its tokens).
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Mints a token for `sub` with `roles` and `claims`, for audience `aud` (the SPIFFE ID of
    /// the service the signer calls), for request `txn`, valid from `now` for `ttl` seconds
    /// (at most 300).
    #[allow(clippy::too_many_arguments)]
    pub fn mint(
        &self,
        aud: &str,
        sub: &str,
        roles: &[String],
        claims: &Map<String, Value>,
        txn: &str,
        now: i64,
        ttl: i64,
    ) -> Result<String, ContextError> {
        self.mint_with_act(aud, sub, roles, claims, &[], txn, now, ttl)
    }

    /// An ECDSA P-256 / SHA-256 signature (r‖s) over `data` with the SVID key — for
    /// statements other than context tokens (signed audit checkpoints).
    pub fn sign_detached(&self, data: &[u8]) -> Result<Vec<u8>, ContextError> {
        self.key
            .sign(&SystemRandom::new(), data)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| ContextError::Sign("ECDSA signing failed".to_owned()))
    }

    /// As [`mint`](Self::mint), for a user on whose behalf `act` (nearest last) already acted.
    #[allow(clippy::too_many_arguments)]
    pub fn mint_with_act(
        &self,
        aud: &str,
        sub: &str,
        roles: &[String],
        claims: &Map<String, Value>,
        act: &[String],
        txn: &str,
        now: i64,
        ttl: i64,
    ) -> Result<String, ContextError> {
        let mut body = json!({
            "iss": self.id.as_str(), "aud": aud, "sub": sub, "roles": roles, "claims": claims,
            "txn": txn, "iat": now, "exp": now + ttl.clamp(1, MAX_CONTEXT_TTL),
        });
        if !act.is_empty()
            && let Some(o) = body.as_object_mut()
        {
            o.insert("act".to_owned(), json!(act));
        }
        let mut out = self.header_b64.clone();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(body.to_string(), &mut out);
        let sig = self
            .key
            .sign(&SystemRandom::new(), out.as_bytes())
            .map_err(|_| ContextError::Sign("ECDSA signing failed".to_owned()))?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }
}

fn b64url_json(seg: &str) -> Result<Map<String, Value>, ContextError> {
    if seg.is_empty()
        || !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ContextError::Malformed("segment is not base64url"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| ContextError::Malformed("segment is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ContextError::Malformed("segment is not a JSON object")),
    }
}

/// A context-token signer whose SVID chain was validated: what [`verify_context_signed_by`]
/// needs, so a verifier can keep it for the tokens that follow from the same signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedSigner {
    /// The signer's SPIFFE ID.
    pub id: SpiffeId,
    spki: Vec<u8>,
    not_after: i64,
}

fn split3(token: &str) -> Result<(&str, &str, &str), ContextError> {
    if token.len() > MAX_CONTEXT_LEN {
        return Err(ContextError::TooLarge);
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err(ContextError::Malformed("expected three segments")),
    }
}

/// The token's header segment: tokens from one signer share it, so it keys a cache of
/// [`ValidatedSigner`]s (which must be emptied whenever the bundle or revocations change).
pub fn context_header(token: &str) -> Result<&str, ContextError> {
    split3(token).map(|(h, _, _)| h)
}

/// Checks the header (exactly `alg ES256`, `typ`, `x5c`) and validates the `x5c` chain as an
/// SVID with the validator's bundle and revocations.
pub fn validate_context_signer(
    token: &str,
    validator: &SvidValidator,
    now: i64,
) -> Result<ValidatedSigner, ContextError> {
    let (h64, _, _) = split3(token)?;
    let header = b64url_json(h64)?;
    if let Some(k) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "typ" | "x5c"))
    {
        return Err(ContextError::Header(k.clone()));
    }
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(ContextError::Header("alg must be ES256".to_owned()));
    }
    if header.get("typ").and_then(Value::as_str) != Some(CONTEXT_TYP) {
        return Err(ContextError::Header(format!("typ must be {CONTEXT_TYP}")));
    }
    let x5c = header
        .get("x5c")
        .and_then(Value::as_array)
        .filter(|a| (1..=4).contains(&a.len()))
        .ok_or_else(|| ContextError::Header("x5c must hold 1-4 certificates".to_owned()))?;
    let chain: Vec<CertificateDer<'static>> = x5c
        .iter()
        .map(|c| {
            c.as_str()
                .and_then(|s| STANDARD.decode(s).ok())
                .map(CertificateDer::from)
        })
        .collect::<Option<_>>()
        .ok_or_else(|| ContextError::Header("x5c entries must be base64 DER".to_owned()))?;
    let now_t = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    let id = validator
        .validate(&chain, now_t, SvidUsage::Client)
        .map_err(|e| ContextError::Signer(e.to_string()))?;
    let leaf = chain.first().ok_or(ContextError::Malformed("empty x5c"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| ContextError::Signer("unparsable leaf".to_owned()))?;
    Ok(ValidatedSigner {
        id,
        spki: cert.public_key().subject_public_key.data.to_vec(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Verifies the signature and claims of a token whose signer was validated (same header):
/// `iss` the signer; `aud` a workload of `trust_domain`; time within a 30 s leeway and a
/// lifetime of at most 5 minutes; the signer's certificate still valid. Who may present it is
/// [`UserContext::presented_by`].
pub fn verify_context_signed_by(
    token: &str,
    signer: &ValidatedSigner,
    trust_domain: &str,
    now: i64,
) -> Result<UserContext, ContextError> {
    let (h64, p64, s64) = split3(token)?;
    if now > signer.not_after {
        return Err(ContextError::Signer("certificate expired".to_owned()));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|_| ContextError::Malformed("signature is not base64url"))?;
    let signed = token
        .get(..h64.len() + 1 + p64.len())
        .ok_or(ContextError::Malformed("bad lengths"))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &signer.spki)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| ContextError::BadSignature)?;
    let c = b64url_json(p64)?;
    let s = |k: &'static str| {
        c.get(k)
            .and_then(Value::as_str)
            .ok_or(ContextError::Claim(k))
    };
    let i = |k: &'static str| {
        c.get(k)
            .and_then(Value::as_i64)
            .ok_or(ContextError::Claim(k))
    };
    if s("iss")? != signer.id.as_str() {
        return Err(ContextError::Claim("iss (not the signer)"));
    }
    let aud = SpiffeId::parse(s("aud")?).map_err(|_| ContextError::Claim("aud"))?;
    if aud.trust_domain() != trust_domain {
        return Err(ContextError::Claim("aud"));
    }
    let (iat, exp) = (i("iat")?, i("exp")?);
    if now > exp + LEEWAY || iat > now + LEEWAY || exp - iat > MAX_CONTEXT_TTL || exp < iat {
        return Err(ContextError::Time);
    }
    let roles = match c.get("roles") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(ContextError::Claim("roles"))?,
        None => Vec::new(),
        _ => return Err(ContextError::Claim("roles")),
    };
    let claims = match c.get("claims") {
        Some(Value::Object(m)) => m.clone(),
        None => Map::new(),
        _ => return Err(ContextError::Claim("claims")),
    };
    let act = match c.get("act") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(ContextError::Claim("act"))?,
        None => Vec::new(),
        _ => return Err(ContextError::Claim("act")),
    };
    Ok(UserContext {
        sub: s("sub")?.to_owned(),
        txn: s("txn")?.to_owned(),
        roles,
        claims,
        exp,
        signer: signer.id.clone(),
        aud,
        act,
    })
}

/// Verifies a context token: the header and signer chain ([`validate_context_signer`]), then
/// signature and claims ([`verify_context_signed_by`]).
pub fn verify_context(
    token: &str,
    validator: &SvidValidator,
    trust_domain: &str,
    now: i64,
) -> Result<UserContext, ContextError> {
    let signer = validate_context_signer(token, validator, now)?;
    verify_context_signed_by(token, &signer, trust_domain, now)
}
