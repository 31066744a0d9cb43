//! The listener, the HTTP routes and the server's shared state.
//!
//! Owns accepting connections (one port for HTTP and every WebSocket front-end), routing,
//! the small HTTP endpoints (`/version`, `/metrics`; `/healthz` and `/readyz` are in
//! [`crate::health`]) and graceful shutdown: on the shutdown signal every WebSocket
//! front-end says goodbye and closes with 1001, and the server waits for connections within
//! the grace period. Meanwhile the main port still answers `/readyz` (503: draining),
//! `/healthz` and `/metrics`, one request per connection, so that a load balancer sees the
//! drain; every other request, upgrades included, gets 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
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
use crate::limits::{ConnectionPermit, Guard, OpenPermit};
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
    /// The readiness probe's cache.
    pub health: crate::health::Health,
    /// Browser logins to the admin dashboard and the log viewer.
    pub logins: crate::http::login::Logins,
    /// In cluster mode: this node's id and name, and its questions to the other nodes.
    pub peers: Option<crate::cluster::peers::Peers>,
}

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    /// The state of a server listening on `port` (the name of a node in a cluster).
    pub fn new(config: Config, port: u16) -> App {
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
            health: crate::health::Health::default(),
            logins: Default::default(),
            peers: config.cluster.as_ref().map(|c| {
                crate::cluster::peers::Peers::new(
                    &c.prefix,
                    crate::hunterpie::admin::cluster_node_name(port),
                    c.node_timeout,
                    crate::hunterpie::admin::answer,
                )
            }),
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
        .route("/", get(crate::hunterpie::dashboard::page))
        .route("/version", get(|| async { PROTOCOL_VERSION }))
        .route("/healthz", get(crate::health::healthz))
        .route("/readyz", get(crate::health::readyz))
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
    // Bodies are read by `http::body` alone, within each endpoint's own limits.
    r.layer(axum::extract::DefaultBodyLimit::disable())
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

/// What the main port serves while the server drains: the probes and the metrics, and
/// 503 for everything else.
fn draining_router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(crate::health::healthz))
        .route("/readyz", get(crate::health::readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n") })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            http_rate_limit,
        ))
        .with_state(app)
}

/// The metrics in the format the scraper's `Accept` asks for (Prometheus text 0.0.4 by
/// default, OpenMetrics 1.0.0 when preferred).
async fn metrics(State(app): State<App>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        app.metrics.encode(format),
    )
        .into_response()
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
        crate::limits::raise_descriptor_limit(config.limits.max_connections);
        let listener = listen(SocketAddr::new(config.bind, config.port))?;
        let local_addr = listener.local_addr()?;
        let app = App::new(config, local_addr.port());
        app.logs.start(&app).await;
        let tls_on = tls.is_some();
        let mut messages_addr = None;
        if let Some(port) = app.config.messages.port {
            let compat = listen(SocketAddr::new(app.config.bind, port))?;
            let addr = compat.local_addr()?;
            info!(local_addr = %addr, "direct messages: original clients' port");
            messages_addr = Some(addr);
            let router = crate::messages::compat_router(app.clone());
            let (app, tls) = (app.clone(), tls.clone());
            tokio::spawn(async move {
                let until = app.shutdown.cancelled();
                accept_loop(&compat, &app, tls.as_ref(), &router, until).await;
            });
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
/// within the grace period, still answering probes on the main port, and lets the log
/// store write the last events.
async fn run(listener: TcpListener, app: App, tls: Option<TlsAcceptor>) {
    let serving = router(app.clone());
    accept_loop(
        &listener,
        &app,
        tls.as_ref(),
        &serving,
        app.shutdown.cancelled(),
    )
    .await;
    info!("shutting down: closing connections");
    let grace = app.config.shutdown_grace;
    app.tracker.close();
    let drained = tokio::time::timeout(grace, app.tracker.wait());
    let draining = draining_router(app.clone());
    if accept_loop(&listener, &app, tls.as_ref(), &draining, drained)
        .await
        .is_err()
    {
        warn!(
            remaining = app.tracker.len(),
            "grace period over; dropping remaining connections"
        );
    }
    drop(listener);
    info!("stopped");
    app.logs.close_store(grace).await;
}

/// Accepts connections and serves `router` on them until `until` is done; returns its
/// output. Connections accepted once shutdown has begun serve one request each.
async fn accept_loop<F: std::future::Future>(
    listener: &TcpListener,
    app: &App,
    tls: Option<&TlsAcceptor>,
    router: &Router,
    until: F,
) -> F::Output {
    let mut backoff = Duration::from_millis(5);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    let mut until = std::pin::pin!(until);
    loop {
        let accepted = tokio::select! {
            biased;
            done = &mut until => return done,
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
        // One address may not hold more than its share of descriptors: past it, a new
        // connection is closed at once (before TLS, before reading a byte).
        let permit = match app.guard.admit_open(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                debug!(%peer, %refusal, "connection refused");
                continue;
            }
        };
        serve_http(tcp, peer, permit, router, app, tls);
    }
}

/// Serves one accepted connection; `permit` holds its place until it closes or upgrades.
fn serve_http(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OpenPermit,
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
        let _permit = permit;
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
        let refused = crate::http::refusal(&req);
        let router = router.clone();
        async move {
            match refused {
                None => router.oneshot(req.map(Body::new)).await,
                Some(refused) => Ok(refused),
            }
        }
    });
    // Accepted during the drain: one request, then the connection closes by itself.
    let draining = app.shutdown.is_cancelled();
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.handshake_timeout)
        .keep_alive(!draining)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = app.shutdown.cancelled(), if !draining => {
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
