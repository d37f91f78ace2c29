//! `ca-cli verify`: a certificate chain checked to a root.

use anyhow::Result;
use ca_core::cert::{load_cert, load_certs};
use ca_core::error::fmt_time;
use serde_json::json;
use time::OffsetDateTime;

use crate::cli::{Output, VerifyArgs};
use crate::output::{self, emit};

pub fn run(a: VerifyArgs, output: Output) -> Result<()> {
    let leaf = load_cert(&a.leaf)?;
    let mut inter = Vec::new();
    for p in &a.chain {
        inter.extend(load_certs(p)?);
    }
    let roots = load_certs(&a.root)?;
    let path = ca_core::chain::verify_chain(&leaf, &inter, &roots, OffsetDateTime::now_utc())?;
    let v = json!({
        "ok": true,
        "path": path.iter().map(|c| json!({
            "subject": c.subject, "serial": c.serial, "not_after": fmt_time(c.not_after), "uris": c.uris,
        })).collect::<Vec<_>>(),
    });
    emit(output, &v, || output::verify_text(&a.leaf, &path));
    Ok(())
}
