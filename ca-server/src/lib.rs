//! `ca-server` as a library: the binary in `main.rs` wires these modules together; the fuzz
//! targets and benchmarks reach the parsers and policy through the same modules.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod dev;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod service;
pub mod tls;

/// Istio's certificate service, generated from proto/istio/v1/auth/ca.proto.
#[allow(clippy::all, clippy::pedantic, dead_code)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}
