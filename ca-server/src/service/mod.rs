//! The domain layer: what the server does, whichever protocol asked. Nothing here imports
//! `crate::http` or `crate::grpc` (checked by `ca-core/tests/architecture.rs`).

pub mod checkpoint;
pub mod crl;
pub mod external_ca;
pub mod issuance;
pub mod jobs;
pub mod keys;
pub mod recorder;
pub mod rotation;
pub mod serving_cert;
pub mod state;
pub mod workload;
