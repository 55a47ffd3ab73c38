//! Signed checkpoints: a writer states, with its SVID key, "chain (identity, writer, epoch) had
//! record `seq` with hash `hash`". The control plane stores them beside the records; whoever
//! verifies later checks the signature against a trust bundle of their own choosing. An insider
//! who edits records and recomputes the chain, or cuts its tail, cannot make the stored records
//! agree with a signature only the workload's key could make.

use serde::{Deserialize, Serialize};

/// One signed statement of a chain's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The proxy id.
    pub writer: String,
    /// The epoch.
    pub epoch: String,
    /// The record it covers (every record up to it).
    pub seq: u64,
    /// That record's hash.
    pub hash: String,
    /// When it was signed (Unix ms).
    pub time_ms: i64,
}

impl Checkpoint {
    /// The exact bytes signed: a versioned JSON statement that also names the signer's SPIFFE
    /// ID, so a checkpoint cannot be moved to another identity's chain.
    pub fn signed_bytes(&self, identity: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "castellan_audit_checkpoint": 1,
            "identity": identity,
            "writer": self.writer,
            "epoch": self.epoch,
            "seq": self.seq,
            "hash": self.hash,
            "time_ms": self.time_ms,
        }))
        .unwrap_or_default()
    }

    /// Checks an ECDSA P-256 / SHA-256 signature (fixed-size r‖s) over
    /// [`signed_bytes`](Self::signed_bytes) with `public_key` (the uncompressed point of the
    /// signer's certificate).
    pub fn verify(&self, identity: &str, public_key: &[u8], signature: &[u8]) -> bool {
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            public_key,
        )
        .verify(&self.signed_bytes(identity), signature)
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    #[test]
    fn signatures_bind_every_field_and_the_identity() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let cp = Checkpoint {
            writer: "gw".to_owned(),
            epoch: "e1".to_owned(),
            seq: 8,
            hash: "ab".repeat(32),
            time_ms: 1,
        };
        let id = "spiffe://example.org/svc/gateway";
        let sig = key.sign(&rng, &cp.signed_bytes(id)).unwrap();
        let public = key.public_key().as_ref();
        assert!(cp.verify(id, public, sig.as_ref()));
        assert!(!cp.verify("spiffe://example.org/svc/orders", public, sig.as_ref()));
        for altered in [
            Checkpoint {
                seq: 9,
                ..cp.clone()
            },
            Checkpoint {
                hash: "cd".repeat(32),
                ..cp.clone()
            },
            Checkpoint {
                epoch: "e2".to_owned(),
                ..cp.clone()
            },
            Checkpoint {
                writer: "x".to_owned(),
                ..cp.clone()
            },
        ] {
            assert!(!altered.verify(id, public, sig.as_ref()), "{altered:?}");
        }
    }
}
