//! The REST API's contract as served by the real `ca-server --dev`: the OpenAPI document at
//! /v1/openapi.json declares every parameter where it is, every error as a problem document
//! and the closed sets of values as enums; bodies and paths that cannot be read get the right
//! status and a problem document. Malformed framing is written as raw bytes over TLS, since
//! reqwest cannot produce it.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "server_support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn document(srv: &Server) -> Value {
    let resp = srv.client.get(format!("{}/v1/openapi.json", srv.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

/// `{name}` placeholders of a path template.
fn template_params(path: &str) -> BTreeSet<String> {
    path.split('{').skip(1).filter_map(|s| s.split_once('}')).map(|(p, _)| p.to_string()).collect()
}

fn enum_of(doc: &Value, schema: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][schema]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("{schema} is not an enum: {}", doc["components"]["schemas"][schema]))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Follows a local `$ref` (one level, as utoipa writes them).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or_else(|| panic!("dangling {r}")),
        None => v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn served_document_declares_parameters_problems_and_enums() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    let doc = document(&srv).await;
    let mut problems = vec![];
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let label = format!("{} {path}", method.to_uppercase());
            let params: Vec<&Value> =
                op["parameters"].as_array().map(|a| a.iter().map(|p| resolve(&doc, p)).collect()).unwrap_or_default();
            let declared: BTreeSet<String> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    if p["required"] != true {
                        problems.push(format!("{label}: path parameter {} is not required", p["name"]));
                    }
                    p["name"].as_str().unwrap().to_string()
                })
                .collect();
            let wanted = template_params(path);
            for missing in wanted.difference(&declared) {
                problems.push(format!("{label}: {{{missing}}} is not declared as a path parameter"));
            }
            for extra in declared.difference(&wanted) {
                problems.push(format!("{label}: path parameter {extra} is not in the template"));
            }
            let responses = op["responses"].as_object().unwrap();
            let mut client_errors = 0;
            for (status, resp) in responses {
                if resolve(&doc, resp)["description"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{label}: {status} has no description"));
                }
                let content = resolve(&doc, resp)["content"].as_object().cloned().unwrap_or_default();
                if status.starts_with('4') || status.starts_with('5') {
                    let problem_json = content
                        .get("application/problem+json")
                        .is_some_and(|c| c["schema"]["$ref"] == "#/components/schemas/Problem");
                    // /readyz answers 503 with its readiness report, not a problem.
                    let readiness = path == "/readyz" && status == "503";
                    if !problem_json && !readiness {
                        problems.push(format!("{label}: {status} is not a Problem as application/problem+json"));
                    }
                    if content.contains_key("application/json") && !readiness {
                        problems.push(format!("{label}: {status} is documented as application/json"));
                    }
                    client_errors += status.starts_with('4') as usize;
                }
            }
            if client_errors == 0 {
                problems.push(format!("{label}: documents no 4xx"));
            }
            for must in ["429", "500"] {
                if !responses.contains_key(must) {
                    problems.push(format!("{label}: {must} is not documented"));
                }
            }
            let bearer = op["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            if bearer {
                for must in ["401", "403"] {
                    if !responses.contains_key(must) {
                        problems.push(format!("{label}: needs a token but does not document {must}"));
                    }
                }
                if method == "post"
                    && !responses
                        .get("403")
                        .and_then(|r| r["description"].as_str())
                        .unwrap_or("")
                        .contains("mfa-required")
                {
                    problems.push(format!("{label}: a state change does not document 403 mfa-required"));
                }
            }
            if op.get("requestBody").is_some() {
                for must in ["400", "413", "415"] {
                    if !responses.contains_key(must) {
                        problems.push(format!("{label}: takes a body but does not document {must}"));
                    }
                }
            }
        }
    }
    assert!(operations >= 26, "{operations} operations");
    // Operations that need an operator token say so, with the roles as scopes.
    let security = |method: &str, path: &str| doc["paths"][path][method]["security"].clone();
    assert_eq!(security("get", "/v1/audit"), json!([{"bearer": ["auditor", "admin"]}]));
    assert_eq!(security("post", "/v1/clusters"), json!([{"bearer": ["operator", "admin"]}]));
    assert_eq!(security("get", "/v1/crl/{issuer}"), Value::Null, "CRLs are public");
    // Query parameters are query parameters.
    let crl_params = doc["paths"]["/v1/crl/{issuer}"]["get"]["parameters"].as_array().unwrap();
    assert!(crl_params.iter().any(|p| p["name"] == "format" && p["in"] == "query" && p["required"] == false));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    assert_eq!(
        enum_of(&doc, "RevocationReason"),
        set(&[
            "unspecified",
            "key-compromise",
            "ca-compromise",
            "affiliation-changed",
            "superseded",
            "cessation-of-operation",
            "certificate-hold",
            "privilege-withdrawn"
        ])
    );
    assert_eq!(enum_of(&doc, "ClusterMode"), set(&["plugin", "external-ca"]));
    assert_eq!(enum_of(&doc, "ClusterState"), set(&["pending", "active", "rejected"]));
    assert_eq!(enum_of(&doc, "RequestStatus"), set(&["pending", "approved", "rejected"]));
    assert_eq!(enum_of(&doc, "CertificateStatus"), set(&["valid", "revoked", "expired"]));
    assert_eq!(enum_of(&doc, "Role"), set(&["admin", "operator", "auditor"]));
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["RevokeRequest"]["properties"]["reason"]["$ref"], "#/components/schemas/RevocationReason");
    assert_eq!(schemas["CertificateView"]["properties"]["status"]["$ref"], "#/components/schemas/CertificateStatus");
    assert_eq!(schemas["ClusterView"]["properties"]["status"]["$ref"], "#/components/schemas/ClusterState");
    assert_eq!(schemas["ClusterView"]["properties"]["mode"]["$ref"], "#/components/schemas/ClusterMode");
    assert_eq!(schemas["RequestView"]["properties"]["status"]["$ref"], "#/components/schemas/RequestStatus");
    // What the configuration decides is in the document as served.
    let register = &schemas["RegisterCluster"];
    assert_eq!(register["properties"]["environment"]["enum"], json!(["dev"]));
    assert_eq!(register["properties"]["trust_domain"]["enum"], json!(["cluster.local"]));
    assert_eq!(
        register["oneOf"][1]["required"],
        json!(["mode", "key", "istio"]),
        "external-ca needs a key and Istio settings: {register}"
    );
}

/// A TLS connection to the server that writes `request` as given and returns the whole answer.
async fn raw(srv: &Server, request: &[u8]) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(std::fs::read(srv.root()).unwrap()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = srv.url.strip_prefix("https://").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    // The server may answer (and close) before it has read everything, as it should for a body
    // over the limit: a failed write is not the test's concern, the answer is.
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    // The server closes the connection after refusing a body it could not read.
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Status, content type and problem code of a raw HTTP/1.1 answer.
fn parse_answer(answer: &str) -> (u16, String, Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {answer:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_bodies_and_paths_get_the_right_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let admin = srv.token("admin");
    let host = srv.url.strip_prefix("https://").unwrap();
    let post = |headers: &str, body: &str| {
        format!(
            "POST /v1/clusters HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\n{headers}\r\n{body}"
        )
    };

    // Chunked framing that is not chunked framing: the body cannot be read, which is not the
    // client sending too much.
    let bad_chunk = post("Transfer-Encoding: chunked\r\n", "zz\r\n{}\r\n0\r\n\r\n");
    let (status, ct, problem) = parse_answer(&raw(&srv, bad_chunk.as_bytes()).await);
    assert_eq!((status, ct.as_str(), &problem["code"]), (400, "application/problem+json", &json!("malformed-body")));

    // Content-Length and Transfer-Encoding together: hyper reads it as chunked (RFC 9112
    // 6.3) and closes the connection afterwards; broken chunks are still a 400.
    let smuggled = post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "5\r\n{\"a\":\r\nX\r\n");
    let (status, ct, problem) = parse_answer(&raw(&srv, smuggled.as_bytes()).await);
    assert_eq!((status, ct.as_str(), &problem["code"]), (400, "application/problem+json", &json!("malformed-body")));

    // Only a body over the limit is 413, chunked or not.
    let big = format!("{:x}\r\n{}\r\n0\r\n\r\n", 70_000, " ".repeat(70_000));
    let (status, _, problem) = parse_answer(&raw(&srv, post("Transfer-Encoding: chunked\r\n", &big).as_bytes()).await);
    assert_eq!((status, &problem["code"]), (413, &json!("payload-too-large")));

    // A JSON body sent as anything but application/json is refused, not parsed.
    let body = json!({"name": "typed", "environment": "dev", "trust_domain": "cluster.local"}).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"] {
        let resp = srv
            .client
            .post(format!("{}/v1/clusters", srv.url))
            .bearer_auth(&admin)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 415, "{content_type}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(resp.json::<Value>().await.unwrap()["code"], "unsupported-media-type", "{content_type}");
    }
    let resp = srv
        .client
        .post(format!("{}/v1/clusters", srv.url))
        .bearer_auth(&admin)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415, "no Content-Type at all");
    // Parameters and case do not matter.
    let resp = srv
        .client
        .post(format!("{}/v1/clusters", srv.url))
        .bearer_auth(&admin)
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{}", resp.text().await.unwrap());

    // A path parameter that does not decode is the path's fault, not the query's.
    for path in ["/v1/crl/%ff", "/v1/clusters/%c3%28/trust-bundle"] {
        let resp = srv.client.get(format!("{}{path}", srv.url)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(resp.json::<Value>().await.unwrap()["code"], "invalid-path", "{path}");
    }
    // A query value outside its enum is the query's.
    let resp = srv.client.get(format!("{}/v1/crl/dev?format=xml", srv.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "invalid-query");
    let (s, v) = srv.call("GET", "/v1/requests?status=maybe", Some(&srv.token("auditor")), None).await;
    assert_eq!((s, &v["code"]), (400, &json!("invalid-query")), "{v}");

    // A body for something that does not exist is answered for what does not exist.
    let upload = json!({"environment": "dev", "certificate": "not a certificate"});
    let (s, v) = srv.call("POST", "/v1/rotations/none/certificates", Some(&admin), Some(upload)).await;
    assert_eq!((s, &v["code"]), (404, &json!("not-found")), "{v}");
}
