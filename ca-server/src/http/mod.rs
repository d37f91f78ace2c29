//! The REST API: router, middleware, extractors and one module per resource. Handlers
//! translate HTTP into calls of `crate::service` and its results back into HTTP.

pub mod body;
pub mod rotations;
