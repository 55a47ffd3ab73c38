//! `castellan audit verify`'s own checks of signed checkpoints: each signature is verified here,
//! against the trust bundle the operator supplies — never against a bundle read from the
//! database — and compared with the record the control plane holds now. A chain recomputed
//! after an edit, or a tail cut after a checkpoint, cannot match a signature only the
//! workload's key could make.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use castellan_audit::Checkpoint;
use castellan_identity::{SvidUsage, SvidValidator, TrustBundle};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};

/// What the checkpoints of one chain say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Checkpoints whose signature verified and whose record matches.
    pub good: usize,
    /// The highest record covered by a good checkpoint (0: none).
    pub signed_through: i64,
    /// The first problem, if any.
    pub problem: Option<String>,
    /// The last good checkpoint, as exported with `--export-heads`.
    pub head: Option<Value>,
}

/// Checks a checkpoint's signature (by the chain's identity, under `validator`'s bundle);
/// returns the statement it signs.
fn signature_problem(
    validator: &SvidValidator,
    writer: &Value,
    cp: &Value,
) -> Result<Checkpoint, String> {
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let identity = str_of(writer, "identity");
    let seq = cp.get("seq").and_then(Value::as_i64).unwrap_or(0);
    let time_ms = cp.get("time_ms").and_then(Value::as_i64).unwrap_or(0);
    let chain: Vec<CertificateDer<'static>> = cp
        .get("cert_chain")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().and_then(|s| STANDARD.decode(s).ok()))
                .map(CertificateDer::from)
                .collect()
        })
        .unwrap_or_default();
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_millis(
        u64::try_from(time_ms).unwrap_or(0),
    ));
    let signer = validator
        .validate(&chain, at, SvidUsage::Client)
        .map_err(|e| {
            format!("checkpoint {seq}: signing certificate not trusted by the bundle given: {e}")
        })?;
    if signer.as_str() != identity {
        return Err(format!(
            "checkpoint {seq}: signed by {signer}, not by the chain's identity {identity}"
        ));
    }
    let leaf = chain
        .first()
        .ok_or_else(|| format!("checkpoint {seq}: no certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| format!("checkpoint {seq}: unparsable certificate"))?;
    let statement = Checkpoint {
        writer: str_of(writer, "proxy_id"),
        epoch: str_of(writer, "epoch"),
        seq: u64::try_from(seq).unwrap_or(0),
        hash: str_of(cp, "hash"),
        time_ms,
    };
    let signature = STANDARD
        .decode(str_of(cp, "signature"))
        .map_err(|_| format!("checkpoint {seq}: signature is not base64"))?;
    if !statement.verify(
        &identity,
        &cert.public_key().subject_public_key.data,
        &signature,
    ) {
        return Err(format!(
            "checkpoint {seq}: signature does not verify (the checkpoint was forged or altered)"
        ));
    }
    Ok(statement)
}

/// Checks a checkpoint's signature, then compares it with the record the control plane holds.
fn checkpoint_problem(validator: &SvidValidator, writer: &Value, cp: &Value) -> Result<(), String> {
    let statement = signature_problem(validator, writer, cp)?;
    let seq = statement.seq;
    let head = writer.get("head").and_then(Value::as_u64).unwrap_or(0);
    match cp.get("stored_hash").and_then(Value::as_str) {
        Some(h) if h == statement.hash => Ok(()),
        Some(_) => Err(format!(
            "record {seq} does not match its signed checkpoint: records up to {seq} were altered and the chain recomputed"
        )),
        None if seq > head => Err(format!(
            "tail truncated after checkpoint {seq}: the stored chain ends at record {head}"
        )),
        None => Err(format!(
            "record {seq}, covered by a signed checkpoint, is missing"
        )),
    }
}

/// How long records may wait for a signed checkpoint before their lack of one is reported
/// (proxies sign every 10 s or 1,000 records, and when idle).
pub const UNSIGNED_GRACE_MS: i64 = 5 * 60 * 1000;

/// Checks every checkpoint of one writer (as `GET /v1/audit/verify` lists it) against
/// `bundle`; the first problem wins.
pub fn check_writer(bundle: &[CertificateDer<'static>], writer: &Value) -> CheckpointReport {
    let mut report = check_signatures(bundle, writer);
    // Records of a format-2 chain (it has an epoch) older than the grace period with no
    // checkpoint covering them: their checkpoints were deleted, or the writer never signed.
    let format2 = writer.get("epoch").is_some_and(|e| !e.is_null());
    if report.problem.is_none()
        && format2
        && let Some(from) = writer.get("uncovered_from_ms").and_then(Value::as_i64)
    {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if now_ms - from > UNSIGNED_GRACE_MS {
            report.problem = Some(format!(
                "records stored since {from} (Unix ms) are covered by no signed checkpoint (checkpoints deleted, or the writer never signed)"
            ));
        }
    }
    report
}

/// Checks SVIDs against the bundle the operator gave.
fn validator(bundle: &[CertificateDer<'static>]) -> Result<SvidValidator, String> {
    TrustBundle::from_roots(bundle.to_vec())
        .map(SvidValidator::new)
        .map_err(|e| format!("the trust bundle given is unusable: {e}"))
}

fn check_signatures(bundle: &[CertificateDer<'static>], writer: &Value) -> CheckpointReport {
    let mut report = CheckpointReport::default();
    let cps = writer
        .get("checkpoints")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if cps.is_empty() {
        return report;
    }
    let validator = match validator(bundle) {
        Ok(v) => v,
        Err(e) => {
            report.problem = Some(e);
            return report;
        }
    };
    for cp in cps {
        match checkpoint_problem(&validator, writer, cp) {
            Ok(()) => {
                report.good += 1;
                let seq = cp.get("seq").and_then(Value::as_i64).unwrap_or(0);
                if seq >= report.signed_through {
                    report.signed_through = seq;
                    let mut head = cp.clone();
                    if let Some(o) = head.as_object_mut() {
                        o.remove("stored_hash");
                        for k in ["writer", "identity", "proxy_id", "epoch"] {
                            o.insert(k.to_owned(), writer.get(k).cloned().unwrap_or(Value::Null));
                        }
                    }
                    report.head = Some(head);
                }
            }
            Err(p) => {
                report.problem = Some(p);
                return report;
            }
        }
    }
    report
}

/// One line of `audit verify` output for a writer.
pub fn summary(writer: &Value, report: &CheckpointReport) -> Value {
    json!({"signed_checkpoints": report.good, "signed_through": report.signed_through,
           "checkpoint_problem": report.problem, "records": writer.get("records")})
}

/// Whether a chain is the control plane's: its writer name, and the control plane's own
/// SPIFFE ID (`spiffe://TD/castellan/server`, which no workload SVID can hold) as the identity
/// its checkpoints are signed by.
fn is_control_plane(w: &Value) -> bool {
    w.get("proxy_id").and_then(Value::as_str) == Some(castellan_server::ADMIN_CHAIN_WRITER)
        && w.get("identity")
            .and_then(Value::as_str)
            .and_then(|id| id.strip_prefix("spiffe://"))
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, path)| path == "castellan/server")
}

/// The newest cut of a purge the control plane recorded and signed: records older than it
/// may be gone. A purge counts only from a control-plane chain that verified and whose
/// signed checkpoints cover its record — an insider can write the database, not the
/// control plane's signature — and its cut is never later than the purge itself.
pub fn audited_purge_cut(writers: &[Value], reports: &[CheckpointReport]) -> Option<i64> {
    writers
        .iter()
        .zip(reports)
        .filter(|(w, r)| {
            is_control_plane(w) && w.get("ok") == Some(&Value::Bool(true)) && r.problem.is_none()
        })
        .flat_map(|(w, r)| {
            w.get("purges")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|p| {
                    p.get("seq")
                        .and_then(Value::as_i64)
                        .is_some_and(|s| s <= r.signed_through)
                })
        })
        .filter(|p| p.get("status").and_then(Value::as_u64) == Some(200))
        .filter_map(|p| {
            let before = p.get("before_ms").and_then(Value::as_i64)?;
            let at = p.get("time_ms").and_then(Value::as_i64)?;
            Some(before.min(at))
        })
        .max()
}

fn checkpoint_at(writer: &Value, seq: i64) -> Option<&Value> {
    writer
        .get("checkpoints")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("seq").and_then(Value::as_i64) == Some(seq))
}

/// A chain that starts after a checkpoint (its older records deleted) that no audited purge
/// allows: the purge deletes only records before checkpoints older than its cut.
pub fn unaudited_deletion(writer: &Value, purge_cut: Option<i64>) -> Option<String> {
    let through = writer
        .get("purged_through")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if through == 0 {
        return None;
    }
    let signed_at = checkpoint_at(writer, through)
        .and_then(|c| c.get("time_ms"))
        .and_then(Value::as_i64);
    match (purge_cut, signed_at) {
        (Some(cut), Some(t)) if t < cut => None,
        _ => Some(format!(
            "records through {through} deleted without an audited purge (no signed `audit purge` cut is newer than checkpoint {through})"
        )),
    }
}

/// Compares signed heads exported earlier (`audit verify --export-heads`) with what the
/// database holds now. Each head's signature is checked against `bundle`; then its chain
/// must still hold that checkpoint with the same hash, or have purged it under an audited
/// purge. Anything else means the database was rolled back or rewritten since the export.
pub fn compare_heads(
    bundle: &[CertificateDer<'static>],
    exported: &[Value],
    writers: &[Value],
    purge_cut: Option<i64>,
) -> Vec<String> {
    let validator = match validator(bundle) {
        Ok(v) => v,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    for h in exported {
        let name = h.get("writer").and_then(Value::as_str).unwrap_or_default();
        let statement = match signature_problem(&validator, h, h) {
            Ok(s) => s,
            Err(p) => {
                problems.push(format!("exported head of {name}: {p}"));
                continue;
            }
        };
        let seq = i64::try_from(statement.seq).unwrap_or(i64::MAX);
        // A purge keeps the checkpoint it purged through, so a chain never disappears whole.
        let Some(w) = writers
            .iter()
            .find(|w| w.get("writer").and_then(Value::as_str) == Some(name))
        else {
            problems.push(format!(
                "{name}: the exported head (record {seq}) is gone: the chain is missing from the database (rolled back or deleted)"
            ));
            continue;
        };
        let head = w.get("head").and_then(Value::as_i64).unwrap_or(0);
        // Checkpoints before the one a chain now starts from go with an audited purge.
        let purged = w
            .get("purged_through")
            .and_then(Value::as_i64)
            .is_some_and(|through| through >= seq)
            && unaudited_deletion(w, purge_cut).is_none();
        match checkpoint_at(w, seq) {
            Some(cp) if cp.get("hash").and_then(Value::as_str) == Some(&statement.hash) => {}
            Some(_) => problems.push(format!(
                "{name}: checkpoint {seq} differs from the exported head (the chain was rewritten)"
            )),
            None if seq > head => problems.push(format!(
                "{name}: rolled back: the exported head is record {seq}, the database ends at record {head}"
            )),
            None if purged => {}
            None => problems.push(format!(
                "{name}: checkpoint {seq} of the exported head is missing"
            )),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(identity: &str, purge: Value) -> Value {
        json!({"proxy_id": "castellan-server", "identity": identity, "ok": true, "purges": [purge]})
    }

    #[test]
    fn only_the_control_planes_signed_purges_set_the_cut() {
        let report = CheckpointReport {
            signed_through: 5,
            ..CheckpointReport::default()
        };
        let purge = json!({"seq": 5, "before_ms": 9000, "time_ms": 10_000, "status": 200});
        let cp = "spiffe://demo.castellan/castellan/server";
        let cut = |w: Value, r: &CheckpointReport| audited_purge_cut(&[w], std::slice::from_ref(r));
        assert_eq!(cut(chain(cp, purge.clone()), &report), Some(9000));
        // A chain named like the control plane's, signed by a workload.
        assert_eq!(
            cut(
                chain("spiffe://demo.castellan/svc/orders", purge.clone()),
                &report
            ),
            None
        );
        // A purge record not covered by a good signature.
        let unsigned = CheckpointReport {
            signed_through: 4,
            ..CheckpointReport::default()
        };
        assert_eq!(cut(chain(cp, purge), &unsigned), None);
        // A cut later than the purge itself counts only up to the purge.
        let late = json!({"seq": 5, "before_ms": 99_999_999, "time_ms": 10_000, "status": 200});
        assert_eq!(cut(chain(cp, late), &report), Some(10_000));
        // A refused purge does not count.
        let refused = json!({"seq": 5, "before_ms": 9000, "time_ms": 10_000, "status": 400});
        assert_eq!(cut(chain(cp, refused), &report), None);
    }
}
