//! `ca-cli root create`: a self-signed root.

use anyhow::Result;
use ca_core::profile::{CertRequest, ProfileKind};

use super::{preflight, write_one};
use crate::cli::{Output, RootCmd};
use crate::output::{self, emit};

pub fn run(cmd: RootCmd, output: Output) -> Result<()> {
    let RootCmd::Create { key, subject, validity, path_len, out } = cmd;
    let key = key.parse()?;
    preflight(&[&out])?;
    let subject = ca_core::dn::parse_subject(&subject)?;
    let signer = hsm::open_signer(&key)?;
    let not_before = ca_core::issue::default_not_before();
    let req = CertRequest {
        path_len: Some(path_len),
        ..CertRequest::new(
            ProfileKind::Root,
            subject,
            signer.public_key().clone(),
            not_before,
            not_before + validity.duration(),
        )
    };
    let issued = ca_core::issue::create_root(&signer, &req)?;
    write_one(&out, issued.pem())?;
    emit(output, &output::cert_json(&issued.cert, &out), || output::cert_text(&issued.cert, &out));
    Ok(())
}
