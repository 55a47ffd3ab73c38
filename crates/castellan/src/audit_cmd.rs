//! `castellan audit …`: query, verify, export and purge the audit trail; pseudonyms.

use crate::admin_cmd::{Connection, finish, ms_ago, parse_duration_secs, printable, s, table};
use clap::Subcommand;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

/// The audit trail.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Records matching filters, newest first.
    Query {
        /// Destination service.
        #[arg(long)]
        service: Option<String>,
        /// Source (part of its SPIFFE ID).
        #[arg(long)]
        source: Option<String>,
        /// End user.
        #[arg(long)]
        user: Option<String>,
        /// allow or deny.
        #[arg(long)]
        decision: Option<String>,
        /// Deciding rule.
        #[arg(long)]
        rule: Option<String>,
        /// From (Unix milliseconds).
        #[arg(long)]
        since: Option<i64>,
        /// Until (Unix milliseconds).
        #[arg(long)]
        until: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Check every chain: altered, deleted, reordered records and gaps (names the first bad
    /// record), and every signed checkpoint — its signature against --bundle, and the record it
    /// covers (a chain recomputed after an edit, or a tail cut after a checkpoint). Exit 1 on
    /// any problem.
    Verify {
        /// Trust bundle to check checkpoint signatures with (default: --ca-bundle). Include
        /// past CAs; never a bundle read from the control plane's database.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Write the last signed checkpoint of every chain here (JSON lines), to anchor
        /// elsewhere and later prove the database was not rolled back.
        #[arg(long)]
        export_heads: Option<PathBuf>,
        /// Heads exported earlier with --export-heads: each must still be provable from the
        /// database (its checkpoint there with the same hash, or purged by an audited purge).
        #[arg(long)]
        heads: Option<PathBuf>,
    },
    /// Every record as JSON lines (for a SIEM).
    Export {
        /// Output format: jsonl (the records as stored and hashed) or ocsf (OCSF 1.1 API
        /// Activity events, one JSON object per line).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "ocsf"])]
        format: String,
        /// Keep running: print records as the control plane stores them (polled every second).
        #[arg(long)]
        follow: bool,
    },
    /// Remove records older than --before, each chain up to its last signed checkpoint among
    /// them (verify then starts from that checkpoint). The purge is itself audited.
    Purge {
        /// Unix milliseconds, or an age such as 90d, 12h, 30m.
        #[arg(long)]
        before: String,
    },
    /// Print the pseudonym proxies running with `--pseudonymize-users KEY_FILE` record for a
    /// user, to find that user's records (`audit query --user`) without anyone else's name.
    Pseudonym {
        /// The proxies' key file.
        #[arg(long)]
        key_file: PathBuf,
        /// The user (`sub`).
        user: String,
    },
}

/// Reads heads written by `audit verify --export-heads` (one JSON object per line).
fn read_heads(path: &std::path::Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| format!("{}:{}: not an exported head", path.display(), n + 1))
        })
        .collect()
}

/// Prints `audit verify` (chains checked by the server, checkpoints checked here) and returns
/// the exit code.
fn verify_output(
    v: &mut Value,
    bundle: &[CertificateDer<'static>],
    export_heads: Option<&std::path::Path>,
    exported: &[Value],
    json_out: bool,
) -> ExitCode {
    use crate::audit_verify as av;
    let mut ok = v.get("ok") == Some(&Value::Bool(true));
    let mut heads = String::new();
    let mut lines = Vec::new();
    let listed: &[Value] = v
        .get("writers")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let reports: Vec<av::CheckpointReport> =
        listed.iter().map(|w| av::check_writer(bundle, w)).collect();
    let cut = av::audited_purge_cut(listed, &reports);
    let deleted: Vec<Option<String>> = listed
        .iter()
        .map(|w| av::unaudited_deletion(w, cut))
        .collect();
    let head_problems = av::compare_heads(bundle, exported, listed, cut);
    if let Some(writers) = v.get_mut("writers").and_then(Value::as_array_mut) {
        for ((w, report), deleted) in writers.iter_mut().zip(reports).zip(deleted) {
            ok &= report.problem.is_none() && deleted.is_none();
            if let Some(h) = &report.head {
                heads.push_str(&h.to_string());
                heads.push('\n');
            }
            let signed = if report.good > 0 {
                format!(", signed through record {}", report.signed_through)
            } else {
                String::new()
            };
            let line = match (
                w.get("first_error").and_then(Value::as_str),
                &report.problem,
            ) {
                (None, None) if deleted.is_some() => format!(
                    "{}: {} records, RECORDS DELETED: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(deleted.as_deref().unwrap_or_default())
                ),
                (Some(e), _) => format!(
                    "{}: {} records, FIRST BAD RECORD: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(e)
                ),
                (None, Some(p)) => format!(
                    "{}: {} records, BAD CHECKPOINT: {}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null),
                    printable(p)
                ),
                (None, None) => format!(
                    "{}: {} records, chain intact{signed}",
                    s(w, "writer"),
                    w.get("records").unwrap_or(&Value::Null)
                ),
            };
            lines.push(line);
            let summary = av::summary(w, &report);
            if let (Some(o), Some(sum)) = (w.as_object_mut(), summary.as_object()) {
                o.remove("checkpoints");
                for (k, val) in sum {
                    o.insert(k.clone(), val.clone());
                }
                o.insert("deleted".to_owned(), json!(deleted));
            }
        }
    }
    for p in &head_problems {
        ok = false;
        lines.push(format!("EXPORTED HEAD: {}", printable(p)));
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".to_owned(), Value::Bool(ok));
        if !exported.is_empty() {
            o.insert("head_problems".to_owned(), json!(head_problems));
        }
    }
    if let Some(path) = export_heads
        && let Err(e) = std::fs::write(path, &heads)
    {
        eprintln!("error: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if json_out {
        println!("{v}");
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A query-string value, percent-encoded.
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prints stored records (as stored, or as OCSF events); with `follow`, keeps printing each
/// chain's new records as they are stored.
fn export(conn: &Connection, ocsf: bool, follow: bool) -> Result<(), String> {
    use std::io::Write as _;
    let print = |text: &str| -> Result<Option<(String, u64)>, String> {
        let mut last = None;
        let mut out = std::io::stdout().lock();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            if ocsf {
                if let Some(e) = crate::ocsf::event(&v) {
                    writeln!(out, "{e}").map_err(|e| e.to_string())?;
                }
            } else {
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            if let (Some(w), Some(seq)) = (
                v.get("writer").and_then(Value::as_str),
                v.get("seq").and_then(Value::as_u64),
            ) {
                last = Some((w.to_owned(), seq));
            }
        }
        out.flush().map_err(|e| e.to_string())?;
        Ok(last)
    };
    let admin = conn.admin()?;
    if !follow {
        print(&admin.get_text("/v1/audit/export")?)?;
        return Ok(());
    }
    // Each chain from where we are in it (everything, the first time round).
    let mut at: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        let heads: Value =
            serde_json::from_str(&admin.get_text("/v1/audit/heads")?).map_err(|e| e.to_string())?;
        for h in heads.as_array().into_iter().flatten() {
            let (Some(chain), Some(seq)) = (
                h.get("chain").and_then(Value::as_str),
                h.get("seq").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let from = at.get(chain).copied().unwrap_or(0);
            if seq <= from {
                continue;
            }
            let text = admin.get_text(&format!(
                "/v1/audit/export?chain={}&from={}",
                query_value(chain),
                from + 1
            ))?;
            print(&text)?;
            at.insert(chain.to_owned(), seq.max(from));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Runs `audit …`.
pub fn audit(cmd: AuditCommand, conn: &Connection, json_out: bool) -> ExitCode {
    match cmd {
        AuditCommand::Pseudonym { key_file, user } => {
            match castellan_proxy::PseudonymKey::from_file(&key_file) {
                Ok(k) => {
                    println!("{}", castellan_audit::pseudonym(&k.0, &user));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        AuditCommand::Query {
            service,
            source,
            user,
            decision,
            rule,
            since,
            until,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [
                ("service", service),
                ("source", source),
                ("user", user),
                ("decision", decision),
                ("rule", rule),
            ] {
                if let Some(v) = v {
                    q.push(format!(
                        "{k}={}",
                        v.replace(
                            |c: char| !c.is_ascii_alphanumeric() && !"-_./:".contains(c),
                            ""
                        )
                    ));
                }
            }
            if let Some(s) = since {
                q.push(format!("since_ms={s}"));
            }
            if let Some(u) = until {
                q.push(format!("until_ms={u}"));
            }
            finish(
                conn.admin()
                    .and_then(|a| a.get(&format!("/v1/audit?{}", q.join("&")))),
                json_out,
                |v| {
                    table(
                        v,
                        &[
                            "time_ms",
                            "writer",
                            "seq",
                            "source",
                            "user",
                            "destination",
                            "method",
                            "path",
                            "decision",
                            "rule",
                            "status",
                        ],
                    )
                },
            )
        }
        AuditCommand::Verify {
            bundle,
            export_heads,
            heads,
        } => {
            let Some(bundle_path) = bundle.or_else(|| conn.ca_bundle.clone()) else {
                eprintln!("error: --bundle or --ca-bundle is required to check checkpoints");
                return ExitCode::from(2);
            };
            let certs: Vec<CertificateDer<'static>> =
                match CertificateDer::pem_file_iter(&bundle_path)
                    .map(|i| i.collect::<Result<Vec<_>, _>>())
                {
                    Ok(Ok(c)) if !c.is_empty() => c,
                    _ => {
                        eprintln!("error: {}: no certificates", bundle_path.display());
                        return ExitCode::from(2);
                    }
                };
            let exported = match heads.as_deref().map(read_heads).transpose() {
                Ok(h) => h.unwrap_or_default(),
                Err(e) => {
                    eprintln!("error: {}", printable(&e));
                    return ExitCode::from(2);
                }
            };
            match conn.admin().and_then(|a| a.get("/v1/audit/verify")) {
                Ok(mut v) => {
                    verify_output(&mut v, &certs, export_heads.as_deref(), &exported, json_out)
                }
                Err(e) => {
                    eprintln!("error: {}", printable(&e));
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Purge { before } => {
            let before_ms = match before.parse::<i64>() {
                Ok(ms) if ms > 0 => ms,
                _ => match parse_duration_secs(&before) {
                    Some(age) => ms_ago(age),
                    None => {
                        eprintln!("error: --before expects Unix milliseconds or an age (90d, 12h)");
                        return ExitCode::from(2);
                    }
                },
            };
            finish(
                conn.admin()
                    .and_then(|a| a.post("/v1/audit/purge", &json!({"before_ms": before_ms}))),
                json_out,
                |v| {
                    format!(
                        "{} records purged",
                        v.get("records").unwrap_or(&Value::Null)
                    )
                },
            )
        }
        AuditCommand::Export { format, follow } => match export(conn, format == "ocsf", follow) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", printable(&e));
                ExitCode::FAILURE
            }
        },
    }
}
