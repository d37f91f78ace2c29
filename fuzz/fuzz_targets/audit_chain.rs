//! The audit hash-chain verifier (`ca_core::audit::verify_chain`) fed rows as a tampered
//! database could hold them: arbitrary sequence numbers, texts, hashes and checkpoints.
//! A row can ask for its hash and link to be made right, so that the fuzzer also builds
//! long valid prefixes and reaches the later checks instead of failing at row one.
#![no_main]

use arbitrary::Arbitrary;
use ca_core::audit::{AuditRecord, Checkpoint, GENESIS, record_hash, verify_chain};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Row {
    seq: Seq,
    time: i64,
    actor: String,
    action: String,
    subject: String,
    details: String,
    prev_hash: Option<String>,
    hash: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Seq {
    /// The next one in order.
    Next,
    Exact(i64),
}

#[derive(Arbitrary, Debug)]
struct Cp {
    seq: i64,
    /// `None`: the hash of the record at `seq`, if there is one.
    hash: Option<String>,
    key_id: String,
    signature: String,
    signature_algorithm: String,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rows: Vec<Row>,
    checkpoints: Vec<Cp>,
    with_key: bool,
}

/// A P-256 key that signed nothing the fuzzer can produce: checkpoint signatures are parsed
/// and checked, and must fail cleanly.
const AUDIT_KEY: &[u8] = include_bytes!("../fixtures/audit-key.pub.der");

fuzz_target!(|input: Input| {
    let key = hsm::PublicKey::from_spki_der(AUDIT_KEY).expect("fixture key");
    let mut prev = GENESIS.to_string();
    let mut next = 1i64;
    let mut records = Vec::new();
    for row in input.rows {
        let seq = match row.seq {
            Seq::Next => next,
            Seq::Exact(s) => s,
        };
        let prev_hash = row.prev_hash.unwrap_or_else(|| prev.clone());
        let hash = row.hash.unwrap_or_else(|| {
            record_hash(seq, row.time, &row.actor, &row.action, &row.subject, &row.details, &prev_hash)
        });
        prev = hash.clone();
        next = seq.wrapping_add(1);
        records.push(AuditRecord {
            seq,
            time: row.time,
            actor: row.actor,
            action: row.action,
            subject: row.subject,
            details: row.details,
            prev_hash,
            hash,
        });
    }
    let checkpoints: Vec<Checkpoint> = input
        .checkpoints
        .into_iter()
        .map(|c| Checkpoint {
            seq: c.seq,
            hash: c
                .hash
                .unwrap_or_else(|| records.iter().find(|r| r.seq == c.seq).map(|r| r.hash.clone()).unwrap_or_default()),
            time: 0,
            key_id: c.key_id,
            signature: c.signature,
            signature_algorithm: c.signature_algorithm,
        })
        .collect();
    let result = verify_chain(records.clone(), &checkpoints, input.with_key.then_some(&key));
    if let Ok(report) = result {
        // Whatever passes is a chain: each record hashes to its hash and links to the one
        // before, starting from the genesis value.
        let mut prev = GENESIS;
        for r in &records {
            assert_eq!(r.computed_hash(), r.hash, "record {} passed with a wrong hash", r.seq);
            assert_eq!(r.prev_hash, prev, "record {} passed unlinked", r.seq);
            prev = &r.hash;
        }
        assert_eq!(report.records as usize, records.len());
        assert_eq!(report.head_hash, prev);
        assert!(!input.with_key || checkpoints.is_empty(), "a checkpoint passed with a forged signature");
    }
});
