//! The server's errors, whichever protocol carries them. Services return [`ServiceError`]: a
//! stable [`ErrorCode`], a detail for the caller and, when known, who was refused. This module
//! maps them once to HTTP (`application/problem+json`, RFC 9457) and once to gRPC statuses.
//! Internal causes are logged, never sent. Every 4xx is also audited by the REST
//! `audit_denials` middleware (one record, or a count in the anonymous summary), which reads
//! the [`Denied`] extension set here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Declares `ErrorCode` from one list, so that a code's name, its string and its kind are
/// written once and `ErrorCode::ALL` cannot miss one.
macro_rules! error_codes {
    ($($code:ident = $text:literal, $kind:ident;)*) => {
        /// Every problem code the server answers with. The README's list of problem codes is
        /// checked against [`ErrorCode::ALL`] by a test, and the OpenAPI document lists them
        /// as the values of `Problem.code`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($code,)*
        }

        impl ErrorCode {
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$code,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$code => $text,)*
                }
            }

            pub fn kind(self) -> ErrorKind {
                match self {
                    $(ErrorCode::$code => ErrorKind::$kind,)*
                }
            }
        }
    };
}

// To add a problem code: one line here (name = "kebab-case string", kind), then the README's
// list (the test `the_readme_lists_every_problem_code` says what is missing).
error_codes! {
    AlreadyDecided = "already-decided", Conflict;
    AlreadyRevoked = "already-revoked", Conflict;
    BadCsrSignature = "bad-csr-signature", Invalid;
    Busy = "busy", Unavailable;
    ClientCertificateExpired = "client-certificate-expired", Unauthenticated;
    ClientCertificateRejected = "client-certificate-rejected", Unauthenticated;
    ClientCertificateRevoked = "client-certificate-revoked", Unauthenticated;
    ClientCertificateSuperseded = "client-certificate-superseded", Unauthenticated;
    ClusterNotActive = "cluster-not-active", Conflict;
    ClusterNotServed = "cluster-not-served", Forbidden;
    Conflict = "conflict", Conflict;
    Disabled = "disabled", Unavailable;
    EnrolmentTokenInvalid = "enrolment-token-invalid", Unauthenticated;
    ExternalCaCluster = "external-ca-cluster", Conflict;
    Forbidden = "forbidden", Forbidden;
    HsmTimeout = "hsm-timeout", Unavailable;
    HsmUnavailable = "hsm-unavailable", Unavailable;
    IdentityMismatch = "identity-mismatch", Forbidden;
    ImpersonationDenied = "impersonation-denied", Forbidden;
    IntermediateNotReady = "intermediate-not-ready", Unavailable;
    IntermediateRevoked = "intermediate-revoked", Unavailable;
    Internal = "internal", Internal;
    InvalidCertificate = "invalid-certificate", Invalid;
    InvalidCluster = "invalid-cluster", Invalid;
    InvalidEnvironment = "invalid-environment", Invalid;
    InvalidImpersonatedIdentity = "invalid-impersonated-identity", Invalid;
    InvalidJwks = "invalid-jwks", Invalid;
    InvalidKey = "invalid-key", Invalid;
    InvalidKind = "invalid-kind", Invalid;
    InvalidMode = "invalid-mode", Invalid;
    InvalidName = "invalid-name", Invalid;
    InvalidNames = "invalid-names", Invalid;
    InvalidNamespace = "invalid-namespace", Invalid;
    InvalidPath = "invalid-path", Invalid;
    InvalidQuery = "invalid-query", Invalid;
    InvalidReason = "invalid-reason", Invalid;
    InvalidReport = "invalid-report", Invalid;
    InvalidRequest = "invalid-request", Invalid;
    InvalidRoot = "invalid-root", Invalid;
    InvalidSettings = "invalid-settings", Invalid;
    InvalidToken = "invalid-token", Unauthenticated;
    InvalidTrustDomain = "invalid-trust-domain", Invalid;
    InvalidValidity = "invalid-validity", Invalid;
    IssuerExpiring = "issuer-expiring", Unavailable;
    IssuerMismatch = "issuer-mismatch", Conflict;
    KeyBlocked = "key-blocked", Invalid;
    KeyCompromised = "key-compromised", Unavailable;
    MalformedBody = "malformed-body", Invalid;
    MalformedCsr = "malformed-csr", Invalid;
    MalformedJson = "malformed-json", Invalid;
    MethodNotAllowed = "method-not-allowed", MethodNotAllowed;
    MfaRequired = "mfa-required", Forbidden;
    NameNotAllowed = "name-not-allowed", Forbidden;
    NoClusterId = "no-cluster-id", Unauthenticated;
    NoCrl = "no-crl", Conflict;
    NotFound = "not-found", NotFound;
    NotRecorded = "not-recorded", Unavailable;
    PayloadTooLarge = "payload-too-large", TooLarge;
    Policy = "policy", Invalid;
    RateLimited = "rate-limited", RateLimited;
    Rejected = "rejected", Invalid;
    RenewalSuperseded = "renewal-superseded", Conflict;
    RequestTimeout = "request-timeout", Timeout;
    RotationBlocked = "rotation-blocked", Conflict;
    RotationInProgress = "rotation-in-progress", Conflict;
    RotationStage = "rotation-stage", Conflict;
    RotationStale = "rotation-stale", Conflict;
    ShuttingDown = "shutting-down", Unavailable;
    TwoPersonRule = "two-person-rule", Forbidden;
    Unauthenticated = "unauthenticated", Unauthenticated;
    UnknownCluster = "unknown-cluster", Invalid;
    UnknownEnvironment = "unknown-environment", Invalid;
    UnsupportedMediaType = "unsupported-media-type", UnsupportedMediaType;
    WeakKey = "weak-key", Invalid;
}

/// What kind of refusal a code is: decides the HTTP status and the gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or breaks a rule (400).
    Invalid,
    /// No credential, or one that does not verify (401).
    Unauthenticated,
    /// A credential that may not do this (403).
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Timeout,
    /// The state does not allow it now (409).
    Conflict,
    TooLarge,
    UnsupportedMediaType,
    RateLimited,
    Internal,
    /// Something this server depends on does not answer, or is not ready (503).
    Unavailable,
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorKind {
    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorKind::Invalid | ErrorKind::TooLarge | ErrorKind::UnsupportedMediaType => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Forbidden | ErrorKind::NotFound => Code::PermissionDenied,
            ErrorKind::Conflict => Code::FailedPrecondition,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::RateLimited => Code::ResourceExhausted,
            ErrorKind::Timeout => Code::DeadlineExceeded,
            ErrorKind::MethodNotAllowed | ErrorKind::Internal => Code::Internal,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceError {
    pub code: ErrorCode,
    pub detail: String,
    /// Who was refused, when known (an authenticated operator, a cluster).
    pub actor: Option<String>,
}

/// Attached to error responses so that the denial can be audited after the fact.
#[derive(Clone, Debug)]
pub struct Denied {
    pub code: ErrorCode,
    pub detail: String,
    pub actor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable, machine-readable error code.
    #[schema(schema_with = problem_codes)]
    pub code: String,
}

fn problem_codes() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
        .build()
}

impl ServiceError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ServiceError { code, detail: detail.into(), actor: None }
    }

    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, detail)
    }

    /// An internal failure: the cause is logged with the request, the client sees a code.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(ErrorCode::Internal, "internal error; see the server log")
    }

    pub fn kind(&self) -> ErrorKind {
        self.code.kind()
    }

    pub fn status(&self) -> StatusCode {
        self.code.kind().http_status()
    }
}

impl From<ca_store::StoreError> for ServiceError {
    fn from(e: ca_store::StoreError) -> Self {
        match e {
            ca_store::StoreError::Conflict(what) => {
                ServiceError::new(ErrorCode::Conflict, format!("{what} already exists"))
            }
            other => ServiceError::internal(other),
        }
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = self.status();
        let title = status.canonical_reason().unwrap_or("Error").to_string();
        let body = Problem {
            kind: format!("urn:pki-mesh:problem:{}", self.code),
            title,
            status: status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.as_str().to_string(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        resp.extensions_mut().insert(Denied { code: self.code, detail: self.detail, actor: self.actor });
        resp
    }
}

/// The same errors for gRPC: the status code from the kind, the message from the code and
/// detail (internal causes were already replaced by a generic detail).
impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        tonic::Status::new(e.kind().grpc_code(), format!("{}: {}", e.code, e.detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README lists every code, and only codes that exist.
    #[test]
    fn the_readme_lists_every_problem_code() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let start = readme.find("Problem codes:").expect("README has a list of problem codes");
        let end = start + readme[start..].find("\n\n").unwrap_or(readme.len() - start);
        let listed: std::collections::BTreeSet<&str> = readme[start..end]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
            .collect();
        let known: std::collections::BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        let missing: Vec<_> = known.difference(&listed).collect();
        let unknown: Vec<_> = listed.difference(&known).collect();
        assert!(missing.is_empty() && unknown.is_empty(), "README lacks {missing:?}; lists unknown {unknown:?}");
    }

    #[test]
    fn every_code_is_listed_once_and_in_kebab_case() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert!(c.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{c}");
        }
    }
}
