//! `castellan proxy run`: a sidecar, gateway or decision point as its own process.

use castellan_proxy::{Mode, OidcIssuer, OidcKeys, ProxyConfig};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Which proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// In front of one service.
    Sidecar,
    /// At the edge.
    Gateway,
    /// Answers Envoy ext_authz, forward-auth (nginx, Caddy, Traefik) and AuthZEN questions.
    Decision,
}

/// Options of `castellan proxy run` (each also as a `CASTELLAN_PROXY_*` variable).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// sidecar, gateway or decision.
    #[arg(long, value_enum, env = "CASTELLAN_PROXY_MODE")]
    mode: ModeArg,
    /// Stable id reported to the control plane.
    #[arg(long, env = "CASTELLAN_PROXY_ID")]
    id: String,
    /// Control-plane URL.
    #[arg(long, env = "CASTELLAN_SERVER")]
    control_plane: String,
    /// Trust bundle (PEM) for the control plane until the first push.
    #[arg(long, env = "CASTELLAN_CA_BUNDLE")]
    ca_bundle: PathBuf,
    /// Join token for the first start (`castellan service add`).
    #[arg(long, env = "CASTELLAN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where the SVID and its key are kept.
    #[arg(long, env = "CASTELLAN_PROXY_STATE_DIR")]
    state_dir: PathBuf,
    /// Inbound listener.
    #[arg(long, env = "CASTELLAN_PROXY_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Admin listener (/metrics, /healthz, /readyz, /status).
    #[arg(long, env = "CASTELLAN_PROXY_ADMIN", default_value = "127.0.0.1:0")]
    admin_listen: SocketAddr,
    /// Sidecar: the local app.
    #[arg(long, env = "CASTELLAN_PROXY_APP")]
    app: Option<SocketAddr>,
    /// Sidecar: an outbound listener, SERVICE=ADDR (repeatable; loopback addresses only).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
    /// Allow outbound listeners on non-loopback addresses (whoever reaches them calls with
    /// this workload's identity).
    #[arg(long)]
    dangerous_outbound_non_loopback: bool,
    /// Another query parameter whose value audit records mask (repeatable; token, access_token,
    /// api_key, password, secret and the like always are).
    #[arg(long = "redact")]
    redact: Vec<String>,
    /// Audit records keep a keyed pseudonym (HMAC-SHA256) of each end user instead of the
    /// user: a key file of at least 32 bytes, mode 0600 (`castellan audit pseudonym` maps a
    /// user to it for an auditor holding the key).
    #[arg(long)]
    pseudonymize_users: Option<std::path::PathBuf>,
    /// Gateway, decision: a route, PREFIX=SERVICE (repeatable).
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Gateway, decision: an OIDC issuer, ISSUER,AUDIENCE[,JWKS_FILE] (repeatable). Without a
    /// file, keys come by OIDC discovery at the (https) issuer URL, refreshed on a schedule
    /// and on an unknown key id.
    #[arg(long = "oidc")]
    oidc: Vec<String>,
    /// PEM roots for OIDC issuers' TLS (default: the system's).
    #[arg(long, env = "CASTELLAN_PROXY_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
    /// Refresh of OIDC keys fetched by URL, seconds.
    #[arg(long, env = "CASTELLAN_PROXY_OIDC_REFRESH_SECS", default_value_t = 300)]
    oidc_refresh_secs: u64,
    /// Decision: the ext_authz gRPC listener (plain HTTP/2, loopback only).
    #[arg(
        long,
        env = "CASTELLAN_PROXY_EXT_AUTHZ_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    ext_authz_listen: SocketAddr,
    /// Decision: the forward-auth and ext_authz HTTP listener (plain HTTP/1.1, loopback only).
    #[arg(
        long,
        env = "CASTELLAN_PROXY_FORWARD_AUTH_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    forward_auth_listen: SocketAddr,
    /// Decision: a SPIFFE ID trusted on the TLS listener, as a proxy asking forward-auth and
    /// ext_authz questions and as an AuthZEN caller (repeatable).
    #[arg(long = "trusted-proxy")]
    trusted_proxies: Vec<String>,
    /// Decision: the asking proxies pass the client certificate in `Client-Cert` (RFC 9440),
    /// so certificate-bound tokens can be accepted (otherwise they are refused).
    #[arg(long)]
    client_cert_header: bool,
    /// Keep enforcing the last policy this long without control-plane contact, then fail closed.
    #[arg(long, env = "CASTELLAN_PROXY_MAX_STALENESS_SECS", default_value_t = 24 * 3600)]
    max_staleness_secs: i64,
    /// redis://HOST:PORT to share rate limits between proxies (local limits when unreachable).
    #[arg(long, env = "CASTELLAN_PROXY_REDIS_URL")]
    redis_url: Option<String>,
    /// Largest audit spool on disk, MiB (beyond it records are counted lost, reported as a gap).
    #[arg(long, env = "CASTELLAN_PROXY_AUDIT_SPOOL_MIB", default_value_t = 256)]
    audit_spool_mib: u64,
}

fn pair(s: &str) -> Option<(String, String)> {
    s.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned()))
}

fn config(a: RunArgs) -> Result<ProxyConfig, String> {
    let mode = match a.mode {
        ModeArg::Sidecar => Mode::Sidecar,
        ModeArg::Gateway => Mode::Gateway,
        ModeArg::Decision => Mode::Decision,
    };
    let mut c = ProxyConfig::new(mode, &a.id, &a.control_plane, a.ca_bundle, a.state_dir);
    c.join_token = a.join_token;
    c.listen = a.listen;
    c.admin_listen = a.admin_listen;
    c.app = a.app;
    if a.max_staleness_secs < 1 {
        return Err("--max-staleness-secs must be at least 1".to_owned());
    }
    c.max_staleness_secs = a.max_staleness_secs;
    c.redis_url = a.redis_url;
    c.audit_spool_bytes = a.audit_spool_mib.saturating_mul(1024 * 1024);
    c.dangerous_outbound_non_loopback = a.dangerous_outbound_non_loopback;
    c.redact_query
        .extend(a.redact.iter().map(|r| r.to_ascii_lowercase()));
    if let Some(f) = &a.pseudonymize_users {
        c.pseudonymize_users = Some(castellan_proxy::PseudonymKey::from_file(f)?);
    }
    for u in &a.upstreams {
        let (svc, addr) =
            pair(u).ok_or_else(|| format!("--upstream {u:?}: expected SERVICE=ADDR"))?;
        c.upstreams.push((
            svc,
            addr.parse().map_err(|e| format!("--upstream {u:?}: {e}"))?,
        ));
    }
    for r in &a.routes {
        let (prefix, svc) =
            pair(r).ok_or_else(|| format!("--route {r:?}: expected PREFIX=SERVICE"))?;
        if !prefix.starts_with('/') {
            return Err(format!("--route {r:?}: the prefix must start with /"));
        }
        c.routes.push((prefix, svc));
    }
    if a.oidc_refresh_secs < 10 {
        return Err("--oidc-refresh-secs must be at least 10".to_owned());
    }
    for o in &a.oidc {
        let mut it = o.splitn(3, ',');
        let (Some(issuer), Some(audience)) = (it.next(), it.next()) else {
            return Err(format!(
                "--oidc {o:?}: expected ISSUER,AUDIENCE[,JWKS_FILE]"
            ));
        };
        c.oidc.push(OidcIssuer {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            keys: match it.next() {
                Some(jwks) => OidcKeys::File(PathBuf::from(jwks)),
                None => OidcKeys::Discovery {
                    ca_file: a.oidc_ca_file.clone(),
                    refresh: std::time::Duration::from_secs(a.oidc_refresh_secs),
                },
            },
        });
    }
    c.decision.grpc_listen = a.ext_authz_listen;
    c.decision.http_listen = a.forward_auth_listen;
    c.decision.trusted = a.trusted_proxies;
    c.decision.client_cert_header = a.client_cert_header;
    Ok(c)
}

/// Runs a proxy until interrupted.
pub fn run(args: RunArgs) -> ExitCode {
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let p = match castellan_proxy::start(cfg).await {
            Ok(p) => p,
            Err(castellan_proxy::ProxyError::Config(e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(d) = &p.decision {
            eprintln!(
                "castellan decision point: ext_authz gRPC {} · forward-auth http://{}{} · ext_authz HTTP http://{}{} · AuthZEN https://{}",
                d.grpc,
                d.http,
                castellan_proxy::FORWARD_AUTH_PATH,
                d.http,
                castellan_proxy::EXT_AUTHZ_HTTP_PREFIX,
                d.tls
            );
        }
        let out: Vec<String> = p.outbound.iter().map(|(s, a)| format!("{s}={a}")).collect();
        eprintln!(
            "castellan proxy: inbound {} admin {} outbound [{}]",
            p.inbound,
            p.admin,
            out.join(", ")
        );
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}
