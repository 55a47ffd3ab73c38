//! `castellan policy …`: check, eval and test policy directories.

use crate::Output;
use castellan_policy::testing::{junit_xml, parse_test_file, run as run_tests};
use castellan_policy::{Diagnostic, LoadError, PolicySet, Request, is_test_file, yaml_files};
use clap::Subcommand;
use serde_json::json;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Exit status when policies, tests or input are invalid.
const EXIT_INVALID: u8 = 2;
/// Exit status when a policy test failed.
const EXIT_TEST_FAILED: u8 = 1;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy and test file below DIR; print each error as file:line:col: message.
    Check {
        /// Directory of policy files.
        dir: PathBuf,
    },
    /// Decide on one request (JSON input) and print the decision as JSON.
    Eval {
        /// Directory of policy files.
        #[arg(long)]
        policy: PathBuf,
        /// Decision input: a JSON file, or - for standard input.
        #[arg(long)]
        input: String,
    },
    /// Run the *_test.yaml files below DIR against the policies beside them.
    Test {
        /// Directory of policy and test files.
        dir: PathBuf,
        /// Also write JUnit XML here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Print every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Validate DIR and store it on the control plane as a new revision, pushed to every proxy.
    Apply {
        /// Directory of policy files (test files are not sent).
        dir: PathBuf,
        /// Why, recorded with the revision.
        #[arg(long, default_value = "")]
        comment: String,
        /// Store nothing: show what DIR would change on the last 24 h of traffic (`policy impact`).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: crate::admin_cmd::Connection,
    },
    /// Replay the stored traffic of a window against the policies in DIR: the calls that would
    /// be newly denied or newly allowed, and those another rule would decide.
    Impact {
        /// Directory of candidate policy files (test files are not sent).
        dir: PathBuf,
        /// Window: 24h, 7d, 90m …
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only calls to this service.
        #[arg(long, default_value = "")]
        service: String,
        /// Also write JUnit XML here (a newly-denied change is a failure).
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Exit 1 when a call would be newly denied (`newly-denied`), for CI gates.
        #[arg(long, value_parser = ["newly-denied"])]
        fail_on: Option<String>,
        #[command(flatten)]
        conn: crate::admin_cmd::Connection,
    },
    /// Write a tightened copy of DIR to OUT: allow rules narrowed to the callers, methods and
    /// paths the window's traffic used, unused ones dropped (each change commented); checked
    /// to deny no call the window made, with the `policy test` cases it would break reported.
    Suggest {
        /// Directory of policy and test files.
        dir: PathBuf,
        /// Where to write the suggestion (a new or empty directory).
        #[arg(long)]
        out: PathBuf,
        /// Window: 24h, 7d, 90m …
        #[arg(long, default_value = "7d")]
        since: String,
        /// Never remove or narrow what a `policy test` case allows.
        #[arg(long)]
        keep_tested: bool,
        #[command(flatten)]
        conn: crate::admin_cmd::Connection,
    },
    /// List stored revisions, newest first.
    History {
        #[command(flatten)]
        conn: crate::admin_cmd::Connection,
    },
    /// Make an earlier revision's content current again (as a new revision).
    Rollback {
        /// The revision to return to.
        rev: i64,
        #[command(flatten)]
        conn: crate::admin_cmd::Connection,
    },
}

pub fn run(cmd: PolicyCommand, output: Output) -> ExitCode {
    match cmd {
        PolicyCommand::Check { dir } => check(&dir, output),
        PolicyCommand::Eval { policy, input } => eval(&policy, &input, output),
        PolicyCommand::Test {
            dir,
            junit,
            verbose,
        } => test(&dir, junit.as_deref(), verbose, output),
        PolicyCommand::Apply {
            dir,
            comment,
            dry_run,
            conn,
        } => match candidate_files(&dir, output) {
            Err(code) => code,
            Ok(files) if dry_run => crate::admin_cmd::policy_impact(
                files,
                24 * 3600,
                "",
                &conn,
                output == Output::Json,
                None,
                false,
            ),
            Ok(files) => {
                crate::admin_cmd::policy_apply(files, comment, &conn, output == Output::Json)
            }
        },
        PolicyCommand::Impact {
            dir,
            since,
            service,
            junit,
            fail_on,
            conn,
        } => {
            let Some(secs) = crate::admin_cmd::parse_since(&since) else {
                eprintln!("error: --since {since:?}: expected an age such as 24h, 7d, 90m");
                return ExitCode::from(EXIT_INVALID);
            };
            match candidate_files(&dir, output) {
                Err(code) => code,
                Ok(files) => crate::admin_cmd::policy_impact(
                    files,
                    secs,
                    &service,
                    &conn,
                    output == Output::Json,
                    junit.as_deref(),
                    fail_on.is_some(),
                ),
            }
        }
        PolicyCommand::Suggest {
            dir,
            out,
            since,
            keep_tested,
            conn,
        } => {
            let Some(since_secs) = crate::admin_cmd::parse_since(&since) else {
                eprintln!("error: --since {since:?}: expected an age such as 24h, 7d, 90m");
                return ExitCode::from(EXIT_INVALID);
            };
            crate::suggest::run(
                &crate::suggest::Options {
                    dir: &dir,
                    out: &out,
                    since_secs,
                    keep_tested,
                    json: output == Output::Json,
                },
                &conn,
            )
        }
        PolicyCommand::History { conn } => {
            crate::admin_cmd::policy_history(&conn, output == Output::Json)
        }
        PolicyCommand::Rollback { rev, conn } => {
            crate::admin_cmd::policy_rollback(rev, &conn, output == Output::Json)
        }
    }
}

/// The policy files of `dir` (not its tests), checked locally first so that errors name the
/// operator's files and lines; `Err` is the exit status after printing why.
fn candidate_files(
    dir: &Path,
    output: Output,
) -> Result<std::collections::BTreeMap<String, String>, ExitCode> {
    if let Err(e) = PolicySet::load_dir(dir) {
        return Err(load_error(e, output));
    }
    let mut files = std::collections::BTreeMap::new();
    let paths = match yaml_files(dir) {
        Ok(p) => p,
        Err(e) => return Err(load_error(e, output)),
    };
    for path in paths.into_iter().filter(|p| !is_test_file(p)) {
        let name = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                files.insert(name, text);
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return Err(ExitCode::from(EXIT_INVALID));
            }
        }
    }
    Ok(files)
}

fn print_diagnostics(diags: &[Diagnostic], output: Output) {
    match output {
        Output::Text => {
            for d in diags {
                eprintln!("{d}");
            }
            eprintln!("{} error(s)", diags.len());
        }
        Output::Json => {
            let errors: Vec<_> = diags
                .iter()
                .map(|d| json!({"file": &*d.file, "line": d.pos.line, "col": d.pos.col, "message": d.message}))
                .collect();
            println!("{}", json!({"valid": false, "errors": errors}));
        }
    }
}

fn load_error(err: LoadError, output: Output) -> ExitCode {
    match err {
        LoadError::Invalid(diags) => print_diagnostics(&diags, output),
        LoadError::Io { .. } => eprintln!("error: {err}"),
    }
    ExitCode::from(EXIT_INVALID)
}

/// Loads the policies and parses the test files below `dir`, collecting every error of both.
fn load_all(
    dir: &Path,
) -> Result<(PolicySet, Vec<castellan_policy::testing::TestCase>), LoadError> {
    let files = yaml_files(dir)?;
    let mut diags = Vec::new();
    let mut cases = Vec::new();
    for path in files.iter().filter(|p| is_test_file(p)) {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        cases.extend(parse_test_file(
            Arc::from(path.display().to_string()),
            &text,
            &mut diags,
        ));
    }
    let set = match PolicySet::load_dir(dir) {
        Ok(set) => Some(set),
        Err(LoadError::Invalid(d)) => {
            diags.extend(d);
            None
        }
        Err(e) => return Err(e),
    };
    match set {
        Some(set) if diags.is_empty() => Ok((set, cases)),
        _ => {
            diags.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
            Err(LoadError::Invalid(diags))
        }
    }
}

fn check(dir: &Path, output: Output) -> ExitCode {
    match load_all(dir) {
        Ok((set, cases)) => {
            match output {
                Output::Text => println!(
                    "ok: {} rule(s), {} test(s) in {}",
                    set.rule_count(),
                    cases.len(),
                    dir.display()
                ),
                Output::Json => println!(
                    "{}",
                    json!({"valid": true, "errors": [], "rules": set.rule_count(), "tests": cases.len()})
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => load_error(e, output),
    }
}

fn eval(policy: &Path, input: &str, _output: Output) -> ExitCode {
    let set = match PolicySet::load_dir(policy) {
        Ok(s) => s,
        Err(e) => return load_error(e, Output::Text),
    };
    let mut text = String::new();
    let read = if input == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(input).map(|t| text = t)
    };
    if let Err(e) = read {
        eprintln!("error: {input}: {e}");
        return ExitCode::from(EXIT_INVALID);
    }
    let req: Request = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "{input}:{}:{}: invalid decision input: {e}",
                e.line(),
                e.column()
            );
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let decision = set.decide(&req);
    match serde_json::to_string(&decision) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot print decision: {e}");
            ExitCode::FAILURE
        }
    }
}

fn test(dir: &Path, junit: Option<&Path>, verbose: bool, output: Output) -> ExitCode {
    let (set, cases) = match load_all(dir) {
        Ok(v) => v,
        Err(e) => return load_error(e, output),
    };
    if cases.is_empty() {
        eprintln!(
            "error: no tests found in {} (files named *_test.yaml)",
            dir.display()
        );
        return ExitCode::from(EXIT_INVALID);
    }
    let outcomes = run_tests(&set, &cases);
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    let passed = outcomes.len() - failed;
    if let Some(path) = junit
        && let Err(e) = std::fs::write(path, junit_xml(&outcomes))
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::from(EXIT_INVALID);
    }
    match output {
        Output::Text => {
            for o in &outcomes {
                let c = o.case;
                match &o.failure {
                    Some(msg) => println!("FAIL {}:{}: {}: {msg}", c.file, c.pos.line, c.name),
                    None if verbose => println!(
                        "PASS {}: {} -> {} ({})",
                        c.name,
                        o.decision.decision,
                        o.decision.rule.as_deref().unwrap_or("no rule"),
                        o.decision.reason.as_str()
                    ),
                    None => {}
                }
            }
            println!("{passed} passed, {failed} failed");
        }
        Output::Json => {
            let results: Vec<_> = outcomes
                .iter()
                .map(|o| {
                    json!({
                        "file": &*o.case.file, "line": o.case.pos.line, "name": o.case.name,
                        "passed": o.failure.is_none(), "failure": o.failure, "decision": o.decision,
                    })
                })
                .collect();
            println!(
                "{}",
                json!({"passed": passed, "failed": failed, "results": results})
            );
        }
    }
    if failed > 0 {
        ExitCode::from(EXIT_TEST_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}
