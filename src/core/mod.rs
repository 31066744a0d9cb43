//! The relay core: sessions, membership and fan-out ([`hub`]), and the bounded per-connection
//! queue every message to a peer goes through ([`outbound`]). Protocol-agnostic: front-ends
//! render their own messages and hand the core shared payloads.

pub mod hub;
pub mod outbound;
