//! Profiles and policy, CSR validation, lint-before-sign issuance, chains, CRLs, the istiod
//! bundle and ceremonies. Knows nothing of HTTP, gRPC or command lines.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cacerts;
pub mod ceremony;
pub mod cert;
pub mod chain;
pub mod crl;
pub mod csr;
pub mod dn;
pub mod duration;
pub mod error;
pub mod issue;
pub mod lint;
pub mod names;
pub mod outputs;
pub mod profile;
pub mod quickstart;
pub mod rotation;
pub mod validity;
pub mod workload;

pub use error::{CoreError, CsrError, PolicyError, Result};
