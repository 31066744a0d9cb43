//! The listener, the HTTP routes and the server's shared state.
//!
//! Owns accepting connections (one port for HTTP and every WebSocket front-end), routing,
//! the small HTTP endpoints (`/version`, `/`, `/metrics`, `/healthz`) and graceful shutdown:
//! on the shutdown signal the listener stops, every WebSocket front-end says goodbye and
//! closes with 1001, and the server waits for connections within the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::core::hub::Hub;
use crate::core::link::Link;
use crate::limits::{ConnectionPermit, Guard};
use crate::metrics::Metrics;
use crate::ws::connection::ConnContext;
use crate::ws::{WsSettings, upgrade};

/// The version the HunterPie client checks; must stay exactly `0.1`.
pub const PROTOCOL_VERSION: &str = "0.1";

/// Shared state of the server: a cheap-to-clone handle.
#[derive(Clone, Debug)]
pub struct App(Arc<AppInner>);

#[derive(Debug)]
pub struct AppInner {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub hub: Hub,
    pub ws: Arc<WsSettings>,
    /// Cancelled once, when shutdown starts.
    pub shutdown: CancellationToken,
    /// Every upgraded connection's tasks, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection caps, rates, client addresses.
    pub guard: Arc<Guard>,
    /// The HTTP channel API's state.
    pub channels: crate::channels::Channels,
    /// The reliable protocol's clients and rooms.
    pub reliable: crate::reliable::Registry,
    /// The direct-message front-end's state.
    pub messages: crate::messages::Messages,
    /// The log front-end's state (live stream, store writer).
    pub logs: crate::logs::Logs,
}

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    pub fn new(config: Config) -> App {
        let metrics = Arc::new(Metrics::new());
        let ws = Arc::new(WsSettings {
            max_message_bytes: config.max_message_bytes,
            max_message_fragments: config.max_message_fragments,
            outbound_queue_bytes: config.outbound_queue_bytes,
            deflate_threshold: config.deflate_threshold,
            deflate_level: config.deflate_level,
            idle_timeout: config.socket_timeout,
            idle_check_interval: config.socket_timeout_check_interval,
            close_timeout: Duration::from_secs(2),
        });
        App(Arc::new(AppInner {
            hub: Hub::new(
                metrics.clone(),
                config.limits.max_session_members,
                // Forwards wait for Redis in at most this many bytes; more are dropped.
                config
                    .cluster
                    .as_ref()
                    .map(|_| Arc::new(Link::new(64 << 20, metrics.clone()))),
            ),
            guard: Arc::new(Guard::new(&config, metrics.clone())),
            channels: crate::channels::Channels::new(&config),
            reliable: crate::reliable::Registry::new(
                config.reliable.clone(),
                config.limits.max_session_members,
                metrics.clone(),
            ),
            messages: crate::messages::Messages::new(&config, metrics.clone()),
            logs: crate::logs::Logs::new(&config, metrics.clone()),
            metrics,
            ws,
            config,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }))
    }

    /// What each WebSocket connection needs from the server.
    pub fn conn_context(&self) -> ConnContext {
        ConnContext {
            settings: self.ws.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            tracker: self.tracker.clone(),
            guard: self.guard.clone(),
        }
    }
}

/// Every route of the server.
pub fn router(app: App) -> Router {
    let mut r = Router::new()
        .route("/", get(status_page))
        .route("/version", get(|| async { PROTOCOL_VERSION }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/connect", get(connect))
        .route("/v1/reliable", get(crate::reliable::connect))
        .merge(crate::channels::routes())
        .merge(crate::messages::routes())
        .merge(crate::logs::routes());
    if app.config.echo_endpoint {
        r = r.route("/echo", get(crate::echo::connect));
    }
    if app.config.admin_token.is_some() {
        r = r.nest("/admin", crate::hunterpie::admin::routes(app.clone()));
    }
    r.layer(axum::extract::DefaultBodyLimit::max(
        app.config.limits.max_http_body_bytes,
    ))
    .layer(axum::middleware::from_fn_with_state(
        app.clone(),
        http_rate_limit,
    ))
    .with_state(app)
}

/// Counts every HTTP request (upgrades included) against its address's rate.
async fn http_rate_limit(
    State(app): State<App>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = client_ip(&app, &req);
    match app.guard.check_http(ip) {
        Ok(()) => next.run(req).await,
        Err(refusal) => (refusal.status(), format!("{refusal}\n")).into_response(),
    }
}

/// The client's address for a request (see [`Guard::client_ip`]).
pub fn client_ip(app: &App, req: &Request) -> std::net::IpAddr {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    app.guard.client_ip(peer, req.headers())
}

async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, crate::hunterpie::serve)
}

/// Accepts a WebSocket upgrade and hands the socket to a front-end's `serve`, tracked for
/// shutdown.
pub fn upgrade_with<F, Fut>(app: &App, req: &mut Request, serve: F) -> Response
where
    F: FnOnce(hyper::upgrade::Upgraded, Option<crate::ws::extension::Deflate>, App, Peer) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let addr = client_ip(app, req);
    let admitted = app
        .guard
        .check_origin(req.headers())
        .and_then(|()| app.guard.admit(addr));
    let permit = match admitted {
        Ok(p) => p,
        Err(refusal) => {
            debug!(%addr, %refusal, "upgrade refused");
            return (refusal.status(), format!("{refusal}\n")).into_response();
        }
    };
    let accepted = match upgrade::accept(req, app.config.deflate) {
        Ok(a) => a,
        Err(e) => {
            app.metrics.error("bad_upgrade");
            debug!(error = %e, "upgrade refused");
            return e.into_response();
        }
    };
    let app2 = app.clone();
    let deflate = accepted.deflate;
    app.tracker.spawn(async move {
        match accepted.on_upgrade.await {
            Ok(upgraded) => serve(upgraded, deflate, app2, Peer { addr, permit }).await,
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    accepted.response
}

/// 200 while the server serves. In cluster mode with Redis unreachable the answer stays
/// 200 (local delivery goes on, and a Redis outage must not take every node out of a load
/// balancer) but says `degraded`.
async fn healthz(State(app): State<App>) -> &'static str {
    match app.hub.link() {
        Some(link) if !link.is_up() => "degraded: Redis unreachable, serving local members only\n",
        _ => "ok\n",
    }
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

async fn status_page(State(app): State<App>) -> Html<String> {
    let m = &app.metrics;
    let up = m.started.elapsed().as_secs();
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>supersynk</title></head><body>\
         <h1>supersynk {}</h1><table>\
         <tr><th align=left>sessions</th><td id=sessions>{}</td></tr>\
         <tr><th align=left>sockets</th><td id=sockets>{}</td></tr>\
         <tr><th align=left>bytes relayed</th><td id=bytes-relayed>{}</td></tr>\
         <tr><th align=left>uptime</th><td id=uptime>{}d {:02}:{:02}:{:02}</td></tr>\
         </table><p><a href=/metrics>metrics</a></p></body></html>",
        env!("CARGO_PKG_VERSION"),
        app.hub.len(),
        m.connections_open.get(),
        m.bytes_relayed.get(),
        up / 86400,
        up / 3600 % 24,
        up / 60 % 60,
        up % 60
    ))
}

/// Who is on the other end of an upgraded connection; holds its place under the
/// connection limits until dropped.
#[derive(Debug)]
pub struct Peer {
    pub addr: std::net::IpAddr,
    pub permit: ConnectionPermit,
}

/// A running server.
pub struct Server {
    pub local_addr: SocketAddr,
    /// The direct-message port for the original's clients (`--messages-port`), if on.
    pub messages_addr: Option<SocketAddr>,
    pub app: App,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        let tls = match &config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let listener = listen(SocketAddr::new(config.bind, config.port))?;
        let local_addr = listener.local_addr()?;
        let app = App::new(config);
        app.logs.start(&app).await;
        let tls_on = tls.is_some();
        let mut messages_addr = None;
        if let Some(port) = app.config.messages.port {
            let compat = listen(SocketAddr::new(app.config.bind, port))?;
            let addr = compat.local_addr()?;
            info!(local_addr = %addr, "direct messages: original clients' port");
            messages_addr = Some(addr);
            let router = crate::messages::compat_router(app.clone());
            tokio::spawn(accept_loop(compat, app.clone(), tls.clone(), router));
        }
        tokio::spawn(crate::messages::open_store(app.clone()));
        tokio::spawn(crate::messages::cluster::run(app.clone()));
        let task = tokio::spawn(run(listener, app.clone(), tls));
        tokio::spawn(crate::channels::sweep_until_shutdown(app.clone()));
        if let Some(cluster) = app.config.cluster.clone() {
            // Tracked, so that shutdown waits for the node to leave the cluster.
            app.tracker.spawn(crate::cluster::run(app.clone(), cluster));
        }
        info!(%local_addr, tls = tls_on, "listening");
        Ok(Server {
            local_addr,
            messages_addr,
            app,
            task,
        })
    }

    /// Starts a graceful shutdown and waits for it to finish (within the grace period).
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        // The accept loop ends on its own once cancelled; a panic there is already logged.
        let _ = self.task.await;
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds with a deep accept backlog: the default of 128 drops SYNs when thousands of
/// clients reconnect at once (after a restart), costing each a one-second retransmit.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves the main port until shutdown, then waits for every connection (of every port)
/// within the grace period.
async fn run(listener: TcpListener, app: App, tls: Option<TlsAcceptor>) {
    accept_loop(listener, app.clone(), tls, router(app.clone())).await;
    info!("shutting down: closing connections");
    let grace = app.config.shutdown_grace;
    app.tracker.close();
    if tokio::time::timeout(grace, app.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = app.tracker.len(),
            "grace period over; dropping remaining connections"
        );
    }
    info!("stopped");
}

/// Accepts connections and serves `router` on them until shutdown.
async fn accept_loop(listener: TcpListener, app: App, tls: Option<TlsAcceptor>, router: Router) {
    let mut backoff = Duration::from_millis(5);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            _ = housekeeping.tick() => {
                app.guard.forget_idle();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        serve_http(tcp, peer, &router, &app, tls.as_ref());
    }
}

fn serve_http(
    tcp: TcpStream,
    peer: SocketAddr,
    router: &Router,
    app: &App,
    tls: Option<&TlsAcceptor>,
) {
    // Small messages must leave at once; Nagle would add up to 40 ms.
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let router = router.clone();
    let app2 = app.clone();
    let tls = tls.cloned();
    // Tracked like WebSocket tasks, so shutdown waits for requests in flight.
    app.tracker.spawn(async move {
        match tls {
            None => serve_io(tcp, peer, router, app2).await,
            Some(acceptor) => {
                match tokio::time::timeout(app2.config.handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => serve_io(stream, peer, router, app2).await,
                    Ok(Err(e)) => {
                        app2.metrics.error("tls_handshake");
                        debug!(error = %e, %peer, "TLS handshake failed");
                    }
                    Err(_) => {
                        app2.metrics.error("tls_handshake");
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            }
        }
    });
}

/// Serves HTTP/1.1 (and upgrades) on one accepted stream, plain or TLS.
async fn serve_io<I>(io: I, peer: SocketAddr, router: Router, app: App)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        router.clone().oneshot(req.map(Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.handshake_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, %peer, "http connection error");
    }
}

/// Loads the PEM certificate chain and key into a TLS acceptor.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(&format!("TLS certificate {}", cert.display()), &e))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid(&format!("TLS key {}", key.display()), &e))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("TLS certificate and key", &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
