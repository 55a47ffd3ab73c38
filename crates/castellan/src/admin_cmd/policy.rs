//! `castellan policy apply | impact | history | rollback` against the control plane, and
//! `castellan access report`.

use super::{Connection, finish, ms_ago, parse_duration_secs, printable, rows, s};
use castellan_server::api::{ApplyPolicy, ImpactRequest};
use clap::Subcommand;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::ExitCode;

/// `policy impact` / `policy apply --dry-run`: what `files` would change on the stored traffic
/// since `since_secs` ago (of `service`); prints it (a table, `-o json`, `--junit FILE`) and
/// exits 1 when `fail_on_newly_denied` and some call would be newly denied.
pub fn policy_impact(
    files: BTreeMap<String, String>,
    since_secs: i64,
    service: &str,
    conn: &Connection,
    json_out: bool,
    junit: Option<&std::path::Path>,
    fail_on_newly_denied: bool,
) -> ExitCode {
    let req = ImpactRequest {
        files,
        since_ms: ms_ago(since_secs),
        service: service.to_owned(),
    };
    let v = match conn.admin().and_then(|a| a.policy_impact(&req)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {}", printable(&e));
            return ExitCode::FAILURE;
        }
    };
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    if json_out {
        println!("{v}");
    } else {
        println!(
            "{} records in the window: {} replayed ({} unchanged), {} indeterminate (inputs not kept), {} not policy decisions of traffic",
            n("scanned"),
            n("replayed"),
            n("unchanged"),
            n("indeterminate"),
            n("skipped")
        );
        println!(
            "newly denied {} · newly allowed {} · deciding rule changed {}",
            n("newly_denied"),
            n("newly_allowed"),
            n("rule_changed")
        );
        let empty = Vec::new();
        let changes = v.get("changes").and_then(Value::as_array).unwrap_or(&empty);
        if !changes.is_empty() {
            println!(
                "\n{:<14} {:<14} {:<34} {:<34} {:>6} {:>7} {:>5}  example",
                "service", "change", "rule then", "rule now", "calls", "callers", "users"
            );
        }
        for c in changes {
            let ex = c
                .get("examples")
                .and_then(|e| e.get(0))
                .map(|e| {
                    format!(
                        "{} {} {} ({})",
                        s(e, "user"),
                        s(e, "method"),
                        s(e, "path"),
                        s(e, "decision_id")
                    )
                })
                .unwrap_or_default();
            let or_dash = |x: String| if x.is_empty() { "-".to_owned() } else { x };
            println!(
                "{:<14} {:<14} {:<34} {:<34} {:>6} {:>7} {:>5}  {}",
                s(c, "service"),
                s(c, "change"),
                or_dash(s(c, "from_rule")),
                or_dash(s(c, "to_rule")),
                c.get("count").and_then(Value::as_u64).unwrap_or(0),
                c.get("callers").and_then(Value::as_u64).unwrap_or(0),
                c.get("users").and_then(Value::as_u64).unwrap_or(0),
                ex
            );
        }
    }
    if let Some(path) = junit {
        let esc = |x: &str| {
            x.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let empty = Vec::new();
        let changes = v.get("changes").and_then(Value::as_array).unwrap_or(&empty);
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let failures = changes
            .iter()
            .filter(|c| s(c, "change") == "newly-denied")
            .count();
        xml.push_str(&format!(
            "<testsuite name=\"policy impact\" tests=\"{}\" failures=\"{failures}\">\n",
            changes.len().max(1)
        ));
        if changes.is_empty() {
            xml.push_str("  <testcase classname=\"impact\" name=\"no change\"/>\n");
        }
        for c in changes {
            let name = esc(&format!(
                "{} {}: {} -> {}",
                s(c, "service"),
                s(c, "change"),
                s(c, "from_rule"),
                s(c, "to_rule")
            ));
            let count = c.get("count").and_then(Value::as_u64).unwrap_or(0);
            if s(c, "change") == "newly-denied" {
                xml.push_str(&format!("  <testcase classname=\"impact\" name=\"{name}\"><failure message=\"{count} calls would be newly denied\"/></testcase>\n"));
            } else {
                xml.push_str(&format!(
                    "  <testcase classname=\"impact\" name=\"{name}\"/>\n"
                ));
            }
        }
        xml.push_str("</testsuite>\n");
        if let Err(e) = std::fs::write(path, xml) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if fail_on_newly_denied && n("newly_denied") > 0 {
        eprintln!("{} calls would be newly denied", n("newly_denied"));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// `policy apply` (files already validated locally).
pub fn policy_apply(
    files: BTreeMap<String, String>,
    comment: String,
    conn: &Connection,
    json_out: bool,
) -> ExitCode {
    finish(
        conn.admin()
            .and_then(|a| a.apply_policy(&ApplyPolicy { files, comment })),
        json_out,
        |v| {
            if v.changed {
                format!(
                    "applied revision {} ({} rules, sha256 {})",
                    v.revision,
                    v.rules,
                    printable(&v.content_hash)
                )
            } else {
                format!(
                    "unchanged: revision {} already has this content",
                    v.revision
                )
            }
        },
    )
}

/// `policy history`.
pub fn policy_history(conn: &Connection, json_out: bool) -> ExitCode {
    finish(
        conn.admin().and_then(|a| a.policy_history()),
        json_out,
        |v| {
            rows(
                v,
                &[
                    "revision",
                    "author",
                    "created_at",
                    "content_hash",
                    "comment",
                ],
            )
        },
    )
}

/// `policy rollback REV`.
pub fn policy_rollback(rev: i64, conn: &Connection, json_out: bool) -> ExitCode {
    finish(
        conn.admin().and_then(|a| a.rollback_policy(rev)),
        json_out,
        |v| {
            format!(
                "revision {} now has the content of revision {rev}",
                v.revision
            )
        },
    )
}

/// Least privilege from real traffic.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Rules never matched, wildcards used for few values, callers and users per rule, idle
    /// services, audit-mode services that would deny.
    Report {
        /// Window: 7d, 24h, 90m …
        #[arg(long, default_value = "7d")]
        since: String,
    },
}

/// Runs `access …`.
pub fn access(cmd: AccessCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        AccessCommand::Report { since } => {
            let Some(secs) = parse_duration_secs(&since) else {
                eprintln!("error: --since {since:?}: expected an age such as 7d, 24h, 90m");
                return ExitCode::from(2);
            };
            let since_ms = ms_ago(secs);
            finish(
                conn.admin().and_then(|a| a.access_report(since_ms)),
                json_out,
                |v| {
                    let mut out = format!(
                        "policy revision {} against {} records since {since}\n\n",
                        v.get("revision").unwrap_or(&Value::Null),
                        v.get("scanned").unwrap_or(&Value::Null)
                    );
                    out.push_str(&format!(
                        "{:<44} {:>8} {:>8} {:>8} {:>6}  callers\n",
                        "rule", "matched", "allowed", "denied", "users"
                    ));
                    let empty = Vec::new();
                    for r in v.get("rules").and_then(Value::as_array).unwrap_or(&empty) {
                        let callers: Vec<String> = r
                            .get("callers")
                            .and_then(Value::as_array)
                            .unwrap_or(&empty)
                            .iter()
                            .filter_map(Value::as_str)
                            .map(printable)
                            .collect();
                        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
                        out.push_str(&format!(
                            "{:<44} {:>8} {:>8} {:>8} {:>6}  {}\n",
                            s(r, "rule"),
                            n("matched"),
                            n("allowed"),
                            n("denied"),
                            n("users"),
                            callers.join(", ")
                        ));
                    }
                    out.push_str("\nfindings:\n");
                    let findings = v
                        .get("findings")
                        .and_then(Value::as_array)
                        .unwrap_or(&empty);
                    if findings.is_empty() {
                        out.push_str("  none\n");
                    }
                    for f in findings {
                        let what = if f.get("rule").is_some() {
                            s(f, "rule")
                        } else {
                            s(f, "service")
                        };
                        out.push_str(&format!(
                            "  {:<18} {:<44} {}\n",
                            s(f, "kind"),
                            what,
                            s(f, "detail")
                        ));
                    }
                    out
                },
            )
        }
    }
}
