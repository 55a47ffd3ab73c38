//! Key material: the key-encryption key (KEK) that seals every private key at rest, and the
//! set of CAs and token-signing keys loaded from the store and opened with it.

use crate::ServerError;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use castellan_identity::ca::{open, seal};
use castellan_identity::{CertificateAuthority, SigningKey, TokenVerifier};
use castellan_store::{KeyRow, Store};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use rustls_pki_types::CertificateDer;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// File name of the KEK in the data directory.
pub const KEK_FILE: &str = "kek";
/// Seal labels: a blob sealed for one purpose cannot be opened as another.
pub(crate) const CA_LABEL: &str = "castellan ca key";
pub(crate) const SIGNING_LABEL: &str = "castellan signing key";

/// A 32-byte key-encryption key.
pub struct Kek([u8; 32]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(…)")
    }
}

impl Kek {
    /// The KEK from `CASTELLAN_KEK` (32 bytes, base64 or hex) if set, else the `kek` file in
    /// `data_dir`, which must be readable by its owner only. With `create`, a missing file is
    /// created with mode 0600.
    pub fn load(data_dir: &Path, env: Option<String>, create: bool) -> Result<Kek, ServerError> {
        if let Some(v) = env {
            return decode_kek(v.trim()).map(Kek).ok_or_else(|| {
                ServerError::Config("CASTELLAN_KEK must be 32 bytes, base64 or hex".to_owned())
            });
        }
        let path = data_dir.join(KEK_FILE);
        if create && !path.exists() {
            let mut k = [0u8; 32];
            aws_lc_rs::rand::fill(&mut k)
                .map_err(|_| ServerError::Internal("no randomness".to_owned()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
            writeln!(f, "{}", STANDARD.encode(k))
                .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
            return Ok(Kek(k));
        }
        let meta = std::fs::metadata(&path).map_err(|e| {
            ServerError::Config(format!(
                "{}: {e} (set CASTELLAN_KEK or run `castellan server init`)",
                path.display()
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ServerError::Config(format!(
                "{}: key-encryption key is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        decode_kek(text.trim())
            .map(Kek)
            .ok_or_else(|| ServerError::Config(format!("{}: not a 32-byte key", path.display())))
    }

    pub(crate) fn seal(&self, label: &str, secret: &[u8]) -> Result<Vec<u8>, ServerError> {
        seal(&self.0, label, secret).map_err(|e| ServerError::Internal(e.to_string()))
    }

    /// HMAC-SHA256 of `data` under a key derived from the KEK for `label`: rows carrying it
    /// were written by a holder of the KEK, not merely by someone who can write the database.
    pub(crate) fn mac(&self, label: &str, data: &[u8]) -> Vec<u8> {
        let root = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.0);
        let derived = aws_lc_rs::hmac::sign(&root, label.as_bytes());
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, derived.as_ref());
        aws_lc_rs::hmac::sign(&key, data).as_ref().to_vec()
    }

    /// Whether `mac` is [`Kek::mac`] of `data` (constant time).
    pub(crate) fn verify_mac(&self, label: &str, data: &[u8], mac: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.mac(label, data), mac).is_ok()
    }

    pub(crate) fn open(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, ServerError> {
        open(&self.0, label, sealed).map_err(|_| {
            ServerError::Config(
                "a stored private key cannot be opened: wrong key-encryption key (CASTELLAN_KEK or DATA/kek)".to_owned(),
            )
        })
    }
}

fn decode_kek(s: &str) -> Option<[u8; 32]> {
    let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| {
                s.get(i * 2..i * 2 + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()?
    } else {
        STANDARD
            .decode(s)
            .or_else(|_| URL_SAFE_NO_PAD.decode(s))
            .ok()?
    };
    bytes.try_into().ok()
}

/// A CA opened from the store.
#[derive(Debug)]
pub struct LoadedCa {
    /// Store id.
    pub id: String,
    /// The CA.
    pub ca: CertificateAuthority,
    /// `notAfter` of its certificate.
    pub not_after: i64,
}

/// Every key the server signs or verifies with, as of one load.
pub struct KeySet {
    /// The CA that signs new certificates.
    pub active_ca: Arc<LoadedCa>,
    /// Every unexpired CA certificate: the trust bundle.
    pub bundle: Vec<CertificateDer<'static>>,
    /// The key that signs new tokens.
    pub signing: Arc<SigningKey>,
    /// Published public keys: the active one and retired ones whose tokens may still be live.
    pub jwks: JwkSet,
    /// `jwks` serialized, as served.
    pub jwks_json: String,
    /// Verifies this server's own tokens (any audience; for introspection and exchange).
    pub verifier: TokenVerifier,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("active_ca", &self.active_ca.id)
            .field("bundle", &self.bundle.len())
            .field("signing", &self.signing.kid())
            .finish_non_exhaustive()
    }
}

/// Creates a new CA, seals its key and stores it; returns its id.
pub async fn add_ca(
    store: &Store,
    kek: &Kek,
    trust_domain: &str,
    now: i64,
    ttl: Duration,
) -> Result<String, ServerError> {
    let ca = CertificateAuthority::generate(trust_domain, now, ttl)
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    let id = random_id(12)?;
    store
        .add_ca_key(&KeyRow {
            id: id.clone(),
            public: ca.cert().to_vec(),
            sealed_key: kek.seal(CA_LABEL, &ca.key_pkcs8())?,
            created_at: now,
            retired_at: None,
        })
        .await?;
    Ok(id)
}

/// Creates a new token-signing key, seals it and stores it; returns its kid.
pub async fn add_signing_key(store: &Store, kek: &Kek, now: i64) -> Result<String, ServerError> {
    let key = SigningKey::generate().map_err(|e| ServerError::Internal(e.to_string()))?;
    let jwk = key
        .jwk()
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    let jwk_json = serde_json::to_string(&jwk).map_err(|e| ServerError::Internal(e.to_string()))?;
    store
        .add_signing_key(
            &KeyRow {
                id: key.kid().to_owned(),
                public: jwk_json.into_bytes(),
                sealed_key: kek.seal(SIGNING_LABEL, &key.pkcs8())?,
                created_at: now,
                retired_at: None,
            },
            "ES256",
        )
        .await?;
    Ok(key.kid().to_owned())
}

/// Loads and opens every key. `publish_for` is how long a retired signing key stays in the
/// JWKS: the longest token lifetime plus the verifiers' leeway.
pub async fn load(
    store: &Store,
    kek: &Kek,
    trust_domain: &str,
    issuer: &str,
    now: i64,
    publish_for: i64,
) -> Result<KeySet, ServerError> {
    let mut active_ca = None;
    let mut bundle = Vec::new();
    let mut refused = 0;
    for row in store.ca_keys().await? {
        let cert = CertificateDer::from(row.public.clone());
        let not_after = cert_not_after(&cert)?;
        if not_after <= now {
            continue;
        }
        // INVARIANT: a CA enters the bundle only if its sealed key opens with the KEK and
        // belongs to its certificate. A row written straight into the database (a CA of the
        // writer's own) cannot be sealed without the KEK, so it never becomes trusted.
        let opened = kek.open(CA_LABEL, &row.sealed_key).and_then(|key| {
            CertificateAuthority::from_parts(trust_domain, cert.clone(), &key)
                .map_err(|e| ServerError::Internal(e.to_string()))
        });
        let ca = match opened {
            Ok(ca) => ca,
            Err(e) => {
                refused += 1;
                metrics::counter!("castellan_server_ca_rows_refused_total").increment(1);
                tracing::error!(ca = %row.id, error = %e, "CA row refused: its key does not open with the KEK or does not match its certificate");
                continue;
            }
        };
        bundle.push(cert);
        if row.retired_at.is_none() {
            // Rows come oldest first: the last unretired one is the newest.
            active_ca = Some(Arc::new(LoadedCa {
                id: row.id,
                ca,
                not_after,
            }));
        }
    }
    let active_ca = active_ca.ok_or_else(|| {
        if refused > 0 {
            ServerError::Config(
                "no usable CA: wrong key-encryption key (the stored CA keys do not open with CASTELLAN_KEK or DATA/kek, or do not match their certificates)".to_owned(),
            )
        } else {
            ServerError::Config("no usable CA: run `castellan ca rotate`".to_owned())
        }
    })?;

    let mut signing = None;
    let mut published: Vec<Jwk> = Vec::new();
    for row in store.signing_keys().await? {
        let live = row
            .retired_at
            .is_none_or(|r| r.saturating_add(publish_for) > now);
        if !live {
            continue;
        }
        // INVARIANT: a signing key is published (and so trusted by every verifier of our
        // tokens) only if its sealed key opens with the KEK and its JWK is that key's: a row
        // written straight into the database, retired or not, never becomes a trusted key.
        let authentic = kek.open(SIGNING_LABEL, &row.sealed_key).and_then(|pkcs8| {
            let key = SigningKey::from_pkcs8(&row.id, &pkcs8)
                .map_err(|e| ServerError::Internal(e.to_string()))?;
            let stored: Jwk = serde_json::from_slice(&row.public)
                .map_err(|e| ServerError::Internal(format!("stored JWK {}: {e}", row.id)))?;
            let own = key
                .jwk()
                .map_err(|e| ServerError::Internal(e.to_string()))?;
            if serde_json::to_value(&stored).ok() != serde_json::to_value(&own).ok() {
                return Err(ServerError::Internal(format!(
                    "signing key {}: stored JWK is not the sealed key's",
                    row.id
                )));
            }
            Ok((key, own))
        });
        let (key, jwk) = match authentic {
            Ok(k) => k,
            Err(e) => {
                metrics::counter!("castellan_server_signing_key_rows_refused_total").increment(1);
                tracing::error!(kid = %row.id, error = %e, "signing key row refused: its key does not open with the KEK or does not match its JWK");
                continue;
            }
        };
        published.push(jwk);
        if row.retired_at.is_none() {
            signing = Some(Arc::new(key));
        }
    }
    let signing = signing.ok_or_else(|| {
        ServerError::Config("no signing key: run `castellan keys rotate`".to_owned())
    })?;
    let jwks = JwkSet { keys: published };
    let jwks_json =
        serde_json::to_string(&jwks).map_err(|e| ServerError::Internal(e.to_string()))?;
    let verifier = TokenVerifier::for_issuer(issuer, &jwks)
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok(KeySet {
        active_ca,
        bundle,
        signing,
        jwks,
        jwks_json,
        verifier,
    })
}

/// `notAfter` of a certificate, Unix seconds.
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Result<i64, ServerError> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| ServerError::Internal(format!("stored certificate: {e}")))?;
    Ok(c.validity().not_after.timestamp())
}

/// `n` random bytes, base64url.
pub fn random_id(n: usize) -> Result<String, ServerError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| ServerError::Internal("no randomness".to_owned()))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// SHA-256 of a credential: what the store keeps instead of it. Castellan's credentials are 256
/// random bits, so a fast hash is enough (a slow password hash protects guessable secrets and
/// would cap token issuance at a few hundred per second).
pub fn credential_hash(secret: &str) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// PEM of DER certificates.
pub fn pem_bundle(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(c.as_ref());
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_file_is_created_private_and_refused_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = Kek::load(dir.path(), None, true).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = Kek::load(dir.path(), None, false).unwrap();
        assert_eq!(k1.0, k2.0);
        std::fs::set_permissions(
            dir.path().join(KEK_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Kek::load(dir.path(), None, false).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }

    #[test]
    fn kek_from_environment() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "00".repeat(31) + "ff";
        assert_eq!(Kek::load(dir.path(), Some(hex), false).unwrap().0[31], 0xff);
        assert!(Kek::load(dir.path(), Some("short".to_owned()), false).is_err());
        let sealed = Kek([7; 32]).seal("a", b"secret").unwrap();
        assert!(Kek([8; 32]).open("a", &sealed).is_err());
        assert!(Kek([7; 32]).open("b", &sealed).is_err());
    }
}
