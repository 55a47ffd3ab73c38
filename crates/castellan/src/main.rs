//! The `castellan` binary: parses the command line and hands over to the command modules.

mod policy_cmd;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd, cli.output),
    }
}
