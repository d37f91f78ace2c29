//! The tamper-evident audit trail: a hash chain over every record, with checkpoints signed by an
//! audit key. Pure logic; storage appends and reads records, this module hashes and verifies.

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// Unix time in milliseconds.
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    /// A JSON document, stored as text so that its bytes are what was hashed.
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A signed statement that the chain up to `seq` ends in `hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub time: i64,
    /// SHA-256 of the audit key's SubjectPublicKeyInfo, hex.
    pub key_id: String,
    /// X.509-style signature (DER ECDSA or PKCS#1 v1.5), hex.
    pub signature: String,
    pub signature_algorithm: String,
}

/// The hash of a record: SHA-256 over an unambiguous encoding (a JSON array) of every field but
/// the hash itself.
pub fn record_hash(
    seq: i64,
    time: i64,
    actor: &str,
    action: &str,
    subject: &str,
    details: &str,
    prev_hash: &str,
) -> String {
    let encoded = serde_json::to_vec(&("pki-audit-v1", seq, time, actor, action, subject, details, prev_hash))
        .expect("tuples of strings and integers serialise");
    hex::encode(sha2::Sha256::digest(encoded))
}

impl AuditRecord {
    pub fn computed_hash(&self) -> String {
        self.computed_hash_at(self.seq)
    }

    fn computed_hash_at(&self, seq: i64) -> String {
        record_hash(seq, self.time, &self.actor, &self.action, &self.subject, &self.details, &self.prev_hash)
    }
}

/// The bytes an audit key signs for a checkpoint.
pub fn checkpoint_message(seq: i64, hash: &str) -> Vec<u8> {
    format!("pki-audit-checkpoint-v1:{seq}:{hash}").into_bytes()
}

/// What is wrong with a chain: the first problem found, naming the record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainProblem {
    #[error("audit record {seq} was altered: its content does not match its hash")]
    Altered { seq: i64 },
    #[error("audit record {seq} was reordered: it was written as record {written_as}")]
    Reordered { seq: i64, written_as: i64 },
    #[error("audit record {seq} is missing")]
    Missing { seq: i64 },
    #[error("audit record {seq} does not follow record {prev}: the chain was broken or a record replaced")]
    Unlinked { seq: i64, prev: i64 },
    #[error("audit records after {last} are missing: a signed checkpoint covers record {checkpoint}")]
    Truncated { last: i64, checkpoint: i64 },
    #[error("audit checkpoint at record {seq} is invalid: {why}")]
    Checkpoint { seq: i64, why: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub records: u64,
    pub checkpoints: u64,
    pub head_seq: i64,
    pub head_hash: String,
}

/// Walks records in `seq` order (as read by primary key) and checks each one's hash, its link
/// to the previous record and the sequence; then checks every checkpoint against the chain and
/// its signature with `audit_key`.
pub fn verify_chain(
    records: impl IntoIterator<Item = AuditRecord>,
    checkpoints: &[Checkpoint],
    audit_key: Option<&hsm::PublicKey>,
) -> Result<ChainReport, ChainProblem> {
    let mut report = ChainReport { head_hash: GENESIS.to_string(), ..Default::default() };
    let mut hashes = std::collections::HashMap::new();
    let mut expected = 1i64;
    let mut prev = GENESIS.to_string();
    for r in records {
        if r.seq > expected {
            return Err(ChainProblem::Missing { seq: expected });
        }
        if r.computed_hash() != r.hash {
            // A record moved to another position still hashes correctly at its old one.
            // Saturating: a tampered row may carry any seq, even i64::MIN.
            let written_as = (r.seq.saturating_sub(16)..=r.seq.saturating_add(16))
                .filter(|s| *s != r.seq && *s > 0)
                .find(|s| r.computed_hash_at(*s) == r.hash);
            return Err(match written_as {
                Some(written_as) => ChainProblem::Reordered { seq: r.seq, written_as },
                None => ChainProblem::Altered { seq: r.seq },
            });
        }
        if r.prev_hash != prev {
            return Err(ChainProblem::Unlinked { seq: r.seq, prev: r.seq.saturating_sub(1) });
        }
        prev = r.hash.clone();
        hashes.insert(r.seq, r.hash.clone());
        report.records += 1;
        report.head_seq = r.seq;
        expected = r.seq + 1;
    }
    report.head_hash = prev;
    for cp in checkpoints {
        let Some(h) = hashes.get(&cp.seq) else {
            return Err(ChainProblem::Truncated { last: report.head_seq, checkpoint: cp.seq });
        };
        if *h != cp.hash {
            return Err(ChainProblem::Checkpoint {
                seq: cp.seq,
                why: "the chain's hash at this record differs from the signed one".into(),
            });
        }
        if let Some(key) = audit_key {
            let key_id = hex::encode(key.fingerprint());
            if cp.key_id != key_id {
                return Err(ChainProblem::Checkpoint {
                    seq: cp.seq,
                    why: format!("signed by key {}, not the audit key {key_id}", cp.key_id),
                });
            }
            let sig = hex::decode(&cp.signature)
                .map_err(|_| ChainProblem::Checkpoint { seq: cp.seq, why: "signature is not hex".into() })?;
            key.verify(&cp.signature_algorithm, &checkpoint_message(cp.seq, &cp.hash), &sig)
                .map_err(|e| ChainProblem::Checkpoint { seq: cp.seq, why: e.to_string() })?;
        }
        report.checkpoints += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let details = format!("{{\"n\":{seq}}}");
                let hash = record_hash(seq, 1000 + seq, "alice", "test.action", "s", &details, &prev);
                let r = AuditRecord {
                    seq,
                    time: 1000 + seq,
                    actor: "alice".into(),
                    action: "test.action".into(),
                    subject: "s".into(),
                    details,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let r = verify_chain(chain(5), &[], None).unwrap();
        assert_eq!((r.records, r.head_seq), (5, 5));
    }

    #[test]
    fn names_the_first_altered_missing_reordered_or_unlinked_record() {
        let mut c = chain(6);
        c[2].details = "{\"n\":99}".into();
        assert_eq!(verify_chain(c, &[], None), Err(ChainProblem::Altered { seq: 3 }));

        let mut c = chain(6);
        c.remove(3);
        assert_eq!(verify_chain(c, &[], None), Err(ChainProblem::Missing { seq: 4 }));

        let mut c = chain(6);
        c.swap(1, 2);
        c[1].seq = 2;
        c[2].seq = 3;
        assert_eq!(verify_chain(c, &[], None), Err(ChainProblem::Reordered { seq: 2, written_as: 3 }));

        // A record rewritten with a fresh, self-consistent hash still breaks the next link.
        let mut c = chain(6);
        c[3].actor = "mallory".into();
        c[3].hash = c[3].computed_hash();
        assert_eq!(verify_chain(c, &[], None), Err(ChainProblem::Unlinked { seq: 5, prev: 4 }));
    }

    #[test]
    fn checkpoints_catch_truncation_and_rewrites() {
        let c = chain(6);
        let cp = Checkpoint {
            seq: 6,
            hash: c[5].hash.clone(),
            time: 0,
            key_id: String::new(),
            signature: String::new(),
            signature_algorithm: String::new(),
        };
        assert!(verify_chain(c.clone(), std::slice::from_ref(&cp), None).is_ok());
        let mut short = c.clone();
        short.truncate(4);
        assert_eq!(
            verify_chain(short, std::slice::from_ref(&cp), None),
            Err(ChainProblem::Truncated { last: 4, checkpoint: 6 })
        );
        let bad = Checkpoint { hash: GENESIS.into(), ..cp };
        assert!(matches!(verify_chain(c, &[bad], None), Err(ChainProblem::Checkpoint { seq: 6, .. })));
    }

    /// Found by the `audit_chain` fuzz target: a row whose seq is i64::MIN (a tampered
    /// database can hold one) overflowed the search for its original position and panicked
    /// instead of being reported.
    #[test]
    fn extreme_sequence_numbers_are_reported_not_panicked_on() {
        let mut c = chain(1);
        c[0].seq = i64::MIN;
        assert_eq!(verify_chain(c.clone(), &[], None), Err(ChainProblem::Altered { seq: i64::MIN }));
        c[0].prev_hash = "x".into();
        c[0].hash = c[0].computed_hash();
        assert!(matches!(verify_chain(c, &[], None), Err(ChainProblem::Unlinked { seq: i64::MIN, .. })));
    }
}
