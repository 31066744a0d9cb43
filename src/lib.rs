//! supersynk: a real-time session relay server.
//!
//! Map of the crate:
//! - [`core`]: sessions, membership and fan-out ([`core::hub`]) and the bounded queue of
//!   every connection ([`core::outbound`]). Knows no wire protocol.
//! - [`ws`]: WebSocket plumbing for every WebSocket front-end: handshake, permessage-deflate
//!   under tungstenite, and one connection's reader and writer.
//! - Front-ends, each speaking one protocol over the core and never importing each other:
//!   [`hunterpie`] (the HunterPie SyncPlugin protocol on `/connect`, its admin API and the
//!   dashboard at `/`), [`channels`] (the HTTP channel API under `/api`), [`messages`]
//!   (direct messages with a durable offline queue on `/messages`), [`logs`] (the plugin's remote logs: `/logs/add`, the live
//!   `/logs/listen`, `/logs/query` over the log store, the `/logs.html` viewer),
//!   [`reliable`] (the reliable session protocol on `/v1/reliable`: acks, resends, resume,
//!   rooms, request/response) and [`echo`] (for conformance testing).
//! - [`cluster`]: cluster mode, several nodes sharing sessions over Redis, behind the
//!   core's [`core::link`] outbox.
//! - [`store`]: the durable store's backends (SQLite in the data directory, PostgreSQL),
//!   whose tables belong to the front-ends that keep data.
//! - [`server`]: listener, routes, shared state and graceful shutdown; [`http`]: what
//!   every HTTP endpoint shares (reading request bodies, the pages' headers, browser logins,
//!   bearer tokens,
//!   the checks before routing); [`limits`]; [`config`]; [`metrics`]; [`health`]
//!   (`/healthz`, `/readyz`).
#![forbid(unsafe_code)]

pub mod channels;
pub mod cluster;
pub mod config;
pub mod core;
pub mod echo;
pub mod health;
pub mod http;
pub mod hunterpie;
pub mod limits;
pub mod logs;
pub mod messages;
pub mod metrics;
pub mod reliable;
pub mod server;
pub mod store;
pub mod ws;

pub use config::Config;
pub use server::Server;
