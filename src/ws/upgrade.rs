//! The server side of the WebSocket opening handshake (RFC 6455 section 4.2) over hyper.
//!
//! Owns the checks on the upgrade request and the 101 answer, including permessage-deflate
//! negotiation. Knows nothing of what is spoken afterwards.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::extension::{self, Deflate};

/// An accepted upgrade: the 101 answer to return and the future of the raw connection.
pub struct Accepted {
    pub response: Response<Body>,
    pub on_upgrade: OnUpgrade,
    pub deflate: Option<Deflate>,
}

/// Why an upgrade request was refused: an HTTP answer for the client.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("WebSocket upgrade requires GET")]
    Method,
    #[error("WebSocket upgrade requires HTTP/1.1")]
    HttpVersion,
    #[error("expected a WebSocket upgrade request (Connection: Upgrade, Upgrade: websocket)")]
    NotUpgrade,
    #[error("unsupported WebSocket version (only 13)")]
    Version,
    #[error("missing or invalid Sec-WebSocket-Key (16 bytes in base64)")]
    Key,
    #[error("connection cannot be upgraded")]
    NoUpgrade,
}

impl UpgradeError {
    /// The HTTP answer for this refusal.
    pub fn into_response(self) -> Response<Body> {
        let status = match self {
            UpgradeError::Method => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::Version => StatusCode::UPGRADE_REQUIRED,
            UpgradeError::NoUpgrade => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        let mut res = Response::new(Body::from(format!("{self}\n")));
        *res.status_mut() = status;
        if status == StatusCode::UPGRADE_REQUIRED {
            res.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        res
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a `Sec-WebSocket-Key` is, as RFC 6455 4.1 requires, 16 bytes in base64. The
/// unused low bits of the last digit may be set, as the original server (ws) allowed.
fn is_key(key: &[u8]) -> bool {
    use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
    use base64::{Engine, alphabet};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let mut out = [0u8; 18];
    key.len() == 24 && matches!(LENIENT.decode_slice(key, &mut out), Ok(16))
}

/// Checks an upgrade request and builds the 101 answer. `offer_deflate` says whether the
/// server accepts permessage-deflate at all.
pub fn accept(req: &mut Request<Body>, offer_deflate: bool) -> Result<Accepted, UpgradeError> {
    if req.method() != Method::GET {
        return Err(UpgradeError::Method);
    }
    // RFC 6455 4.1; hyper cannot upgrade an HTTP/1.0 connection either.
    if req.version() < Version::HTTP_11 {
        return Err(UpgradeError::HttpVersion);
    }
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(UpgradeError::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(UpgradeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(UpgradeError::Key)?;
    if !is_key(key.as_bytes()) {
        return Err(UpgradeError::Key);
    }
    let accept_key = derive_accept_key(key.as_bytes());
    let deflate = if offer_deflate {
        extension::negotiate(
            headers
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
    } else {
        None
    };
    let on_upgrade = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or(UpgradeError::NoUpgrade)?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // The accept key is base64: always a valid header value.
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key).map_err(|_| UpgradeError::Key)?,
    );
    if let Some(v) = deflate.and_then(|d| HeaderValue::from_str(&d.response_header()).ok()) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    Ok(Accepted {
        response,
        on_upgrade,
        deflate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_16_bytes_of_base64() {
        assert!(is_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_key(b"dGhlIHNhbXBsZSBub25jZR=="));
        for bad in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=",
            b"!!!!!!!!!!!!!!!!!!!!!!==",
            b"dGhlIHNhbXBsZSBub25jZXg=",
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl",
        ] {
            assert!(!is_key(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
