//! Castellan's audit trail: one record per decision, hash-chained per writer (each record
//! carries its sequence number and the previous record's hash), spooled to local disk before the
//! response completes, and verifiable by anyone holding the records: an altered, deleted or
//! reordered record breaks the chain at a place [`verify_chain`] names.

pub mod spool;

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
}

/// One audit record (product.md §6). Field order is the hash's canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// The enforcement point that wrote it (proxy id).
    pub writer: String,
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
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl AuditRecord {
    /// The hash this record should carry.
    pub fn compute_hash(&self) -> String {
        let mut copy = self.clone();
        copy.hash = String::new();
        let json = serde_json::to_vec(&copy).unwrap_or_default();
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
    /// Chains an entry (or a gap of `lost` records) after this head and advances it.
    pub fn chain(&mut self, writer: &str, kind: Kind, e: Entry, lost: u64) -> AuditRecord {
        let mut r = AuditRecord {
            writer: writer.to_owned(),
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
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        self.seq = r.seq;
        self.hash = r.hash.clone();
        r
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

/// Verifies one writer's records fed in storage order (by `seq`), one at a time, so a long
/// chain can be read in pages.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    prev: Option<(u64, String)>,
    count: u64,
}

impl ChainVerifier {
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

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut h = Head::default();
        (0..n)
            .map(|i| {
                h.chain(
                    "w",
                    Kind::Decision,
                    Entry {
                        decision_id: format!("d{i}"),
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
        let mut with_gap = vec![h.chain("w", Kind::Decision, Entry::default(), 0)];
        with_gap.push(h.chain("w", Kind::Gap, Entry::default(), 7));
        assert_eq!(
            verify_chain(&with_gap),
            Err(ChainError::Gap { seq: 2, lost: 7 })
        );
    }
}
