//! The Kubernetes calls the controllers share: reading Secret data, conditional writes, and
//! which failures are worth a retry.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Error};

/// Label on every object the agent writes, so that `kubectl get -l` finds them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ca-agent");

/// A Secret's value as text; `None` when absent or not UTF-8. (The API server folds
/// `stringData` into `data` on write, so a Secret read back has only `data`.)
pub fn secret_str(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref().and_then(|d| d.get(key)).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// A Secret's whole data as text.
pub fn secret_map(s: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        if let Ok(t) = String::from_utf8(v.0.clone()) {
            out.insert(k.clone(), t);
        }
    }
    out
}

/// A Secret to write: `data` as given; `resource_version` makes a replace conditional.
pub fn secret(
    name: &str,
    namespace: &str,
    data: &BTreeMap<String, String>,
    resource_version: Option<String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version,
            labels: Some(BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())])),
            ..Default::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The status code of an API answer, if the failure was one.
pub fn status(e: &Error) -> Option<u16> {
    match e {
        Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The `ca_agent_errors_total{cause}` label for a Kubernetes failure.
pub fn cause(e: &Error) -> &'static str {
    match status(e) {
        Some(409) => "api-conflict",
        Some(404) => "api-not-found",
        Some(401 | 403) => "api-forbidden",
        Some(c) if c >= 500 => "api-unavailable",
        Some(_) => "api-refused",
        None => "api-unreachable",
    }
}

/// Worth retrying at once: the API server had trouble, not an opinion about the request.
pub fn transient(e: &Error) -> bool {
    match status(e) {
        Some(c) => c == 429 || c >= 500,
        None => true,
    }
}

/// Runs `op` until it succeeds, fails for a reason a retry cannot fix, or `attempts` ran out,
/// sleeping 200 ms, 400 ms, ... between tries.
pub async fn retrying<T, F, Fut>(attempts: u32, mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut n = 0;
    loop {
        n += 1;
        match op().await {
            Err(e) if transient(&e) && n < attempts => {
                tracing::debug!(error = %e, attempt = n, "Kubernetes API call failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Writes `obj`: replace when it carries a resourceVersion (409 if someone changed it since it
/// was read), create otherwise (409 if someone created it meanwhile). Never deletes.
pub async fn write_secret(api: &Api<Secret>, obj: &Secret) -> Result<Secret, Error> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    retrying(4, || async {
        if obj.metadata.resource_version.is_some() {
            api.replace(&name, &PostParams::default(), obj).await
        } else {
            api.create(&PostParams::default(), obj).await
        }
    })
    .await
}
