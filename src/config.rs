//! Settings: command-line flags, environment variables and an optional TOML file.
//!
//! Owns the list of settings, their defaults and their precedence (flag, then
//! `SUPERSYNK_*` variable, then the original server's variable where there is one, then the
//! config file, then the default). Every setting is all three: `--socket-timeout-ms`,
//! `SUPERSYNK_SOCKET_TIMEOUT_MS`, `socket-timeout-ms = ...`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One layer of settings: every field optional, so layers can be merged. Parsed from the
/// command line (with environment variables) and, with the same names, from the config file.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "supersynk",
    version,
    about = "A real-time session relay server"
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TOML file with any of these settings (keys as the long flag names)
    #[arg(long, env = "SUPERSYNK_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Check the settings (flags, environment, file) and the TLS files, say what is wrong
    /// naming the flag, and exit: 0 when valid, 2 when not. Connects to nothing
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// Address to listen on [default: 0.0.0.0]
    #[arg(long, env = "SUPERSYNK_BIND")]
    pub bind: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 5001] [env alias: PORT]
    #[arg(long, env = "SUPERSYNK_PORT")]
    pub port: Option<u16>,
    /// Close sockets silent for this long, in ms [default: 300000] [env alias: SOCKET_TIMEOUT]
    #[arg(long, env = "SUPERSYNK_SOCKET_TIMEOUT_MS")]
    pub socket_timeout_ms: Option<u64>,
    /// How often silent sockets are looked for, in ms [default: 80000]
    /// [env alias: SOCKET_TIMEOUT_CHECK_INTERVAL]
    #[arg(long, env = "SUPERSYNK_SOCKET_TIMEOUT_CHECK_INTERVAL_MS")]
    pub socket_timeout_check_interval_ms: Option<u64>,
    /// Largest WebSocket message accepted, in bytes, after decompression [default: 65536]
    #[arg(long, env = "SUPERSYNK_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Frames one fragmented WebSocket message may have at most (close 1009 past it)
    /// [default: 128]
    #[arg(long, env = "SUPERSYNK_MAX_MESSAGE_FRAGMENTS")]
    pub max_message_fragments: Option<usize>,
    /// Outbound queue per connection, in bytes; a receiver past it is a slow consumer
    /// [default: 262144]
    #[arg(long, env = "SUPERSYNK_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    /// Offer permessage-deflate [default: true]
    #[arg(long, env = "SUPERSYNK_DEFLATE")]
    pub deflate: Option<bool>,
    /// Messages shorter than this are sent uncompressed, in bytes [default: 50]
    #[arg(long, env = "SUPERSYNK_DEFLATE_THRESHOLD")]
    pub deflate_threshold: Option<usize>,
    /// Deflate level, 0-9 [default: 1] (level 1 is 2.6x faster than 3 on a 300-byte push)
    #[arg(long, env = "SUPERSYNK_DEFLATE_LEVEL", value_parser = clap::value_parser!(u32).range(0..=9))]
    pub deflate_level: Option<u32>,
    /// Time allowed for a client to send its HTTP request, in ms [default: 10000]
    #[arg(long, env = "SUPERSYNK_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// On SIGTERM/SIGINT, how long to wait for clients to go, in ms [default: 10000]
    #[arg(long, env = "SUPERSYNK_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Serve a WebSocket echo endpoint at /echo (for conformance tests) [default: false]
    #[arg(long, env = "SUPERSYNK_ECHO_ENDPOINT")]
    pub echo_endpoint: Option<bool>,
    /// Log filter, e.g. info or supersynk=debug [default: info]
    #[arg(long, env = "SUPERSYNK_LOG")]
    pub log: Option<String>,
    /// Log format [default: text]
    #[arg(long, env = "SUPERSYNK_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// WebSocket connections the server holds at most; a warning at start says when the file
    /// descriptor limit (raised to its hard limit) allows fewer [default: 100000]
    #[arg(long, env = "SUPERSYNK_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// WebSocket connections per client address, and connections not upgraded (plain HTTP,
    /// idle) per peer address (127.0.0.1, ::1 and trusted proxies exempt) [default: 200]
    #[arg(long, env = "SUPERSYNK_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Messages (and every other frame: pings, pongs, fragments) a connection may send per
    /// second, sustained [default: 200]
    #[arg(long, env = "SUPERSYNK_MESSAGES_PER_SECOND")]
    pub messages_per_second: Option<u32>,
    /// Messages a connection may send in a burst above the sustained rate [default: 400]
    #[arg(long, env = "SUPERSYNK_MESSAGE_BURST")]
    pub message_burst: Option<u32>,
    /// Session switches (SetSession to another session) per connection per minute
    /// [default: 30]
    #[arg(long, env = "SUPERSYNK_SESSION_SWITCHES_PER_MINUTE")]
    pub session_switches_per_minute: Option<u32>,
    /// Members a session may have [default: 256]
    #[arg(long, env = "SUPERSYNK_MAX_SESSION_MEMBERS")]
    pub max_session_members: Option<usize>,
    /// Largest HTTP request body, in bytes [default: 1048576]
    #[arg(long, env = "SUPERSYNK_MAX_HTTP_BODY_BYTES")]
    pub max_http_body_bytes: Option<usize>,
    /// An HTTP request body must arrive whole within this long, in ms, or the request gets
    /// 408 and the connection is closed [default: 15000]
    #[arg(long, env = "SUPERSYNK_HTTP_BODY_TIMEOUT_MS")]
    pub http_body_timeout_ms: Option<u64>,
    /// HTTP requests per second per client address (127.0.0.1, ::1 and trusted proxies
    /// exempt) [default: 50]
    #[arg(long, env = "SUPERSYNK_HTTP_REQUESTS_PER_SECOND")]
    pub http_requests_per_second: Option<u32>,
    /// Proxies whose X-Forwarded-For is believed, as addresses or CIDR ranges, comma-separated
    /// (in the file also an array) [default: none]
    #[arg(long, env = "SUPERSYNK_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    #[serde(deserialize_with = "proxies_from_file")]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,
    /// Origins allowed to open WebSockets from a browser, comma-separated; requests without
    /// an Origin (the plugin) are always allowed [default: any]
    #[arg(long, env = "SUPERSYNK_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Secret for HMAC-signed leader tokens (see protocol/hunterpie.md) [default: none]
    #[arg(long, env = "SUPERSYNK_LEADER_TOKEN_SECRET")]
    pub leader_token_secret: Option<String>,
    /// Let a session's first leader protect it with a secret of its own choosing; off, a
    /// secret is ignored (a client could pre-claim a session id against the plugin, which
    /// cannot send one) (see protocol/hunterpie.md) [default: false]
    #[arg(long, env = "SUPERSYNK_LEADER_SECRETS")]
    pub leader_secrets: Option<bool>,
    /// Token of the admin API under /admin (Bearer) and of the dashboard's login at /; both
    /// are off without it [default: none]
    #[arg(long, env = "SUPERSYNK_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// PEM certificate chain: serve TLS (wss/https) instead of plain TCP [default: none]
    #[arg(long, env = "SUPERSYNK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// HTTP channel API: clients silent this long are removed, in ms [default: 1000]
    #[arg(long, env = "SUPERSYNK_CHANNEL_TIMEOUT_MS")]
    pub channel_timeout_ms: Option<u64>,
    /// HTTP channel API: watchers get at most one snapshot per this many ms [default: 50]
    #[arg(long, env = "SUPERSYNK_CHANNEL_WATCH_INTERVAL_MS")]
    pub channel_watch_interval_ms: Option<u64>,
    /// HTTP channel API: largest posted body, in bytes [default: 65536]
    #[arg(long, env = "SUPERSYNK_MAX_CHANNEL_BODY_BYTES")]
    pub max_channel_body_bytes: Option<usize>,
    /// HTTP channel API: clients one channel holds at most; a new client's post past it gets
    /// 413 [default: 100]
    #[arg(long, env = "SUPERSYNK_MAX_CHANNEL_CLIENTS")]
    pub max_channel_clients: Option<usize>,
    /// HTTP channel API: bytes of every client's state in one channel together, at least
    /// max-channel-body-bytes; the post that would pass it gets 413 [default: 131072]
    #[arg(long, env = "SUPERSYNK_MAX_CHANNEL_BYTES")]
    pub max_channel_bytes: Option<usize>,
    /// PEM private key for --tls-cert [default: none]
    #[arg(long, env = "SUPERSYNK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Redis URL (redis://host:port/db): run as one node of a cluster [default: none, a
    /// single node] [env alias: REDIS_URL]
    #[arg(long, env = "SUPERSYNK_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel, so clusters can share a Redis
    /// [default: supersynk:]
    #[arg(long, env = "SUPERSYNK_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Cluster mode: a node silent this long is dead and its members are removed from every
    /// session, in ms [default: 10000]
    #[arg(long, env = "SUPERSYNK_NODE_TIMEOUT_MS")]
    pub node_timeout_ms: Option<u64>,
    /// Reliable protocol (/v1/reliable): heartbeat interval announced in the welcome, in ms;
    /// a peer silent for twice this is lost [default: 15000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_HEARTBEAT_MS")]
    pub reliable_heartbeat_ms: Option<u64>,
    /// Reliable protocol: how long a lost client's state is kept for a resume, in ms
    /// [default: 120000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_RESUME_WINDOW_MS")]
    pub reliable_resume_window_ms: Option<u64>,
    /// Reliable protocol: unacknowledged messages held per client; past it the client's state
    /// is dropped [default: 1000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_BUFFER_MESSAGES")]
    pub reliable_buffer_messages: Option<usize>,
    /// Reliable protocol: unacknowledged bytes held per client; past it the client's state is
    /// dropped [default: 1048576]
    #[arg(long, env = "SUPERSYNK_RELIABLE_BUFFER_BYTES")]
    pub reliable_buffer_bytes: Option<usize>,
    /// Reliable protocol: unacknowledged messages are resent after this many ms [default: 2000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_RESEND_MS")]
    pub reliable_resend_ms: Option<u64>,
    /// Reliable protocol: a request unanswered this long gets an error response, in ms; also
    /// the most a request's own timeoutMs may ask for [default: 10000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_REQUEST_TIMEOUT_MS")]
    pub reliable_request_timeout_ms: Option<u64>,
    /// Reliable protocol: bytes of unacknowledged messages held by all client states
    /// together (each message counted once, however many receive it); past it, states
    /// waiting for a resume are dropped, longest waiting first, and then new messages are
    /// refused (server_busy) [default: 268435456]
    #[arg(long, env = "SUPERSYNK_RELIABLE_TOTAL_BUFFER_BYTES")]
    pub reliable_total_buffer_bytes: Option<usize>,
    /// Reliable protocol: rooms one client may be in at once; a join past it is refused
    /// (too_many_rooms) [default: 64]
    #[arg(long, env = "SUPERSYNK_RELIABLE_MAX_ROOMS_PER_CLIENT")]
    pub reliable_max_rooms_per_client: Option<usize>,
    /// Reliable protocol: client states held at most, connected or waiting for a resume; a
    /// new client past it is refused (too_many_clients) [default: 100000]
    #[arg(long, env = "SUPERSYNK_RELIABLE_MAX_CLIENTS")]
    pub reliable_max_clients: Option<usize>,
    /// Reliable protocol: client states waiting for a resume per client address (loopback
    /// and trusted proxies exempt); a new client from an address past it is refused
    /// (too_many_clients) [default: 100]
    #[arg(long, env = "SUPERSYNK_RELIABLE_MAX_DETACHED_PER_IP")]
    pub reliable_max_detached_per_ip: Option<usize>,
    /// Directory of the embedded store (SQLite), created if missing [default: ./data]
    #[arg(long, env = "SUPERSYNK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://user@host/db): keep the durable store there instead of
    /// in --data-dir [default: none] [env alias: DATABASE_URL]
    #[arg(long, env = "SUPERSYNK_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Direct messages: also serve the protocol at / on this port, for the original
    /// server's clients [default: off]
    #[arg(long, env = "SUPERSYNK_MESSAGES_PORT")]
    pub messages_port: Option<u16>,
    /// Direct messages: secret for login tokens (HMAC-SHA256 of the name, hex); logins
    /// need a token when set [default: none]
    #[arg(long, env = "SUPERSYNK_MESSAGES_SECRET")]
    pub messages_secret: Option<String>,
    /// Direct messages: largest message frame, in bytes [default: 16384, or
    /// --max-message-bytes if lower]
    #[arg(long, env = "SUPERSYNK_MESSAGES_MAX_BYTES")]
    pub messages_max_bytes: Option<usize>,
    /// Direct messages: messages kept for one offline peer at most [default: 1000]
    #[arg(long, env = "SUPERSYNK_MESSAGES_QUEUE_LIMIT")]
    pub messages_queue_limit: Option<usize>,
    /// Direct messages: bytes of queued messages kept for every offline peer together
    /// [default: 268435456]
    #[arg(long, env = "SUPERSYNK_MESSAGES_STORE_BYTES")]
    pub messages_store_bytes: Option<u64>,
    /// Direct messages: names known at most (every name that ever logged in); past it a new
    /// name cannot log in, known ones still can [default: 100000]
    #[arg(long, env = "SUPERSYNK_MESSAGES_MAX_PEERS")]
    pub messages_max_peers: Option<u64>,
    /// Direct messages: ping a quiet connection after this long, and count it gone after
    /// twice this with no answer, in ms [default: 20000]
    #[arg(long, env = "SUPERSYNK_MESSAGES_PING_INTERVAL_MS")]
    pub messages_ping_interval_ms: Option<u64>,
    /// Token required by /logs/listen and /logs/query (as ?token=, a Bearer header, or the
    /// viewer's login at /logs.html); /logs/add stays open [default: none, open]
    #[arg(long, env = "SUPERSYNK_LOGS_TOKEN")]
    pub logs_token: Option<String>,
    /// Log store: delete entries older than this many days; 0 keeps them [default: 30]
    #[arg(long, env = "SUPERSYNK_LOGS_RETENTION_DAYS")]
    pub logs_retention_days: Option<u32>,
    /// Log store: keep at most this many entries (the newest); 0 for no limit [default: 0]
    #[arg(long, env = "SUPERSYNK_LOGS_RETENTION_ROWS")]
    pub logs_retention_rows: Option<u64>,
    /// Log store: keep it under this many bytes on disk, deleting the oldest entries first;
    /// 0 for no limit [default: 1073741824]
    #[arg(long, env = "SUPERSYNK_LOGS_RETENTION_BYTES")]
    pub logs_retention_bytes: Option<u64>,
    /// POST /logs/add: entries per second per client address, bursts of ten seconds' worth
    /// (127.0.0.1, ::1 and trusted proxies
    /// exempt) [default: 100]
    #[arg(long, env = "SUPERSYNK_LOGS_ENTRIES_PER_SECOND")]
    pub logs_entries_per_second: Option<u32>,
    /// POST /logs/add: body bytes per second per client address, bursts of ten seconds'
    /// worth (127.0.0.1, ::1 and trusted proxies
    /// exempt) [default: 131072]
    #[arg(long, env = "SUPERSYNK_LOGS_BYTES_PER_SECOND")]
    pub logs_bytes_per_second: Option<u32>,
    /// POST /logs/add requests per second per client address, burst twice that (127.0.0.1,
    /// ::1 and trusted proxies exempt) [default: 20]
    #[arg(long, env = "SUPERSYNK_LOGS_PER_SECOND")]
    pub logs_per_second: Option<u32>,
    /// Bytes a log listener's socket may hold; past it, entries count as missed and the
    /// listener is told how many [default: 1048576]
    #[arg(long, env = "SUPERSYNK_LOGS_LISTENER_BUFFER_BYTES")]
    pub logs_listener_buffer_bytes: Option<usize>,
    /// The server's own log events at this level and above go into the log stream as
    /// user "server": off, error, warn, info, debug or trace [default: info]
    #[arg(long, env = "SUPERSYNK_LOGS_SERVER_LEVEL")]
    pub logs_server_level: Option<String>,
    /// Entries waiting for the log store at most; more are dropped and counted
    /// [default: 100000]
    #[arg(long, env = "SUPERSYNK_LOGS_STORE_QUEUE")]
    pub logs_store_queue: Option<usize>,
    /// Bytes of entries waiting for the log store (or being written) at most; more are
    /// dropped for the store and counted (listeners still get them) [default: 67108864]
    #[arg(long, env = "SUPERSYNK_LOGS_STORE_QUEUE_BYTES")]
    pub logs_store_queue_bytes: Option<usize>,
    /// POST /logs/add: the whole body must arrive within this long, in ms, or the request
    /// gets 408 and the connection is closed [default: --http-body-timeout-ms]
    #[arg(long, env = "SUPERSYNK_LOGS_BODY_TIMEOUT_MS")]
    pub logs_body_timeout_ms: Option<u64>,
    /// /logs/listen: ping a quiet listener after this long (at most half of
    /// --socket-timeout-ms), and close it after twice this with no frame from it, in ms
    /// [default: 20000]
    #[arg(long, env = "SUPERSYNK_LOGS_PING_INTERVAL_MS")]
    pub logs_ping_interval_ms: Option<u64>,
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("invalid config file {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("invalid value {value:?} for environment variable {name} ({flag})")]
    Env {
        name: &'static str,
        flag: &'static str,
        value: String,
    },
    /// A value that parses but cannot be used; the message starts with the flag.
    #[error("{0}")]
    Invalid(String),
}

/// `flag` (as given on the command line; the file key and variable are named after it) and
/// what is wrong with its value.
fn invalid(flag: &str, problem: &str) -> ConfigError {
    ConfigError::Invalid(format!("{flag} {problem}"))
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: IpAddr,
    pub port: u16,
    pub socket_timeout: Duration,
    pub socket_timeout_check_interval: Duration,
    pub max_message_bytes: usize,
    pub max_message_fragments: usize,
    pub outbound_queue_bytes: usize,
    pub deflate: bool,
    pub deflate_threshold: usize,
    pub deflate_level: u32,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub echo_endpoint: bool,
    pub log: String,
    pub log_format: LogFormat,
    /// `--check-config`: check these settings and exit (not a setting of the server).
    pub check_config: bool,
    pub limits: Limits,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub allowed_origins: Vec<String>,
    pub leader_token_secret: Option<String>,
    /// Session secrets chosen by leaders protect leadership (off: they are ignored).
    pub leader_secrets: bool,
    pub admin_token: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub channel_timeout: Duration,
    pub channel_watch_interval: Duration,
    pub max_channel_body_bytes: usize,
    /// Bounds of one channel: clients, and bytes of their states together.
    pub max_channel_clients: usize,
    pub max_channel_bytes: usize,
    pub cluster: Option<ClusterConfig>,
    pub reliable: ReliableConfig,
    /// Where the durable store lives.
    pub store: StoreConfig,
    pub messages: MessagesConfig,
    /// The log front-end.
    pub logs: LogsConfig,
}

/// The direct-message front-end's settings.
#[derive(Debug, Clone)]
pub struct MessagesConfig {
    pub port: Option<u16>,
    pub secret: Option<String>,
    pub max_bytes: usize,
    pub queue_limit: usize,
    /// Bytes of queued messages in all, and names known, at most.
    pub store_bytes: u64,
    pub max_peers: u64,
    /// Server pings on a quiet connection; silence for twice this is a lost connection.
    pub ping_interval: Duration,
}

/// The log front-end's settings.
#[derive(Debug, Clone)]
pub struct LogsConfig {
    pub token: Option<String>,
    /// `None`: kept forever.
    pub retention_days: Option<u32>,
    /// `None`: no limit.
    pub retention_rows: Option<u64>,
    /// Bytes of the store on disk; `None`: no limit.
    pub retention_bytes: Option<u64>,
    pub per_second: u32,
    /// `/logs/add` entries and body bytes per second per client address.
    pub entries_per_second: u32,
    pub bytes_per_second: u32,
    pub listener_buffer_bytes: usize,
    /// A `tracing` level filter (`off`, `error`, ..., `trace`).
    pub server_level: String,
    pub store_queue_entries: usize,
    /// Bytes the store's queue and the batch being written may hold.
    pub store_queue_bytes: usize,
    /// The deadline for reading a `/logs/add` body.
    pub body_timeout: Duration,
    /// Server pings on a quiet listener (already capped at half the socket timeout).
    pub ping_interval: Duration,
}

/// Where the durable store (logs, message queue) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// SQLite databases in this directory (the default: no setup).
    Sqlite(PathBuf),
    /// A PostgreSQL server, shared by every node of a cluster.
    Postgres(String),
}

/// The reliable protocol's timers and bounds (protocol/reliable.md).
#[derive(Debug, Clone)]
pub struct ReliableConfig {
    pub heartbeat: Duration,
    pub resume_window: Duration,
    pub buffer_messages: usize,
    pub buffer_bytes: usize,
    pub resend: Duration,
    pub request_timeout: Duration,
    /// Bytes of message bodies held by all client states together.
    pub total_buffer_bytes: usize,
    pub max_rooms_per_client: usize,
    /// Client states held at most.
    pub max_clients: usize,
    /// Client states without a connection per (non-exempt) client address.
    pub max_detached_per_ip: usize,
    /// Copied from the connection settings: announced in the welcome, and used to size a
    /// reliable connection's window and what it keeps of messages ahead of a gap.
    pub max_message_bytes: usize,
    pub outbound_queue_bytes: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
}

/// Cluster mode: where the backplane is and how it is used.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub prefix: String,
    pub node_timeout: Duration,
}

/// Every limit on what clients may do.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
    pub session_switches_per_minute: u32,
    pub max_session_members: usize,
    pub max_http_body_bytes: usize,
    /// The deadline for reading a request body (every endpoint but `/logs/add`, which has
    /// its own).
    pub http_body_timeout: Duration,
    pub http_requests_per_second: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(Settings::default()).expect("defaults are valid")
    }
}

macro_rules! merge {
    ($top:expr, $base:expr, $($field:ident),*) => {
        Settings {
            config: $top.config.or($base.config),
            check_config: $top.check_config || $base.check_config,
            $($field: $top.$field.or($base.$field)),*
        }
    };
}

impl Settings {
    /// `self` where set, else `base`.
    pub fn over(self, base: Settings) -> Settings {
        merge!(
            self,
            base,
            bind,
            port,
            socket_timeout_ms,
            socket_timeout_check_interval_ms,
            max_message_bytes,
            max_message_fragments,
            outbound_queue_bytes,
            deflate,
            deflate_threshold,
            deflate_level,
            handshake_timeout_ms,
            shutdown_grace_ms,
            echo_endpoint,
            log,
            log_format,
            max_connections,
            max_connections_per_ip,
            messages_per_second,
            message_burst,
            session_switches_per_minute,
            max_session_members,
            max_http_body_bytes,
            http_body_timeout_ms,
            http_requests_per_second,
            trusted_proxies,
            allowed_origins,
            leader_token_secret,
            leader_secrets,
            admin_token,
            tls_cert,
            tls_key,
            channel_timeout_ms,
            channel_watch_interval_ms,
            max_channel_body_bytes,
            max_channel_clients,
            max_channel_bytes,
            redis_url,
            redis_prefix,
            node_timeout_ms,
            data_dir,
            database_url,
            messages_port,
            messages_secret,
            messages_max_bytes,
            messages_queue_limit,
            messages_store_bytes,
            messages_max_peers,
            messages_ping_interval_ms,
            logs_token,
            logs_retention_days,
            logs_retention_rows,
            logs_retention_bytes,
            logs_entries_per_second,
            logs_bytes_per_second,
            logs_per_second,
            logs_listener_buffer_bytes,
            logs_server_level,
            logs_store_queue,
            logs_store_queue_bytes,
            logs_body_timeout_ms,
            logs_ping_interval_ms,
            reliable_heartbeat_ms,
            reliable_resume_window_ms,
            reliable_buffer_messages,
            reliable_buffer_bytes,
            reliable_resend_ms,
            reliable_request_timeout_ms,
            reliable_total_buffer_bytes,
            reliable_max_rooms_per_client,
            reliable_max_clients,
            reliable_max_detached_per_ip
        )
    }

    /// The original server's variable names (and the conventional `REDIS_URL`), honoured
    /// where the new names are not set.
    pub fn from_legacy_env() -> Result<Settings, ConfigError> {
        Ok(Settings {
            redis_url: legacy("REDIS_URL", "--redis-url")?,
            database_url: legacy("DATABASE_URL", "--database-url")?,
            port: legacy("PORT", "--port")?,
            socket_timeout_ms: legacy("SOCKET_TIMEOUT", "--socket-timeout-ms")?,
            socket_timeout_check_interval_ms: legacy(
                "SOCKET_TIMEOUT_CHECK_INTERVAL",
                "--socket-timeout-check-interval-ms",
            )?,
            ..Settings::default()
        })
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))
    }
}

/// A secret setting as given: an empty one is a mistake (it would turn authentication off
/// without a word), so it refuses to start, naming the setting.
fn secret(name: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.trim().is_empty() => {
            let env = format!("SUPERSYNK_{}", name.to_uppercase().replace('-', "_"));
            Err(ConfigError::Invalid(format!(
                "--{name} is empty: set a value, or leave it unset (the flag, {env} and the \
                 file key {name}) for none"
            )))
        }
        v => Ok(v),
    }
}

/// One trusted proxy: an address (`127.0.0.1`, `::1`) or a CIDR range (`10.0.0.0/8`).
pub fn parse_proxy(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR range"))
}

/// `trusted-proxies` in the file: an array of addresses and ranges, or one comma-separated
/// string (the environment variable's form).
fn proxies_from_file<'de, D>(d: D) -> Result<Option<Vec<ipnet::IpNet>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        One(String),
        Many(Vec<String>),
    }
    let items = match Given::deserialize(d)? {
        Given::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Given::Many(v) => v,
    };
    items
        .iter()
        .map(|s| parse_proxy(s).map_err(serde::de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn legacy<T: std::str::FromStr>(
    name: &'static str,
    flag: &'static str,
) -> Result<Option<T>, ConfigError> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map(Some).map_err(|_| ConfigError::Env {
            name,
            flag,
            value: v,
        }),
        Err(_) => Ok(None),
    }
}

impl Config {
    /// Flags and environment, then legacy variables, then the config file, then defaults.
    pub fn load() -> Result<Config, ConfigError> {
        let cli = Settings::parse();
        let mut settings = cli.over(Settings::from_legacy_env()?);
        if let Some(path) = settings.config.clone() {
            settings = settings.over(Settings::from_file(&path)?);
        }
        Config::resolve(settings)
    }

    /// Fills in defaults and checks the values.
    pub fn resolve(s: Settings) -> Result<Config, ConfigError> {
        let ms = Duration::from_millis;
        // Also copied into the reliable protocol's settings (announced in its welcome).
        let max_message_bytes = s.max_message_bytes.unwrap_or(64 * 1024);
        let outbound_queue_bytes = s.outbound_queue_bytes.unwrap_or(256 * 1024);
        let messages_per_second = s.messages_per_second.unwrap_or(200);
        let message_burst = s.message_burst.unwrap_or(400);
        let http_body_timeout_ms = s.http_body_timeout_ms.unwrap_or(15_000);
        let config = Config {
            bind: s.bind.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: s.port.unwrap_or(5001),
            socket_timeout: ms(s.socket_timeout_ms.unwrap_or(300_000)),
            socket_timeout_check_interval: ms(s.socket_timeout_check_interval_ms.unwrap_or(80_000)),
            max_message_bytes,
            max_message_fragments: s.max_message_fragments.unwrap_or(128),
            outbound_queue_bytes,
            deflate: s.deflate.unwrap_or(true),
            deflate_threshold: s.deflate_threshold.unwrap_or(50),
            deflate_level: s.deflate_level.unwrap_or(1),
            handshake_timeout: ms(s.handshake_timeout_ms.unwrap_or(10_000)),
            shutdown_grace: ms(s.shutdown_grace_ms.unwrap_or(10_000)),
            echo_endpoint: s.echo_endpoint.unwrap_or(false),
            leader_secrets: s.leader_secrets.unwrap_or(false),
            log: s.log.unwrap_or_else(|| "info".into()),
            log_format: s.log_format.unwrap_or(LogFormat::Text),
            check_config: s.check_config,
            limits: Limits {
                max_connections: s.max_connections.unwrap_or(100_000),
                max_connections_per_ip: s.max_connections_per_ip.unwrap_or(200),
                messages_per_second,
                message_burst,
                session_switches_per_minute: s.session_switches_per_minute.unwrap_or(30),
                max_session_members: s.max_session_members.unwrap_or(256),
                max_http_body_bytes: s.max_http_body_bytes.unwrap_or(1 << 20),
                http_body_timeout: ms(http_body_timeout_ms),
                http_requests_per_second: s.http_requests_per_second.unwrap_or(50),
            },
            trusted_proxies: s.trusted_proxies.unwrap_or_default(),
            allowed_origins: s.allowed_origins.unwrap_or_default(),
            leader_token_secret: secret("leader-token-secret", s.leader_token_secret)?,
            admin_token: secret("admin-token", s.admin_token)?,
            channel_timeout: ms(s.channel_timeout_ms.unwrap_or(1000)),
            channel_watch_interval: ms(s.channel_watch_interval_ms.unwrap_or(50)),
            max_channel_body_bytes: s.max_channel_body_bytes.unwrap_or(64 * 1024),
            max_channel_clients: s.max_channel_clients.unwrap_or(100),
            max_channel_bytes: s.max_channel_bytes.unwrap_or(128 * 1024),
            cluster: s
                .redis_url
                .filter(|u| !u.is_empty())
                .map(|redis_url| ClusterConfig {
                    redis_url,
                    prefix: s.redis_prefix.unwrap_or_else(|| "supersynk:".into()),
                    node_timeout: ms(s.node_timeout_ms.unwrap_or(10_000)),
                }),
            reliable: ReliableConfig {
                heartbeat: ms(s.reliable_heartbeat_ms.unwrap_or(15_000)),
                total_buffer_bytes: s.reliable_total_buffer_bytes.unwrap_or(256 << 20),
                max_rooms_per_client: s.reliable_max_rooms_per_client.unwrap_or(64),
                max_clients: s.reliable_max_clients.unwrap_or(100_000),
                max_detached_per_ip: s.reliable_max_detached_per_ip.unwrap_or(100),
                max_message_bytes,
                outbound_queue_bytes,
                messages_per_second,
                message_burst,
                resume_window: ms(s.reliable_resume_window_ms.unwrap_or(120_000)),
                buffer_messages: s.reliable_buffer_messages.unwrap_or(1000),
                buffer_bytes: s.reliable_buffer_bytes.unwrap_or(1 << 20),
                resend: ms(s.reliable_resend_ms.unwrap_or(2000)),
                request_timeout: ms(s.reliable_request_timeout_ms.unwrap_or(10_000)),
            },
            messages: MessagesConfig {
                port: s.messages_port,
                secret: secret("messages-secret", s.messages_secret)?,
                // The default never exceeds the WebSocket limit; a value given does (an error).
                max_bytes: s
                    .messages_max_bytes
                    .unwrap_or((16 * 1024).min(max_message_bytes)),
                queue_limit: s.messages_queue_limit.unwrap_or(1000),
                store_bytes: s.messages_store_bytes.unwrap_or(256 << 20),
                max_peers: s.messages_max_peers.unwrap_or(100_000),
                ping_interval: ms(s.messages_ping_interval_ms.unwrap_or(20_000)),
            },
            store: match s.database_url.filter(|u| !u.is_empty()) {
                Some(url) => StoreConfig::Postgres(url),
                None => StoreConfig::Sqlite(s.data_dir.unwrap_or_else(|| "data".into())),
            },
            logs: LogsConfig {
                token: secret("logs-token", s.logs_token)?,
                retention_days: Some(s.logs_retention_days.unwrap_or(30)).filter(|d| *d > 0),
                retention_rows: s.logs_retention_rows.filter(|n| *n > 0),
                retention_bytes: Some(s.logs_retention_bytes.unwrap_or(1 << 30)).filter(|n| *n > 0),
                entries_per_second: s.logs_entries_per_second.unwrap_or(100),
                bytes_per_second: s.logs_bytes_per_second.unwrap_or(128 * 1024),
                per_second: s.logs_per_second.unwrap_or(20),
                listener_buffer_bytes: s.logs_listener_buffer_bytes.unwrap_or(1 << 20),
                server_level: s.logs_server_level.unwrap_or_else(|| "info".into()),
                store_queue_entries: s.logs_store_queue.unwrap_or(100_000),
                store_queue_bytes: s.logs_store_queue_bytes.unwrap_or(64 << 20),
                body_timeout: ms(s.logs_body_timeout_ms.unwrap_or(http_body_timeout_ms)),
                ping_interval: ms(s.logs_ping_interval_ms.unwrap_or(20_000))
                    .min(ms(s.socket_timeout_ms.unwrap_or(300_000)) / 2),
            },
            tls: match (s.tls_cert, s.tls_key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(invalid("--tls-cert", "and --tls-key go together"));
                }
            },
        };
        let l = &config.limits;
        if l.http_body_timeout.is_zero() {
            return Err(invalid("--http-body-timeout-ms", "must be above 0"));
        }
        for (flag, value) in [
            ("--messages-per-second", l.messages_per_second),
            ("--message-burst", l.message_burst),
            (
                "--session-switches-per-minute",
                l.session_switches_per_minute,
            ),
            ("--http-requests-per-second", l.http_requests_per_second),
        ] {
            if value == 0 {
                return Err(invalid(flag, "must be above 0"));
            }
        }
        if config.socket_timeout.is_zero() {
            return Err(invalid("--socket-timeout-ms", "must be above 0"));
        }
        if config.socket_timeout_check_interval.is_zero() {
            return Err(invalid(
                "--socket-timeout-check-interval-ms",
                "must be above 0",
            ));
        }
        if config.max_message_bytes < 1024 {
            return Err(invalid("--max-message-bytes", "must be at least 1024"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log) {
            return Err(invalid("--log", &format!("is not a valid filter: {e}")));
        }
        if config.max_channel_clients == 0 {
            return Err(invalid("--max-channel-clients", "must be above 0"));
        }
        if config.max_channel_bytes < config.max_channel_body_bytes {
            return Err(invalid(
                "--max-channel-bytes",
                "must be at least --max-channel-body-bytes",
            ));
        }
        if config.max_message_fragments == 0 {
            return Err(invalid("--max-message-fragments", "must be above 0"));
        }
        if let Some(c) = &config.cluster {
            if let Err(e) = redis::Client::open(c.redis_url.as_str()) {
                return Err(invalid(
                    "--redis-url",
                    &format!("is not a valid Redis URL: {e}"),
                ));
            }
            if c.node_timeout < Duration::from_millis(300) {
                return Err(invalid("--node-timeout-ms", "must be at least 300"));
            }
        }
        let r = &config.reliable;
        if r.heartbeat < Duration::from_millis(20) {
            return Err(invalid("--reliable-heartbeat-ms", "must be at least 20"));
        }
        if r.resend < Duration::from_millis(10) {
            return Err(invalid("--reliable-resend-ms", "must be at least 10"));
        }
        for (flag, zero) in [
            ("--reliable-request-timeout-ms", r.request_timeout.is_zero()),
            ("--reliable-buffer-messages", r.buffer_messages == 0),
            ("--reliable-buffer-bytes", r.buffer_bytes == 0),
            ("--reliable-max-clients", r.max_clients == 0),
            ("--reliable-max-detached-per-ip", r.max_detached_per_ip == 0),
            ("--reliable-total-buffer-bytes", r.total_buffer_bytes == 0),
            (
                "--reliable-max-rooms-per-client",
                r.max_rooms_per_client == 0,
            ),
        ] {
            if zero {
                return Err(invalid(flag, "must be above 0"));
            }
        }
        if let StoreConfig::Postgres(url) = &config.store
            && let Err(e) = url.parse::<tokio_postgres::Config>()
        {
            return Err(invalid(
                "--database-url",
                &format!("is not a valid PostgreSQL URL: {e}"),
            ));
        }
        if config.messages.queue_limit == 0 {
            return Err(invalid("--messages-queue-limit", "must be above 0"));
        }
        if config.messages.max_bytes == 0 {
            return Err(invalid("--messages-max-bytes", "must be above 0"));
        }
        if config.messages.store_bytes == 0 {
            return Err(invalid("--messages-store-bytes", "must be above 0"));
        }
        if config.messages.max_peers == 0 {
            return Err(invalid("--messages-max-peers", "must be above 0"));
        }
        if config.messages.max_bytes > config.max_message_bytes {
            return Err(invalid(
                "--messages-max-bytes",
                &format!(
                    "{} cannot be above --max-message-bytes ({}): larger frames are closed by \
                     the WebSocket layer",
                    config.messages.max_bytes, config.max_message_bytes
                ),
            ));
        }
        if config.messages.ping_interval < Duration::from_millis(100) {
            return Err(invalid(
                "--messages-ping-interval-ms",
                "must be at least 100",
            ));
        }
        for (flag, zero) in [
            ("--logs-per-second", config.logs.per_second == 0),
            (
                "--logs-entries-per-second",
                config.logs.entries_per_second == 0,
            ),
            ("--logs-bytes-per-second", config.logs.bytes_per_second == 0),
            ("--logs-store-queue", config.logs.store_queue_entries == 0),
            (
                "--logs-store-queue-bytes",
                config.logs.store_queue_bytes == 0,
            ),
            ("--logs-body-timeout-ms", config.logs.body_timeout.is_zero()),
            (
                "--logs-ping-interval-ms",
                config.logs.ping_interval.is_zero(),
            ),
        ] {
            if zero {
                return Err(invalid(flag, "must be above 0"));
            }
        }
        if config
            .logs
            .server_level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            return Err(invalid(
                "--logs-server-level",
                "must be off, error, warn, info, debug or trace",
            ));
        }
        if config.deflate_level > 9 {
            return Err(invalid("--deflate-level", "must be 0-9"));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_file_over_default() {
        let file: Settings = toml::from_str("port = 7000\nsocket-timeout-ms = 1234\n").unwrap();
        let cli = Settings::try_parse_from(["supersynk", "--port", "8000"]).unwrap();
        let c = Config::resolve(cli.over(file)).unwrap();
        assert_eq!(c.port, 8000);
        assert_eq!(c.socket_timeout, Duration::from_millis(1234));
        assert_eq!(
            c.socket_timeout_check_interval,
            Duration::from_millis(80_000)
        );
    }

    #[test]
    fn every_refused_value_names_its_flag() {
        for (flag, bad) in [
            ("--socket-timeout-ms", "0"),
            ("--socket-timeout-check-interval-ms", "0"),
            ("--max-message-bytes", "100"),
            ("--messages-per-second", "0"),
            ("--message-burst", "0"),
            ("--session-switches-per-minute", "0"),
            ("--http-requests-per-second", "0"),
            ("--log", "a=["),
            ("--reliable-heartbeat-ms", "10"),
            ("--reliable-resend-ms", "5"),
            ("--reliable-request-timeout-ms", "0"),
            ("--reliable-buffer-messages", "0"),
            ("--reliable-buffer-bytes", "0"),
            ("--reliable-max-clients", "0"),
            ("--reliable-max-detached-per-ip", "0"),
            ("--reliable-total-buffer-bytes", "0"),
            ("--reliable-max-rooms-per-client", "0"),
            ("--http-body-timeout-ms", "0"),
            ("--admin-token", " "),
            ("--max-channel-clients", "0"),
            ("--max-channel-bytes", "1"),
            ("--max-message-fragments", "0"),
            ("--messages-store-bytes", "0"),
            ("--messages-max-peers", "0"),
            ("--logs-entries-per-second", "0"),
            ("--logs-bytes-per-second", "0"),
            ("--database-url", "postgres://a:b@c:notaport/d"),
            ("--messages-queue-limit", "0"),
            ("--messages-max-bytes", "0"),
            ("--messages-max-bytes", "100000"),
            ("--messages-ping-interval-ms", "10"),
            ("--logs-per-second", "0"),
            ("--logs-store-queue", "0"),
            ("--logs-store-queue-bytes", "0"),
            ("--logs-body-timeout-ms", "0"),
            ("--logs-ping-interval-ms", "0"),
            ("--logs-server-level", "loud"),
            ("--tls-cert", "c.pem"),
            ("--redis-url", "nope://x"),
        ] {
            let settings = Settings::try_parse_from(["s", flag, bad]).unwrap();
            let e = Config::resolve(settings).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{flag} ")), "{flag} {bad}: {e}");
        }
        let cluster = Settings::try_parse_from([
            "s",
            "--redis-url",
            "redis://127.0.0.1",
            "--node-timeout-ms",
            "10",
        ])
        .unwrap();
        let e = Config::resolve(cluster).unwrap_err().to_string();
        assert!(e.starts_with("--node-timeout-ms "), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<Settings>("prot = 1").is_err());
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.port, 5001);
        assert_eq!(c.socket_timeout, Duration::from_secs(300));
        assert!(c.deflate);
    }

    #[test]
    fn message_frames_stay_within_the_websocket_limit() {
        let c = Config::resolve(
            Settings::try_parse_from(["s", "--max-message-bytes", "4096"]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.messages.max_bytes, 4096);
        let args = [
            "s",
            "--max-message-bytes",
            "4096",
            "--messages-max-bytes",
            "8192",
        ];
        assert!(Config::resolve(Settings::try_parse_from(args).unwrap()).is_err());
    }

    #[test]
    fn reliable_settings_take_the_connection_limits() {
        let c = Config::resolve(
            Settings::try_parse_from(["s", "--max-message-bytes", "4096"]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.reliable.max_message_bytes, 4096);
        assert_eq!(c.reliable.total_buffer_bytes, 256 << 20);
        let zero = Settings::try_parse_from(["s", "--reliable-max-rooms-per-client", "0"]).unwrap();
        assert!(Config::resolve(zero).is_err());
    }
}
