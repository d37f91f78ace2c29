//! The domain layer: what the server does, whichever protocol asked. Nothing here imports
//! `crate::http` or `crate::grpc` (checked by `ca-core/tests/architecture.rs`).

pub mod checkpoint;
pub mod crl;
pub mod issuance;
pub mod keys;
pub mod state;
