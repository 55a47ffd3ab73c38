//! Commands that talk to a running control plane through its admin API: `service`, `cert`,
//! `ca`, `client`, `keys`, `operator`.

use clap::{Args, Subcommand};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

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
    ca_bundle: Option<PathBuf>,
}

/// Workload identities.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Register a service and print a single-use join token for its proxy.
    Add {
        /// Service name (a-z, 0-9, '-').
        name: String,
        /// A DNS name or IP address its SVIDs also carry (repeatable; for an edge listener).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        #[command(flatten)]
        role: ServiceRoleArgs,
    },
    /// Change what a service's proxies are (kind, routes, upstreams); they are sent what that
    /// needs with the next push.
    Update {
        /// Service name.
        name: String,
        #[command(flatten)]
        role: ServiceRoleArgs,
    },
    /// Print a new join token for a registered service.
    JoinToken {
        /// Service name.
        name: String,
    },
    /// Register the service's OpenAPI 3.0/3.1 document (YAML or JSON); proxies validate every
    /// request to it before the app sees it.
    Spec {
        /// Service name.
        name: String,
        /// The OpenAPI document.
        file: PathBuf,
    },
    /// Disable a service: no more certificates, and proxies learn of it.
    Disable {
        /// Service name.
        name: String,
    },
    /// List services.
    List,
}

/// Certificates.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke a certificate by serial number (hex).
    Revoke {
        /// Serial number, hex (colons allowed).
        serial: String,
    },
    /// List the certificates issued to a service.
    List {
        /// Service name.
        service: String,
    },
}

/// The trust domain's CA.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Add a new CA; the old one stays in the bundle until it expires.
    Rotate,
    /// Print the trust bundle (PEM).
    Bundle,
}

/// OAuth2 clients.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register a client and print its secret (shown once), or bind it to an SVID.
    Add {
        /// Client id.
        name: String,
        /// Scopes it may request (comma or space separated).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Authenticate with this SPIFFE ID over mTLS (tls_client_auth) instead of a secret.
        #[arg(long)]
        tls_san_uri: Option<String>,
        /// Audiences it may request tokens for, besides the default (comma separated).
        #[arg(long, value_delimiter = ',')]
        audiences: Vec<String>,
    },
    /// Disable a client.
    Disable {
        /// Client id.
        name: String,
    },
    /// List clients.
    List,
}

/// Token-signing keys.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Start signing with a new key; old public keys stay published until their tokens expire.
    Rotate,
    /// List signing keys.
    List,
}

/// Admin credentials.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Create an admin credential and print it (shown once).
    Add {
        /// Who it is for.
        name: String,
        /// admin (read and change) or viewer (read only).
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// List admin credentials (ids, holders, roles; never the credentials).
    List,
    /// Revoke an admin credential by its id (from `operator list`).
    Revoke {
        /// Its id.
        id: String,
    },
}

/// What a service's proxies are: the control plane sends each only what that needs.
#[derive(Debug, Args)]
pub struct ServiceRoleArgs {
    /// sidecar (default), gateway or decision.
    #[arg(long)]
    kind: Option<String>,
    /// Gateways and decision points: PREFIX=SERVICE (repeatable), e.g. /orders=orders.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Sidecars: a service it calls (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
}

impl ServiceRoleArgs {
    fn json(&self) -> Value {
        json!({"kind": self.kind, "routes": self.routes, "upstreams": self.upstreams})
    }
}

/// One admin API call.
struct Call {
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
}

fn call(method: reqwest::Method, path: impl Into<String>, body: Option<Value>) -> Call {
    Call {
        method,
        path: path.into(),
        body,
    }
}

impl Connection {
    fn client(&self) -> Result<(reqwest::Client, String, String), String> {
        let server = self
            .server
            .clone()
            .ok_or("--server or CASTELLAN_SERVER is required")?;
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
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| e.to_string())?;
        Ok((client, server.trim_end_matches('/').to_owned(), token))
    }
}

/// `POST path` with a JSON body on the admin API.
pub(crate) fn post(conn: &Connection, path: &str, body: Value) -> Result<Value, String> {
    send(conn, call(Method::POST, path, Some(body)))
}

fn send(conn: &Connection, c: Call) -> Result<Value, String> {
    let (client, server, token) = conn.client()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut req = client
            .request(c.method, format!("{server}{}", c.path))
            .bearer_auth(token);
        if let Some(b) = c.body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{server}: {}", castellan_proxy::error_chain(&e)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(body)
        } else {
            let detail = body
                .get("detail")
                .and_then(Value::as_str)
                .map_or_else(|| body.to_string(), str::to_owned);
            Err(format!(
                "{} {}: {detail}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ))
        }
    })
}

fn finish(
    conn: &Connection,
    c: Call,
    json_out: bool,
    text: impl FnOnce(&Value) -> String,
) -> ExitCode {
    match send(conn, c) {
        Ok(v) => {
            if json_out {
                println!("{v}");
            } else {
                println!("{}", text(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", printable(&e));
            ExitCode::FAILURE
        }
    }
}

fn s(v: &Value, k: &str) -> String {
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

fn table(v: &Value, cols: &[&str]) -> String {
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

use reqwest::Method;

/// Reads heads written by `audit verify --export-heads` (one JSON object per line).
fn read_heads(path: &std::path::Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| format!("{}:{}: not an exported head", path.display(), n + 1))
        })
        .collect()
}

/// Prints `audit verify` (chains checked by the server, checkpoints checked here) and returns
/// the exit code.
fn verify_output(
    v: &mut Value,
    bundle: &[CertificateDer<'static>],
    export_heads: Option<&std::path::Path>,
    exported: &[Value],
    json_out: bool,
) -> ExitCode {
    use crate::audit_verify as av;
    let mut ok = v.get("ok") == Some(&Value::Bool(true));
    let mut heads = String::new();
    let mut lines = Vec::new();
    let listed: &[Value] = v
        .get("writers")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let reports: Vec<av::CheckpointReport> =
        listed.iter().map(|w| av::check_writer(bundle, w)).collect();
    let cut = av::audited_purge_cut(listed, &reports);
    let deleted: Vec<Option<String>> = listed
        .iter()
        .map(|w| av::unaudited_deletion(w, cut))
        .collect();
    let head_problems = av::compare_heads(bundle, exported, listed, cut);
    if let Some(writers) = v.get_mut("writers").and_then(Value::as_array_mut) {
        for ((w, report), deleted) in writers.iter_mut().zip(reports).zip(deleted) {
            ok &= report.problem.is_none() && deleted.is_none();
            if let Some(h) = &report.head {
                heads.push_str(&h.to_string());
                heads.push('\n');
            }
            let signed = if report.good > 0 {
                format!(", signed through record {}", report.signed_through)
            } else {
                String::new()
            };
            let line = match (
                w.get("first_error").and_then(Value::as_str),
                &report.problem,
            ) {
                (None, None) if deleted.is_some() => format!(
                    "{}: {} records, RECORDS DELETED: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(deleted.as_deref().unwrap_or_default())
                ),
                (Some(e), _) => format!(
                    "{}: {} records, FIRST BAD RECORD: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(e)
                ),
                (None, Some(p)) => format!(
                    "{}: {} records, BAD CHECKPOINT: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(p)
                ),
                (None, None) => format!(
                    "{}: {} records, chain intact{signed}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null)
                ),
            };
            lines.push(line);
            let summary = av::summary(w, &report);
            if let (Some(o), Some(sum)) = (w.as_object_mut(), summary.as_object()) {
                o.remove("checkpoints");
                for (k, val) in sum {
                    o.insert(k.clone(), val.clone());
                }
                o.insert("deleted".to_owned(), json!(deleted));
            }
        }
    }
    for p in &head_problems {
        ok = false;
        lines.push(format!("EXPORTED HEAD: {}", printable(p)));
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".to_owned(), Value::Bool(ok));
        if !exported.is_empty() {
            o.insert("head_problems".to_owned(), json!(head_problems));
        }
    }
    if let Some(path) = export_heads
        && let Err(e) = std::fs::write(path, &heads)
    {
        eprintln!("error: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if json_out {
        println!("{v}");
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `service …`.
pub fn service(cmd: ServiceCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        ServiceCommand::Update { name, role } => finish(
            conn,
            call(
                Method::PUT,
                format!("/v1/services/{name}"),
                Some(role.json()),
            ),
            json_out,
            |v| format!("service {} is a {}", s(v, "name"), s(v, "kind")),
        ),
        ServiceCommand::Add {
            name,
            dns_names,
            role,
        } => finish(
            conn,
            call(Method::POST, "/v1/services", {
                let mut body = role.json();
                if let Some(o) = body.as_object_mut() {
                    o.insert("name".to_owned(), json!(name));
                    o.insert("dns_names".to_owned(), json!(dns_names));
                }
                Some(body)
            }),
            json_out,
            |v| {
                format!(
                    "service {} ({})\njoin token (single use, expires at {}):\n{}",
                    s(v, "name"),
                    s(v, "spiffe_id"),
                    v.get("expires_at").unwrap_or(&Value::Null),
                    s(v, "join_token")
                )
            },
        ),
        ServiceCommand::JoinToken { name } => finish(
            conn,
            call(
                Method::POST,
                format!("/v1/services/{name}/join-token"),
                None,
            ),
            json_out,
            |v| s(v, "join_token").to_owned(),
        ),
        ServiceCommand::Spec { name, file } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            match put_text(conn, &format!("/v1/services/{name}/spec"), text) {
                Ok(v) => {
                    if json_out {
                        println!("{v}");
                    } else {
                        println!(
                            "OpenAPI document for {name} set ({} paths); proxies validate requests against it",
                            v.get("paths").unwrap_or(&Value::Null)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ServiceCommand::Disable { name } => finish(
            conn,
            call(Method::POST, format!("/v1/services/{name}/disable"), None),
            json_out,
            |v| format!("service {} disabled", s(v, "name")),
        ),
        ServiceCommand::List => finish(
            conn,
            call(Method::GET, "/v1/services", None),
            json_out,
            |v| table(v, &["name", "spiffe_id", "created_at", "disabled_at"]),
        ),
    }
}

/// Runs `cert …`.
pub fn cert(cmd: CertCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        CertCommand::Revoke { serial } => finish(
            conn,
            call(
                Method::POST,
                format!("/v1/certificates/{serial}/revoke"),
                None,
            ),
            json_out,
            |v| format!("certificate {} revoked", s(v, "serial")),
        ),
        CertCommand::List { service } => finish(
            conn,
            call(
                Method::GET,
                format!("/v1/services/{service}/certificates"),
                None,
            ),
            json_out,
            |v| table(v, &["serial", "issued_at", "not_after", "revoked_at"]),
        ),
    }
}

/// Runs `ca …`.
pub fn ca(cmd: CaCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        CaCommand::Rotate => finish(
            conn,
            call(Method::POST, "/v1/ca/rotate", None),
            json_out,
            |v| {
                format!(
                    "new CA {} (bundle now holds {} certificates)",
                    s(v, "id"),
                    v.get("bundle_size").unwrap_or(&Value::Null)
                )
            },
        ),
        CaCommand::Bundle => finish(conn, call(Method::GET, "/v1/bundle", None), json_out, |v| {
            s(v, "pem").trim_end().to_owned()
        }),
    }
}

/// Runs `client …`.
pub fn client(cmd: ClientCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        ClientCommand::Add {
            name,
            scopes,
            tls_san_uri,
            audiences,
        } => {
            let scopes: Vec<String> = scopes
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_owned)
                .collect();
            let body = json!({"name": name, "scopes": scopes, "tls_san_uri": tls_san_uri, "audiences": audiences});
            finish(
                conn,
                call(Method::POST, "/v1/clients", Some(body)),
                json_out,
                |v| match v.get("client_secret").and_then(Value::as_str) {
                    Some(secret) => format!(
                        "client {}\nclient secret (shown once; store it now):\n{secret}",
                        s(v, "client_id")
                    ),
                    None => format!(
                        "client {} authenticates as {} (tls_client_auth)",
                        s(v, "client_id"),
                        s(v, "tls_san_uri")
                    ),
                },
            )
        }
        ClientCommand::Disable { name } => finish(
            conn,
            call(Method::POST, format!("/v1/clients/{name}/disable"), None),
            json_out,
            |v| format!("client {} disabled", s(v, "client_id")),
        ),
        ClientCommand::List => finish(
            conn,
            call(Method::GET, "/v1/clients", None),
            json_out,
            |v| table(v, &["client_id", "scopes", "tls_san_uri", "disabled_at"]),
        ),
    }
}

/// Runs `keys …`.
pub fn keys(cmd: KeysCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        KeysCommand::Rotate => finish(
            conn,
            call(Method::POST, "/v1/keys/rotate", None),
            json_out,
            |v| {
                format!(
                    "now signing with {} ({} keys published)",
                    s(v, "kid"),
                    v.get("published").unwrap_or(&Value::Null)
                )
            },
        ),
        KeysCommand::List => finish(conn, call(Method::GET, "/v1/keys", None), json_out, |v| {
            table(v, &["kid", "active", "created_at", "retired_at"])
        }),
    }
}

/// Runs `operator …`.
pub fn operator(cmd: OperatorCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        OperatorCommand::Add { name, role } => finish(
            conn,
            call(
                Method::POST,
                "/v1/admin-tokens",
                Some(json!({"name": name, "role": role})),
            ),
            json_out,
            |v| {
                format!(
                    "{} credential for {} (shown once):\n{}",
                    s(v, "role"),
                    s(v, "name"),
                    s(v, "token")
                )
            },
        ),
        OperatorCommand::List => finish(
            conn,
            call(Method::GET, "/v1/admin-tokens", None),
            json_out,
            |v| table(v, &["id", "name", "role", "created_at", "revoked_at"]),
        ),
        OperatorCommand::Revoke { id } => finish(
            conn,
            call(Method::POST, format!("/v1/admin-tokens/{id}/revoke"), None),
            json_out,
            |v| format!("admin credential of {} revoked", s(v, "name")),
        ),
    }
}

/// `policy impact` / `policy apply --dry-run`: what `files` would change on the stored traffic
/// since `since_secs` ago (of `service`); prints it (a table, `-o json`, `--junit FILE`) and
/// exits 1 when `fail_on_newly_denied` and some call would be newly denied.
pub fn policy_impact(
    files: Value,
    since_secs: i64,
    service: &str,
    conn: &Connection,
    json_out: bool,
    junit: Option<&std::path::Path>,
    fail_on_newly_denied: bool,
) -> ExitCode {
    let since_ms = ms_ago(since_secs);
    let body = json!({"files": files, "since_ms": since_ms, "service": service});
    let v = match send(conn, call(Method::POST, "/v1/policy/impact", Some(body))) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {}", printable(&e));
            return ExitCode::FAILURE;
        }
    };
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    if json_out {
        println!("{v}");
    } else {
        println!(
            "{} records in the window: {} replayed ({} unchanged), {} indeterminate (inputs not kept), {} not policy decisions of traffic",
            n("scanned"),
            n("replayed"),
            n("unchanged"),
            n("indeterminate"),
            n("skipped")
        );
        println!(
            "newly denied {} · newly allowed {} · deciding rule changed {}",
            n("newly_denied"),
            n("newly_allowed"),
            n("rule_changed")
        );
        let empty = Vec::new();
        let changes = v.get("changes").and_then(Value::as_array).unwrap_or(&empty);
        if !changes.is_empty() {
            println!(
                "\n{:<14} {:<14} {:<34} {:<34} {:>6} {:>7} {:>5}  example",
                "service", "change", "rule then", "rule now", "calls", "callers", "users"
            );
        }
        for c in changes {
            let ex = c
                .get("examples")
                .and_then(|e| e.get(0))
                .map(|e| {
                    format!(
                        "{} {} {} ({})",
                        s(e, "user"),
                        s(e, "method"),
                        s(e, "path"),
                        s(e, "decision_id")
                    )
                })
                .unwrap_or_default();
            let or_dash = |x: String| if x.is_empty() { "-".to_owned() } else { x };
            println!(
                "{:<14} {:<14} {:<34} {:<34} {:>6} {:>7} {:>5}  {}",
                s(c, "service"),
                s(c, "change"),
                or_dash(s(c, "from_rule")),
                or_dash(s(c, "to_rule")),
                c.get("count").and_then(Value::as_u64).unwrap_or(0),
                c.get("callers").and_then(Value::as_u64).unwrap_or(0),
                c.get("users").and_then(Value::as_u64).unwrap_or(0),
                ex
            );
        }
    }
    if let Some(path) = junit {
        let esc = |x: &str| {
            x.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let empty = Vec::new();
        let changes = v.get("changes").and_then(Value::as_array).unwrap_or(&empty);
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let failures = changes
            .iter()
            .filter(|c| s(c, "change") == "newly-denied")
            .count();
        xml.push_str(&format!(
            "<testsuite name=\"policy impact\" tests=\"{}\" failures=\"{failures}\">\n",
            changes.len().max(1)
        ));
        if changes.is_empty() {
            xml.push_str("  <testcase classname=\"impact\" name=\"no change\"/>\n");
        }
        for c in changes {
            let name = esc(&format!(
                "{} {}: {} -> {}",
                s(c, "service"),
                s(c, "change"),
                s(c, "from_rule"),
                s(c, "to_rule")
            ));
            let count = c.get("count").and_then(Value::as_u64).unwrap_or(0);
            if s(c, "change") == "newly-denied" {
                xml.push_str(&format!("  <testcase classname=\"impact\" name=\"{name}\"><failure message=\"{count} calls would be newly denied\"/></testcase>\n"));
            } else {
                xml.push_str(&format!(
                    "  <testcase classname=\"impact\" name=\"{name}\"/>\n"
                ));
            }
        }
        xml.push_str("</testsuite>\n");
        if let Err(e) = std::fs::write(path, xml) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if fail_on_newly_denied && n("newly_denied") > 0 {
        eprintln!("{} calls would be newly denied", n("newly_denied"));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
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

/// `policy apply` (files already validated locally).
pub fn policy_apply(body: Value, conn: &Connection, json_out: bool) -> ExitCode {
    finish(
        conn,
        call(Method::POST, "/v1/policy", Some(body)),
        json_out,
        |v| {
            if v.get("changed") == Some(&Value::Bool(true)) {
                format!(
                    "applied revision {} ({} rules, sha256 {})",
                    v.get("revision").unwrap_or(&Value::Null),
                    v.get("rules").unwrap_or(&Value::Null),
                    s(v, "content_hash")
                )
            } else {
                format!(
                    "unchanged: revision {} already has this content",
                    v.get("revision").unwrap_or(&Value::Null)
                )
            }
        },
    )
}

/// `policy history`.
pub fn policy_history(conn: &Connection, json_out: bool) -> ExitCode {
    finish(
        conn,
        call(Method::GET, "/v1/policy/history", None),
        json_out,
        |v| {
            table(
                v,
                &[
                    "revision",
                    "author",
                    "created_at",
                    "content_hash",
                    "comment",
                ],
            )
        },
    )
}

/// `policy rollback REV`.
pub fn policy_rollback(rev: i64, conn: &Connection, json_out: bool) -> ExitCode {
    finish(
        conn,
        call(Method::POST, format!("/v1/policy/rollback/{rev}"), None),
        json_out,
        |v| {
            format!(
                "revision {} now has the content of revision {rev}",
                v.get("revision").unwrap_or(&Value::Null)
            )
        },
    )
}

/// Proxies.
#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Every proxy with its policy revision, certificate expiry and last contact.
    List,
    /// Run a sidecar or gateway in this process until interrupted.
    Run(Box<castellan::proxy_cmd::RunArgs>),
}

/// Runs `proxy …`.
pub fn proxy(cmd: ProxyCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        ProxyCommand::Run(args) => castellan::proxy_cmd::run(*args),
        ProxyCommand::List => finish(
            conn,
            call(Method::GET, "/v1/proxies", None),
            json_out,
            |v| {
                table(
                    v,
                    &[
                        "proxy_id",
                        "service",
                        "mode",
                        "address",
                        "revision",
                        "up_to_date",
                        "cert_not_after",
                        "seconds_since_contact",
                    ],
                )
            },
        ),
    }
}

/// End-user API keys.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key for a user and print it (shown once; proxies receive only its hash).
    Create {
        /// The user it authenticates.
        #[arg(long)]
        user: String,
        /// Roles (comma separated).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Extra claims, NAME=VALUE (repeatable).
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// A service it may be used for (repeatable; none: any).
        #[arg(long = "service")]
        services: Vec<String>,
        /// A route prefix it may be used for (repeatable; none: any), e.g. /orders.
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
        /// Lifetime: seconds, or with a unit (90s, 30m, 12h, 7d); none: until revoked.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Revoke an API key by id.
    Revoke {
        /// Key id.
        key_id: String,
    },
    /// List active API keys (ids, users, roles, scope, expiry, last use; never the keys).
    List,
}

/// `3600`, `90s`, `30m`, `12h`, `7d` → seconds.
fn parse_duration_secs(s: &str) -> Option<i64> {
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

/// Runs `apikey …`.
pub fn apikey(cmd: ApiKeyCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        ApiKeyCommand::Create {
            user,
            roles,
            claims,
            services,
            prefixes,
            expires_in,
        } => {
            let ttl = match expires_in.as_deref().map(parse_duration_secs) {
                None => None,
                Some(Some(t)) => Some(t),
                Some(None) => {
                    eprintln!("error: --expires-in expects e.g. 3600, 90s, 30m, 12h or 7d");
                    return ExitCode::from(2);
                }
            };
            let mut map = serde_json::Map::new();
            for c in &claims {
                let Some((k, v)) = c.split_once('=') else {
                    eprintln!("error: --claim expects NAME=VALUE, got {c:?}");
                    return ExitCode::from(2);
                };
                map.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            let body = json!({"user": user, "roles": roles, "claims": map,
                              "services": services, "prefixes": prefixes, "ttl_secs": ttl});
            finish(
                conn,
                call(Method::POST, "/v1/apikeys", Some(body)),
                json_out,
                |v| {
                    format!(
                        "API key {} for {} (shown once; store it now):\n{}",
                        s(v, "key_id"),
                        s(v, "user"),
                        s(v, "api_key")
                    )
                },
            )
        }
        ApiKeyCommand::Revoke { key_id } => finish(
            conn,
            call(Method::POST, format!("/v1/apikeys/{key_id}/revoke"), None),
            json_out,
            |v| format!("API key {} revoked", s(v, "key_id")),
        ),
        ApiKeyCommand::List => finish(
            conn,
            call(Method::GET, "/v1/apikeys", None),
            json_out,
            |v| {
                table(
                    v,
                    &[
                        "key_id",
                        "user",
                        "roles",
                        "claims",
                        "services",
                        "prefixes",
                        "expires_at",
                        "last_used_at",
                    ],
                )
            },
        ),
    }
}

/// Least privilege from real traffic.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Rules never matched, wildcards used for few values, callers and users per rule, idle
    /// services, audit-mode services that would deny.
    Report {
        /// Window: 7d, 24h, 90m …
        #[arg(long, default_value = "7d")]
        since: String,
    },
}

/// Runs `access …`.
pub fn access(cmd: AccessCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        AccessCommand::Report { since } => {
            let Some(secs) = parse_duration_secs(&since) else {
                eprintln!("error: --since {since:?}: expected an age such as 7d, 24h, 90m");
                return ExitCode::from(2);
            };
            let since_ms = ms_ago(secs);
            finish(
                conn,
                call(
                    Method::GET,
                    format!("/v1/access/report?since_ms={since_ms}"),
                    None,
                ),
                json_out,
                |v| {
                    let mut out = format!(
                        "policy revision {} against {} records since {since}\n\n",
                        v.get("revision").unwrap_or(&Value::Null),
                        v.get("scanned").unwrap_or(&Value::Null)
                    );
                    out.push_str(&format!(
                        "{:<44} {:>8} {:>8} {:>8} {:>6}  callers\n",
                        "rule", "matched", "allowed", "denied", "users"
                    ));
                    let empty = Vec::new();
                    for r in v.get("rules").and_then(Value::as_array).unwrap_or(&empty) {
                        let callers: Vec<String> = r
                            .get("callers")
                            .and_then(Value::as_array)
                            .unwrap_or(&empty)
                            .iter()
                            .filter_map(Value::as_str)
                            .map(printable)
                            .collect();
                        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
                        out.push_str(&format!(
                            "{:<44} {:>8} {:>8} {:>8} {:>6}  {}\n",
                            s(r, "rule"),
                            n("matched"),
                            n("allowed"),
                            n("denied"),
                            n("users"),
                            callers.join(", ")
                        ));
                    }
                    out.push_str("\nfindings:\n");
                    let findings = v
                        .get("findings")
                        .and_then(Value::as_array)
                        .unwrap_or(&empty);
                    if findings.is_empty() {
                        out.push_str("  none\n");
                    }
                    for f in findings {
                        let what = if f.get("rule").is_some() {
                            s(f, "rule")
                        } else {
                            s(f, "service")
                        };
                        out.push_str(&format!(
                            "  {:<18} {:<44} {}\n",
                            s(f, "kind"),
                            what,
                            s(f, "detail")
                        ));
                    }
                    out
                },
            )
        }
    }
}

/// The audit trail.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Records matching filters, newest first.
    Query {
        /// Destination service.
        #[arg(long)]
        service: Option<String>,
        /// Source (part of its SPIFFE ID).
        #[arg(long)]
        source: Option<String>,
        /// End user.
        #[arg(long)]
        user: Option<String>,
        /// allow or deny.
        #[arg(long)]
        decision: Option<String>,
        /// Deciding rule.
        #[arg(long)]
        rule: Option<String>,
        /// From (Unix milliseconds).
        #[arg(long)]
        since: Option<i64>,
        /// Until (Unix milliseconds).
        #[arg(long)]
        until: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Check every chain: altered, deleted, reordered records and gaps (names the first bad
    /// record), and every signed checkpoint — its signature against --bundle, and the record it
    /// covers (a chain recomputed after an edit, or a tail cut after a checkpoint). Exit 1 on
    /// any problem.
    Verify {
        /// Trust bundle to check checkpoint signatures with (default: --ca-bundle). Include
        /// past CAs; never a bundle read from the control plane's database.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Write the last signed checkpoint of every chain here (JSON lines), to anchor
        /// elsewhere and later prove the database was not rolled back.
        #[arg(long)]
        export_heads: Option<PathBuf>,
        /// Heads exported earlier with --export-heads: each must still be provable from the
        /// database (its checkpoint there with the same hash, or purged by an audited purge).
        #[arg(long)]
        heads: Option<PathBuf>,
    },
    /// Every record as JSON lines (for a SIEM).
    Export {
        /// Output format: jsonl (the records as stored and hashed) or ocsf (OCSF 1.1 API
        /// Activity events, one JSON object per line).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "ocsf"])]
        format: String,
        /// Keep running: print records as the control plane stores them (polled every second).
        #[arg(long)]
        follow: bool,
    },
    /// Remove records older than --before, each chain up to its last signed checkpoint among
    /// them (verify then starts from that checkpoint). The purge is itself audited.
    Purge {
        /// Unix milliseconds, or an age such as 90d, 12h, 30m.
        #[arg(long)]
        before: String,
    },
    /// Print the pseudonym proxies running with `--pseudonymize-users KEY_FILE` record for a
    /// user, to find that user's records (`audit query --user`) without anyone else's name.
    Pseudonym {
        /// The proxies' key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The user (`sub`).
        user: String,
    },
}

fn put_text(conn: &Connection, path: &str, body: String) -> Result<Value, String> {
    let (client, server, token) = conn.client()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let r = client
            .put(format!("{server}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/yaml")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{server}: {}", castellan_proxy::error_chain(&e)))?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!(
                "{status}: {}",
                v.get("detail").and_then(Value::as_str).unwrap_or("")
            ))
        }
    })
}

fn get_text(conn: &Connection, path: &str) -> Result<String, String> {
    let (client, server, token) = conn.client()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let r = client
            .get(format!("{server}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("{server}: {}", castellan_proxy::error_chain(&e)))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{status}: {text}"))
        }
    })
}

/// A query-string value, percent-encoded.
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prints stored records (as stored, or as OCSF events); with `follow`, keeps printing each
/// chain's new records as they are stored.
fn export(conn: &Connection, ocsf: bool, follow: bool) -> Result<(), String> {
    use std::io::Write as _;
    let print = |text: &str| -> Result<Option<(String, u64)>, String> {
        let mut last = None;
        let mut out = std::io::stdout().lock();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            if ocsf {
                if let Some(e) = crate::ocsf::event(&v) {
                    writeln!(out, "{e}").map_err(|e| e.to_string())?;
                }
            } else {
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            if let (Some(w), Some(seq)) = (
                v.get("writer").and_then(Value::as_str),
                v.get("seq").and_then(Value::as_u64),
            ) {
                last = Some((w.to_owned(), seq));
            }
        }
        out.flush().map_err(|e| e.to_string())?;
        Ok(last)
    };
    if !follow {
        print(&get_text(conn, "/v1/audit/export")?)?;
        return Ok(());
    }
    // Each chain from where we are in it (everything, the first time round).
    let mut at: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        let heads: Value =
            serde_json::from_str(&get_text(conn, "/v1/audit/heads")?).map_err(|e| e.to_string())?;
        for h in heads.as_array().into_iter().flatten() {
            let (Some(chain), Some(seq)) = (
                h.get("chain").and_then(Value::as_str),
                h.get("seq").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let from = at.get(chain).copied().unwrap_or(0);
            if seq <= from {
                continue;
            }
            let text = get_text(
                conn,
                &format!(
                    "/v1/audit/export?chain={}&from={}",
                    query_value(chain),
                    from + 1
                ),
            )?;
            print(&text)?;
            at.insert(chain.to_owned(), seq.max(from));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Runs `audit …`.
pub fn audit(cmd: AuditCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        AuditCommand::Pseudonym { key_file, user } => {
            match castellan_proxy::PseudonymKey::from_file(&key_file) {
                Ok(k) => {
                    println!("{}", castellan_audit::pseudonym(&k.0, &user));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        AuditCommand::Query {
            service,
            source,
            user,
            decision,
            rule,
            since,
            until,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [
                ("service", service),
                ("source", source),
                ("user", user),
                ("decision", decision),
                ("rule", rule),
            ] {
                if let Some(v) = v {
                    q.push(format!(
                        "{k}={}",
                        v.replace(
                            |c: char| !c.is_ascii_alphanumeric() && !"-_./:".contains(c),
                            ""
                        )
                    ));
                }
            }
            if let Some(s) = since {
                q.push(format!("since_ms={s}"));
            }
            if let Some(u) = until {
                q.push(format!("until_ms={u}"));
            }
            finish(
                conn,
                call(Method::GET, format!("/v1/audit?{}", q.join("&")), None),
                json_out,
                |v| {
                    table(
                        v,
                        &[
                            "time_ms",
                            "writer",
                            "seq",
                            "source",
                            "user",
                            "destination",
                            "method",
                            "path",
                            "decision",
                            "rule",
                            "status",
                        ],
                    )
                },
            )
        }
        AuditCommand::Verify {
            bundle,
            export_heads,
            heads,
        } => {
            let Some(bundle_path) = bundle.or_else(|| conn.ca_bundle.clone()) else {
                eprintln!("error: --bundle or --ca-bundle is required to check checkpoints");
                return ExitCode::from(2);
            };
            let certs: Vec<CertificateDer<'static>> =
                match CertificateDer::pem_file_iter(&bundle_path)
                    .map(|i| i.collect::<Result<Vec<_>, _>>())
                {
                    Ok(Ok(c)) if !c.is_empty() => c,
                    _ => {
                        eprintln!("error: {}: no certificates", bundle_path.display());
                        return ExitCode::from(2);
                    }
                };
            let exported = match heads.as_deref().map(read_heads).transpose() {
                Ok(h) => h.unwrap_or_default(),
                Err(e) => {
                    eprintln!("error: {}", printable(&e));
                    return ExitCode::from(2);
                }
            };
            match send(conn, call(Method::GET, "/v1/audit/verify", None)) {
                Ok(mut v) => {
                    verify_output(&mut v, &certs, export_heads.as_deref(), &exported, json_out)
                }
                Err(e) => {
                    eprintln!("error: {}", printable(&e));
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Purge { before } => {
            let before_ms = match before.parse::<i64>() {
                Ok(ms) if ms > 0 => ms,
                _ => match parse_duration_secs(&before) {
                    Some(age) => ms_ago(age),
                    None => {
                        eprintln!("error: --before expects Unix milliseconds or an age (90d, 12h)");
                        return ExitCode::from(2);
                    }
                },
            };
            finish(
                conn,
                call(
                    Method::POST,
                    "/v1/audit/purge",
                    Some(json!({"before_ms": before_ms})),
                ),
                json_out,
                |v| {
                    format!(
                        "{} records purged",
                        v.get("records").unwrap_or(&Value::Null)
                    )
                },
            )
        }
        AuditCommand::Export { format, follow } => match export(conn, format == "ocsf", follow) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", printable(&e));
                ExitCode::FAILURE
            }
        },
    }
}
