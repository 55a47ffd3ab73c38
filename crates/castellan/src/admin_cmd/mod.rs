//! Commands that talk to a running control plane through its admin API, one file per resource:
//! `service`, `cert` and `ca`, `client`, `keys` and `operator`, `policy` (apply, impact, history,
//! rollback) and `access`, `proxy`, `apikey`. This file holds how to reach the control plane
//! and how answers are printed.

use crate::admin_client::AdminClient;
use clap::Args;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

mod apikey;
mod client;
mod keys;
mod pki;
mod policy;
mod proxy;
mod service;

pub use apikey::{ApiKeyCommand, apikey};
pub use client::{ClientCommand, client};
pub use keys::{KeysCommand, OperatorCommand, keys, operator};
pub use pki::{CaCommand, CertCommand, ca, cert};
pub use policy::{
    AccessCommand, access, policy_apply, policy_history, policy_impact, policy_rollback,
};
pub use proxy::{ProxyCommand, proxy};
pub use service::{ServiceCommand, service};

/// How to reach the control plane.
#[derive(Debug, Args)]
pub struct Connection {
    /// Control-plane URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "CASTELLAN_SERVER", global = true)]
    server: Option<String>,
    /// Admin credential (cadm_…).
    #[arg(long, env = "CASTELLAN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// PEM file with the trust bundle that signed the server's certificate.
    #[arg(long, env = "CASTELLAN_CA_BUNDLE", global = true)]
    pub(crate) ca_bundle: Option<PathBuf>,
}

impl Connection {
    /// A client of the control plane, or why there can be none (a missing flag, a bad bundle).
    pub(crate) fn admin(&self) -> Result<AdminClient, String> {
        let server = self
            .server
            .clone()
            .ok_or("--server or CASTELLAN_SERVER is required")?;
        // The admin credential never travels in clear (nor after a redirect to http).
        if !server.starts_with("https://") {
            return Err(format!(
                "--server {server}: the admin API is served over TLS only (https://…)"
            ));
        }
        let token = self
            .token
            .clone()
            .ok_or("--token or CASTELLAN_TOKEN is required")?;
        let bundle = self
            .ca_bundle
            .clone()
            .ok_or("--ca-bundle or CASTELLAN_CA_BUNDLE is required")?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&bundle)
            .map_err(|e| format!("{}: {e}", bundle.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", bundle.display()))?;
        // The control plane is accepted only with its SPIFFE ID under this bundle: a workload
        // SVID naming the same host would otherwise collect the admin token.
        let tls = castellan_proxy::tls::control_plane_client_config(certs, None, &[])
            .map_err(|e| format!("{}: {e}", bundle.display()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .build()
            .map_err(|e| e.to_string())?;
        AdminClient::new(http, &server, token)
    }
}

/// Prints an answer (as JSON with `-o json`, else as `text` renders it) and returns the exit
/// code; a failure is printed as `error: …` and exits 1.
pub(crate) fn finish<T: Serialize>(
    answer: Result<T, String>,
    json_out: bool,
    text: impl FnOnce(&T) -> String,
) -> ExitCode {
    let answer = answer.and_then(|v| {
        if json_out {
            serde_json::to_value(&v)
                .map(|j| j.to_string())
                .map_err(|e| e.to_string())
        } else {
            Ok(text(&v))
        }
    });
    match answer {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", printable(&e));
            ExitCode::FAILURE
        }
    }
}

/// The string field `k` of `v`, printable (empty when absent).
pub(crate) fn s(v: &Value, k: &str) -> String {
    printable(v.get(k).and_then(Value::as_str).unwrap_or(""))
}

/// `x` with every control character escaped (`\u{1b}`, `\n`, `\t`): values stored by the
/// server may come from anyone (a token's `sub`, a request path), and raw escape sequences
/// would rewrite the operator's terminal or forge table rows.
pub(crate) fn printable(x: &str) -> String {
    if !x.chars().any(char::is_control) {
        return x.to_owned();
    }
    x.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A tab-separated table of the `cols` of each object of the array `v` (`-` for null or absent).
pub(crate) fn table(v: &Value, cols: &[&str]) -> String {
    let mut out = cols.join("\t");
    for row in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push('\n');
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match row.get(*c) {
                Some(Value::String(x)) => printable(x),
                Some(Value::Null) | None => "-".to_owned(),
                Some(x) => printable(&x.to_string()),
            })
            .collect();
        out.push_str(&cells.join("\t"));
    }
    out
}

/// [`table`] of typed rows, as their JSON reads.
fn rows<T: Serialize>(rows: &[T], cols: &[&str]) -> String {
    table(&serde_json::to_value(rows).unwrap_or_default(), cols)
}

/// Unix milliseconds `secs` seconds ago.
pub(crate) fn ms_ago(secs: i64) -> i64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    now_ms.saturating_sub(secs.saturating_mul(1000))
}

/// `--since` values: `24h`, `7d`, `90m`, seconds.
pub fn parse_since(s: &str) -> Option<i64> {
    parse_duration_secs(s)
}

/// `3600`, `90s`, `30m`, `12h`, `7d` → seconds.
pub(crate) fn parse_duration_secs(s: &str) -> Option<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().ok().filter(|n| *n > 0)?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}
