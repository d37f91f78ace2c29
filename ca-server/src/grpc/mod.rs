//! Istio's certificate gRPC API (`istio.v1.auth.IstioCertificateService`) for istio-agent and
//! ztunnel: the handler turns a request into a call of `crate::service::workload`; the
//! listener serves it. Nothing below this module knows tonic.

pub mod handler;
pub mod listener;

pub use listener::serve;
