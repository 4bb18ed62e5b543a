//! What the peer's HTTP servers and clients share: the accept loop, body
//! types, `Range` headers, the HTTP client, and the stop signal.

use std::convert::Infallible;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tracing::debug;

/// Error of a streamed body: ending a body with it aborts the response, so
/// the client sees a broken transfer instead of wrong bytes.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body fed through the returned sender; an `Err` sent aborts it.
pub fn channel_body() -> (mpsc::Sender<Result<Bytes, BodyError>>, Body) {
    let (sender, receiver) = mpsc::channel(4);
    let frames = futures_util::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
        |item: Result<Bytes, BodyError>| item.map(Frame::data),
    );
    (sender, StreamBody::new(frames).boxed())
}

/// A response with a status, text body and no other headers.
pub fn text(status: u16, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(full(body.into()));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
}

/// Serves `handler` on every connection `listener` accepts, forever.
pub async fn serve<H, F>(listener: tokio::net::TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = handler(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%remote, %error, "connection ended");
            }
        });
    }
}

/// Serves `render()` at `/metrics` (Prometheus' text format), forever.
pub async fn serve_metrics<R>(listener: tokio::net::TcpListener, render: R)
where
    R: Fn() -> String + Send + Sync + 'static,
{
    serve(listener, move |request| {
        let answer = if request.uri().path() == "/metrics" {
            Response::new(full(render()))
        } else {
            text(404, "not found\n")
        };
        std::future::ready(answer)
    })
    .await;
}

/// The byte range a `Range` header asks of a blob of `size` bytes:
/// `None` without a header (the whole blob), `Err` for a range outside the
/// blob or one this server does not support (several ranges, other units).
pub fn requested_range(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(header) = header else {
        return Ok(None);
    };
    let spec = header.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (first, last) = spec.split_once('-').ok_or(())?;
    let parse = |s: &str| s.trim().parse::<u64>().map_err(|_| ());
    let range = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => {
            let suffix = parse(last)?;
            if suffix == 0 {
                return Err(());
            }
            size.saturating_sub(suffix)..size
        }
        (false, true) => parse(first)?..size,
        (false, false) => {
            let (start, end) = (parse(first)?, parse(last)?);
            if end < start {
                return Err(());
            }
            start..end.saturating_add(1).min(size)
        }
        (true, true) => return Err(()),
    };
    if range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

/// An HTTP client for the origin and for other peers: no redirects
/// followed (they pass through to the client), TLS with the platform's
/// roots.
pub fn client() -> Result<reqwest::Client, crate::P2pError> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let setup = |e: String| crate::P2pError::HttpClient(e);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))?
        .with_platform_verifier()
        .map_err(|e| setup(e.to_string()))?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .read_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| setup(e.to_string()))
}

/// Completes on SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers_resolve_against_the_blob_size() {
        for (header, expected) in [
            (None, Ok(None)),
            (Some("bytes=0-9"), Ok(Some(0..10))),
            (Some("bytes=10-"), Ok(Some(10..100))),
            (Some("bytes=-10"), Ok(Some(90..100))),
            (Some("bytes=-1000"), Ok(Some(0..100))),
            (Some("bytes=90-1000"), Ok(Some(90..100))),
            (Some("bytes=100-"), Err(())),
            (Some("bytes=5-4"), Err(())),
            (Some("bytes=-0"), Err(())),
            (Some("bytes=0-1,5-6"), Err(())),
            (Some("items=0-1"), Err(())),
            (Some("bytes=-"), Err(())),
            (Some("bytes=x-1"), Err(())),
        ] {
            assert_eq!(requested_range(header, 100), expected, "{header:?}");
        }
    }
}
