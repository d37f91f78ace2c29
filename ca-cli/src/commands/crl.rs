//! `ca-cli crl create`.

use anyhow::Result;
use ca_core::cert::{load_cert, to_pem};
use ca_core::error::fmt_time;
use serde_json::json;
use time::OffsetDateTime;

use super::{preflight, write_one};
use crate::cli::{CrlCmd, Output};
use crate::output::{self, emit};

pub fn run(cmd: CrlCmd, output: Output) -> Result<()> {
    let CrlCmd::Create { ca_cert, ca_key, revoke, next_update, crl_number, out } = cmd;
    let ca_key = ca_key.parse()?;
    preflight(&[&out])?;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let revoked = revoke.iter().map(|r| ca_core::crl::parse_revocation(r, now)).collect::<Result<Vec<_>, _>>()?;
    let issuer = ca_core::issue::CaIssuer::new(load_cert(&ca_cert)?, hsm::open_signer(&ca_key)?)?;
    let number = crl_number.unwrap_or(now.unix_timestamp() as u64);
    let req = ca_core::crl::CrlRequest { number, this_update: now, next_update: now + next_update.duration(), revoked };
    let der = ca_core::crl::create_crl(&issuer, &req)?;
    write_one(&out, to_pem("X509 CRL", &der))?;
    let v = json!({
        "path": out, "issuer": issuer.cert.subject, "crl_number": number,
        "this_update": fmt_time(req.this_update), "next_update": fmt_time(req.next_update),
        "revoked": req.revoked.iter().map(|r| hex::encode(&r.serial)).collect::<Vec<_>>(),
    });
    emit(output, &v, || output::crl_text(&out, &req));
    Ok(())
}
