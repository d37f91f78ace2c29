//! Reading the configuration: environment overrides, path resolution and the checks serde
//! cannot express.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::*;

pub const ENV_PREFIX: &str = "CA_SERVER_";

impl Config {
    /// Reads the file, applies environment overrides, resolves relative paths against the
    /// file's directory and validates.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml_str(&text, path, std::env::vars())
    }

    /// `load` after the read, with the environment passed in, so that the fuzz target and
    /// tests exercise exactly what the server runs. `path` names the file in errors and
    /// anchors relative paths; nothing is read from it.
    pub fn from_toml_str(text: &str, path: &Path, env: impl Iterator<Item = (String, String)>) -> Result<Config> {
        let mut value: toml::Table =
            toml::from_str(text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        apply_env_overrides(&mut value, env)?;
        let mut cfg: Config = toml::Value::Table(value)
            .try_into()
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve(&base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let fix_ref = |r: &mut String| {
            if let Some(rest) = r.strip_prefix("file:") {
                let p = Path::new(rest);
                if p.is_relative() {
                    *r = format!("file:{}", base.join(p).display());
                }
            }
        };
        fix(&mut self.tls.cert);
        fix_ref(&mut self.tls.key);
        self.tls.client_ca.iter_mut().for_each(fix);
        if let Some(p) = &mut self.auth.jwks_file {
            fix(p);
        }
        for i in &mut self.issuers {
            fix(&mut i.certificate);
            i.chain.iter_mut().for_each(fix);
            fix_ref(&mut i.key);
        }
        fix_ref(&mut self.audit.key);
        if let Some(istio) = &mut self.istio {
            for c in istio.clusters.values_mut() {
                if let Some(p) = &mut c.jwks_file {
                    fix(p);
                }
            }
        }
        if let Some(rest) = self.database.url.strip_prefix("sqlite://") {
            let p = Path::new(rest);
            if p.is_relative() {
                self.database.url = format!("sqlite://{}", base.join(p).display());
            }
        }
    }

    fn validate(&self) -> Result<()> {
        if self.issuers.is_empty() {
            bail!("configure at least one [[issuers]] entry");
        }
        let mut names = std::collections::HashSet::new();
        for i in &self.issuers {
            if !names.insert(&i.name) {
                bail!("issuer {:?} is configured twice", i.name);
            }
            i.key.parse::<hsm::KeyRef>().with_context(|| format!("issuers.{}.key", i.name))?;
        }
        if self.auth.jwks_file.is_none() == self.auth.jwks_url.is_none() {
            bail!("set exactly one of auth.jwks_file and auth.jwks_url");
        }
        if !self.tls.key.starts_with("file:") {
            bail!("tls.key must be a file: reference");
        }
        self.audit.key.parse::<hsm::KeyRef>().context("audit.key")?;
        if self.rate_limit.anonymous_per_minute == 0 || self.rate_limit.anonymous_burst == 0 {
            bail!("rate_limit.anonymous_per_minute and rate_limit.anonymous_burst must be at least 1");
        }
        if self.audit.denial_summary_interval.duration() <= time::Duration::ZERO {
            bail!("audit.denial_summary_interval must be positive");
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            bail!("log.format must be json or text");
        }
        if let Some(istio) = &self.istio {
            for (name, c) in &istio.clusters {
                if c.jwks_file.is_none() == c.oidc_discovery_url.is_none() {
                    bail!("istio.clusters.{name}: set exactly one of jwks_file and oidc_discovery_url");
                }
                if c.audiences.is_empty() {
                    bail!("istio.clusters.{name}.audiences must not be empty");
                }
                if c.default_ttl.duration() <= time::Duration::ZERO || c.default_ttl.duration() > c.max_ttl.duration() {
                    bail!("istio.clusters.{name}: default_ttl must be positive and at most max_ttl");
                }
                for a in &c.trusted_node_accounts {
                    if a.split('/').count() != 2 || a.split('/').any(str::is_empty) {
                        bail!("istio.clusters.{name}.trusted_node_accounts: {a:?} is not namespace/serviceaccount");
                    }
                }
            }
            if istio.jwks_grace.duration() < time::Duration::ZERO {
                bail!("istio.jwks_grace must not be negative");
            }
            if istio.server_names.is_empty() {
                bail!("istio.server_names must name the gRPC endpoint");
            }
            if istio.batch_max == 0 {
                bail!("istio.batch_max must be at least 1");
            }
            if istio.max_concurrent_requests == 0 || istio.max_concurrent_requests_per_connection == 0 {
                bail!("istio.max_concurrent_requests and max_concurrent_requests_per_connection must be at least 1");
            }
            if istio.request_timeout.duration() <= time::Duration::ZERO {
                bail!("istio.request_timeout must be positive");
            }
        }
        if self.audit.checkpoint_every < 1 {
            bail!("audit.checkpoint_every must be at least 1");
        }
        if let Some(m) = &self.auth.require_mfa
            && m.acr.is_empty()
            && m.amr.is_empty()
        {
            bail!("auth.require_mfa must list at least one acr value or amr method");
        }
        if let Some(l) = &self.metrics.listen
            && !self.metrics.allow_remote
            && !is_loopback(l)
        {
            bail!(
                "metrics.listen {l:?} is not a loopback address; set metrics.allow_remote = true to serve metrics beyond this host"
            );
        }
        if self.limits.handshake_timeout.duration() <= time::Duration::ZERO
            || self.limits.idle_timeout.duration() <= time::Duration::ZERO
        {
            bail!("limits.handshake_timeout and limits.idle_timeout must be positive");
        }
        Ok(())
    }
}

/// `127.0.0.1:9464`, `[::1]:9464` or `localhost:9464`.
fn is_loopback(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

/// `CA_SERVER_LISTEN=...` sets `listen`; `CA_SERVER_DATABASE__URL=...` sets `database.url`.
/// Values are parsed as TOML when they parse (numbers, booleans, arrays), else taken as strings.
pub fn apply_env_overrides(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
    for (k, val) in vars {
        let Some(rest) = k.strip_prefix(ENV_PREFIX) else { continue };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            bail!("environment variable {k}: empty key segment");
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {val}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(val));
        let (last, parents) = path.split_last().expect("non-empty");
        let mut t = &mut *table;
        for p in parents {
            t = t
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .with_context(|| format!("environment variable {k}: {p} is not a section"))?;
        }
        t.insert(last.clone(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_reach_nested_keys() {
        let mut t: toml::Table = toml::from_str("listen = \"a\"\n[database]\nurl = \"sqlite://x\"\n").unwrap();
        let vars = vec![
            ("CA_SERVER_LISTEN".to_string(), "127.0.0.1:9".to_string()),
            ("CA_SERVER_DATABASE__URL".to_string(), "postgres://h/db".to_string()),
            ("CA_SERVER_DATABASE__MIGRATE".to_string(), "false".to_string()),
            ("CA_SERVER_POLICY__MAX_BODY_BYTES".to_string(), "10".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        apply_env_overrides(&mut t, vars.into_iter()).unwrap();
        assert_eq!(t["listen"].as_str(), Some("127.0.0.1:9"));
        assert_eq!(t["database"]["url"].as_str(), Some("postgres://h/db"));
        assert_eq!(t["database"]["migrate"].as_bool(), Some(false));
        assert_eq!(t["policy"]["max_body_bytes"].as_integer(), Some(10));
        assert!(
            apply_env_overrides(&mut t, vec![("CA_SERVER_LISTEN__X".to_string(), "1".to_string())].into_iter())
                .is_err()
        );
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// The configuration shown in deploy/kubernetes/ca-server.yaml parses and validates.
    #[test]
    fn the_kubernetes_example_config_is_valid() {
        let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/ca-server.yaml"))
            .unwrap();
        let block: String = yaml
            .lines()
            .skip_while(|l| !l.contains("config.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| l.strip_prefix("    ").unwrap_or(l).to_string() + "\n")
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, block).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.issuers[0].name, "prod");
        assert!(!cfg.database.migrate);
        assert_eq!(cfg.auth.roles_claim, "realm_access.roles");
    }
}
