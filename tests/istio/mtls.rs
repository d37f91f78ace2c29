//! Two workloads complete an mTLS handshake with what the server issued.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workloads_complete_an_mtls_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    let issue = |ns: &'static str, sa: &'static str| {
        let ch = ch.clone();
        let t = sa_token(&srv, ns, sa, |_| {});
        async move {
            let (c, key) = csr(vec![], &rcgen::PKCS_ECDSA_P256_SHA256);
            (create(&ch, Call::new(&t, c)).await.unwrap(), key)
        }
    };
    let (server_chain, server_key) = issue("shop", "frontend").await;
    let (client_chain, client_key) = issue("shop", "checkout").await;
    let (peer_seen, client_saw) = mtls(&server_chain, server_key, &client_chain, client_key).await;
    assert_eq!(peer_seen, "spiffe://cluster.local/ns/shop/sa/checkout");
    assert_eq!(client_saw, "spiffe://cluster.local/ns/shop/sa/frontend");
}

fn spiffe_of(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(u.to_string()) } else { None })
        .unwrap()
}

/// Checks the chain with webpki against the bundle, and the peer by its SPIFFE ID rather than
/// a host name, as Istio's proxies do.
#[derive(Debug)]
struct SpiffeVerifier(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Ok(v) => Ok(v),
            // Workload certificates carry no host names; the chain itself verified.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {
                assert!(spiffe_of(end_entity).starts_with("spiffe://cluster.local/"));
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// One handshake: returns the SPIFFE ID each side saw of the other.
async fn mtls(
    server_chain: &[String],
    server_key: Vec<u8>,
    client_chain: &[String],
    client_key: Vec<u8>,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = |chain: &[String]| {
        let mut r = rustls::RootCertStore::empty();
        for p in pem::parse_many(chain.last().unwrap()).unwrap() {
            r.add(p.into_contents().into()).unwrap();
        }
        Arc::new(r)
    };
    let certs = |chain: &[String]| -> Vec<rustls::pki_types::CertificateDer<'static>> {
        chain[..chain.len() - 1].iter().map(|p| der(p).into()).collect()
    };
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(server_chain), provider.clone())
            .build()
            .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs(server_chain), rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.into()))
        .unwrap();
    let webpki_server =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(client_chain), provider.clone())
            .build()
            .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier(webpki_server)))
        .with_client_auth_cert(certs(client_chain), rustls::pki_types::PrivateKeyDer::Pkcs8(client_key.into()))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg)).accept(tcp).await.unwrap();
        let peer = spiffe_of(&tls.get_ref().1.peer_certificates().unwrap()[0]);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        peer
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect("workload.invalid".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let saw = spiffe_of(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    (server.await.unwrap(), saw)
}
