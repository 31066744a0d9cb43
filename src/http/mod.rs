//! HTTP plumbing shared by every front-end: reading request bodies ([`body`]), the headers
//! of the HTML pages ([`page`]), browser logins to token-protected pages ([`login`]), bearer
//! tokens, and the checks every request passes before it is routed.

pub mod body;
pub mod login;
pub mod page;

use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};

/// The token of an `Authorization: Bearer <token>` header; the scheme in any case (RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// The refusal of what no route should see: an HTTP/1.1 request without exactly one `Host`
/// header (RFC 9112 section 3.2: 400). HTTP/1.0 requests may go without one.
pub fn refusal<B>(req: &Request<B>) -> Option<Response> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if req.version() >= Version::HTTP_11 && hosts != 1 {
        let text = if hosts == 0 {
            "missing Host header\n"
        } else {
            "more than one Host header\n"
        };
        let mut res = (StatusCode::BAD_REQUEST, text).into_response();
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Some(res);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_in_any_case() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for v in ["Bearer t", "bearer t", "BEARER  t ", "bEaReR t"] {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            assert_eq!(bearer(&h), Some("t"), "{v}");
        }
        h.insert(header::AUTHORIZATION, "Basic dDp0".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn host_is_required_from_http_1_1() {
        let req = |version, hosts: &[&str]| {
            let mut b = Request::builder().version(version).uri("/");
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert!(refusal(&req(Version::HTTP_11, &["x"])).is_none());
        assert!(refusal(&req(Version::HTTP_10, &[])).is_none());
        let refused = refusal(&req(Version::HTTP_11, &[])).unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(refusal(&req(Version::HTTP_11, &["a", "b"])).is_some());
    }
}
