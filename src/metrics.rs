//! Prometheus metrics, shared by every front-end.
//!
//! Owns the registry and the counters; knows nothing about who increments them. Counters
//! on the hot path are plain atomics (prometheus-client's), bumped once per batch, not per
//! byte; the hot path's histograms are filled from per-connection accumulators
//! ([`histogram`]). The registry also holds the build info and the process metrics
//! ([`process`]); [`exposition`] writes it in the format the scraper asks for.

pub mod exposition;
pub mod histogram;
pub mod process;

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use exposition::Format;
use histogram::Histogram;

/// The git commit the binary was built from (`build.rs`), or `unknown`.
pub const GIT_COMMIT: &str = env!("SUPERSYNK_GIT_COMMIT");

/// Upper bounds of `supersynk_relay_latency_seconds`, in nanoseconds: 50 µs to 5 s.
const LATENCY_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Upper bounds of `supersynk_outbound_queue_bytes`: 64 bytes to 1 MiB (the queue's
/// default bound is 256 KiB).
const QUEUE_BOUNDS: &[u64] = &[64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576];

/// Label of a per-protocol or per-kind metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub sessions: Gauge,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    /// Bytes relayed from a leader to followers (payload bytes, before compression).
    pub bytes_relayed: Counter,
    pub pushes_relayed: Counter,
    /// Uncompressed minus compressed payload bytes of compressed messages written.
    pub deflate_saved_bytes: Counter,
    pub deflate_messages: Counter,
    /// Compressions performed: one per distinct message, however many receive it.
    pub deflate_compressions: Counter,
    pub slow_consumer_disconnects: Counter,
    pub idle_timeouts: Counter,
    /// Peer errors and refusals by kind (invalid_json, binary_frame, too_big, ...).
    pub errors: Family<KindLabel, Counter>,
    /// Connections closed, by close code class.
    pub closes: Family<KindLabel, Counter>,
    /// Cluster mode: 1 while the Redis backplane is connected.
    pub redis_up: Gauge,
    pub redis_outages: Counter,
    /// Cluster mode: live nodes, this one included, as last seen.
    pub cluster_nodes: Gauge,
    pub cluster_nodes_reaped: Counter,
    /// Cluster mode: payloads sent to, received from, and not sent to other nodes.
    pub cluster_forwarded: Counter,
    pub cluster_received: Counter,
    pub cluster_dropped: Counter,
    /// Reliable protocol: client states held (connected or waiting for a resume).
    pub reliable_clients: Gauge,
    pub reliable_resumes: Counter,
    /// Reliable protocol: messages sent again (after the resend timeout or on a resume).
    pub reliable_resends: Counter,
    /// Reliable protocol: client states dropped because their unacknowledged buffer was full.
    pub reliable_overflows: Counter,
    /// Reliable protocol: client states dropped at the end of their resume window.
    pub reliable_expired: Counter,
    /// Reliable protocol: client states without a connection (waiting for a resume).
    pub reliable_detached: Gauge,
    /// Reliable protocol: hellos refused because too many client states are held (in all,
    /// or waiting for a resume from the client's address).
    pub reliable_refused: Counter,
    /// Reliable protocol: bytes of unacknowledged messages held by all client states (each
    /// message once, however many receive it).
    pub reliable_buffered_bytes: Gauge,
    /// Reliable protocol: states without a connection dropped to make room for new messages
    /// (--reliable-total-buffer-bytes).
    pub reliable_evicted: Counter,
    /// Direct messages by what happened to them (delivered, queued, drained, refused).
    pub direct_messages: Family<KindLabel, Counter>,
    /// Direct messages: peers logged in on this node.
    pub direct_peers_online: Gauge,
    /// Log front-end: entries accepted (posted and the server's own), stored, store write
    /// attempts that failed, entries not stored (queue full, no store, given up, refused),
    /// of which refused by the store as data; bytes waiting for the store.
    pub logs_received: Counter,
    pub logs_stored: Counter,
    pub logs_store_failures: Counter,
    pub logs_store_dropped: Counter,
    pub logs_store_refused: Counter,
    pub logs_store_queue_bytes: Gauge,
    /// Log front-end: listeners connected; entries listeners missed for being slow.
    pub logs_listeners: Gauge,
    pub logs_listener_missed: Counter,
    /// From a push's arrival at this node (from its leader, or from another node) to its
    /// write to each follower's socket, in nanoseconds; fed per connection
    /// ([`histogram::Local`]).
    pub relay_latency: Histogram,
    /// Bytes a connection's outbound queue held each time its writer took a batch.
    pub outbound_queue: Histogram,
    /// The kinds counted in `errors` so far, for the admin dashboard (a family cannot list
    /// its series). A `std` mutex taken only the first time a kind is counted.
    error_kinds: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
    /// Log front-end: entries and bytes of `/logs/add` bodies refused by the per-address
    /// ingest limits; the store's size as last measured.
    pub logs_refused_entries: Counter,
    pub logs_refused_bytes: Counter,
    pub logs_store_bytes: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            started: Instant::now(),
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            sessions: Gauge::default(),
            messages_in: Counter::default(),
            bytes_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_out: Counter::default(),
            bytes_relayed: Counter::default(),
            pushes_relayed: Counter::default(),
            deflate_saved_bytes: Counter::default(),
            deflate_messages: Counter::default(),
            deflate_compressions: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            idle_timeouts: Counter::default(),
            errors: Family::default(),
            closes: Family::default(),
            redis_up: Gauge::default(),
            redis_outages: Counter::default(),
            cluster_nodes: Gauge::default(),
            cluster_nodes_reaped: Counter::default(),
            cluster_forwarded: Counter::default(),
            cluster_received: Counter::default(),
            cluster_dropped: Counter::default(),
            reliable_clients: Gauge::default(),
            reliable_resumes: Counter::default(),
            reliable_resends: Counter::default(),
            reliable_overflows: Counter::default(),
            reliable_expired: Counter::default(),
            reliable_detached: Gauge::default(),
            reliable_refused: Counter::default(),
            reliable_buffered_bytes: Gauge::default(),
            reliable_evicted: Counter::default(),
            direct_messages: Family::default(),
            direct_peers_online: Gauge::default(),
            logs_received: Counter::default(),
            logs_stored: Counter::default(),
            logs_store_failures: Counter::default(),
            logs_store_dropped: Counter::default(),
            logs_store_refused: Counter::default(),
            logs_store_queue_bytes: Gauge::default(),
            logs_listeners: Gauge::default(),
            logs_listener_missed: Counter::default(),
            logs_refused_entries: Counter::default(),
            logs_refused_bytes: Counter::default(),
            logs_store_bytes: Gauge::default(),

            relay_latency: Histogram::new(LATENCY_BOUNDS_NS, 1e-9),
            outbound_queue: Histogram::new(QUEUE_BOUNDS, 1.0),
            error_kinds: Default::default(),
            registry: Registry::default(),
        };
        // The process metrics keep their standard names; the server's own carry its prefix.
        m.registry
            .register_collector(Box::new(process::ProcessCollector));
        let r = m.registry.sub_registry_with_prefix("supersynk");
        r.register(
            "build",
            "The version and git commit of this build",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_commit", GIT_COMMIT),
            ]),
        );
        r.register_with_unit(
            "relay_latency",
            "From a push's arrival at this node to its write to each follower's socket \
             (merged per connection at most once a second)",
            Unit::Seconds,
            m.relay_latency.clone(),
        );
        r.register_with_unit(
            "outbound_queue",
            "Bytes waiting in a connection's outbound queue when its writer takes a batch",
            Unit::Bytes,
            m.outbound_queue.clone(),
        );
        r.register(
            "connections_open",
            "WebSocket connections open",
            m.connections_open.clone(),
        );
        r.register(
            "connections",
            "WebSocket connections accepted",
            m.connections_total.clone(),
        );
        r.register(
            "sessions",
            "Sessions with at least one member",
            m.sessions.clone(),
        );
        r.register(
            "messages_in",
            "WebSocket messages received",
            m.messages_in.clone(),
        );
        r.register(
            "bytes_in",
            "WebSocket payload bytes received (after inflation)",
            m.bytes_in.clone(),
        );
        r.register(
            "messages_out",
            "WebSocket messages written",
            m.messages_out.clone(),
        );
        r.register(
            "bytes_out",
            "WebSocket payload bytes written (as sent, compressed or not)",
            m.bytes_out.clone(),
        );
        r.register(
            "relayed_bytes",
            "Push payload bytes relayed to followers",
            m.bytes_relayed.clone(),
        );
        r.register(
            "relayed_pushes",
            "Pushes accepted and relayed",
            m.pushes_relayed.clone(),
        );
        r.register(
            "deflate_saved_bytes",
            "Bytes saved by permessage-deflate on written messages",
            m.deflate_saved_bytes.clone(),
        );
        r.register(
            "deflate_messages",
            "Messages written compressed",
            m.deflate_messages.clone(),
        );
        r.register(
            "deflate_compressions",
            "Messages compressed (once per message, shared by its receivers)",
            m.deflate_compressions.clone(),
        );
        r.register(
            "slow_consumer_disconnects",
            "Connections closed because their outbound queue was full",
            m.slow_consumer_disconnects.clone(),
        );
        r.register(
            "idle_timeouts",
            "Connections closed after the idle timeout",
            m.idle_timeouts.clone(),
        );
        r.register(
            "errors",
            "Bad input and refusals, by kind",
            m.errors.clone(),
        );
        r.register("closes", "Connections closed, by reason", m.closes.clone());
        r.register(
            "redis_up",
            "Cluster mode: 1 while the Redis backplane is connected",
            m.redis_up.clone(),
        );
        r.register(
            "redis_outages",
            "Cluster mode: outages of Redis (connection lost, or unreachable at start)",
            m.redis_outages.clone(),
        );
        r.register(
            "cluster_nodes",
            "Cluster mode: live nodes, this one included",
            m.cluster_nodes.clone(),
        );
        r.register(
            "cluster_nodes_reaped",
            "Cluster mode: dead nodes this node removed from the cluster",
            m.cluster_nodes_reaped.clone(),
        );
        r.register(
            "cluster_forwarded",
            "Cluster mode: payloads published for members on other nodes",
            m.cluster_forwarded.clone(),
        );
        r.register(
            "cluster_received",
            "Cluster mode: payloads received from other nodes",
            m.cluster_received.clone(),
        );
        r.register(
            "cluster_dropped",
            "Cluster mode: payloads for other nodes dropped (Redis down or too slow)",
            m.cluster_dropped.clone(),
        );
        r.register(
            "reliable_clients",
            "Reliable protocol: client states held, connected or waiting for a resume",
            m.reliable_clients.clone(),
        );
        r.register(
            "reliable_resumes",
            "Reliable protocol: connections that resumed a client state",
            m.reliable_resumes.clone(),
        );
        r.register(
            "reliable_resends",
            "Reliable protocol: messages sent again (resend timeout or resume)",
            m.reliable_resends.clone(),
        );
        r.register(
            "reliable_overflows",
            "Reliable protocol: client states dropped because their unacknowledged buffer was full",
            m.reliable_overflows.clone(),
        );
        r.register(
            "reliable_expired",
            "Reliable protocol: client states dropped at the end of their resume window",
            m.reliable_expired.clone(),
        );
        r.register(
            "reliable_detached",
            "Reliable protocol: client states without a connection, waiting for a resume",
            m.reliable_detached.clone(),
        );
        r.register(
            "reliable_refused",
            "Reliable protocol: hellos refused because too many client states are held",
            m.reliable_refused.clone(),
        );
        r.register(
            "reliable_buffered_bytes",
            "Reliable protocol: bytes of unacknowledged messages held by all client states",
            m.reliable_buffered_bytes.clone(),
        );
        r.register(
            "reliable_evicted",
            "Reliable protocol: states waiting for a resume dropped to make room for new messages",
            m.reliable_evicted.clone(),
        );
        r.register(
            "direct_messages",
            "Direct messages: delivered at once, queued for an offline peer, drained from the \
             queue at login, refused",
            m.direct_messages.clone(),
        );
        r.register(
            "direct_peers_online",
            "Direct messages: peers logged in on this node",
            m.direct_peers_online.clone(),
        );
        r.register(
            "logs_received",
            "Log entries accepted (posted to /logs/add and the server's own)",
            m.logs_received.clone(),
        );
        r.register(
            "logs_stored",
            "Log entries written to the log store",
            m.logs_stored.clone(),
        );
        r.register(
            "logs_store_failures",
            "Log store writes (or retention runs) that failed",
            m.logs_store_failures.clone(),
        );
        r.register(
            "logs_store_dropped",
            "Log entries not stored: store queue full (entries or bytes), no store, batch given up, or refused",
            m.logs_store_dropped.clone(),
        );
        r.register(
            "logs_store_refused",
            "Log entries the store refused as data (a permanent error; also in logs_store_dropped)",
            m.logs_store_refused.clone(),
        );
        r.register(
            "logs_store_queue_bytes",
            "Bytes of log entries waiting for the log store or being written",
            m.logs_store_queue_bytes.clone(),
        );
        r.register(
            "logs_listeners",
            "Log listeners connected (/logs/listen)",
            m.logs_listeners.clone(),
        );
        r.register(
            "logs_listener_missed",
            "Log entries not sent to listeners that could not keep up (they are told)",
            m.logs_listener_missed.clone(),
        );
        r.register(
            "logs_refused_entries",
            "Log entries refused by /logs/add's per-address limits on entries and bytes",
            m.logs_refused_entries.clone(),
        );
        r.register(
            "logs_refused_bytes",
            "Body bytes of /logs/add requests refused by the per-address limits on entries and bytes",
            m.logs_refused_bytes.clone(),
        );
        r.register(
            "logs_store_bytes",
            "Size of the log store as last measured (SQLite: pages in use; PostgreSQL: estimated row bytes)",
            m.logs_store_bytes.clone(),
        );
        m
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        let label = KindLabel { kind };
        if self.errors.get(&label).is_none() {
            self.error_kinds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(kind);
        }
        self.errors.get_or_create(&label).inc();
    }

    /// Every kind of error counted so far, with its count, by kind.
    pub fn errors_by_kind(&self) -> Vec<(&'static str, u64)> {
        let kinds: Vec<&'static str> = self
            .error_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        kinds
            .into_iter()
            .map(|kind| {
                let n = self.errors.get(&KindLabel { kind }).map_or(0, |c| c.get());
                (kind, n)
            })
            .collect()
    }

    /// Counts one direct message that was `kind` (delivered, spilled into the queue of an online
    /// peer that was behind, queued, drained from a queue, refused).
    pub fn direct(&self, kind: &'static str) {
        self.direct_messages
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text => exposition::to_text(&out),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
