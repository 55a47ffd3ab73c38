//! End-user tokens from external OIDC issuers. An issuer's keys come from a JWKS file, or by
//! URL: OIDC discovery (`ISSUER/.well-known/openid-configuration`, whose `issuer` must be the
//! one configured) and the `jwks_uri` it names, both over verified TLS only. Keys by URL are
//! refreshed on a schedule and when a token names a `kid` we do not know (at most once per
//! [`MIN_REFETCH`]); on any failure the last good keys stay in force. Keys in a token header
//! (`jku`, `x5u`, `jwk`) are never followed.

use crate::{Inner, ProxyError};
use arc_swap::ArcSwap;
use bytes::Bytes;
use castellan_identity::{TokenError, TokenVerifier, VerifiedToken};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// Fewest seconds between two fetches prompted by unknown `kid`s.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Largest discovery document or JWKS accepted.
const MAX_DOC_BYTES: usize = 256 * 1024;

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum OidcKeys {
    /// A JWKS file, read at start.
    File(PathBuf),
    /// OIDC discovery at the issuer URL (https), refreshed every `refresh`; the issuer's TLS
    /// certificate is verified with the system roots, or with `ca_file` alone when given.
    Discovery {
        /// PEM roots for the issuer's TLS (instead of the system's).
        ca_file: Option<PathBuf>,
        /// Scheduled refresh.
        refresh: Duration,
    },
}

/// A JWT issuer the gateway and decision points accept end-user tokens from.
#[derive(Debug, Clone)]
pub struct OidcIssuer {
    /// `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Its keys.
    pub keys: OidcKeys,
}

/// One configured issuer and its keys in force.
#[derive(Debug)]
pub(crate) struct Issuer {
    cfg: OidcIssuer,
    keys: ArcSwap<Option<TokenVerifier>>,
    /// Woken when a token names an unknown `kid`.
    wake: Notify,
}

/// The issuers of `cfg`: file keys loaded now (an unreadable file is a configuration error),
/// URL keys empty until the first fetch.
pub(crate) fn load(cfg: &[OidcIssuer]) -> Result<Vec<Arc<Issuer>>, ProxyError> {
    let mut out = Vec::new();
    for o in cfg {
        let keys = match &o.keys {
            OidcKeys::File(path) => {
                let err = |e: &dyn std::fmt::Display| {
                    ProxyError::Config(format!("{}: {e}", path.display()))
                };
                let text = std::fs::read_to_string(path).map_err(|e| err(&e))?;
                let jwks = serde_json::from_str(&text).map_err(|e| err(&e))?;
                Some(TokenVerifier::new(&o.issuer, &o.audience, &jwks).map_err(|e| err(&e))?)
            }
            OidcKeys::Discovery { .. } => {
                if !o.issuer.starts_with("https://") {
                    return Err(ProxyError::Config(format!(
                        "OIDC issuer {}: keys by URL need an https issuer",
                        o.issuer
                    )));
                }
                None
            }
        };
        out.push(Arc::new(Issuer {
            cfg: o.clone(),
            keys: ArcSwap::from_pointee(keys),
            wake: Notify::new(),
        }));
    }
    Ok(out)
}

/// The first issuer whose keys verify `token`. A `kid` no issuer knows wakes the refresh of
/// the issuers whose keys come by URL.
pub(crate) fn verify(inner: &Inner, token: &str, now: i64) -> Option<VerifiedToken> {
    let mut unknown_kid = false;
    for i in &inner.oidc {
        if let Some(v) = i.keys.load().as_ref() {
            match v.verify(token, now) {
                Ok(t) => return Some(t),
                Err(TokenError::UnknownKey) => unknown_kid = true,
                Err(_) => {}
            }
        } else {
            unknown_kid = true;
        }
    }
    if unknown_kid {
        for i in &inner.oidc {
            if matches!(i.cfg.keys, OidcKeys::Discovery { .. }) {
                i.wake.notify_one();
            }
        }
    }
    None
}

/// Starts the refresh task of every issuer whose keys come by URL.
pub(crate) fn spawn_refresh(inner: &Arc<Inner>, stop: &watch::Receiver<bool>) {
    for i in &inner.oidc {
        if let OidcKeys::Discovery { ca_file, refresh } = &i.cfg.keys {
            tokio::spawn(refresh_loop(
                i.clone(),
                ca_file.clone(),
                *refresh,
                inner.cfg.proxy_id.clone(),
                stop.clone(),
            ));
        }
    }
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn https_client(ca_file: Option<&std::path::Path>) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in crate::read_bundle(path).map_err(|e| e.to_string())? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(conn))
}

async fn get_json(client: &HttpsClient, url: &str) -> Result<Value, String> {
    // The whole exchange, body included, within 10 s: a slow body must not stall refreshes.
    tokio::time::timeout(Duration::from_secs(10), get_json_inner(client, url))
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

async fn get_json_inner(client: &HttpsClient, url: &str) -> Result<Value, String> {
    if !url.starts_with("https://") {
        return Err(format!("{url}: not https"));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let resp = client
        .get(uri)
        .await
        .map_err(|e| format!("{url}: {}", crate::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_DOC_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}

/// Keeps the keys an issuer can sign with: those of its JWKS with a `kid` and an algorithm we
/// accept (ES256, EdDSA — said by `alg`, or by the key type when `alg` is absent). Keys of
/// other algorithms are left out, not an error: providers publish several.
fn usable_keys(jwks: &Value) -> Result<jsonwebtoken::jwk::JwkSet, String> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS without keys")?;
    let mut kept = Vec::new();
    for k in keys {
        let Some(obj) = k.as_object() else { continue };
        if obj
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let alg = match (
            obj.get("alg").and_then(Value::as_str),
            obj.get("kty").and_then(Value::as_str),
            obj.get("crv").and_then(Value::as_str),
        ) {
            (Some(a @ ("ES256" | "EdDSA")), _, _) => a,
            (None, Some("EC"), Some("P-256")) => "ES256",
            (None, Some("OKP"), Some("Ed25519")) => "EdDSA",
            _ => continue,
        };
        let mut obj = obj.clone();
        obj.insert("alg".to_owned(), Value::String(alg.to_owned()));
        kept.push(Value::Object(obj));
    }
    serde_json::from_value(serde_json::json!({ "keys": kept })).map_err(|e| e.to_string())
}

async fn fetch(client: &HttpsClient, cfg: &OidcIssuer) -> Result<TokenVerifier, String> {
    let base = cfg.issuer.trim_end_matches('/');
    let meta = get_json(client, &format!("{base}/.well-known/openid-configuration")).await?;
    // OIDC Discovery §4.3: the document's issuer must be the one asked about.
    let issuer = meta.get("issuer").and_then(Value::as_str);
    if issuer != Some(cfg.issuer.as_str()) {
        return Err(format!(
            "discovery names issuer {issuer:?}, not {:?}",
            cfg.issuer
        ));
    }
    let jwks_uri = meta
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("discovery without jwks_uri")?;
    let jwks = usable_keys(&get_json(client, jwks_uri).await?)?;
    TokenVerifier::new(&cfg.issuer, &cfg.audience, &jwks).map_err(|e| e.to_string())
}

async fn refresh_loop(
    issuer: Arc<Issuer>,
    ca_file: Option<PathBuf>,
    every: Duration,
    proxy: String,
    mut stop: watch::Receiver<bool>,
) {
    let client = match https_client(ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(issuer = %issuer.cfg.issuer, error = %e, "OIDC issuer TLS configuration failed");
            return;
        }
    };
    let mut last_fetch: Option<Instant> = None;
    loop {
        // Never two fetches closer than MIN_REFETCH, however often unknown kids wake us.
        if let Some(t) = last_fetch {
            let wait = MIN_REFETCH.saturating_sub(t.elapsed());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
        last_fetch = Some(Instant::now());
        let next = match fetch(&client, &issuer.cfg).await {
            Ok(v) => {
                tracing::info!(issuer = %issuer.cfg.issuer, "OIDC issuer keys fetched");
                metrics::counter!("castellan_proxy_oidc_key_fetches_total", "proxy" => proxy.clone(), "result" => "ok").increment(1);
                issuer.keys.store(Arc::new(Some(v)));
                every
            }
            Err(e) => {
                // The last good keys stay in force.
                tracing::warn!(issuer = %issuer.cfg.issuer, error = %e, "fetching OIDC issuer keys failed; keeping the last good keys");

                metrics::counter!("castellan_proxy_oidc_key_fetches_total", "proxy" => proxy.clone(), "result" => "error").increment(1);
                MIN_REFETCH.min(every)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = issuer.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}
