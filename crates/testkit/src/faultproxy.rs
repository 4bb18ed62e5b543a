//! Loopback HTTP servers for tests: [`LoopbackServer`] (a handler on a
//! background thread with its own runtime, usable from sync and async tests)
//! and [`FaultProxy`], an HTTP/1.1 proxy in front of a real server that
//! injects planned faults: error statuses, connection resets, truncated,
//! stalled or corrupted bodies, delays, request bodies cut off mid-way.
//!
//! Faults are planned with [`FaultRule`]s ("the next 2 GETs under /blobs/
//! answer 503"); every request is logged with the fault applied and the
//! status returned, so tests assert on what really happened on the wire.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Error type of [`Body`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type of [`LoopbackServer`] handlers.
pub type Body = BoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full_body(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with `status`, the given headers and body.
pub fn response(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(full_body(body))
        .expect("test response headers are valid")
}

/// What a [`LoopbackServer`] handler does with a request.
#[derive(Debug)]
pub enum Reply {
    /// Send this response.
    Response(Response<Body>),
    /// Abort the client connection with a TCP reset instead of answering.
    Reset,
}

impl From<Response<Body>> for Reply {
    fn from(response: Response<Body>) -> Reply {
        Reply::Response(response)
    }
}

type Handler =
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync;

/// An HTTP/1.1 server on `127.0.0.1:0`, running `handler` for every request
/// on a background thread with its own tokio runtime. Stops on drop.
pub struct LoopbackServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LoopbackServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl LoopbackServer {
    /// Starts serving. Panics if it cannot bind or start its runtime.
    pub fn start<F, Fut, R>(handler: F) -> LoopbackServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: Into<Reply>,
    {
        let handler: Arc<Handler> = Arc::new(move |request| {
            let reply = handler(request);
            Box::pin(async move { reply.await.into() })
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback port");
        listener
            .set_nonblocking(true)
            .expect("make listener non-blocking");
        let addr = listener.local_addr().expect("listener address");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("loopback-http-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("test server runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("register listener");
                    tokio::select! {
                        _ = stop => {}
                        () = accept_loop(listener, handler) => {}
                    }
                });
            })
            .expect("spawn test server thread");
        LoopbackServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returned to hyper to make it drop a connection we armed for reset.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by test fault")
    }
}

impl std::error::Error for ResetConnection {}

async fn accept_loop(listener: tokio::net::TcpListener, handler: Arc<Handler>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(serve_connection(stream, handler));
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, handler: Arc<Handler>) {
    let _ = stream.set_nodelay(true);
    // A second descriptor of the socket lets a handler arm SO_LINGER=0
    // while hyper owns the stream; hyper's close then sends a RST.
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let reset_handle = Arc::new(Mutex::new(std_stream.try_clone().ok()));
    let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
        return;
    };
    let service = hyper::service::service_fn(move |request| {
        let handler = handler.clone();
        let reset_handle = reset_handle.clone();
        async move {
            match handler(request).await {
                Reply::Response(response) => Ok(response),
                Reply::Reset => {
                    if let Some(socket) = lock(&reset_handle).take() {
                        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                    }
                    Err(ResetConnection)
                }
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fault to inject into one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty body; the target never sees it.
    Status(u16),
    /// Reset the client's connection (TCP RST) instead of answering.
    Reset,
    /// Wait this long, then forward normally.
    Delay(Duration),
    /// Forward, but end the response body with an error after this many
    /// bytes (headers keep the full Content-Length), dropping the connection.
    TruncateBody(u64),
    /// Forward, but pause this long when the body reaches `after` bytes.
    StallBody {
        /// Body offset of the pause.
        after: u64,
        /// Length of the pause.
        duration: Duration,
    },
    /// Forward, inverting the body byte at this offset.
    FlipByte(u64),
    /// Forward the request with its body cut off after this many bytes,
    /// then reset the client's connection. The target sees its client
    /// vanish mid-body and has finished handling that before the reset.
    CutRequestBody(u64),
}

/// "Apply `fault` to the next `times` requests matching the filters."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    fault: Fault,
    times: usize,
    method: Option<String>,
    path_contains: Option<String>,
}

impl FaultRule {
    /// `fault` once, for any request.
    pub fn new(fault: Fault) -> FaultRule {
        FaultRule {
            fault,
            times: 1,
            method: None,
            path_contains: None,
        }
    }

    /// Apply to the next `times` matching requests.
    pub fn times(mut self, times: usize) -> FaultRule {
        self.times = times;
        self
    }

    /// Only requests with this method (e.g. "GET").
    pub fn method(mut self, method: &str) -> FaultRule {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only requests whose path (with query) contains `text`.
    pub fn path_contains(mut self, text: &str) -> FaultRule {
        self.path_contains = Some(text.to_owned());
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.times > 0
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.contains(p))
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// e.g. "GET".
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// The status sent back (`None` for resets).
    pub status: Option<u16>,
}

#[derive(Debug)]
struct ProxyState {
    target: SocketAddr,
    rules: Mutex<Vec<FaultRule>>,
    log: Mutex<Vec<RequestRecord>>,
}

/// An HTTP/1.1 proxy on loopback in front of `target`, injecting planned
/// faults. The `Host` header is forwarded unchanged, so servers that build
/// absolute URLs from it (registries do, for uploads) keep clients on the
/// proxy.
#[derive(Debug)]
pub struct FaultProxy {
    server: LoopbackServer,
    state: Arc<ProxyState>,
}

impl FaultProxy {
    /// Starts a proxy to `target` with no faults planned.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let state = Arc::new(ProxyState {
            target,
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        });
        let handler_state = state.clone();
        let server = LoopbackServer::start(move |request| {
            let state = handler_state.clone();
            async move { state.handle(request).await }
        });
        FaultProxy { server, state }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `127.0.0.1:PORT`, e.g. as the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr().to_string()
    }

    /// Plans a fault. Rules are consulted in the order added.
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.state.rules).push(rule);
    }

    /// Drops all planned faults.
    pub fn clear_faults(&self) {
        lock(&self.state.rules).clear();
    }

    /// Faults planned but not yet applied.
    pub fn pending_faults(&self) -> usize {
        lock(&self.state.rules).iter().map(|r| r.times).sum()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).clone()
    }

    /// Forgets the request log.
    pub fn clear_log(&self) {
        lock(&self.state.log).clear();
    }
}

impl ProxyState {
    async fn handle(&self, request: Request<Incoming>) -> Reply {
        let method = request.method().as_str().to_owned();
        let path = request
            .uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default();
        let fault = self.take_fault(&method, &path);
        let index = {
            let mut log = lock(&self.log);
            log.push(RequestRecord {
                method,
                path,
                fault: fault.clone(),
                status: None,
            });
            log.len() - 1
        };
        let reply = self.apply(fault, request).await;
        if let Reply::Response(response) = &reply {
            lock(&self.log)[index].status = Some(response.status().as_u16());
        }
        reply
    }

    fn take_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let rule = rules.iter_mut().find(|rule| rule.matches(method, path))?;
        rule.times -= 1;
        Some(rule.fault.clone())
    }

    async fn apply(&self, fault: Option<Fault>, request: Request<Incoming>) -> Reply {
        match fault {
            Some(Fault::Status(status)) => response(status, &[("content-length", "0")], "").into(),
            Some(Fault::Reset) => Reply::Reset,
            Some(Fault::CutRequestBody(limit)) => {
                if let Err(error) = self.send_cut_request(request, limit).await {
                    tracing::warn!(%error, "fault proxy could not deliver a cut request");
                }
                Reply::Reset
            }
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                self.forward(request, None).await
            }
            Some(body_fault) => self.forward(request, Some(body_fault)).await,
            None => self.forward(request, None).await,
        }
    }

    async fn forward(&self, request: Request<Incoming>, body_fault: Option<Fault>) -> Reply {
        match self.send_upstream(request).await {
            Ok(upstream) => {
                let (parts, body) = upstream.into_parts();
                let body = match body_fault {
                    Some(fault) => faulty_body(body, fault),
                    None => body.map_err(BoxError::from).boxed(),
                };
                Response::from_parts(parts, body).into()
            }
            Err(error) => {
                let message = format!("fault proxy cannot reach {}: {error}", self.target);
                response(StatusCode::BAD_GATEWAY.as_u16(), &[], message).into()
            }
        }
    }

    /// One fresh upstream connection per request keeps the proxy simple
    /// and makes faults on one request unable to poison the next.
    async fn send_upstream(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, BoxError> {
        let stream = tokio::net::TcpStream::connect(self.target).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender.send_request(request).await?)
    }

    /// Sends `request` upstream with only `limit` body bytes and half-closes
    /// the connection, then reads until the target closes it: the target has
    /// handled the broken request by then, so what the client does next
    /// meets its aftermath, not a race with it.
    async fn send_cut_request(
        &self,
        request: Request<Incoming>,
        limit: u64,
    ) -> Result<(), BoxError> {
        let (parts, mut body) = request.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("{} {target} HTTP/1.1\r\n", parts.method).into_bytes();
        for (name, value) in &parts.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let mut stream = tokio::net::TcpStream::connect(self.target).await?;
        stream.write_all(&head).await?;
        let mut sent = 0;
        while sent < limit {
            let Some(frame) = body.frame().await else {
                break;
            };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            let take = (limit - sent).min(data.len() as u64);
            stream.write_all(&data[..take as usize]).await?;
            sent += take;
        }
        stream.shutdown().await?;
        let mut answer = Vec::new();
        tokio::time::timeout(CUT_REQUEST_ANSWER_TIMEOUT, stream.read_to_end(&mut answer)).await??;
        Ok(())
    }
}

/// Longest wait for the target to finish with a cut request.
const CUT_REQUEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the body transformer emits next.
enum BodyStep {
    Data(Bytes),
    Pause(Duration),
    Fail,
}

/// The upstream body with `fault` applied, as a stream of planned steps.
fn faulty_body(body: Incoming, fault: Fault) -> Body {
    struct State {
        body: Incoming,
        offset: u64,
        fault: Fault,
        steps: VecDeque<BodyStep>,
        done: bool,
    }
    let state = State {
        body,
        offset: 0,
        fault,
        steps: VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            match state.steps.pop_front() {
                Some(BodyStep::Data(data)) => return Some((Ok(Frame::data(data)), state)),
                Some(BodyStep::Pause(duration)) => tokio::time::sleep(duration).await,
                Some(BodyStep::Fail) => {
                    // Let hyper flush what was sent so far: the client must
                    // see the headers and the first bytes, then the cut.
                    tokio::task::yield_now().await;
                    state.done = true;
                    state.steps.clear();
                    let error: BoxError = "body truncated by test fault".into();
                    return Some((Err(error), state));
                }
                None if state.done => return None,
                None => match state.body.frame().await {
                    None => state.done = true,
                    Some(Err(error)) => {
                        state.done = true;
                        return Some((Err(BoxError::from(error)), state));
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let start = state.offset;
                            state.offset += data.len() as u64;
                            plan_steps(&state.fault, start, data, &mut state.steps);
                        }
                        Err(trailers) => return Some((Ok(trailers), state)),
                    },
                },
            }
        }
    });
    StreamBody::new(stream).boxed()
}

/// The steps for the body bytes `data` at `start`.
fn plan_steps(fault: &Fault, start: u64, data: Bytes, steps: &mut VecDeque<BodyStep>) {
    let end = start + data.len() as u64;
    let local = |offset: u64| (offset - start) as usize;
    match *fault {
        Fault::TruncateBody(limit) if end > limit => {
            let keep = local(limit.max(start));
            if keep > 0 {
                steps.push_back(BodyStep::Data(data.slice(..keep)));
            }
            steps.push_back(BodyStep::Fail);
        }
        Fault::StallBody { after, duration } if (start..end).contains(&after) => {
            let split = local(after);
            if split > 0 {
                steps.push_back(BodyStep::Data(data.slice(..split)));
            }
            steps.push_back(BodyStep::Pause(duration));
            steps.push_back(BodyStep::Data(data.slice(split..)));
        }
        Fault::FlipByte(offset) if (start..end).contains(&offset) => {
            let mut flipped = BytesMut::from(&data[..]);
            flipped[local(offset)] ^= 0xff;
            steps.push_back(BodyStep::Data(flipped.freeze()));
        }
        _ => steps.push_back(BodyStep::Data(data)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A plain HTTP/1.0 GET; returns the raw response or the I/O error.
    fn raw_get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        Ok(reply)
    }

    fn body_of(reply: &[u8]) -> &[u8] {
        let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        &reply[split + 4..]
    }

    fn origin() -> LoopbackServer {
        LoopbackServer::start(|_request| async {
            response(200, &[("content-length", "10")], &b"0123456789"[..])
        })
    }

    #[test]
    fn forwards_and_logs() {
        let origin = origin();
        let proxy = FaultProxy::start(origin.addr());
        let reply = raw_get(proxy.addr(), "/a?b=c").unwrap();
        assert!(reply.starts_with(b"HTTP/1.0 200") || reply.starts_with(b"HTTP/1.1 200"));
        assert_eq!(body_of(&reply), b"0123456789");
        assert_eq!(
            proxy.requests(),
            vec![RequestRecord {
                method: "GET".into(),
                path: "/a?b=c".into(),
                fault: None,
                status: Some(200)
            }]
        );
    }

    #[test]
    fn planned_faults_hit_matching_requests_in_order() {
        let origin = origin();
        let proxy = FaultProxy::start(origin.addr());
        proxy.inject(
            FaultRule::new(Fault::Status(503))
                .times(2)
                .path_contains("/blobs/"),
        );
        proxy.inject(FaultRule::new(Fault::FlipByte(3)).method("GET"));
        assert_eq!(proxy.pending_faults(), 3);

        let flipped = raw_get(proxy.addr(), "/other").unwrap();
        assert_eq!(body_of(&flipped), b"012\xcc456789");
        for _ in 0..2 {
            let reply = raw_get(proxy.addr(), "/v2/x/blobs/y").unwrap();
            assert!(
                String::from_utf8_lossy(&reply).contains(" 503 "),
                "{reply:?}"
            );
        }
        let clean = raw_get(proxy.addr(), "/v2/x/blobs/y").unwrap();
        assert_eq!(body_of(&clean), b"0123456789");
        assert_eq!(proxy.pending_faults(), 0);
        let statuses: Vec<_> = proxy.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [Some(200), Some(503), Some(503), Some(200)]);
    }

    #[test]
    fn truncation_cuts_the_body_short_of_its_length() {
        let origin = origin();
        let proxy = FaultProxy::start(origin.addr());
        proxy.inject(FaultRule::new(Fault::TruncateBody(4)));
        let reply = raw_get(proxy.addr(), "/").unwrap();
        assert_eq!(body_of(&reply), b"0123", "{reply:?}");
        assert!(String::from_utf8_lossy(&reply).contains("content-length: 10"));
    }

    #[test]
    fn reset_aborts_the_connection() {
        let origin = origin();
        let proxy = FaultProxy::start(origin.addr());
        proxy.inject(FaultRule::new(Fault::Reset));
        let err = raw_get(proxy.addr(), "/").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(proxy.requests()[0].status, None);
        assert!(raw_get(proxy.addr(), "/").is_ok());
    }

    #[test]
    fn stall_pauses_mid_body() {
        let origin = origin();
        let proxy = FaultProxy::start(origin.addr());
        let pause = Duration::from_millis(300);
        proxy.inject(FaultRule::new(Fault::StallBody {
            after: 5,
            duration: pause,
        }));
        let started = std::time::Instant::now();
        let reply = raw_get(proxy.addr(), "/").unwrap();
        assert_eq!(body_of(&reply), b"0123456789");
        assert!(started.elapsed() >= pause);
    }

    #[test]
    fn cut_request_body_delivers_a_prefix_then_resets() {
        let received = Arc::new(Mutex::new(None));
        let seen = received.clone();
        let origin = LoopbackServer::start(move |request: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let mut body = request.into_body();
                let mut bytes = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    bytes += frame.data_ref().map_or(0, Bytes::len);
                }
                *lock(&seen) = Some(bytes);
                response(400, &[], "")
            }
        });
        let proxy = FaultProxy::start(origin.addr());
        proxy.inject(FaultRule::new(Fault::CutRequestBody(4)));
        let mut stream = std::net::TcpStream::connect(proxy.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
        )
        .unwrap();
        let err = stream.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(*lock(&received), Some(4));
    }

    #[test]
    fn unreachable_target_is_a_502() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = unused.local_addr().unwrap();
        drop(unused);
        let proxy = FaultProxy::start(target);
        let reply = raw_get(proxy.addr(), "/").unwrap();
        assert!(String::from_utf8_lossy(&reply).contains(" 502 "));
    }
}
