//! Operators authenticate with OIDC bearer JWTs (any OIDC provider, e.g. Keycloak): the
//! signature is checked against a JWKS, then `iss`, `aud`, `exp` and `nbf`; roles come from a
//! configurable claim.

pub mod service_account;

use std::sync::RwLock;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::AuthConfig;
use crate::error::{ErrorCode, ServiceError};

/// An operator's role, from the token's roles claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Auditor,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

/// An authenticated operator.
#[derive(Clone, Debug)]
pub struct Operator {
    pub name: String,
    pub roles: Vec<Role>,
    /// The token proves a second factor as `auth.require_mfa` defines it (always true when
    /// that is not set).
    pub second_factor: bool,
}

impl Operator {
    /// Actor name in the audit trail.
    pub fn actor(&self) -> String {
        format!("operator:{}", self.name)
    }

    /// Requires one of `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), ServiceError> {
        if self.roles.iter().any(|r| roles.contains(r)) {
            Ok(())
        } else {
            Err(ServiceError::new(ErrorCode::Forbidden, format!("{what} needs one of the roles {roles:?}"))
                .by(self.actor()))
        }
    }
}

pub struct Auth {
    cfg: AuthConfig,
    jwks: RwLock<JwkSet>,
}

const ALLOWED: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::EdDSA,
];

impl Auth {
    pub fn new(cfg: AuthConfig, jwks: JwkSet) -> Self {
        Auth { cfg, jwks: RwLock::new(jwks) }
    }

    pub fn set_jwks(&self, jwks: JwkSet) {
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = jwks;
    }

    /// Verifies a bearer token. Errors say what was wrong with it, never echo it.
    pub fn verify(&self, token: &str) -> Result<Operator, ServiceError> {
        let invalid = |why: String| ServiceError::new(ErrorCode::InvalidToken, why);
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("malformed token: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(invalid(format!("token algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| invalid("token has no key id (kid)".into()))?;
        let key = {
            let jwks = self.jwks.read().unwrap_or_else(|p| p.into_inner());
            let jwk = jwks.find(&kid).ok_or_else(|| invalid(format!("token key {kid:?} is not in the JWKS")))?;
            DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("JWKS key {kid:?} is unusable: {e}")))?
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| invalid(describe_jwt_error(&e, &self.cfg.issuer, &format!("{:?}", self.cfg.audience))))?;
        let claims = data.claims;
        let name = lookup(&claims, &self.cfg.subject_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("token has no {} claim", self.cfg.subject_claim)))?
            .to_string();
        let roles: Vec<Role> = lookup(&claims, &self.cfg.roles_claim)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|r| r.as_str()).filter_map(Role::parse).collect())
            .unwrap_or_default();
        let second_factor = self.cfg.require_mfa.as_ref().is_none_or(|m| proves_second_factor(&claims, m));
        if roles.is_empty() {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                format!("token carries no known role in claim {}", self.cfg.roles_claim),
            )
            .by(format!("operator:{name}")));
        }
        Ok(Operator { name, roles, second_factor })
    }
}

/// `acr` is one of the accepted values, or `amr` lists one of the accepted methods.
fn proves_second_factor(claims: &serde_json::Value, mfa: &crate::config::MfaConfig) -> bool {
    let acr = claims.get("acr").and_then(|v| v.as_str()).is_some_and(|a| mfa.acr.iter().any(|x| x == a));
    let amr = claims
        .get("amr")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().filter_map(|m| m.as_str()).any(|m| mfa.amr.iter().any(|x| x == m)));
    acr || amr
}

/// Why a token was refused, in words for the caller; never the token itself.
pub fn describe_jwt_error(e: &jsonwebtoken::errors::Error, issuer: &str, audience: &str) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired".into(),
        ErrorKind::InvalidAudience => format!("token audience is not {audience}"),
        ErrorKind::InvalidIssuer => format!("token issuer is not {issuer:?}"),
        ErrorKind::InvalidSignature => "token signature does not verify".into(),
        ErrorKind::ImmatureSignature => "token is not valid yet".into(),
        _ => format!("token rejected: {e}"),
    }
}

/// Follows a dotted path (`realm_access.roles`) into the claims.
fn lookup<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(claims, |v, k| v.get(k))
}
