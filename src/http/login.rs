//! Browser logins for the token-protected pages (the admin dashboard, the log viewer): a
//! page posts the operator's token once to a login endpoint, which answers with a session
//! cookie, so the token never sits in a URL, a history entry or a page's storage.
//!
//! The cookie is `HttpOnly` (scripts cannot read it), `SameSite=Strict` (another site's
//! requests do not carry it), scoped to its API's path, `Secure` when the request came over
//! TLS (the server's own, or a proxy's `X-Forwarded-Proto: https`), and lives 12 hours. Each
//! login also has a CSRF token that requests which change something must echo in
//! `X-CSRF-Token`, and a cookie-authenticated WebSocket must come from this server's own
//! origin. Logins are kept in memory (a restart logs everyone out), at most
//! [`MAX_LOGINS`] per scope; the server keeps only the SHA-256 of each cookie.
//!
//! Owns no token: the front-ends compare the posted token with theirs ([`crate::core::secret_eq`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::body::{self, BodyLimit};
use crate::metrics::Metrics;

/// How long a login lasts.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Logins kept per scope; past it a new login pushes out the one closest to expiring.
pub const MAX_LOGINS: usize = 1024;
/// The header that carries a login's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What a login opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The admin API under `/admin` (the dashboard at `/`).
    Admin,
    /// `/logs/listen` and `/logs/query` (the viewer at `/logs.html`).
    Logs,
}

impl Scope {
    fn cookie(self) -> &'static str {
        match self {
            Scope::Admin => "supersynk_admin",
            Scope::Logs => "supersynk_logs",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Scope::Admin => "/admin",
            Scope::Logs => "/logs",
        }
    }

    /// The error kind of a refused login.
    fn refused(self) -> &'static str {
        match self {
            Scope::Admin => "admin_login_refused",
            Scope::Logs => "logs_login_refused",
        }
    }
}

/// The login endpoints of one scope: `POST .../login` with `{"token": ...}`, `GET
/// .../login` (whether the request's cookie is a live login, and its CSRF token),
/// `POST .../logout`.
pub struct Gate<'a> {
    pub logins: &'a Logins,
    pub scope: Scope,
    /// The operator's token for this scope; `None`: the scope is open, nothing to log in to.
    pub token: Option<&'a str>,
    /// Whether the server itself speaks TLS.
    pub tls: bool,
    pub metrics: &'a Metrics,
    pub limit: BodyLimit,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    token: String,
}

/// The login body's parser, for the body fuzz target.
pub(crate) fn parse_for_fuzzing(body: &[u8]) {
    let _ = serde_json::from_slice::<LoginBody>(body);
}

/// The routes `{prefix}/login` (GET and POST) and `{prefix}/logout` over the gate that
/// `gate` makes of the state.
pub fn routes<S>(prefix: &str, gate: for<'a> fn(&'a S) -> Gate<'a>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route(
            &format!("{prefix}/login"),
            get(move |State(s): State<S>, req: Request| async move {
                gate(&s).state(req.headers())
            })
            .post(move |State(s): State<S>, req: Request| async move {
                gate(&s).login(req).await
            }),
        )
        .route(
            &format!("{prefix}/logout"),
            post(move |State(s): State<S>, req: Request| async move {
                gate(&s).logout(req.headers())
            }),
        )
}

impl Gate<'_> {
    /// `POST .../login`: 200 `{"csrf": ...}` with the cookie, or 401 for a wrong token.
    pub async fn login(&self, req: Request) -> Response {
        let Some(token) = self.token else {
            return error(
                StatusCode::NOT_FOUND,
                "no token is set: nothing to log in to",
            );
        };
        let headers = req.headers().clone();
        let bytes = match body::read(self.metrics, req, self.limit).await {
            Ok(bytes) => bytes,
            Err(e) => return e.into_response(),
        };
        let Ok(body) = serde_json::from_slice::<LoginBody>(&bytes) else {
            return error(StatusCode::BAD_REQUEST, "expected JSON {\"token\": ...}");
        };
        if !crate::core::secret_eq(&body.token, token) {
            self.metrics.error(self.scope.refused());
            return error(StatusCode::UNAUTHORIZED, "wrong token");
        }
        match self.logins.start(self.scope, &headers, self.tls) {
            Ok((login, cookie)) => {
                let mut res = no_store(Json(json!({ "csrf": login.csrf })).into_response());
                res.headers_mut().insert(header::SET_COOKIE, cookie);
                res
            }
            Err(e) => {
                tracing::error!(error = %e, "login failed");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "login failed: no randomness",
                )
            }
        }
    }

    /// `GET .../login`: 200 `{"csrf": ...}` for a live login, 200 `{"open": true}` when no
    /// token is set, 401 otherwise.
    pub fn state(&self, headers: &HeaderMap) -> Response {
        if self.token.is_none() {
            return no_store(Json(json!({ "open": true })).into_response());
        }
        match self.logins.check(self.scope, headers) {
            Some(login) => no_store(Json(json!({ "csrf": login.csrf })).into_response()),
            None => error(StatusCode::UNAUTHORIZED, "not logged in"),
        }
    }

    /// `POST .../logout`: ends the login (which must echo its CSRF token) and clears the
    /// cookie.
    pub fn logout(&self, headers: &HeaderMap) -> Response {
        if let Some(login) = self.logins.check(self.scope, headers)
            && !login.csrf_ok(headers)
        {
            return csrf_refused(self.metrics);
        }
        let cookie = self.logins.end(self.scope, headers, self.tls);
        let mut res = no_store(Json(json!({ "loggedOut": true })).into_response());
        res.headers_mut().insert(header::SET_COOKIE, cookie);
        res
    }
}

/// 403 for a cookie-authenticated request that changes something without the login's
/// CSRF token.
pub fn csrf_refused(metrics: &Metrics) -> Response {
    metrics.error("csrf_refused");
    error(
        StatusCode::FORBIDDEN,
        "missing or wrong X-CSRF-Token (the login's csrf)",
    )
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

fn no_store(mut res: Response) -> Response {
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A live login.
#[derive(Debug, Clone)]
pub struct Login {
    /// What `X-CSRF-Token` must say on requests that change something.
    pub csrf: String,
    expires: Instant,
}

impl Login {
    /// Whether the request echoes this login's CSRF token (compared in constant time).
    pub fn csrf_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|given| crate::core::secret_eq(given, &self.csrf))
    }
}

/// Every live login, by scope and the SHA-256 of its cookie.
#[derive(Debug, Default)]
pub struct Logins {
    /// A `std` mutex held for one map operation (a full map is swept under it: at most
    /// [`MAX_LOGINS`] entries).
    map: Mutex<HashMap<(Scope, [u8; 32]), Login>>,
}

/// Why a login could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no randomness for a login: {0}")]
pub struct NoRandomness(getrandom::Error);

impl Logins {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(Scope, [u8; 32]), Login>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a login; returns it with the `Set-Cookie` value that carries it.
    pub fn start(
        &self,
        scope: Scope,
        headers: &HeaderMap,
        tls: bool,
    ) -> Result<(Login, HeaderValue), NoRandomness> {
        let id = random_token()?;
        let login = Login {
            csrf: random_token()?,
            expires: Instant::now() + LIFETIME,
        };
        let mut map = self.map();
        let now = Instant::now();
        let in_scope = |map: &HashMap<_, _>| map.keys().filter(|(s, _)| *s == scope).count();
        if in_scope(&map) >= MAX_LOGINS {
            map.retain(|_, l| l.expires > now);
            let soonest = map
                .iter()
                .filter(|((s, _), _)| *s == scope)
                .min_by_key(|(_, l)| l.expires)
                .map(|(k, _)| *k);
            if let Some(k) = soonest.filter(|_| in_scope(&map) >= MAX_LOGINS) {
                map.remove(&k);
            }
        }
        map.insert((scope, digest(&id)), login.clone());
        let cookie = format!(
            "{}={id}; Path={}; Max-Age={}; HttpOnly; SameSite=Strict{}",
            scope.cookie(),
            scope.path(),
            LIFETIME.as_secs(),
            secure(headers, tls)
        );
        Ok((login, header_value(&cookie)))
    }

    /// The live login the request's cookie names, if any.
    pub fn check(&self, scope: Scope, headers: &HeaderMap) -> Option<Login> {
        let id = cookie(headers, scope.cookie())?;
        let key = (scope, digest(id));
        let mut map = self.map();
        match map.get(&key) {
            Some(l) if l.expires > Instant::now() => Some(l.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the login the request's cookie names; returns the `Set-Cookie` value that
    /// clears the cookie.
    pub fn end(&self, scope: Scope, headers: &HeaderMap, tls: bool) -> HeaderValue {
        if let Some(id) = cookie(headers, scope.cookie()) {
            self.map().remove(&(scope, digest(id)));
        }
        let cookie = format!(
            "{}=; Path={}; Max-Age=0; HttpOnly; SameSite=Strict{}",
            scope.cookie(),
            scope.path(),
            secure(headers, tls)
        );
        header_value(&cookie)
    }
}

/// A cookie as a header value: only base64url characters and ASCII go into one, so this
/// cannot fail.
fn header_value(cookie: &str) -> HeaderValue {
    HeaderValue::from_str(cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `; Secure` when the browser reached this server over TLS: cookies set over plain HTTP
/// cannot be `Secure` (the browser would never send them back).
fn secure(headers: &HeaderMap, tls: bool) -> &'static str {
    let proxied_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    if tls || proxied_tls { "; Secure" } else { "" }
}

/// Whether a browser's request comes from a page of this server: its `Origin` (when it has
/// one) names the host the request was sent to. A cookie-authenticated WebSocket must: a
/// browser sends cookies with another site's WebSocket handshakes in some cases, and the
/// `Origin` is what tells them apart. Ports are not compared (a proxy's `Host` may leave
/// its port out, and to a browser's cookies every port of a host is the same site).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_name);
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| host_name(rest.trim_end_matches('/')));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// The host of `host[:port]` or `[v6]:port`.
fn host_name(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.split(':').next().unwrap_or(authority),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// 32 random bytes from the operating system, base64url.
fn random_token() -> Result<String, NoRandomness> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(NoRandomness)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn digest(id: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(set_cookie: &HeaderValue) -> HeaderMap {
        let pair = set_cookie.to_str().unwrap().split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, format!("other=1; {pair}").parse().unwrap());
        h
    }

    #[test]
    fn a_login_is_found_by_its_cookie_in_its_scope_until_it_ends() {
        let logins = Logins::default();
        let (login, set) = logins
            .start(Scope::Admin, &HeaderMap::new(), false)
            .unwrap();
        let set_text = set.to_str().unwrap();
        assert!(set_text.starts_with("supersynk_admin="), "{set_text}");
        for part in [
            "Path=/admin",
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=43200",
        ] {
            assert!(set_text.contains(part), "{set_text}");
        }
        assert!(!set_text.contains("Secure"), "{set_text}");
        let h = with_cookie(&set);
        assert_eq!(logins.check(Scope::Admin, &h).unwrap().csrf, login.csrf);
        assert!(logins.check(Scope::Logs, &h).is_none());
        let mut csrf = HeaderMap::new();
        assert!(!login.csrf_ok(&csrf));
        csrf.insert(CSRF_HEADER, login.csrf.parse().unwrap());
        assert!(login.csrf_ok(&csrf));
        let cleared = logins.end(Scope::Admin, &h, false);
        assert!(cleared.to_str().unwrap().contains("Max-Age=0"));
        assert!(logins.check(Scope::Admin, &h).is_none());
    }

    #[test]
    fn secure_over_tls_and_behind_a_tls_proxy() {
        let logins = Logins::default();
        let (_, set) = logins.start(Scope::Logs, &HeaderMap::new(), true).unwrap();
        assert!(set.to_str().unwrap().ends_with("; Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "HTTPS".parse().unwrap());
        let (_, set) = logins.start(Scope::Logs, &h, false).unwrap();
        assert!(set.to_str().unwrap().contains("Path=/logs"));
        assert!(set.to_str().unwrap().ends_with("; Secure"));
    }

    #[test]
    fn logins_are_bounded() {
        let logins = Logins::default();
        let first = logins
            .start(Scope::Logs, &HeaderMap::new(), false)
            .unwrap()
            .1;
        for _ in 0..MAX_LOGINS {
            logins.start(Scope::Logs, &HeaderMap::new(), false).unwrap();
        }
        assert_eq!(logins.map().len(), MAX_LOGINS);
        assert!(logins.check(Scope::Logs, &with_cookie(&first)).is_none());
        // The other scope's logins are its own.
        let admin = logins
            .start(Scope::Admin, &HeaderMap::new(), false)
            .unwrap()
            .1;
        logins.start(Scope::Logs, &HeaderMap::new(), false).unwrap();
        assert!(logins.check(Scope::Admin, &with_cookie(&admin)).is_some());
        assert_eq!(logins.map().len(), MAX_LOGINS + 1);
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h));
        h.insert(header::HOST, "node:5001".parse().unwrap());
        h.insert(header::ORIGIN, "http://node:5001".parse().unwrap());
        assert!(same_origin(&h));
        // Behind a proxy, Host may leave the port out.
        h.insert(header::ORIGIN, "https://NODE:8443".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::HOST, "[::1]:5001".parse().unwrap());
        h.insert(header::ORIGIN, "http://[::1]:5001".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://node.evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::HOST, "node:5001".parse().unwrap());
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
