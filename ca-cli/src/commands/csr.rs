//! `ca-cli csr create`.

use anyhow::Result;
use serde_json::json;

use super::{preflight, write_one};
use crate::cli::{CsrCmd, Output};
use crate::output::{self, emit};

pub fn run(cmd: CsrCmd, output: Output) -> Result<()> {
    let CsrCmd::Create { key, subject, out } = cmd;
    let key = key.parse()?;
    preflight(&[&out])?;
    let subject_dn = ca_core::dn::parse_subject(&subject)?;
    let signer = hsm::open_signer(&key)?;
    let pem = ca_core::csr::create_csr(&signer, subject_dn)?;
    write_one(&out, pem)?;
    let v =
        json!({"path": out, "subject": subject, "public_key_sha256": hex::encode(signer.public_key().fingerprint())});
    emit(output, &v, || output::csr_text(&out, &subject));
    Ok(())
}
