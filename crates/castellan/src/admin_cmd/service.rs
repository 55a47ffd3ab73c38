//! `castellan service …`: registration, kinds and routes, join tokens, OpenAPI documents.

use super::{Connection, finish, printable, rows};
use castellan_server::api::{NewService, ServiceRole};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Workload identities.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Register a service and print a single-use join token for its proxy.
    Add {
        /// Service name (a-z, 0-9, '-').
        name: String,
        /// A DNS name or IP address its SVIDs also carry (repeatable; for an edge listener).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        #[command(flatten)]
        role: ServiceRoleArgs,
    },
    /// Change what a service's proxies are (kind, routes, upstreams); they are sent what that
    /// needs with the next push.
    Update {
        /// Service name.
        name: String,
        #[command(flatten)]
        role: ServiceRoleArgs,
    },
    /// Print a new join token for a registered service.
    JoinToken {
        /// Service name.
        name: String,
    },
    /// Register the service's OpenAPI 3.0/3.1 document (YAML or JSON); proxies validate every
    /// request to it before the app sees it.
    Spec {
        /// Service name.
        name: String,
        /// The OpenAPI document.
        file: PathBuf,
    },
    /// Disable a service: no more certificates, and proxies learn of it.
    Disable {
        /// Service name.
        name: String,
    },
    /// List services.
    List,
}

/// What a service's proxies are: the control plane sends each only what that needs.
#[derive(Debug, Args)]
pub struct ServiceRoleArgs {
    /// sidecar (default), gateway or decision.
    #[arg(long)]
    kind: Option<String>,
    /// Gateways and decision points: PREFIX=SERVICE (repeatable), e.g. /orders=orders.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Sidecars: a service it calls (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
}

impl ServiceRoleArgs {
    fn role(&self) -> ServiceRole {
        ServiceRole {
            kind: self.kind.clone(),
            routes: self.routes.clone(),
            upstreams: self.upstreams.clone(),
        }
    }
}

/// Runs `service …`.
pub fn service(cmd: ServiceCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        ServiceCommand::Update { name, role } => finish(
            conn.admin()
                .and_then(|a| a.update_service(&name, &role.role())),
            json_out,
            |v| format!("service {} is a {}", printable(&v.name), printable(&v.kind)),
        ),
        ServiceCommand::Add {
            name,
            dns_names,
            role,
        } => {
            let role = role.role();
            let new = NewService {
                name,
                dns_names,
                kind: role.kind,
                routes: role.routes,
                upstreams: role.upstreams,
            };
            finish(
                conn.admin().and_then(|a| a.add_service(&new)),
                json_out,
                |v| {
                    format!(
                        "service {} ({})\njoin token (single use, expires at {}):\n{}",
                        printable(&v.name),
                        printable(&v.spiffe_id),
                        v.expires_at,
                        printable(&v.join_token)
                    )
                },
            )
        }
        ServiceCommand::JoinToken { name } => finish(
            conn.admin().and_then(|a| a.join_token(&name)),
            json_out,
            |v| printable(&v.join_token),
        ),
        ServiceCommand::Spec { name, file } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            finish(
                conn.admin().and_then(|a| a.set_spec(&name, text)),
                json_out,
                |v| {
                    format!(
                        "OpenAPI document for {name} set ({} paths); proxies validate requests against it",
                        v.paths
                    )
                },
            )
        }
        ServiceCommand::Disable { name } => finish(
            conn.admin().and_then(|a| a.disable_service(&name)),
            json_out,
            |v| format!("service {} disabled", printable(&v.name)),
        ),
        ServiceCommand::List => finish(conn.admin().and_then(|a| a.services()), json_out, |v| {
            rows(v, &["name", "spiffe_id", "created_at", "disabled_at"])
        }),
    }
}
