//! The ceremony file formats, one struct per ceremony type.

use std::path::PathBuf;

use serde::Deserialize;

use crate::crl::Reason;
use crate::duration::Validity;
use crate::names::TrustDomain;
use crate::profile::ProfileKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyCeremony {
    pub key: String,
    pub algorithm: String,
    pub outputs: KeyOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeyOutputs {
    pub public_key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RootCeremony {
    pub key: String,
    pub subject: String,
    pub validity: Validity,
    #[serde(default = "default_root_path_len")]
    pub path_len: u32,
    pub outputs: CertOutputs,
}

fn default_root_path_len() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CertOutputs {
    pub certificate: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CsrCeremony {
    pub key: String,
    pub subject: String,
    pub outputs: CsrOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CsrOutputs {
    pub csr: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IssuerSpec {
    pub certificate: PathBuf,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IntermediateCeremony {
    pub profile: ProfileKind,
    pub issuer: IssuerSpec,
    pub csr: PathBuf,
    pub trust_domains: Vec<TrustDomain>,
    pub validity: Validity,
    #[serde(default)]
    pub name_constraints: bool,
    #[serde(default)]
    pub crl_distribution_points: Vec<String>,
    #[serde(default)]
    pub ca_issuers: Vec<String>,
    pub outputs: CertOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrossSignCeremony {
    pub issuer: IssuerSpec,
    /// The CA certificate whose subject and key are certified again under `issuer`.
    pub certificate: PathBuf,
    pub validity: Validity,
    pub path_len: Option<u32>,
    pub outputs: CertOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrlCeremony {
    pub issuer: IssuerSpec,
    pub crl_number: u64,
    pub next_update: Validity,
    #[serde(default)]
    pub revoked: Vec<RevokedEntry>,
    pub outputs: CrlOutputs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RevokedEntry {
    pub serial: String,
    pub reason: Option<Reason>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CrlOutputs {
    pub crl: PathBuf,
}

#[derive(Debug)]
pub enum Spec {
    Key(KeyCeremony),
    Root(RootCeremony),
    Csr(CsrCeremony),
    Intermediate(IntermediateCeremony),
    CrossSign(CrossSignCeremony),
    Crl(CrlCeremony),
}
