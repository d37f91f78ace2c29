//! The domain layer: what the server does, whichever protocol asked. Nothing here imports
//! `crate::http` or `crate::grpc` (checked by `ca-core/tests/architecture.rs`).

pub mod agent;
pub mod approval_kind;
pub mod approvals;
pub mod audit;
pub mod certificates;
pub mod checkpoint;
pub mod cluster_ca;
pub mod cluster_settings;
pub mod clusters;
pub mod crl;
pub mod denials;
pub mod enrolment_token;
pub mod external_ca;
pub mod health;
pub mod hsm_call;
pub mod intermediates;
pub mod issuance;
pub mod issuer;
pub mod istio;
pub mod jobs;
pub mod keys;
pub mod recorder;
pub mod revocation;
pub mod rotation;
pub mod rotation_record;
pub mod serving_cert;
pub mod state;
pub mod trust;
pub mod workload;
