//! `castellan-proxy`: the data plane alone (`castellan-proxy run …` takes the options of
//! `castellan proxy run`). The same proxy as the all-in-one `castellan` binary, without the
//! control plane, its SQL drivers and the admin CLI linked in, so fewer pages are resident per
//! proxy process (product.md §2: the all-in-one binary stays the default).

use castellan::proxy_cmd;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Castellan's data plane: sidecar, gateway or decision point.
#[derive(Debug, Parser)]
#[command(name = "castellan-proxy", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sidecar, gateway or decision point until interrupted.
    Run(Box<proxy_cmd::RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = castellan::install_crypto_provider() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    castellan::init_logging();
    match cli.command {
        Command::Run(args) => proxy_cmd::run(*args),
    }
}
