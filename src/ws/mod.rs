//! WebSocket plumbing shared by every WebSocket front-end.
//!
//! Owns the handshake ([`upgrade`]), permessage-deflate ([`extension`], [`deflate`]) and the
//! life of one connection ([`connection`]): a reader that turns frames into [`Event`]s and a
//! single writer task that alone owns the socket's sink. Front-ends see text and binary
//! messages and an [`Outbound`](crate::core::outbound::Outbound) queue, nothing else.

pub mod connection;
pub mod deflate;
pub mod extension;
pub mod upgrade;

pub use connection::{Connection, Event, WsSettings};
