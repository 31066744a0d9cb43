//! The relay core: sessions, membership and fan-out ([`hub`]), and the bounded per-connection
//! queue every message to a peer goes through ([`outbound`]). Protocol-agnostic: front-ends
//! render their own messages and hand the core shared payloads.

pub mod hub;
pub mod link;
pub mod outbound;

/// Compares two secrets without leaking, through timing, how much of them matched.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// HMAC-SHA256 of `msg` under `key`, as lowercase hex: the tokens of every front-end.
pub fn hmac_hex(key: &str, msg: &str) -> String {
    use hmac::{Hmac, Mac};
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(msg.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}
