//! Negotiation of permessage-deflate (RFC 7692 section 7.1) in the opening handshake.
//!
//! Owns the parsing of `Sec-WebSocket-Extensions` offers and the choice of the answer. The
//! server always answers with no context takeover in both directions (see [`super::deflate`]
//! for why). A client that asks for a smaller server window gets messages compressed only
//! when they are no longer than that window, which keeps every back-reference inside it.

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// `server_max_window_bits` asked for by the client (15 when not asked).
    pub server_max_window_bits: u8,
}

impl Deflate {
    /// The longest message this connection may receive compressed. With no context
    /// takeover, a message no longer than the window cannot reference outside it.
    pub fn max_compressed_len(&self) -> usize {
        if self.server_max_window_bits >= 15 {
            usize::MAX
        } else {
            1 << self.server_max_window_bits
        }
    }

    /// The `Sec-WebSocket-Extensions` value of the 101 answer.
    pub fn response_header(&self) -> String {
        let mut s = String::from(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if self.server_max_window_bits < 15 {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        s
    }
}

/// Picks the first acceptable permessage-deflate offer among the header values, in order.
/// Offers with unknown, repeated or invalid parameters are declined, as RFC 7692 requires.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<Deflate> {
    header_values
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut server_bits = 15u8;
    for param in parts {
        if param.is_empty() {
            continue;
        }
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (
                n.trim().to_ascii_lowercase(),
                Some(v.trim().trim_matches('"')),
            ),
            None => (param.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v)?;
            }
            ("server_max_window_bits", Some(v)) => server_bits = window_bits(v)?,
            _ => return None,
        }
        seen.push(name);
    }
    Some(Deflate {
        server_max_window_bits: server_bits,
    })
}

fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hunterpie_offer() {
        let d = negotiate(["permessage-deflate;client_no_context_takeover"]).unwrap();
        assert_eq!(d.server_max_window_bits, 15);
        assert_eq!(
            d.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn browser_offer() {
        let d = negotiate(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(d.max_compressed_len(), usize::MAX);
    }

    #[test]
    fn small_server_window() {
        let d = negotiate(["permessage-deflate; server_max_window_bits=9"]).unwrap();
        assert_eq!(d.max_compressed_len(), 512);
        assert!(d.response_header().ends_with("server_max_window_bits=9"));
    }

    #[test]
    fn declines_bad_offers_and_takes_the_next() {
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=16"]),
            None
        );
        assert_eq!(negotiate(["permessage-deflate; foo"]), None);
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits"]),
            None
        );
        assert_eq!(
            negotiate([
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
            ]),
            None
        );
        assert_eq!(negotiate(["x-webkit-deflate-frame"]), None);
        let d =
            negotiate(["permessage-deflate; bogus, permessage-deflate; server_max_window_bits=10"])
                .unwrap();
        assert_eq!(d.server_max_window_bits, 10);
    }
}
