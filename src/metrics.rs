//! Prometheus metrics, shared by every front-end.
//!
//! Owns the registry and the counters; knows nothing about who increments them. Counters
//! on the hot path are plain atomics (prometheus-client's), bumped once per batch, not per
//! byte.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    /// Reliable protocol: times a sender's messages waited for a congested receiver, and
    /// waits that ran out (the receiver is then stalled: no one waits for it any more).
    pub reliable_backpressure_waits: Counter,
    pub reliable_backpressure_stalls: Counter,
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
            reliable_backpressure_waits: Counter::default(),
            reliable_backpressure_stalls: Counter::default(),
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
            registry: Registry::with_prefix("supersynk"),
        };
        let r = &mut m.registry;
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
            "reliable_backpressure_waits",
            "Reliable protocol: times a sender's messages waited for a receiver's acks",
            m.reliable_backpressure_waits.clone(),
        );
        r.register(
            "reliable_backpressure_stalls",
            "Reliable protocol: waits that ran out (the receiver is stalled: no one waits for it)",
            m.reliable_backpressure_stalls.clone(),
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
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts one direct message that was `kind` (delivered, spilled into the queue of an online
    /// peer that was behind, queued, drained from a queue, refused).
    pub fn direct(&self, kind: &'static str) {
        self.direct_messages
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
