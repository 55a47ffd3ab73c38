//! `castellan apikey …`: end-user API keys.

use super::{Connection, finish, parse_duration_secs, printable, rows};
use castellan_server::api::NewApiKey;
use clap::Subcommand;
use std::process::ExitCode;

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
            let mut map = std::collections::BTreeMap::new();
            for c in &claims {
                let Some((k, v)) = c.split_once('=') else {
                    eprintln!("error: --claim expects NAME=VALUE, got {c:?}");
                    return ExitCode::from(2);
                };
                map.insert(k.to_owned(), v.to_owned());
            }
            let new = NewApiKey {
                user,
                roles,
                claims: map,
                services,
                prefixes,
                ttl_secs: ttl,
            };
            finish(
                conn.admin().and_then(|a| a.add_api_key(&new)),
                json_out,
                |v| {
                    format!(
                        "API key {} for {} (shown once; store it now):\n{}",
                        printable(&v.key_id),
                        printable(&v.user),
                        printable(&v.api_key)
                    )
                },
            )
        }
        ApiKeyCommand::Revoke { key_id } => finish(
            conn.admin().and_then(|a| a.revoke_api_key(&key_id)),
            json_out,
            |v| format!("API key {} revoked", printable(&v.key_id)),
        ),
        ApiKeyCommand::List => finish(conn.admin().and_then(|a| a.api_keys()), json_out, |v| {
            rows(
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
        }),
    }
}
