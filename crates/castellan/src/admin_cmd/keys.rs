//! `castellan keys …` and `castellan operator …`: token-signing keys and admin credentials.

use super::{Connection, finish, printable, rows};
use castellan_server::api::NewAdminToken;
use clap::Subcommand;
use std::process::ExitCode;

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

/// Runs `keys …`.
pub fn keys(cmd: KeysCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        KeysCommand::Rotate => finish(conn.admin().and_then(|a| a.rotate_keys()), json_out, |v| {
            format!(
                "now signing with {} ({} keys published)",
                printable(&v.kid),
                v.published
            )
        }),
        KeysCommand::List => finish(conn.admin().and_then(|a| a.signing_keys()), json_out, |v| {
            rows(v, &["kid", "active", "created_at", "retired_at"])
        }),
    }
}

/// Runs `operator …`.
pub fn operator(cmd: OperatorCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        OperatorCommand::Add { name, role } => finish(
            conn.admin()
                .and_then(|a| a.add_admin_token(&NewAdminToken { name, role })),
            json_out,
            |v| {
                format!(
                    "{} credential for {} (shown once):\n{}",
                    printable(&v.role),
                    printable(&v.name),
                    printable(&v.token)
                )
            },
        ),
        OperatorCommand::List => {
            finish(conn.admin().and_then(|a| a.admin_tokens()), json_out, |v| {
                rows(v, &["id", "name", "role", "created_at", "revoked_at"])
            })
        }
        OperatorCommand::Revoke { id } => finish(
            conn.admin().and_then(|a| a.revoke_admin_token(&id)),
            json_out,
            |v| format!("admin credential of {} revoked", printable(&v.name)),
        ),
    }
}
