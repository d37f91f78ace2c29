//! ca-agent end to end: the real `ca-agent` binary against the real `ca-server --dev` and the
//! in-process Kubernetes API stand-in (`testing/kube-standin`, which names what it does not
//! model). Each test fails if the behaviour it names breaks.

#![allow(clippy::disallowed_methods)]

#[path = "../server_support/mod.rs"]
mod server_support;

mod external_ca;
mod plugin;
mod support;
