//! Deny-rate alerts: every few seconds, for each configured rule, count the matching audit
//! records of the last window; over the threshold → one JSON POST to the webhook (retried with
//! backoff), a log line and a metric, at most once per window per rule.

use crate::{Server, config::AlertRule};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::watch;

/// How often rules are evaluated.
const EVERY: Duration = Duration::from_secs(2);

type WebhookClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client for one rule's webhook: https verified with the rule's CA file or the system
/// roots (plain http is allowed by the config only to loopback).
fn client_for(rule: &AlertRule) -> Result<WebhookClient, String> {
    client_with(rule.ca_file.as_deref())
}

/// Sends `body` to `webhook` in the background (retried with backoff; a failure is logged).
pub(crate) fn send(webhook: &str, ca_file: Option<&std::path::Path>, body: String) {
    let client = match client_with(ca_file) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%webhook, error = %e, "alert webhook client unusable");
            return;
        }
    };
    let url = webhook.to_owned();
    tokio::spawn(async move {
        if !post(&client, &url, &body).await {
            tracing::error!(webhook = %url, "alert webhook failed after retries");
        }
    });
}

fn client_with(ca_file: Option<&std::path::Path>) -> Result<WebhookClient, String> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", path.display()))?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
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
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(conn))
}

async fn post(client: &WebhookClient, url: &str, body: &str) -> bool {
    let mut wait = Duration::from_millis(200);
    for _ in 0..4 {
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())));
        if let Ok(req) = req
            && let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    false
}

/// Evaluates the rules until stopped.
pub(crate) async fn run(
    server: Weak<Server>,
    rules: Vec<AlertRule>,
    mut stop: watch::Receiver<bool>,
) {
    if rules.is_empty() {
        return;
    }
    let clients: Vec<Option<WebhookClient>> = rules
        .iter()
        .map(|r| match client_for(r) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(webhook = %r.webhook, error = %e, "alert webhook client unusable");
                None
            }
        })
        .collect();
    let mut last_fired: Vec<i64> = vec![i64::MIN / 2; rules.len()];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        let Some(s) = server.upgrade() else { return };
        let now = crate::unix_now() * 1000;
        for (i, rule) in rules.iter().enumerate() {
            let Some(window) = rule.window_ms() else {
                continue;
            };
            let Some(last) = last_fired.get_mut(i) else {
                continue;
            };
            if now - *last < window {
                continue; // at most once per window
            }
            let count = match s
                .store
                .audit_count_since(&rule.service, &rule.decision, now - window)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "alert evaluation failed");
                    continue;
                }
            };
            if count as u64 > rule.over {
                *last = now;
                metrics::counter!("castellan_server_alerts_fired_total", "service" => rule.service.clone()).increment(1);
                tracing::warn!(service = %rule.service, decision = %rule.decision, count, over = rule.over, per = %rule.per, "alert: decision rate over threshold");
                let body = json!({
                    "alert": "decision-rate", "service": rule.service, "decision": rule.decision,
                    "count": count, "over": rule.over, "per": rule.per, "at_ms": now,
                })
                .to_string();
                let Some(Some(client)) = clients.get(i).cloned() else {
                    continue;
                };
                let url = rule.webhook.clone();
                tokio::spawn(async move {
                    if !post(&client, &url, &body).await {
                        tracing::error!(webhook = %url, "alert webhook failed after retries");
                    }
                });
            }
        }
    }
}
