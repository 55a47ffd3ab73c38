//! The `castellan` binaries' library half: the demo mesh, so tests can drive it in-process, and
//! `proxy run`, shared by `castellan` and the proxy-only `castellan-proxy`.

pub mod demo;
pub mod demo_apps;
pub mod ocsf;
pub mod peers;
pub mod proxy_cmd;

/// JSON logs on stderr; `CASTELLAN_LOG` (or `RUST_LOG`) sets the filter, default `info`.
pub fn init_logging() {
    let filter = std::env::var("CASTELLAN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the process's one TLS crypto provider: both ring and aws-lc-rs are linked (through
/// dependencies); choosing explicitly keeps every handshake on the same implementation.
pub fn install_crypto_provider() -> Result<(), String> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| "a TLS crypto provider was already installed".to_owned())
}
