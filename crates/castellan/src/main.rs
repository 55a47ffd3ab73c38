//! The `castellan` binary: parses the command line and hands over to the command modules.

mod admin_client;
mod admin_cmd;
mod audit_cmd;
mod audit_verify;
use castellan::{demo, init_logging, ocsf};
mod policy_cmd;
mod server_cmd;
mod suggest;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Castellan: zero-trust security for microservices in one binary.
#[derive(Debug, Parser)]
#[command(name = "castellan", version, about, propagate_version = true)]
struct Cli {
    /// Output format for structured results.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// JSON on stdout.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, evaluate and test access policies.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Run the whole product on loopback with scripted traffic; exit 0 only if every
    /// expectation held.
    Demo {
        /// Keep everything running until interrupted instead of running the script.
        #[arg(long)]
        serve: bool,
        /// With --serve: write URLs, CA bundle, admin token and user credentials here (JSON).
        #[arg(long, requires = "serve")]
        state_file: Option<std::path::PathBuf>,
    },
    /// Run the control plane.
    #[command(subcommand)]
    Server(server_cmd::ServerCommand),
    /// Register services and issue join tokens.
    Service {
        #[command(subcommand)]
        cmd: admin_cmd::ServiceCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Revoke and list certificates.
    Cert {
        #[command(subcommand)]
        cmd: admin_cmd::CertCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Rotate the CA, print the trust bundle.
    Ca {
        #[command(subcommand)]
        cmd: admin_cmd::CaCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Manage OAuth2 clients.
    Client {
        #[command(subcommand)]
        cmd: admin_cmd::ClientCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Rotate token-signing keys.
    Keys {
        #[command(subcommand)]
        cmd: admin_cmd::KeysCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// List proxies and what they enforce.
    Proxy {
        #[command(subcommand)]
        cmd: admin_cmd::ProxyCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Query, verify and export the audit trail.
    Audit {
        #[command(subcommand)]
        cmd: audit_cmd::AuditCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// What the policy in force grants against what traffic used.
    Access {
        #[command(subcommand)]
        cmd: admin_cmd::AccessCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Manage end-user API keys.
    Apikey {
        #[command(subcommand)]
        cmd: admin_cmd::ApiKeyCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
    /// Manage admin credentials (roles admin and viewer).
    Operator {
        #[command(subcommand)]
        cmd: admin_cmd::OperatorCommand,
        #[command(flatten)]
        conn: admin_cmd::Connection,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = castellan::install_crypto_provider() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd, cli.output),
        Command::Demo { serve, state_file } => {
            if std::env::var_os("CASTELLAN_LOG").is_none() && std::env::var_os("RUST_LOG").is_none()
            {
                // The table is the demo's output; only problems go to the log.
                // SAFETY-free: set before any thread is started.
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
                    .with_writer(std::io::stderr)
                    .try_init();
            } else {
                init_logging();
            }
            demo::run(serve, state_file, json)
        }
        Command::Server(cmd) => {
            init_logging();
            server_cmd::run(cmd, json)
        }
        Command::Service { cmd, conn } => admin_cmd::service(cmd, &conn, json),
        Command::Cert { cmd, conn } => admin_cmd::cert(cmd, &conn, json),
        Command::Ca { cmd, conn } => admin_cmd::ca(cmd, &conn, json),
        Command::Client { cmd, conn } => admin_cmd::client(cmd, &conn, json),
        Command::Keys { cmd, conn } => admin_cmd::keys(cmd, &conn, json),
        Command::Operator { cmd, conn } => admin_cmd::operator(cmd, &conn, json),
        Command::Proxy { cmd, conn } => {
            if matches!(cmd, admin_cmd::ProxyCommand::Run(_)) {
                init_logging();
            }
            admin_cmd::proxy(cmd, &conn, json)
        }
        Command::Apikey { cmd, conn } => admin_cmd::apikey(cmd, &conn, json),
        Command::Access { cmd, conn } => admin_cmd::access(cmd, &conn, json),
        Command::Audit { cmd, conn } => audit_cmd::audit(cmd, &conn, json),
    }
}
