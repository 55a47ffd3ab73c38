//! The control plane's own audit chain: every admin action (policy apply and rollback,
//! registrations, revocations, credentials created or revoked, rotations) is a record in a
//! chain written by this process — (`castellan-server`, its SPIFFE ID, an epoch per start) —
//! stored before the action's response is sent, and covered by a checkpoint signed with the
//! control plane's serving SVID key, so `castellan audit verify` checks it like any proxy's.

use crate::{Server, unix_now};
use base64::Engine as _;
use castellan_audit::{AuditRecord, Checkpoint, Entry, Head, Kind};
use castellan_store::{AuditRow, CheckpointRow};

/// The writer name of the control plane's chain.
pub const WRITER: &str = "castellan-server";

/// This process's chain.
#[derive(Debug)]
pub(crate) struct AdminChain {
    epoch: String,
    head: tokio::sync::Mutex<Head>,
}

impl AdminChain {
    pub(crate) fn new() -> AdminChain {
        AdminChain {
            epoch: castellan_audit::new_epoch(unix_now() * 1000),
            head: tokio::sync::Mutex::new(Head::default()),
        }
    }
}

impl Server {
    /// Records an admin action (`action` on `object` by admin `who`, answered with `status`)
    /// in the control plane's chain, with a signed checkpoint. Failing to record is an error
    /// the caller returns: an admin action is never silently unrecorded.
    pub(crate) async fn record_admin(
        &self,
        who: &str,
        action: &str,
        object: &str,
        status: u16,
    ) -> Result<(), crate::problem::Problem> {
        let id = self
            .spiffe_id()
            .map_err(crate::problem::Problem::internal)?;
        let key = crate::audit::chain_key(WRITER, &id, &self.admin_chain.epoch);
        // INVARIANT: the head lock is held until the record is stored, so records of this
        // chain are stored in sequence order.
        let mut head = self.admin_chain.head.lock().await;
        let mut next = head.clone();
        let r: AuditRecord = next.chain(
            WRITER,
            &self.admin_chain.epoch,
            Kind::Admin,
            Entry {
                // Milliseconds: `audit verify` compares a purge's time with checkpoints'.
                time_ms: crate::unix_now_ms(),
                decision_id: crate::keys::random_id(9)
                    .map_err(crate::problem::Problem::internal)?,
                source: id.as_str().to_owned(),
                user: who.to_owned(),
                destination: "castellan-server".to_owned(),
                method: action.to_owned(),
                path: object.to_owned(),
                decision: "allow".to_owned(),
                reason: "admin-action".to_owned(),
                status,
                ..Entry::default()
            },
            0,
        );
        let record = serde_json::to_string(&r).map_err(crate::problem::Problem::internal)?;
        let seq = i64::try_from(r.seq).map_err(crate::problem::Problem::internal)?;
        self.store
            .insert_audit(&[AuditRow {
                writer: key.clone(),
                seq,
                record,
                time_ms: r.time_ms,
                source: r.source.clone(),
                user_sub: r.user.clone(),
                destination: r.destination.clone(),
                decision: r.decision.clone(),
                rule: String::new(),
            }])
            .await?;
        *head = next;
        // Signed with the serving SVID's key: an insider rewriting this chain cannot re-sign.
        let (chain, key_pkcs8) = self
            .serving
            .lock()
            .map_err(|_| crate::problem::Problem::internal("lock poisoned"))?
            .identity();
        let cp = Checkpoint {
            writer: WRITER.to_owned(),
            epoch: self.admin_chain.epoch.clone(),
            seq: r.seq,
            hash: r.hash.clone(),
            time_ms: r.time_ms,
        };
        let signer = castellan_identity::ContextSigner::new(id.clone(), &chain, &key_pkcs8)
            .map_err(crate::problem::Problem::internal)?;
        let signature = signer
            .sign_detached(&cp.signed_bytes(id.as_str()))
            .map_err(crate::problem::Problem::internal)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.store
            .add_audit_checkpoints(&[CheckpointRow {
                writer: key,
                seq,
                hash: r.hash,
                time_ms: r.time_ms,
                signature: b64.encode(signature),
                cert_chain: serde_json::to_string(
                    &chain
                        .iter()
                        .map(|c| b64.encode(c.as_ref()))
                        .collect::<Vec<_>>(),
                )
                .map_err(crate::problem::Problem::internal)?,
            }])
            .await?;
        Ok(())
    }
}
