//! Request bodies: the one way every endpoint that takes a body reads it.
//!
//! Owns a body's bounds: its size (413 as soon as the declared `Content-Length`, or the
//! bytes received, pass the endpoint's limit), its deadline (408 unless the whole body has
//! arrived in time) and its memory. hyper hands each read off the socket to the body as a
//! slice of its read buffer, so a body kept as those slices (as `Collected` or axum's
//! `Bytes` extractor keep it) pins one read buffer, about 8 KiB, per slice: a body sent a
//! byte at a time held 3-4 KiB of memory per byte, and the memory stayed fragmented after.
//! Here each slice is copied into one buffer, sized from `Content-Length` (at most the
//! limit), and dropped at once: a body costs its own size, held once, however it is cut.
//!
//! After a 413 the server answers at once and closes the connection, but first reads and
//! discards what the client still sends, for at most the body deadline and
//! [`LINGER_BYTES`], until it pauses for [`LINGER_IDLE`] (nginx's lingering close): most HTTP clients write their whole body
//! before they read, and closing on unread bytes resets the connection, which they report
//! as a broken pipe instead of the 413. A client that sent `Expect: 100-continue` has sent
//! nothing yet and is not waited for.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use tracing::debug;

use crate::metrics::Metrics;

/// Most bytes read and discarded after a 413 before the connection is closed anyway.
pub const LINGER_BYTES: u64 = 64 << 20;
/// After a 413, the connection is closed once the client has sent nothing for this long.
pub const LINGER_IDLE: Duration = Duration::from_secs(2);

/// What one endpoint accepts.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    /// Largest body, in bytes.
    pub max_bytes: usize,
    /// The whole body must have arrived within this, from when the handler starts reading.
    pub deadline: Duration,
}

/// Why a body was refused; rendered as a JSON `{"error": ...}` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body too large: at most {0} bytes")]
    TooLarge(usize),
    #[error("body not received within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("body could not be read")]
    Unreadable,
}

impl BodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Unreadable => StatusCode::BAD_REQUEST,
        }
    }

    /// Metrics label (`supersynk_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "body_too_large",
            BodyError::Timeout(_) => "body_timeout",
            BodyError::Unreadable => "body_unreadable",
        }
    }
}

impl IntoResponse for BodyError {
    /// 413 and 408 close the connection: the rest of the body was not read.
    fn into_response(self) -> Response {
        let closes = !matches!(self, BodyError::Unreadable);
        let mut res = (
            self.status(),
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if closes {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

/// Reads a request's body whole, within `limit`; a refusal is counted in `metrics`.
pub async fn read(metrics: &Metrics, req: Request, limit: BodyLimit) -> Result<Bytes, BodyError> {
    let expects_continue = req.headers().contains_key(header::EXPECT);
    let mut body = req.into_body();
    let result =
        match tokio::time::timeout(limit.deadline, collect(&mut body, limit.max_bytes)).await {
            Ok(result) => result,
            Err(_) => Err(BodyError::Timeout(limit.deadline)),
        };
    if let Err(e) = &result {
        metrics.error(e.kind());
        debug!(error = %e, "request body refused");
        if matches!(e, BodyError::TooLarge(_)) && !expects_continue {
            tokio::spawn(linger(body, limit.deadline));
        }
    }
    result
}

/// Collects `body` into one buffer of at most `max_bytes`. Refuses at once a body whose
/// declared length is larger, and otherwise as soon as the bytes received pass the limit;
/// what is left of the body is then not read.
pub async fn collect<B>(body: &mut B, max_bytes: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let hint = body.size_hint();
    if hint.lower() > max_bytes as u64 {
        return Err(BodyError::TooLarge(max_bytes));
    }
    // Exact for a Content-Length body; a chunked one grows, never past the limit.
    let declared = hint.exact().unwrap_or(0).min(max_bytes as u64) as usize;
    let mut buf = Vec::with_capacity(declared);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            debug!(error = %e, "request body not read");
            BodyError::Unreadable
        })?;
        // Trailers carry nothing an endpoint uses.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = buf.len() + data.len();
        if len > max_bytes {
            return Err(BodyError::TooLarge(max_bytes));
        }
        if len > buf.capacity() {
            // Doubling, but never reserving past the limit.
            let want = len.max(buf.capacity() * 2).min(max_bytes);
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&data);
        // `data` (a slice of hyper's read buffer) is dropped here, so the buffer is reused.
    }
    buf.shrink_to_fit();
    Ok(Bytes::from(buf))
}

/// Reads and discards what is left of a refused body, within `deadline`, [`LINGER_BYTES`]
/// and [`LINGER_IDLE`], so that the client, which may still be writing it, gets to read
/// the answer; then drops it, and hyper closes the connection.
async fn linger(mut body: axum::body::Body, deadline: Duration) {
    let drain = async {
        let mut read = 0u64;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(LINGER_IDLE, body.frame()).await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > LINGER_BYTES {
                break;
            }
        }
    };
    // Past the deadline the connection is simply closed.
    let _ = tokio::time::timeout(deadline, drain).await;
}

/// For the fuzz target and its regressions: `body` collected within `limit` as one
/// declared-length frame and as a chunked body cut into `cut`-byte frames gives the same
/// answer, the body itself when it fits and [`BodyError::TooLarge`] when it does not; then
/// every endpoint's parser takes what was collected or refuses it, never panics.
#[doc(hidden)]
pub fn check_for_fuzzing(body: &[u8], cut: usize, limit: usize) {
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;
    let whole =
        futures::executor::block_on(collect(&mut Full::new(Bytes::copy_from_slice(body)), limit));
    let frames: Vec<Result<_, std::convert::Infallible>> = body
        .chunks(cut.max(1))
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let mut chunked = StreamBody::new(futures::stream::iter(frames));
    let pieces = futures::executor::block_on(collect(&mut chunked, limit));
    assert_eq!(whole, pieces);
    match whole {
        Ok(got) => {
            assert_eq!(&got[..], body);
            let _ = crate::channels::client_id(&got);
            let _ = crate::logs::entry::parse_body(&got);
            crate::hunterpie::admin::parse_for_fuzzing(&got);
        }
        Err(e) => assert!(e == BodyError::TooLarge(limit) && body.len() > limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    fn frames(
        parts: &[&'static [u8]],
    ) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let v: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures::stream::iter(v))
    }

    #[tokio::test]
    async fn collects_frames_into_one_buffer_within_the_limit() {
        let mut b = frames(&[b"{\"a\"", b":", b"1}"]);
        assert_eq!(collect(&mut b, 7).await.unwrap(), &b"{\"a\":1}"[..]);
        let mut b = frames(&[b"{\"a\"", b":", b"1}"]);
        assert_eq!(collect(&mut b, 6).await, Err(BodyError::TooLarge(6)));
        let mut b = frames(&[]);
        assert!(collect(&mut b, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let mut b = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(collect(&mut b, 9).await, Err(BodyError::TooLarge(9)));
        let mut b = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(collect(&mut b, 10).await.unwrap().len(), 10);
    }
}
