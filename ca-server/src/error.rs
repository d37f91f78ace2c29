//! The server's errors, whichever protocol carries them. Services return [`ServiceError`]: a
//! stable [`ErrorCode`], a detail for the caller and, when known, who was refused. This module
//! maps them once to HTTP (`application/problem+json`, RFC 9457) and once to gRPC statuses.
//! Internal causes are logged, never sent. Every 4xx is also audited by the REST
//! `audit_denials` middleware (one record, or a count in the anonymous summary), which reads
//! the [`Denied`] extension set here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every problem code the server answers with. The README's list of problem codes is checked
/// against [`ErrorCode::ALL`] by a test, and the OpenAPI document lists them as the values of
/// `Problem.code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AlreadyDecided,
    AlreadyRevoked,
    BadCsrSignature,
    Busy,
    ClientCertificateExpired,
    ClientCertificateRejected,
    ClientCertificateRevoked,
    ClientCertificateSuperseded,
    ClusterNotActive,
    ClusterNotServed,
    Conflict,
    Disabled,
    EnrolmentTokenInvalid,
    ExternalCaCluster,
    Forbidden,
    HsmTimeout,
    HsmUnavailable,
    IdentityMismatch,
    ImpersonationDenied,
    IntermediateNotReady,
    IntermediateRevoked,
    Internal,
    InvalidCertificate,
    InvalidCluster,
    InvalidEnvironment,
    InvalidImpersonatedIdentity,
    InvalidKey,
    InvalidKind,
    InvalidMode,
    InvalidName,
    InvalidNames,
    InvalidNamespace,
    InvalidPath,
    InvalidQuery,
    InvalidReason,
    InvalidReport,
    InvalidRequest,
    InvalidRoot,
    InvalidToken,
    InvalidTrustDomain,
    InvalidValidity,
    IssuerExpiring,
    KeyBlocked,
    KeyCompromised,
    MalformedBody,
    MalformedCsr,
    MalformedJson,
    MethodNotAllowed,
    MfaRequired,
    NameNotAllowed,
    NoClusterId,
    NoCrl,
    NotFound,
    NotRecorded,
    PayloadTooLarge,
    Policy,
    RateLimited,
    Rejected,
    RenewalSuperseded,
    RequestTimeout,
    RotationBlocked,
    RotationInProgress,
    RotationStage,
    RotationStale,
    ShuttingDown,
    TwoPersonRule,
    Unauthenticated,
    UnknownCluster,
    UnknownEnvironment,
    UnsupportedMediaType,
    WeakKey,
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

impl ErrorCode {
    pub const ALL: &[ErrorCode] = &[
        Self::AlreadyDecided,
        Self::AlreadyRevoked,
        Self::BadCsrSignature,
        Self::Busy,
        Self::ClientCertificateExpired,
        Self::ClientCertificateRejected,
        Self::ClientCertificateRevoked,
        Self::ClientCertificateSuperseded,
        Self::ClusterNotActive,
        Self::ClusterNotServed,
        Self::Conflict,
        Self::Disabled,
        Self::EnrolmentTokenInvalid,
        Self::ExternalCaCluster,
        Self::Forbidden,
        Self::HsmTimeout,
        Self::HsmUnavailable,
        Self::IdentityMismatch,
        Self::ImpersonationDenied,
        Self::IntermediateNotReady,
        Self::IntermediateRevoked,
        Self::Internal,
        Self::InvalidCertificate,
        Self::InvalidCluster,
        Self::InvalidEnvironment,
        Self::InvalidImpersonatedIdentity,
        Self::InvalidKey,
        Self::InvalidKind,
        Self::InvalidMode,
        Self::InvalidName,
        Self::InvalidNames,
        Self::InvalidNamespace,
        Self::InvalidPath,
        Self::InvalidQuery,
        Self::InvalidReason,
        Self::InvalidReport,
        Self::InvalidRequest,
        Self::InvalidRoot,
        Self::InvalidToken,
        Self::InvalidTrustDomain,
        Self::InvalidValidity,
        Self::IssuerExpiring,
        Self::KeyBlocked,
        Self::KeyCompromised,
        Self::MalformedBody,
        Self::MalformedCsr,
        Self::MalformedJson,
        Self::MethodNotAllowed,
        Self::MfaRequired,
        Self::NameNotAllowed,
        Self::NoClusterId,
        Self::NoCrl,
        Self::NotFound,
        Self::NotRecorded,
        Self::PayloadTooLarge,
        Self::Policy,
        Self::RateLimited,
        Self::Rejected,
        Self::RenewalSuperseded,
        Self::RequestTimeout,
        Self::RotationBlocked,
        Self::RotationInProgress,
        Self::RotationStage,
        Self::RotationStale,
        Self::ShuttingDown,
        Self::TwoPersonRule,
        Self::Unauthenticated,
        Self::UnknownCluster,
        Self::UnknownEnvironment,
        Self::UnsupportedMediaType,
        Self::WeakKey,
    ];

    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            AlreadyDecided => "already-decided",
            AlreadyRevoked => "already-revoked",
            BadCsrSignature => "bad-csr-signature",
            Busy => "busy",
            ClientCertificateExpired => "client-certificate-expired",
            ClientCertificateRejected => "client-certificate-rejected",
            ClientCertificateRevoked => "client-certificate-revoked",
            ClientCertificateSuperseded => "client-certificate-superseded",
            ClusterNotActive => "cluster-not-active",
            ClusterNotServed => "cluster-not-served",
            Conflict => "conflict",
            Disabled => "disabled",
            EnrolmentTokenInvalid => "enrolment-token-invalid",
            ExternalCaCluster => "external-ca-cluster",
            Forbidden => "forbidden",
            HsmTimeout => "hsm-timeout",
            HsmUnavailable => "hsm-unavailable",
            IdentityMismatch => "identity-mismatch",
            ImpersonationDenied => "impersonation-denied",
            IntermediateNotReady => "intermediate-not-ready",
            IntermediateRevoked => "intermediate-revoked",
            Internal => "internal",
            InvalidCertificate => "invalid-certificate",
            InvalidCluster => "invalid-cluster",
            InvalidEnvironment => "invalid-environment",
            InvalidImpersonatedIdentity => "invalid-impersonated-identity",
            InvalidKey => "invalid-key",
            InvalidKind => "invalid-kind",
            InvalidMode => "invalid-mode",
            InvalidName => "invalid-name",
            InvalidNames => "invalid-names",
            InvalidNamespace => "invalid-namespace",
            InvalidPath => "invalid-path",
            InvalidQuery => "invalid-query",
            InvalidReason => "invalid-reason",
            InvalidReport => "invalid-report",
            InvalidRequest => "invalid-request",
            InvalidRoot => "invalid-root",
            InvalidToken => "invalid-token",
            InvalidTrustDomain => "invalid-trust-domain",
            InvalidValidity => "invalid-validity",
            IssuerExpiring => "issuer-expiring",
            KeyBlocked => "key-blocked",
            KeyCompromised => "key-compromised",
            MalformedBody => "malformed-body",
            MalformedCsr => "malformed-csr",
            MalformedJson => "malformed-json",
            MethodNotAllowed => "method-not-allowed",
            MfaRequired => "mfa-required",
            NameNotAllowed => "name-not-allowed",
            NoClusterId => "no-cluster-id",
            NoCrl => "no-crl",
            NotFound => "not-found",
            NotRecorded => "not-recorded",
            PayloadTooLarge => "payload-too-large",
            Policy => "policy",
            RateLimited => "rate-limited",
            Rejected => "rejected",
            RenewalSuperseded => "renewal-superseded",
            RequestTimeout => "request-timeout",
            RotationBlocked => "rotation-blocked",
            RotationInProgress => "rotation-in-progress",
            RotationStage => "rotation-stage",
            RotationStale => "rotation-stale",
            ShuttingDown => "shutting-down",
            TwoPersonRule => "two-person-rule",
            Unauthenticated => "unauthenticated",
            UnknownCluster => "unknown-cluster",
            UnknownEnvironment => "unknown-environment",
            UnsupportedMediaType => "unsupported-media-type",
            WeakKey => "weak-key",
        }
    }

    pub fn kind(self) -> ErrorKind {
        use ErrorCode::*;
        match self {
            BadCsrSignature
            | InvalidCertificate
            | InvalidCluster
            | InvalidEnvironment
            | InvalidImpersonatedIdentity
            | InvalidKey
            | InvalidKind
            | InvalidMode
            | InvalidName
            | InvalidNames
            | InvalidNamespace
            | InvalidPath
            | InvalidQuery
            | InvalidReason
            | InvalidReport
            | InvalidRequest
            | InvalidRoot
            | InvalidTrustDomain
            | InvalidValidity
            | KeyBlocked
            | MalformedBody
            | MalformedCsr
            | MalformedJson
            | Policy
            | Rejected
            | UnknownCluster
            | UnknownEnvironment
            | WeakKey => ErrorKind::Invalid,
            ClientCertificateExpired
            | ClientCertificateRejected
            | ClientCertificateRevoked
            | ClientCertificateSuperseded
            | EnrolmentTokenInvalid
            | InvalidToken
            | NoClusterId
            | Unauthenticated => ErrorKind::Unauthenticated,
            ClusterNotServed | Forbidden | IdentityMismatch | ImpersonationDenied | MfaRequired | NameNotAllowed
            | TwoPersonRule => ErrorKind::Forbidden,
            NotFound => ErrorKind::NotFound,
            MethodNotAllowed => ErrorKind::MethodNotAllowed,
            RequestTimeout => ErrorKind::Timeout,
            AlreadyDecided | AlreadyRevoked | ClusterNotActive | Conflict | ExternalCaCluster | NoCrl
            | RenewalSuperseded | RotationBlocked | RotationInProgress | RotationStage | RotationStale => {
                ErrorKind::Conflict
            }
            PayloadTooLarge => ErrorKind::TooLarge,
            UnsupportedMediaType => ErrorKind::UnsupportedMediaType,
            RateLimited => ErrorKind::RateLimited,
            Internal => ErrorKind::Internal,
            Busy | Disabled | HsmTimeout | HsmUnavailable | IntermediateNotReady | IntermediateRevoked
            | IssuerExpiring | KeyCompromised | NotRecorded | ShuttingDown => ErrorKind::Unavailable,
        }
    }
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
