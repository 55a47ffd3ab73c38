//! Castellan's audit trail: one record per decision, hash-chained per writer (each record
//! carries its sequence number and the previous record's hash), spooled to local disk before the
//! response completes, and verifiable by anyone holding the records: an altered, deleted or
//! reordered record breaks the chain at a place [`verify_chain`] names.

pub mod checkpoint;
pub mod spool;

pub use checkpoint::Checkpoint;

use serde::{Deserialize, Serialize};

/// `prev_hash` of a writer's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One decision.
    Decision,
    /// Records the writer could not keep (its spool was full): `lost` says how many.
    Gap,
    /// A control-plane admin action (format 2): `user` is the admin, `method` the action,
    /// `path` its object.
    Admin,
}

/// `origin` of a decision asked through an API (AuthZEN), not taken on traffic.
pub const ORIGIN_API: &str = "authzen";

/// The record format this crate writes.
pub const FORMAT: u8 = 2;

fn format_v1() -> u8 {
    1
}

fn is_v1(v: &u8) -> bool {
    *v == 1
}

/// One audit record (product.md §6). Field order is the hash's canonical order. Fields added
/// in format 2 are left out of a v1 record's JSON, so v1 records hash as they always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Record format: 1 (no epoch) or [`FORMAT`].
    #[serde(default = "format_v1", skip_serializing_if = "is_v1")]
    pub v: u8,
    /// The enforcement point that wrote it (proxy id).
    pub writer: String,
    /// The writer's process start this chain belongs to (format 2): every start opens a new
    /// chain, so a restart with an empty spool, or two processes given one id, never collide.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    /// 1, 2, 3, … per writer.
    pub seq: u64,
    /// The previous record's `hash` ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// Decision or gap.
    pub kind: Kind,
    /// Unix milliseconds.
    pub time_ms: i64,
    /// The decision id (also in the response).
    pub decision_id: String,
    /// W3C trace id, if the request carried one.
    pub trace_id: String,
    /// Calling workload's SPIFFE ID.
    pub source: String,
    /// End user (`sub`).
    pub user: String,
    /// Destination service.
    pub destination: String,
    /// HTTP method.
    pub method: String,
    /// Normalized path (or the raw target when it was malformed).
    pub path: String,
    /// allow or deny.
    pub decision: String,
    /// Deciding rule, if any.
    pub rule: String,
    /// Why (matched-allow, no-matching-allow, rate-limited, …).
    pub reason: String,
    /// enforce or audit.
    pub mode: String,
    /// HTTP status sent.
    pub status: u16,
    /// Time spent deciding and forwarding, microseconds.
    pub latency_us: u64,
    /// Gap records: how many records were lost.
    pub lost: u64,
    /// Format 2: who acted on the user's behalf (delegation chain), nearest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act: Vec<String>,
    /// Format 2: where the decision was asked. Empty: traffic a Castellan proxy enforced;
    /// `ext_authz` / `forward_auth`: traffic another proxy enforced on this answer;
    /// [`ORIGIN_API`]: a question asked through an API (AuthZEN), not traffic — traffic views
    /// (graph, reports, anomalies, replay) leave these out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
    /// Format 2, decisions asked through an API: the identity that asked (the PEP's SPIFFE ID
    /// or OAuth client id), so every answer names who relied on it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub asked_by: String,
    /// Format 2: what the decision read beyond the fields above, so it can be replayed against
    /// another policy (`castellan policy impact`). Absent on refusals before a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Inputs>,
    /// SHA-256 (hex) over every field above, in this order, as JSON.
    pub hash: String,
}

/// The fields of a decision record before it is chained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// Unix milliseconds.
    pub time_ms: i64,
    /// Decision id.
    pub decision_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Source SPIFFE ID.
    pub source: String,
    /// User.
    pub user: String,
    /// Destination service.
    pub destination: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// allow / deny.
    pub decision: String,
    /// Rule.
    pub rule: String,
    /// Reason.
    pub reason: String,
    /// Mode.
    pub mode: String,
    /// Status.
    pub status: u16,
    /// Latency, µs.
    pub latency_us: u64,
    /// Delegation chain.
    pub act: Vec<String>,
    /// Where the decision was asked (see [`AuditRecord::origin`]).
    pub origin: String,
    /// Who asked (see [`AuditRecord::asked_by`]).
    pub asked_by: String,
    /// What the decision read (see [`AuditRecord::inputs`]).
    pub inputs: Option<Inputs>,
}

/// The inputs of a decision a record keeps for replay, after redaction. `path` (with its
/// query, secret values masked) and the caller, user and destination are the record's own
/// fields; path parameters are derived from the path again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// The end user's roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The end user's claims (registered claims left out).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The request's host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The header names the policy in force could read (lower-case), or `["*"]` for all but
    /// credentials; a candidate that reads another header cannot be replayed on this record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_headers: Vec<String>,
    /// Those of them the request carried, with their values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Lower-case hex of `b` (one allocation: this runs for every record written and ingested).
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 * b.len());
    hex_into(b, &mut s);
    s
}

/// The bytes a hex text spells (either case), or `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(i * 2..i * 2 + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// Appends lowercase hex of `b` to `s`.
fn hex_into(b: &[u8], s: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    s.reserve(2 * b.len());
    for x in b {
        for nibble in [x >> 4, x & 15] {
            s.push(char::from(
                DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
}

impl AuditRecord {
    /// Whether the record is of enforced traffic (a decision some proxy acted on), not of a
    /// question asked through an API.
    pub fn is_traffic(&self) -> bool {
        self.kind == Kind::Decision && self.origin != ORIGIN_API
    }

    /// The hash this record should carry.
    pub fn compute_hash(&self) -> String {
        // `hash` is the last field: serialize once and empty it in place of cloning the
        // record (ingest checks every record this way).
        let mut json = serde_json::to_vec(self).unwrap_or_default();
        let tail = format!(
            "\"hash\":{}}}",
            serde_json::to_string(&self.hash).unwrap_or_default()
        );
        if json.ends_with(tail.as_bytes()) {
            json.truncate(json.len() - tail.len());
            json.extend_from_slice(b"\"hash\":\"\"}");
        } else {
            let mut copy = self.clone();
            copy.hash = String::new();
            json = serde_json::to_vec(&copy).unwrap_or_default();
        }
        hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json).as_ref())
    }
}

/// A writer's chain head: what the next record links to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Last sequence number written (0: none).
    pub seq: u64,
    /// Last hash written ([`GENESIS`]: none).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

impl Head {
    /// Chains an entry (or a gap of `lost` records) after this head and advances it, as a
    /// format-2 record of `writer`'s chain `epoch`.
    pub fn chain(
        &mut self,
        writer: &str,
        epoch: &str,
        kind: Kind,
        e: Entry,
        lost: u64,
    ) -> AuditRecord {
        let mut r = self.record(writer, epoch, kind, e, lost);
        r.hash = r.compute_hash();
        self.seq = r.seq;
        self.hash = r.hash.clone();
        r
    }

    /// The next record after this head, its `hash` empty.
    fn record(&self, writer: &str, epoch: &str, kind: Kind, e: Entry, lost: u64) -> AuditRecord {
        AuditRecord {
            v: FORMAT,
            writer: writer.to_owned(),
            epoch: epoch.to_owned(),
            seq: self.seq + 1,
            prev_hash: self.hash.clone(),
            kind,
            time_ms: e.time_ms,
            decision_id: e.decision_id,
            trace_id: e.trace_id,
            source: e.source,
            user: e.user,
            destination: e.destination,
            method: e.method,
            path: e.path,
            decision: e.decision,
            rule: e.rule,
            reason: e.reason,
            mode: e.mode,
            status: e.status,
            latency_us: e.latency_us,
            lost,
            act: e.act,
            origin: e.origin,
            asked_by: e.asked_by,
            inputs: e.inputs,
            hash: String::new(),
        }
    }

    /// [`Head::chain`], appending the record's JSON line (with its newline) to `out` from the
    /// one serialization that is also hashed: `hash` is the last field, so the line is the
    /// hashed JSON with the empty `"hash":""` filled in. Returns the record's sequence number.
    pub fn chain_into(
        &mut self,
        writer: &str,
        epoch: &str,
        kind: Kind,
        e: Entry,
        lost: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64, serde_json::Error> {
        let start = out.len();
        let mut r = self.record(writer, epoch, kind, e, lost);
        serde_json::to_writer(&mut *out, &r)?;
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            out.get(start..).unwrap_or_default(),
        );
        const EMPTY_HASH: &[u8] = b"\"hash\":\"\"}";
        // The previous hash's buffer becomes the new head's.
        let mut hash = std::mem::take(&mut r.prev_hash);
        hash.clear();
        hex_into(digest.as_ref(), &mut hash);
        if out.ends_with(EMPTY_HASH) {
            out.truncate(out.len() - 2);
            out.extend_from_slice(hash.as_bytes());
            out.extend_from_slice(b"\"}\n");
        } else {
            // Not reachable with serde_json's field order; serialize again.
            out.truncate(start);
            r.prev_hash.clone_from(&self.hash);
            r.hash.clone_from(&hash);
            serde_json::to_writer(&mut *out, &r)?;
            out.push(b'\n');
        }
        self.seq = r.seq;
        self.hash = hash;
        Ok(r.seq)
    }
}

/// What is wrong with a writer's chain, at the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The record's content does not match its hash.
    #[error("record {seq} was altered (its hash does not match its content)")]
    Altered {
        /// Sequence number.
        seq: u64,
    },
    /// Records are missing before this one.
    #[error("records {from}..{to} are missing (deleted) before record {to_next}")]
    Missing {
        /// First missing.
        from: u64,
        /// Last missing.
        to: u64,
        /// The record after them.
        to_next: u64,
    },
    /// The record does not link to the one stored before it.
    #[error("record {seq} does not follow record {prev} (reordered or replaced)")]
    Broken {
        /// This record.
        seq: u64,
        /// The one before it in storage order.
        prev: u64,
    },
    /// The writer reported lost records.
    #[error("record {seq} reports a gap: {lost} record(s) lost by the writer")]
    Gap {
        /// Sequence number of the gap record.
        seq: u64,
        /// How many were lost.
        lost: u64,
    },
}

/// Why a shipped batch does not continue the stored chain (checked on ingest, before anything
/// is stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// A record's content does not match its hash.
    #[error("record {seq} does not match its hash")]
    BadHash {
        /// Sequence number it claims.
        seq: u64,
    },
    /// Not the next sequence number.
    #[error("expected record {expected}, received record {received}")]
    Position {
        /// Stored head + 1.
        expected: u64,
        /// What the batch holds there.
        received: u64,
    },
    /// Does not link to the stored head.
    #[error(
        "record {seq} does not link to the stored head (prev_hash {received}, head hash {expected})"
    )]
    Link {
        /// Sequence number.
        seq: u64,
        /// The stored head's hash.
        expected: String,
        /// The record's `prev_hash`.
        received: String,
    },
    /// A field that must be the batch's (writer, epoch, format) is not.
    #[error("record {seq}: {what}")]
    Field {
        /// Sequence number.
        seq: u64,
        /// What is wrong.
        what: String,
    },
}

impl Head {
    /// Checks that `r` is the next record of the chain `(writer, epoch)` after this head and
    /// advances the head. Gap records are accepted here (they are explicit; `verify` reports
    /// them).
    pub fn accept(
        &mut self,
        writer: &str,
        epoch: &str,
        r: &AuditRecord,
    ) -> Result<(), IngestError> {
        let field = |what: String| IngestError::Field { seq: r.seq, what };
        if r.v != FORMAT {
            return Err(field(format!(
                "record format {} (this server takes {FORMAT})",
                r.v
            )));
        }
        if r.kind == Kind::Admin {
            // Admin-action records are written by the control plane itself, never shipped.
            return Err(field(
                "admin records are not accepted from proxies".to_owned(),
            ));
        }
        if r.writer != writer {
            return Err(field(format!(
                "writer {:?} in a batch of {writer:?}",
                r.writer
            )));
        }
        if r.epoch != epoch {
            return Err(field(format!(
                "epoch {:?} in a batch of epoch {epoch:?}",
                r.epoch
            )));
        }
        if r.seq != self.seq + 1 {
            return Err(IngestError::Position {
                expected: self.seq + 1,
                received: r.seq,
            });
        }
        if r.prev_hash != self.hash {
            return Err(IngestError::Link {
                seq: r.seq,
                expected: self.hash.clone(),
                received: r.prev_hash.clone(),
            });
        }
        if r.hash != r.compute_hash() {
            return Err(IngestError::BadHash { seq: r.seq });
        }
        // Fields read by views and rollups are from closed sets (no markup, no surprises).
        if !matches!(
            r.origin.as_str(),
            "" | "ext_authz" | "forward_auth" | ORIGIN_API
        ) {
            return Err(field(format!("unknown origin {:?}", r.origin)));
        }
        if r.kind == Kind::Decision && !matches!(r.decision.as_str(), "allow" | "deny") {
            return Err(field(format!(
                "decision {:?} is not allow or deny",
                r.decision
            )));
        }
        self.seq = r.seq;
        self.hash.clone_from(&r.hash);
        Ok(())
    }
}

/// Whether `s` is a well-formed proxy id or epoch: 1–128 of `[A-Za-z0-9._-]` (no spaces, so
/// the stored chain key `"<proxy id> <SPIFFE ID> <epoch>"` splits one way only).
pub fn is_plain_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The prefix of a pseudonymised `user`.
pub const PSEUDONYM_PREFIX: &str = "hmac:";

/// Keyed pseudonym of an end user (`hmac:` + 128 bits of HMAC-SHA256, hex): the same user
/// always maps to the same pseudonym under one key, so an auditor holding the key can find a
/// user's records (`castellan audit pseudonym`) and correlate without reading identities.
pub fn pseudonym(key: &[u8], user: &str) -> String {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let mut msg = Vec::with_capacity(user.len() + 32);
    msg.extend_from_slice(b"castellan user pseudonym\0");
    msg.extend_from_slice(user.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&k, &msg);
    format!(
        "{PSEUDONYM_PREFIX}{}",
        hex(tag.as_ref().get(..16).unwrap_or_default())
    )
}

/// A fresh epoch: the start time (ms, hex, so epochs sort by start) and 64 random bits.
pub fn new_epoch(now_ms: i64) -> String {
    let mut r = [0u8; 8];
    // INVARIANT: aws-lc's system RNG does not fail on supported platforms; if it ever did,
    // the time part alone still separates process starts a millisecond apart.
    let _ = aws_lc_rs::rand::fill(&mut r);
    format!("{now_ms:012x}-{}", hex(&r))
}

/// Verifies one writer's records fed in storage order (by `seq`), one at a time, so a long
/// chain can be read in pages.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    prev: Option<(u64, String)>,
    count: u64,
}

impl ChainVerifier {
    /// A verifier continuing after record `seq` whose hash is `hash` — where a chain purged up
    /// to a signed checkpoint starts again.
    pub fn resume(seq: u64, hash: &str) -> ChainVerifier {
        ChainVerifier {
            prev: Some((seq, hash.to_owned())),
            count: 0,
        }
    }

    /// Checks the next record; the first problem is the answer.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), ChainError> {
        if r.hash != r.compute_hash() {
            return Err(ChainError::Altered { seq: r.seq });
        }
        let (want_seq, want_hash) = self
            .prev
            .as_ref()
            .map_or((1, GENESIS), |(s, h)| (s + 1, h.as_str()));
        if r.seq > want_seq {
            return Err(ChainError::Missing {
                from: want_seq,
                to: r.seq - 1,
                to_next: r.seq,
            });
        }
        if r.seq < want_seq || r.prev_hash != want_hash {
            return Err(ChainError::Broken {
                seq: r.seq,
                prev: self.prev.as_ref().map_or(0, |(s, _)| *s),
            });
        }
        if r.kind == Kind::Gap {
            return Err(ChainError::Gap {
                seq: r.seq,
                lost: r.lost,
            });
        }
        self.prev = Some((r.seq, r.hash.clone()));
        self.count += 1;
        Ok(())
    }

    /// Records verified so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Verifies one writer's records in storage order (by `seq`); the first problem wins.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64, ChainError> {
    let mut v = ChainVerifier::default();
    for r in records {
        v.push(r)?;
    }
    Ok(v.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_into_appends_the_chained_record_serialized_once() {
        let (mut a, mut b) = (Head::default(), Head::default());
        for i in 0..3 {
            let e = Entry {
                decision_id: format!("d{i}"),
                path: "/x?q=\"quoted\"".to_owned(),
                inputs: Some(Inputs {
                    roles: vec!["r".to_owned()],
                    ..Inputs::default()
                }),
                ..Entry::default()
            };
            let r = a.chain("w", "e", Kind::Decision, e.clone(), 0);
            // Appended after what the buffer holds (another record of the same group).
            let mut line = b"earlier\n".to_vec();
            let seq = b
                .chain_into("w", "e", Kind::Decision, e, 0, &mut line)
                .unwrap();
            assert_eq!(seq, r.seq);
            let line = line.strip_prefix(b"earlier\n").unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            let parsed: AuditRecord = serde_json::from_slice(line).unwrap();
            assert_eq!(parsed, r);
            assert_eq!(parsed.compute_hash(), parsed.hash);
        }
        assert_eq!(a, b);
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut h = Head::default();
        (0..n)
            .map(|i| {
                h.chain(
                    "w",
                    "e1",
                    Kind::Decision,
                    Entry {
                        decision_id: format!("d{i}"),
                        decision: "allow".to_owned(),
                        status: 200,
                        ..Entry::default()
                    },
                    0,
                )
            })
            .collect()
    }

    #[test]
    fn alteration_deletion_reordering_and_gaps_are_named() {
        let good = chain(5);
        assert_eq!(verify_chain(&good), Ok(5));
        let mut altered = good.clone();
        altered[2].status = 403;
        assert_eq!(verify_chain(&altered), Err(ChainError::Altered { seq: 3 }));
        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(
            verify_chain(&deleted),
            Err(ChainError::Missing {
                from: 2,
                to: 2,
                to_next: 3
            })
        );
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        assert_eq!(
            verify_chain(&swapped),
            Err(ChainError::Missing {
                from: 2,
                to: 2,
                to_next: 3
            })
        );
        // Swapping the contents but keeping the sequence numbers in place: the links break.
        let mut relabelled = good.clone();
        relabelled.swap(1, 2);
        relabelled[1].seq = 2;
        relabelled[1].hash = relabelled[1].compute_hash();
        assert!(matches!(
            verify_chain(&relabelled),
            Err(ChainError::Broken { seq: 2, .. })
        ));
        let mut deleted_last_rehashed = good.clone();
        deleted_last_rehashed[4].prev_hash = GENESIS.to_owned();
        deleted_last_rehashed[4].hash = deleted_last_rehashed[4].compute_hash();
        assert_eq!(
            verify_chain(&deleted_last_rehashed),
            Err(ChainError::Broken { seq: 5, prev: 4 })
        );
        let mut h = Head::default();
        let mut with_gap = vec![h.chain("w", "e1", Kind::Decision, Entry::default(), 0)];
        with_gap.push(h.chain("w", "e1", Kind::Gap, Entry::default(), 7));
        assert_eq!(
            verify_chain(&with_gap),
            Err(ChainError::Gap { seq: 2, lost: 7 })
        );
    }

    #[test]
    fn hash_in_place_equals_hash_of_an_emptied_copy() {
        let mut h = Head::default();
        let e = Entry {
            user: "a\"b\\c\u{1}".to_owned(),
            inputs: Some(Inputs {
                roles: vec!["r".to_owned()],
                ..Inputs::default()
            }),
            ..Entry::default()
        };
        let mut r = h.chain("w", "e", Kind::Decision, e, 0);
        let slow = |r: &AuditRecord| {
            let mut c = r.clone();
            c.hash = String::new();
            hex(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                &serde_json::to_vec(&c).unwrap_or_default(),
            )
            .as_ref())
        };
        assert_eq!(r.compute_hash(), slow(&r));
        // Whatever a forger puts in `hash`, the same content hashes the same.
        for forged in ["", "\"}", "x\\\"hash\":\"\"}"] {
            r.hash = forged.to_owned();
            assert_eq!(r.compute_hash(), slow(&r), "{forged:?}");
        }
    }

    #[test]
    fn v1_records_keep_their_hash() {
        // A record as the previous release wrote it (no `v`, no `epoch`).
        let v1 = r#"{"writer":"gw","seq":1,"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","kind":"decision","time_ms":1,"decision_id":"d","trace_id":"","source":"","user":"","destination":"","method":"GET","path":"/","decision":"allow","rule":"","reason":"","mode":"","status":200,"latency_us":1,"lost":0,"hash":""}"#;
        let mut r: AuditRecord = serde_json::from_str(v1).unwrap();
        assert_eq!((r.v, r.epoch.as_str()), (1, ""));
        r.hash = r.compute_hash();
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("\"v\"") && !text.contains("epoch"), "{text}");
        assert_eq!(verify_chain([&r]), Ok(1));
    }

    #[test]
    fn ingest_accepts_only_the_continuation_of_the_head() {
        let good = chain(4);
        let mut head = Head::default();
        for r in &good[..2] {
            head.accept("w", "e1", r).unwrap();
        }
        // Replayed, skipped ahead, forged link, altered, other writer or epoch: refused, head kept.
        let before = head.clone();
        assert_eq!(
            head.accept("w", "e1", &good[0]),
            Err(IngestError::Position {
                expected: 3,
                received: 1
            })
        );
        assert_eq!(
            head.accept("w", "e1", &good[3]),
            Err(IngestError::Position {
                expected: 3,
                received: 4
            })
        );
        let mut other = Head::default();
        let forged = other.chain("w", "e1", Kind::Decision, Entry::default(), 0);
        let mut forged3 = forged.clone();
        forged3.seq = 3;
        forged3.hash = forged3.compute_hash();
        assert!(matches!(
            head.accept("w", "e1", &forged3),
            Err(IngestError::Link { seq: 3, .. })
        ));
        let mut altered = good[2].clone();
        altered.status = 403;
        assert_eq!(
            head.accept("w", "e1", &altered),
            Err(IngestError::BadHash { seq: 3 })
        );
        assert!(matches!(
            head.accept("x", "e1", &good[2]),
            Err(IngestError::Field { .. })
        ));
        assert!(matches!(
            head.accept("w", "e2", &good[2]),
            Err(IngestError::Field { .. })
        ));
        assert_eq!(head, before);
        head.accept("w", "e1", &good[2]).unwrap();
        assert_eq!(head.seq, 3);
    }

    #[test]
    fn ids_and_epochs() {
        assert!(is_plain_id("orders-sidecar.1_a"));
        for bad in ["", "a b", "a\u{1b}[2J", "a/b", &"x".repeat(129)] {
            assert!(!is_plain_id(bad), "{bad:?}");
        }
        let (a, b) = (new_epoch(1), new_epoch(1));
        assert_ne!(a, b);
        assert!(is_plain_id(&a));
    }
}
