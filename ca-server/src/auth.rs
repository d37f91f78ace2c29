//! Operators authenticate with OIDC bearer JWTs (any OIDC provider, e.g. Keycloak): the
//! signature is checked against a JWKS, then `iss`, `aud`, `exp` and `nbf`; roles come from a
//! configurable claim.

pub mod service_account;

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;

use crate::config::AuthConfig;
use crate::error::{ErrorCode, ServiceError};
use crate::jwt::{Expect, KeySet, KeySource};

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
    keys: KeySet,
    /// `cfg.audience` as the one-element list `jwt::Expect` wants.
    audiences: Vec<String>,
}

/// How often a JWKS URL is re-read (a file is read at start, and again for an unknown `kid`).
const JWKS_URL_REFRESH: Duration = Duration::from_secs(600);

const OWNER: &str = "the operators' JWKS";

impl Auth {
    /// Operators' tokens verified against fixed keys (tests).
    pub fn new(cfg: AuthConfig, jwks: JwkSet) -> Self {
        let keys = KeySet::fixed(OWNER, &jwks).unwrap_or_else(|_| {
            KeySet::unloaded(OWNER, KeySource::Fixed, Duration::MAX).expect("an HTTP client can be built")
        });
        Self::with_keys(cfg, keys)
    }

    /// Reads `auth.jwks_file` or `auth.jwks_url` now.
    pub async fn load(cfg: AuthConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (source, what) = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(path), _) => (KeySource::File(path.clone()), format!("auth.jwks_file {}", path.display())),
            (None, Some(url)) => (KeySource::Url(url.clone()), format!("auth.jwks_url {url}")),
            (None, None) => anyhow::bail!("set exactly one of auth.jwks_file and auth.jwks_url"),
        };
        let keys = KeySet::load(OWNER, source, JWKS_URL_REFRESH).await.context(what)?;
        Ok(Self::with_keys(cfg, keys))
    }

    fn with_keys(cfg: AuthConfig, keys: KeySet) -> Self {
        let audiences = vec![cfg.audience.clone()];
        Auth { cfg, keys, audiences }
    }

    /// Re-reads the keys if the periodic refresh is due (a JWKS URL; a file only on demand).
    pub async fn refresh_if_due(&self) -> anyhow::Result<()> {
        if self.cfg.jwks_url.is_some() && self.keys.due() {
            self.keys.refresh(true).await?;
        }
        Ok(())
    }

    /// Verifies a bearer token. Errors say what was wrong with it, never echo it.
    pub async fn verify(&self, token: &str) -> Result<Operator, ServiceError> {
        let invalid = |why: String| ServiceError::new(ErrorCode::InvalidToken, why);
        let expect = Expect { issuer: &self.cfg.issuer, audiences: &self.audiences, leeway: 30 };
        let claims: serde_json::Value = crate::jwt::decode(&self.keys, token, &expect).await.map_err(invalid)?;
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

/// Follows a dotted path (`realm_access.roles`) into the claims.
fn lookup<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(claims, |v, k| v.get(k))
}
