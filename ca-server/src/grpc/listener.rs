//! The gRPC listener: tonic's generated service behind our own rustls accept loop and
//! `tls::serve_conn` (tonic's `Server` cannot close idle connections), with tower's timeout,
//! concurrency limits and load shedding in front.

use std::sync::Arc;

use anyhow::{Context, Result};
use tonic::Status;

use crate::grpc::handler::IstioApi;
use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::service::state::AppState;

/// Serves Istio's certificate API over TLS until `shutdown` resolves, then lets the requests
/// in flight finish. Each request has `istio.request_timeout` (then `DEADLINE_EXCEEDED`);
/// over `istio.max_concurrent_requests` in all, or `max_concurrent_requests_per_connection`
/// on one connection, a request is refused with `RESOURCE_EXHAUSTED` at once rather than
/// queued (istio-agent and ztunnel retry with backoff). Connections follow `limits`.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    limits: crate::tls::ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let cfg = state.config.istio.clone().context("istio is not configured")?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(state.istio.serving.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let service = IstioCertificateServiceServer::new(IstioApi::new(state.clone())).max_decoding_message_size(64 * 1024);
    let global = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests));
    let deadline = cfg.request_timeout.duration().unsigned_abs();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            c = crate::tls::accept(&listener) => c,
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let stop = stop_rx.clone();
        let svc = tower::ServiceBuilder::new()
            .map_result(grpc_refusal)
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(global.clone()))
            .concurrency_limit(cfg.max_concurrent_requests_per_connection)
            .timeout(deadline)
            // tonic's own server records the peer for `Request::remote_addr` (the anonymous
            // rate limit is keyed by it); this accept loop has to do the same.
            .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: Some(remote) });
                req
            })
            .map_response(tonic_body)
            // A panicking handler answers INTERNAL instead of resetting the stream.
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::grpc_panic_response))
            .service(service.clone());
        // Handshakes run in their own tasks: one slow client must not hold up the rest.
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "gRPC TLS handshake failed"),
                Err(_) => return tracing::debug!(%remote, "gRPC TLS handshake timed out"),
            };
            crate::tls::serve_conn(hyper_util::rt::TokioIo::new(tls), svc, limits, true, Some(stop), remote).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

/// The catch-panic layer's body back into tonic's.
fn tonic_body(
    r: hyper::Response<tower_http::body::UnsyncBoxBody<hyper::body::Bytes, tower::BoxError>>,
) -> hyper::Response<tonic::body::Body> {
    r.map(tonic::body::Body::new)
}

/// The limits' refusals as gRPC statuses, never a failed connection (tonic's own server would answer a timeout with
/// `CANCELLED`; a deadline is what the caller ran into).
fn grpc_refusal(
    r: Result<hyper::Response<tonic::body::Body>, tower::BoxError>,
) -> Result<hyper::Response<tonic::body::Body>, tower::BoxError> {
    Ok(match r {
        Ok(resp) => resp,
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => {
            Status::deadline_exceeded("the request took longer than istio.request_timeout").into_http()
        }
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
            Status::resource_exhausted("too many requests in flight; retry with backoff").into_http()
        }
        Err(e) => {
            tracing::error!(error = %e, "gRPC request failed");
            Status::internal("internal error; see the server log").into_http()
        }
    })
}
