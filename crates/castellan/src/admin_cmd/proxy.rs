//! `castellan proxy …`: the proxy registry, and running a proxy in this process.

use super::{Connection, finish, rows};
use clap::Subcommand;
use std::process::ExitCode;

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
        ProxyCommand::List => finish(conn.admin().and_then(|a| a.proxies()), json_out, |v| {
            rows(
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
        }),
    }
}
