//! The domain layer: what the server does, whichever protocol asked. Nothing here imports
//! `crate::http` or `crate::grpc` (checked by `ca-core/tests/architecture.rs`).

pub mod approvals;
pub mod audit;
pub mod certificates;
pub mod checkpoint;
pub mod clusters;
pub mod crl;
pub mod denials;
pub mod health;
pub mod intermediates;
pub mod issuance;
pub mod keys;
pub mod revocation;
pub mod state;
pub mod trust;
