//! `castellan cert …` and `castellan ca …`: issued certificates, the trust bundle, CA rotation.

use super::{Connection, finish, printable, rows};
use clap::Subcommand;
use std::process::ExitCode;

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

/// Runs `cert …`.
pub fn cert(cmd: CertCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        CertCommand::Revoke { serial } => finish(
            conn.admin().and_then(|a| a.revoke_certificate(&serial)),
            json_out,
            |v| format!("certificate {} revoked", printable(&v.serial)),
        ),
        CertCommand::List { service } => finish(
            conn.admin().and_then(|a| a.certificates(&service)),
            json_out,
            |v| rows(v, &["serial", "issued_at", "not_after", "revoked_at"]),
        ),
    }
}

/// Runs `ca …`.
pub fn ca(cmd: CaCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        CaCommand::Rotate => finish(conn.admin().and_then(|a| a.rotate_ca()), json_out, |v| {
            format!(
                "new CA {} (bundle now holds {} certificates)",
                printable(&v.id),
                v.bundle_size
            )
        }),
        CaCommand::Bundle => finish(conn.admin().and_then(|a| a.bundle()), json_out, |v| {
            printable(&v.pem).trim_end().to_owned()
        }),
    }
}
