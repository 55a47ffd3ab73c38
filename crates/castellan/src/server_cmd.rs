//! `castellan server init|run`: the control plane's lifecycle.

use castellan_server::{Server, ServerConfig, ServerError};
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Control-plane lifecycle.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create the data directory, the trust domain's CA and signing key, and print the first
    /// admin credential (shown once).
    Init {
        /// The trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        common: Common,
    },
    /// Serve the admin API, gRPC for proxies, OAuth2/OIDC, /metrics, /healthz, /readyz over TLS.
    Run {
        #[command(flatten)]
        common: Common,
        /// Listen address (default 127.0.0.1:8443).
        #[arg(long, env = "CASTELLAN_LISTEN")]
        listen: Option<SocketAddr>,
    },
}

/// Options both subcommands take.
#[derive(Debug, Args)]
pub struct Common {
    /// Data directory (SQLite database, key-encryption key, trust bundle).
    #[arg(long, env = "CASTELLAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://… (default: SQLite in the data directory).
    #[arg(long, env = "CASTELLAN_DATABASE_URL")]
    database_url: Option<String>,
    /// YAML configuration file; CASTELLAN_* variables and flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Common {
    fn config(self) -> Result<ServerConfig, String> {
        let mut cfg = ServerConfig::load(self.config.as_deref(), |k| std::env::var(k).ok())
            .map_err(|e| e.to_string())?;
        if let Some(d) = self.data_dir {
            cfg.data_dir = d;
        }
        if let Some(u) = self.database_url {
            cfg.database_url = Some(u);
        }
        Ok(cfg)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn fail(e: &ServerError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ServerError::Config(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Runs a `server` subcommand.
pub fn run(cmd: ServerCommand, json: bool) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match cmd {
        ServerCommand::Init {
            trust_domain,
            common,
        } => {
            let cfg = match common.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let kek = std::env::var("CASTELLAN_KEK").ok();
            match rt.block_on(castellan_server::init(&cfg, &trust_domain, kek)) {
                Ok(out) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"trust_domain": out.trust_domain, "admin_token": out.admin_token,
                                               "ca_bundle": out.bundle_path, "data_dir": cfg.data_dir})
                        );
                    } else {
                        println!(
                            "initialized trust domain {} in {}",
                            out.trust_domain,
                            cfg.data_dir.display()
                        );
                        println!("trust bundle: {}", out.bundle_path.display());
                        println!("admin credential (shown once; store it now):");
                        println!("{}", out.admin_token);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        ServerCommand::Run { common, listen } => {
            let mut cfg = match common.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let kek = std::env::var("CASTELLAN_KEK").ok();
            rt.block_on(async move {
                let running = match Server::start(cfg, kek).await {
                    Ok(r) => r,
                    Err(e) => return fail(&e),
                };
                eprintln!("castellan server listening on {}", running.url);
                shutdown_signal().await;
                tracing::info!("shutting down");
                running.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
