//! `ca-cli key generate` and `ca-cli key info`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use hsm::KeyAlgorithm;
use serde_json::json;

use super::{preflight, write_one};
use crate::cli::{KeyArg, KeyCmd, Output};
use crate::output::{self, emit};

pub fn run(cmd: KeyCmd, output: Output) -> Result<()> {
    match cmd {
        KeyCmd::Generate { key, algorithm, public_out } => generate(key, algorithm, public_out, output),
        KeyCmd::Info { key } => info(key, output),
    }
}

fn generate(key: KeyArg, algorithm: KeyAlgorithm, public_out: Option<PathBuf>, output: Output) -> Result<()> {
    let key = key.parse()?;
    if let Some(p) = &public_out {
        preflight(&[p])?;
    }
    let public = hsm::generate_key(&key, algorithm).with_context(|| format!("generating {algorithm} key {key}"))?;
    if let Some(p) = &public_out {
        write_one(p, public.to_pem())?;
    }
    let sha256 = hex::encode(public.fingerprint());
    let v = json!({
        "key": key.to_string(),
        "algorithm": algorithm.as_str(),
        "public_key_sha256": sha256,
        "public_out": public_out,
        "public_key_pem": public.to_pem(),
    });
    emit(output, &v, || output::key_generated_text(algorithm, &key, &sha256, public_out.as_deref()));
    Ok(())
}

fn info(key: KeyArg, output: Output) -> Result<()> {
    let key = key.parse()?;
    let signer = hsm::open_signer(&key)?;
    let public = signer.public_key();
    let mut v = json!({
        "key": key.to_string(),
        "algorithm": signer.algorithm().as_str(),
        "public_key_sha256": hex::encode(public.fingerprint()),
        "hardware": signer.is_hardware(),
    });
    if signer.is_hardware() {
        let a = signer.token_attributes()?;
        v["pkcs11"] = json!({
            "token": a.token, "object": a.object, "id": a.id,
            "token_object": a.token_object, "private": a.private,
            "sensitive": a.sensitive, "extractable": a.extractable,
            "always_sensitive": a.always_sensitive, "never_extractable": a.never_extractable,
            "sign": a.sign,
        });
    }
    emit(output, &v, || output::json_text(&v));
    Ok(())
}
