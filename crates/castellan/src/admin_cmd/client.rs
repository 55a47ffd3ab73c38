//! `castellan client …`: OAuth2 clients.

use super::{Connection, finish, printable, rows};
use castellan_server::api::NewClient;
use clap::Subcommand;
use std::process::ExitCode;

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
            let new = NewClient {
                name,
                scopes,
                tls_san_uri,
                audiences,
            };
            finish(
                conn.admin().and_then(|a| a.add_client(&new)),
                json_out,
                |v| match &v.client_secret {
                    Some(secret) => format!(
                        "client {}\nclient secret (shown once; store it now):\n{}",
                        printable(&v.client_id),
                        printable(secret)
                    ),
                    None => format!(
                        "client {} authenticates as {} (tls_client_auth)",
                        printable(&v.client_id),
                        printable(v.tls_san_uri.as_deref().unwrap_or(""))
                    ),
                },
            )
        }
        ClientCommand::Disable { name } => finish(
            conn.admin().and_then(|a| a.disable_client(&name)),
            json_out,
            |v| format!("client {} disabled", printable(&v.client_id)),
        ),
        ClientCommand::List => finish(conn.admin().and_then(|a| a.clients()), json_out, |v| {
            rows(v, &["client_id", "scopes", "tls_san_uri", "disabled_at"])
        }),
    }
}
