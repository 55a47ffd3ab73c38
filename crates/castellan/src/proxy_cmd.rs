//! `castellan proxy run`: a sidecar or gateway as its own process.

use castellan_proxy::{Mode, OidcIssuer, ProxyConfig};
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
}

/// Options of `castellan proxy run` (each also as a `CASTELLAN_PROXY_*` variable).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// sidecar or gateway.
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
    /// Gateway: a route, PREFIX=SERVICE (repeatable).
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Gateway: an OIDC issuer, ISSUER,AUDIENCE,JWKS_FILE (repeatable).
    #[arg(long = "oidc")]
    oidc: Vec<String>,
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
    for o in &a.oidc {
        let mut it = o.splitn(3, ',');
        let (Some(issuer), Some(audience), Some(jwks)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("--oidc {o:?}: expected ISSUER,AUDIENCE,JWKS_FILE"));
        };
        c.oidc.push(OidcIssuer {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_file: PathBuf::from(jwks),
        });
    }
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
