//! `ca-server` configuration: one TOML file, every key overridable from the environment as
//! `CA_SERVER_<KEY>` for top-level keys and `CA_SERVER_<SECTION>__<KEY>` inside sections
//! (for example `CA_SERVER_DATABASE__URL`). README.md documents every key.

use std::path::PathBuf;

use ca_core::duration::Validity;
use serde::{Deserialize, Serialize};

mod load;

pub use load::{ENV_PREFIX, apply_env_overrides};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, e.g. `127.0.0.1:8443`. Port 0 picks a free port.
    pub listen: String,
    pub tls: TlsConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    #[serde(rename = "issuers")]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub crl: CrlConfig,
    pub audit: AuditConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Istio's certificate API (external-CA mode). Off when absent.
    pub istio: Option<IstioConfig>,
    #[serde(default)]
    pub rotation: RotationConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain-HTTP address serving `GET /metrics` only. Off when absent.
    pub listen: Option<String>,
    /// The metrics name every cluster and issuer: an address other than loopback must be
    /// asked for explicitly.
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time for a client to finish the TLS handshake, and then to send its first request
    /// (HTTP/1 headers, or an HTTP/2 preface followed by a request).
    #[serde(default = "default_handshake_timeout", with = "validity")]
    pub handshake_timeout: Validity,
    /// A connection with no request in flight for this long is shut down gracefully.
    #[serde(default = "default_idle_timeout", with = "validity")]
    pub idle_timeout: Validity,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// The longest workload certificate any cluster issues (istiod's `MAX_WORKLOAD_CERT_TTL`
    /// in plug-in clusters, an external-CA cluster's `max_ttl` setting here): the drain stage lasts at least
    /// this long after the last cluster moved to the new chain.
    #[serde(default = "default_workload_ttl", with = "validity")]
    pub workload_ttl: Validity,
    /// Added to the drain for clock skew and late renewals.
    #[serde(default = "default_drain_margin", with = "validity")]
    pub drain_margin: Validity,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioConfig {
    /// gRPC listen address, e.g. `0.0.0.0:9443`. Port 0 picks a free port.
    pub listen: String,
    /// DNS names (or IPs) of the gRPC serving certificate, which the server issues itself from
    /// `serving_cluster`'s intermediate so that agents verify it against the mesh root.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// The external-CA cluster whose intermediate signs the serving certificate (default: the
    /// first configured one, by name, that is active here).
    pub serving_cluster: Option<String>,
    #[serde(default = "default_serving_validity", with = "validity")]
    pub serving_cert_validity: Validity,
    /// How long a workload certificate stays findable after it expired; then it is pruned.
    #[serde(default = "default_retention", with = "validity")]
    pub retention: Validity,
    /// Most certificates written in one group commit.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// A `CreateCertificate` taking longer is answered `DEADLINE_EXCEEDED`.
    #[serde(default = "default_request_timeout", with = "validity")]
    pub request_timeout: Validity,
    /// Requests in flight on all connections together; more are refused with
    /// `RESOURCE_EXHAUSTED` rather than queued.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Requests in flight on one connection; more are refused likewise.
    #[serde(default = "default_max_concurrent_requests_per_connection")]
    pub max_concurrent_requests_per_connection: usize,
    /// How long service-account keys that a cluster replaced (pushed by its agent, or changed
    /// in its settings) still verify tokens.
    #[serde(default = "default_jwks_grace", with = "validity")]
    pub jwks_grace: Validity,
    /// Deprecated: per-cluster settings now live in the database (registration and
    /// `PUT /v1/clusters/<name>/settings`). A table here only seeds a registered external-CA
    /// cluster that has no settings yet, at start, with a warning.
    #[serde(default)]
    pub clusters: std::collections::BTreeMap<String, IstioClusterConfig>,
}

/// An external-CA cluster's Istio settings: registration's `istio` object, the body of
/// `PUT /v1/clusters/<name>/settings`, and what the database keeps (`ca_store::ClusterSettingsRecord`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioSettings {
    /// Expected `iss` of the cluster's service-account tokens.
    pub sa_issuer: String,
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// `namespace/serviceaccount` of callers allowed to send `ImpersonatedIdentity` (ztunnel).
    #[serde(default)]
    pub trusted_node_accounts: Vec<String>,
    #[serde(default = "default_workload_ttl", with = "validity")]
    pub default_ttl: Validity,
    #[serde(default = "default_max_workload_ttl", with = "validity")]
    pub max_ttl: Validity,
    #[serde(default = "default_over_max")]
    pub over_max: ca_core::workload::OverMax,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "validity")]
    pub leeway: Validity,
    /// DNS names `POST /v1/clusters/<name>/server-certificates` may issue (istiod's).
    #[serde(default = "default_server_certificate_names")]
    pub server_certificate_names: Vec<String>,
    /// The cluster's service-account keys (a JWKS document), when given by an operator;
    /// otherwise its agent pushes them, or they come from `oidc_discovery_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// An OIDC discovery document whose `issuer` is `sa_issuer` and whose `jwks_uri` is
    /// fetched and refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_discovery_url: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioClusterConfig {
    /// Expected `iss` of the cluster's service-account tokens.
    pub sa_issuer: String,
    /// The cluster's JWKS as a file (`kubectl get --raw /openid/v1/jwks`) ...
    pub jwks_file: Option<PathBuf>,
    /// ... or its OIDC discovery document URL, whose `jwks_uri` is fetched and refreshed.
    pub oidc_discovery_url: Option<String>,
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "validity")]
    pub leeway: Validity,
    /// `namespace/serviceaccount` of callers allowed to send `ImpersonatedIdentity` (ztunnel).
    #[serde(default)]
    pub trusted_node_accounts: Vec<String>,
    #[serde(default = "default_workload_ttl", with = "validity")]
    pub default_ttl: Validity,
    #[serde(default = "default_max_workload_ttl", with = "validity")]
    pub max_ttl: Validity,
    /// `reject` (default) or `clamp` a request over `max_ttl`.
    #[serde(default = "default_over_max")]
    pub over_max: ca_core::workload::OverMax,
    /// How often the keys are re-read; an unknown `kid` also triggers a re-read (at most
    /// every 10 s).
    #[serde(default = "default_jwks_refresh", with = "validity")]
    pub jwks_refresh: Validity,
    /// DNS names `POST /v1/clusters/<name>/server-certificates` may issue (istiod's).
    #[serde(default = "default_server_certificate_names")]
    pub server_certificate_names: Vec<String>,
}

pub fn default_server_certificate_names() -> Vec<String> {
    vec!["istiod.istio-system.svc".into()]
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate followed by its chain (PEM).
    pub cert: PathBuf,
    /// The server key: a `file:` reference (rustls needs the key in memory).
    pub key: String,
    /// Roots that cluster client certificates (for renewal over mTLS) must chain to.
    pub client_ca: Vec<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (single server) or `postgres://...` (several replicas).
    pub url: String,
    /// Apply migrations at start. Turn off when the server's role may not change the schema.
    #[serde(default = "yes")]
    pub migrate: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss` of operator tokens.
    pub issuer: String,
    /// Expected `aud` of operator tokens.
    pub audience: String,
    /// Verification keys: a JWKS file ...
    pub jwks_file: Option<PathBuf>,
    /// ... or URL (fetched at start and every 10 minutes).
    pub jwks_url: Option<String>,
    /// Dotted path of the claim holding the roles, e.g. `roles` or `realm_access.roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Claim naming the operator, recorded in the audit trail.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// When set, state-changing calls need a token that proves a second factor.
    pub require_mfa: Option<MfaConfig>,
}

/// What counts as a second factor: a token passes when its `acr` is one of `acr`, or its
/// `amr` array holds one of `amr` (RFC 8176 method names, as OIDC providers state them).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MfaConfig {
    #[serde(default)]
    pub acr: Vec<String>,
    #[serde(default)]
    pub amr: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The environment this intermediate serves; clusters name it when they register.
    pub name: String,
    /// The environment intermediate (PEM).
    pub certificate: PathBuf,
    /// Its chain up to and including the root (PEM, one or more files).
    pub chain: Vec<PathBuf>,
    /// Key reference: `pkcs11:...` or `file:...`.
    pub key: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "default_cluster_validity", with = "validity")]
    pub cluster_validity: Validity,
    #[serde(default = "default_enrolment_ttl", with = "validity")]
    pub enrolment_token_ttl: Validity,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long a request may wait for the HSM before it fails with 503.
    #[serde(default = "default_hsm_timeout", with = "validity")]
    pub hsm_timeout: Validity,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrlConfig {
    #[serde(default = "default_crl_validity", with = "validity")]
    pub validity: Validity,
    /// Regenerate once less than this is left before nextUpdate.
    #[serde(default = "default_crl_refresh", with = "validity")]
    pub refresh_before: Validity,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Key that signs checkpoints: `pkcs11:...` or `file:...`.
    pub key: String,
    /// Sign a checkpoint after this many new records ...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: i64,
    /// ... or when this much time has passed with new records.
    #[serde(default = "default_checkpoint_interval", with = "validity")]
    pub checkpoint_interval: Validity,
    /// Refusals of unauthenticated callers are counted in memory and written as one
    /// `request.denied.summary` record per interval (when there were any).
    #[serde(default = "default_denial_summary_interval", with = "validity")]
    pub denial_summary_interval: Validity,
}

/// Per-source-address quota for unauthenticated callers (REST and gRPC). Callers with a valid
/// credential never draw on it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per minute an address may make without a credential (or refusals
    /// of a credential that fails) ...
    #[serde(default = "default_anonymous_per_minute")]
    pub anonymous_per_minute: u32,
    /// ... and how many it may make at once after a quiet period.
    #[serde(default = "default_anonymous_burst")]
    pub anonymous_burst: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// How often background jobs (CRL refresh, expiry scan, checkpoints, HSM probe) run.
    #[serde(default = "default_job_interval", with = "validity")]
    pub interval: Validity,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (default) or `text`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter, e.g. `info` or `ca_server=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn yes() -> bool {
    true
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn v(s: &str) -> Validity {
    s.parse().expect("valid default")
}
fn default_cluster_validity() -> Validity {
    v("90d")
}
fn default_enrolment_ttl() -> Validity {
    v("24h")
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_hsm_timeout() -> Validity {
    v("5s")
}
fn default_crl_validity() -> Validity {
    v("7d")
}
fn default_crl_refresh() -> Validity {
    v("3d")
}
fn default_checkpoint_every() -> i64 {
    100
}
fn default_checkpoint_interval() -> Validity {
    v("60s")
}
fn default_denial_summary_interval() -> Validity {
    v("60s")
}
fn default_anonymous_per_minute() -> u32 {
    1200
}
fn default_anonymous_burst() -> u32 {
    200
}
fn default_job_interval() -> Validity {
    v("30s")
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_serving_validity() -> Validity {
    v("24h")
}
fn default_retention() -> Validity {
    v("30d")
}
fn default_batch_max() -> usize {
    2048
}
fn default_audiences() -> Vec<String> {
    vec!["istio-ca".into()]
}
fn default_leeway() -> Validity {
    v("30s")
}
fn default_workload_ttl() -> Validity {
    v("24h")
}
fn default_max_workload_ttl() -> Validity {
    v("7d")
}
fn default_over_max() -> ca_core::workload::OverMax {
    ca_core::workload::OverMax::Reject
}
fn default_jwks_refresh() -> Validity {
    v("10m")
}
fn default_jwks_grace() -> Validity {
    v("1h")
}
fn default_drain_margin() -> Validity {
    v("1h")
}
fn default_handshake_timeout() -> Validity {
    v("10s")
}
fn default_idle_timeout() -> Validity {
    v("120s")
}
fn default_request_timeout() -> Validity {
    v("30s")
}
fn default_max_concurrent_requests() -> usize {
    2048
}
fn default_max_concurrent_requests_per_connection() -> usize {
    256
}
fn default_log_format() -> String {
    "json".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            cluster_validity: default_cluster_validity(),
            enrolment_token_ttl: default_enrolment_ttl(),
            max_body_bytes: default_max_body(),
            hsm_timeout: default_hsm_timeout(),
        }
    }
}
impl Default for CrlConfig {
    fn default() -> Self {
        CrlConfig { validity: default_crl_validity(), refresh_before: default_crl_refresh() }
    }
}
impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig { workload_ttl: default_workload_ttl(), drain_margin: default_drain_margin() }
    }
}
impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig { interval: default_job_interval() }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { handshake_timeout: default_handshake_timeout(), idle_timeout: default_idle_timeout() }
    }
}
impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            anonymous_per_minute: default_anonymous_per_minute(),
            anonymous_burst: default_anonymous_burst(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: default_log_format(), level: default_log_level() }
    }
}

mod validity {
    use ca_core::duration::Validity;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Validity, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Validity, D::Error> {
        Validity::deserialize(d)
    }
}
