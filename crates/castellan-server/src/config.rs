//! Server configuration: one YAML file (`--config`), every field overridable by a
//! `CASTELLAN_*` environment variable, command-line flags over both. Unknown fields are errors.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// Why the configuration is unusable (the operator's to fix; the binary exits 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {err}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        err: std::io::Error,
    },
    /// The file is not YAML.
    #[error("{path}:{line}:{col}: {msg}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What the parser said.
        msg: String,
    },
    /// A field is unknown or has the wrong type.
    #[error("{0}")]
    Field(String),
}

/// An external OIDC issuer whose tokens may be exchanged (RFC 8693) for castellan tokens.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    /// Its `iss`.
    pub issuer: String,
    /// The audience its tokens must carry to be accepted here.
    pub audience: String,
    /// A JWKS file with its public keys (never fetched from a URL in a token).
    pub jwks_file: PathBuf,
}

/// A deny-rate alert: more than `over` decisions of kind `decision` for `service` within `per`
/// → one JSON POST to `webhook` (retried with backoff), at most once per window.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Destination service.
    pub service: String,
    /// `deny` or `allow`.
    #[serde(default = "default_decision")]
    pub decision: String,
    /// Threshold (more than this many).
    pub over: u64,
    /// Window: `30s`, `1m`, `5m`, `1h`…
    pub per: String,
    /// `https://` URL to POST to (or `http://` to a loopback address).
    pub webhook: String,
    /// PEM CA certificates to verify an https webhook with, instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Anomaly alerts (new edge, user first seen on a service, deny spike): where they go and
/// what a spike is.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// `https://` URL to POST to (or `http://` to a loopback address).
    pub webhook: String,
    /// PEM CA certificates to verify an https webhook with, instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A deny spike needs more denies in one minute (per source or per user) than this…
    #[serde(default = "default_spike_over")]
    pub deny_spike_over: u64,
    /// …and more than this many times the average of the previous minutes.
    #[serde(default = "default_spike_factor")]
    pub deny_spike_factor: u64,
}

/// The dashboard on its own address with the operator's certificate (e.g. one a browser
/// trusts): only `/dashboard` pages are served there. The dashboard is always also on the main
/// listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (a file readable only by its owner).
    pub key_file: PathBuf,
}

fn default_spike_over() -> u64 {
    20
}

fn default_spike_factor() -> u64 {
    5
}

/// Whether a webhook URL is acceptable: https anywhere, plain http only to loopback (an alert
/// crossing a network unencrypted and unauthenticated is refused).
pub fn webhook_ok(webhook: &str) -> bool {
    AlertRule {
        service: String::new(),
        decision: String::new(),
        over: 0,
        per: String::new(),
        webhook: webhook.to_owned(),
        ca_file: None,
    }
    .webhook_ok()
}

impl AlertRule {
    /// Whether the webhook URL is acceptable: https anywhere, plain http only to loopback
    /// (an alert crossing a network unencrypted and unauthenticated is refused).
    pub fn webhook_ok(&self) -> bool {
        let Ok(uri) = self.webhook.parse::<hyper::Uri>() else {
            return false;
        };
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        match uri.scheme_str() {
            Some("https") => !host.is_empty(),
            Some("http") => {
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            _ => false,
        }
    }
}

fn default_decision() -> String {
    "deny".to_owned()
}

impl AlertRule {
    /// The window in milliseconds.
    pub fn window_ms(&self) -> Option<i64> {
        let (n, unit) = self
            .per
            .split_at(self.per.find(|c: char| !c.is_ascii_digit())?);
        let n: i64 = n.parse().ok().filter(|n| *n > 0)?;
        let unit_ms = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        Some(n * unit_ms)
    }
}

/// Clients allowed to exchange subject tokens issued for `audience`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MayAct {
    /// The subject tokens' `aud`.
    pub audience: String,
    /// Client ids.
    pub clients: Vec<String>,
}

/// Everything `castellan server run` needs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data directory: SQLite database, key-encryption key, trust bundle.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: SQLite in the data directory.
    pub database_url: Option<String>,
    /// Address of the one TLS listener (admin API, OAuth2/OIDC, gRPC, metrics).
    pub listen: SocketAddr,
    /// `iss` of issued tokens; default `https://<listen>`.
    pub issuer: Option<String>,
    /// DNS names the serving certificate carries besides the listen IP.
    pub hostnames: Vec<String>,
    /// Access-token lifetime.
    pub token_ttl_secs: i64,
    /// X.509-SVID lifetime.
    pub svid_ttl_secs: i64,
    /// Join-token lifetime.
    pub join_token_ttl_secs: i64,
    /// CA certificate lifetime (a rotated-out CA stays in the bundle until it expires).
    pub ca_ttl_secs: i64,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Failed client authentications allowed per client per minute before it is locked out.
    pub auth_failures_per_minute: u32,
    /// Audience of `client_credentials` tokens when the client asks for none.
    pub default_audience: Option<String>,
    /// Issuers whose tokens token exchange accepts.
    pub external_issuers: Vec<ExternalIssuer>,
    /// Deny-rate alerts.
    pub alerts: Vec<AlertRule>,
    /// Anomaly alerts (none when unset).
    #[serde(default)]
    pub anomalies: Option<AnomalyConfig>,
    /// The dashboard's own listener and certificate (none when unset).
    #[serde(default)]
    pub dashboard: Option<DashboardConfig>,
    /// Token exchange: besides the client a subject token was issued for (its `aud`), the
    /// clients that may exchange tokens of each audience (e.g. an external IdP's tokens issued
    /// for the control plane).
    pub may_act: Vec<MayAct>,
    /// Most proxy ids one workload identity may have in the registry at once (a stolen key
    /// cannot flood `proxy list`); reports beyond it are refused, logged and counted.
    pub max_proxies_per_identity: i64,
    /// A proxy not heard from for this long leaves the registry.
    pub proxy_expiry_secs: i64,
    /// A TLS handshake (protocol detection included) must finish within this.
    pub handshake_timeout_secs: i64,
    /// A connection with no request in flight for this long is closed (one that sends nothing
    /// after its handshake included). Watch streams are requests in flight.
    pub idle_timeout_secs: i64,
    /// Connections are asked to close (gracefully) after this long; clients reconnect.
    pub max_connection_age_secs: i64,
    /// Open connections, all sources together; beyond it new ones are closed at once.
    pub max_connections: i64,
    /// Open connections from one source address.
    pub max_connections_per_source: i64,
    /// Also serve `/metrics`, without credentials, on this plain-HTTP address (e.g.
    /// 127.0.0.1:9464 for a local scraper). On the main listener it always needs an admin or
    /// viewer credential.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("castellan-data"),
            database_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            issuer: None,
            hostnames: vec!["localhost".to_owned()],
            token_ttl_secs: 300,
            svid_ttl_secs: 3600,
            join_token_ttl_secs: 900,
            ca_ttl_secs: 365 * 24 * 3600,
            max_body_bytes: 64 * 1024,
            auth_failures_per_minute: 5,
            default_audience: None,
            external_issuers: Vec::new(),
            alerts: Vec::new(),
            anomalies: None,
            dashboard: None,
            may_act: Vec::new(),
            max_proxies_per_identity: 256,
            proxy_expiry_secs: 3600,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 30,
            max_connection_age_secs: 3600,
            max_connections: 10_000,
            max_connections_per_source: 256,
            metrics_listen: None,
        }
    }
}

/// Top-level fields an environment variable `CASTELLAN_<NAME>` may set.
const ENV_FIELDS: &[&str] = &[
    "data_dir",
    "database_url",
    "listen",
    "issuer",
    "token_ttl_secs",
    "svid_ttl_secs",
    "join_token_ttl_secs",
    "ca_ttl_secs",
    "max_body_bytes",
    "auth_failures_per_minute",
    "default_audience",
    "max_proxies_per_identity",
    "proxy_expiry_secs",
    "handshake_timeout_secs",
    "idle_timeout_secs",
    "max_connection_age_secs",
    "max_connections",
    "max_connections_per_source",
    "metrics_listen",
];

impl ServerConfig {
    /// The file at `path` (if any), then `CASTELLAN_*` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ServerConfig, ConfigError> {
        let mut fields = match path {
            Some(p) => yaml_file(p)?,
            None => Map::new(),
        };
        for name in ENV_FIELDS {
            if let Some(v) = env(&format!("CASTELLAN_{}", name.to_ascii_uppercase())) {
                let value = match v.parse::<i64>() {
                    Ok(n)
                        if name.ends_with("_secs")
                            || name.ends_with("_bytes")
                            || name.ends_with("_identity")
                            || name.starts_with("max_connections")
                            || name.ends_with("_minute") =>
                    {
                        Value::from(n)
                    }
                    _ => Value::String(v),
                };
                fields.insert((*name).to_owned(), value);
            }
        }
        let where_ = path.map_or_else(|| "environment".to_owned(), |p| p.display().to_string());
        let cfg: ServerConfig = serde_json::from_value(Value::Object(fields))
            .map_err(|e| ConfigError::Field(format!("{where_}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges: lifetimes positive and bounded as the issue demands short TTLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ranges = [
            ("token_ttl_secs", self.token_ttl_secs, 1, 3600),
            ("svid_ttl_secs", self.svid_ttl_secs, 60, 7 * 24 * 3600),
            (
                "max_proxies_per_identity",
                self.max_proxies_per_identity,
                1,
                1_000_000,
            ),
            (
                "proxy_expiry_secs",
                self.proxy_expiry_secs,
                60,
                30 * 24 * 3600,
            ),
            (
                "join_token_ttl_secs",
                self.join_token_ttl_secs,
                1,
                24 * 3600,
            ),
            ("ca_ttl_secs", self.ca_ttl_secs, 3600, 10 * 365 * 24 * 3600),
            (
                "handshake_timeout_secs",
                self.handshake_timeout_secs,
                1,
                300,
            ),
            ("idle_timeout_secs", self.idle_timeout_secs, 1, 3600),
            (
                "max_connection_age_secs",
                self.max_connection_age_secs,
                10,
                7 * 24 * 3600,
            ),
            ("max_connections", self.max_connections, 1, 1_000_000),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
                1,
                1_000_000,
            ),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(ConfigError::Field(format!(
                    "{name} must be between {lo} and {hi}, got {v}"
                )));
            }
        }
        if self.svid_ttl_secs.saturating_mul(2) > self.ca_ttl_secs {
            return Err(ConfigError::Field(
                "ca_ttl_secs must be at least twice svid_ttl_secs".to_owned(),
            ));
        }
        for a in &self.alerts {
            if a.window_ms().is_none()
                || !a.webhook_ok()
                || !matches!(a.decision.as_str(), "deny" | "allow")
            {
                return Err(ConfigError::Field(format!(
                    "alert for {:?}: per must look like 30s/1m/1h, decision deny or allow, webhook an https:// URL (http:// only to loopback)",
                    a.service
                )));
            }
        }
        if let Some(a) = &self.anomalies
            && (!webhook_ok(&a.webhook) || a.deny_spike_factor < 1)
        {
            return Err(ConfigError::Field(
                "anomalies: webhook an https:// URL (http:// only to loopback), deny_spike_factor at least 1"
                    .to_owned(),
            ));
        }
        if self.auth_failures_per_minute == 0 || self.max_body_bytes < 1024 {
            return Err(ConfigError::Field(
                "auth_failures_per_minute must be > 0 and max_body_bytes ≥ 1024".to_owned(),
            ));
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("castellan.db").display()))
    }
}

fn yaml_file(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: path.display().to_string(),
        err,
    })?;
    let docs = YamlLoader::load_from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.display().to_string(),
        line: e.marker().line(),
        col: e.marker().col() + 1,
        msg: e.info().to_owned(),
    })?;
    match docs.into_iter().next().map(yaml_to_json) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(ConfigError::Field(format!(
            "{}: the configuration must be a mapping",
            path.display()
        ))),
    }
}

/// YAML (or JSON) text as JSON; errors name line and column.
pub(crate) fn yaml_text_to_json(text: &str) -> Result<Value, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| {
        format!(
            "{}:{}: {}",
            e.marker().line(),
            e.marker().col() + 1,
            e.info()
        )
    })?;
    Ok(docs
        .into_iter()
        .next()
        .map(yaml_to_json)
        .unwrap_or(Value::Null))
}

fn yaml_to_json(y: Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map_or(Value::String(s), Value::from),
        Yaml::Integer(i) => Value::from(i),
        Yaml::String(s) => Value::String(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Array(a) => Value::Array(a.into_iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s,
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.yaml");
        std::fs::write(
            &p,
            "listen: 127.0.0.1:9000\ntoken_ttl_secs: 120\nhostnames: [cp.local]\n",
        )
        .unwrap();
        let cfg = ServerConfig::load(Some(&p), |k| {
            (k == "CASTELLAN_TOKEN_TTL_SECS").then(|| "60".to_owned())
        })
        .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.token_ttl_secs, 60);
        assert_eq!(cfg.hostnames, ["cp.local"]);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.yaml");
        std::fs::write(&p, "listen: 127.0.0.1:9000\ntoken_tll_secs: 120\n").unwrap();
        let e = ServerConfig::load(Some(&p), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_tll_secs"), "{e}");
        std::fs::write(&p, "token_ttl_secs: 86400\n").unwrap();
        let e = ServerConfig::load(Some(&p), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_ttl_secs must be between"), "{e}");
        std::fs::write(&p, "a: [\n").unwrap();
        let e = ServerConfig::load(Some(&p), |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{}:", p.display())), "{e}");
    }
}
