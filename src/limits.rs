//! Limits on what clients may do, shared by every front-end.
//!
//! Owns the client address (the peer, or the `X-Forwarded-For` client when the peer is a
//! trusted proxy), the connection caps (WebSocket connections in all and per address, and
//! connections not upgraded, plain HTTP or idle, per peer address), the per-address HTTP
//! request rate, the Origin allowlist, the per-connection message rate and the process's
//! file descriptor limit. Knows nothing of any protocol: a refusal is an HTTP status and a
//! text that names the limit. Per-address limits never apply to the local host's own
//! addresses (127.0.0.1 and ::1) or to trusted proxies, so local benchmarks and a local nginx
//! work.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, header};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::Config;
use crate::metrics::Metrics;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("server full: at most {0} connections")]
    ServerFull(usize),
    #[error("connection limit: at most {0} connections per address")]
    PerAddress(usize),
    #[error("connection limit: at most {0} open HTTP connections per address")]
    OpenPerAddress(usize),
    #[error("request rate limit: at most {0} requests per second per address")]
    HttpRate(u32),
    #[error("origin not allowed")]
    Origin,
}

impl Refusal {
    /// The HTTP status for this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ServerFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::PerAddress(_) | Refusal::OpenPerAddress(_) | Refusal::HttpRate(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::Origin => StatusCode::FORBIDDEN,
        }
    }

    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::ServerFull(_) => "limit_max_connections",
            Refusal::PerAddress(_) => "limit_connections_per_ip",
            Refusal::OpenPerAddress(_) => "limit_http_connections_per_ip",
            Refusal::HttpRate(_) => "limit_http_rate",
            Refusal::Origin => "origin_refused",
        }
    }
}

/// The limits in force, with their counters.
#[derive(Debug)]
pub struct Guard {
    max_connections: usize,
    max_per_address: usize,
    trusted: Vec<IpNet>,
    origins: Vec<String>,
    /// WebSocket connections admitted and not yet gone.
    total: AtomicUsize,
    /// Open WebSocket connections per (non-exempt) client address.
    per_address: PerAddress,
    /// Connections accepted and not (yet) upgraded per (non-exempt) peer address.
    open_per_address: PerAddress,
    http_rate: u32,
    http: DefaultKeyedRateLimiter<IpAddr>,
    message_quota: Quota,
    switch_quota: Quota,
    metrics: Arc<Metrics>,
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Guard {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Guard {
        let l = &config.limits;
        let http_quota = Quota::per_second(nonzero(l.http_requests_per_second))
            .allow_burst(nonzero(l.http_requests_per_second * 2));
        Guard {
            max_connections: l.max_connections,
            max_per_address: l.max_connections_per_ip,
            trusted: config.trusted_proxies.clone(),
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            total: AtomicUsize::new(0),
            per_address: PerAddress::default(),
            open_per_address: PerAddress::default(),
            http_rate: l.http_requests_per_second,
            http: RateLimiter::keyed(http_quota),
            message_quota: Quota::per_second(nonzero(l.messages_per_second))
                .allow_burst(nonzero(l.message_burst)),
            switch_quota: Quota::per_minute(nonzero(l.session_switches_per_minute))
                .allow_burst(nonzero(l.session_switches_per_minute)),
            metrics,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the last
    /// address in `X-Forwarded-For` that is not itself a trusted proxy. An entry may carry a
    /// port (`203.0.113.30:5555`, `[2001:db8::5]:443`) or brackets (`[2001:db8::5]`); an
    /// entry that still does not parse (`unknown`, an obfuscated name) ends the search: it
    /// is [`UNPARSED_CLIENT`], never the proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .collect::<Vec<_>>();
        for entry in forwarded.into_iter().rev() {
            match forwarded_ip(entry) {
                Some(ip) if self.is_trusted(ip) => continue,
                Some(ip) => return ip,
                None => return UNPARSED_CLIENT,
            }
        }
        peer
    }

    /// Whether per-address limits skip this address: the local host's own (127.0.0.1, ::1)
    /// and trusted proxies.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip == Ipv4Addr::LOCALHOST || ip == Ipv6Addr::LOCALHOST || self.is_trusted(ip)
    }

    /// Checks the `Origin` of a browser's request against the allowlist.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        if self.origins.is_empty() {
            return Ok(());
        }
        let origin = origin
            .to_str()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_ascii_lowercase();
        if self.origins.contains(&origin) {
            Ok(())
        } else {
            Err(self.refused(Refusal::Origin))
        }
    }

    /// Counts one HTTP request from `ip`.
    pub fn check_http(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.is_exempt(ip) || self.http.check_key(&ip).is_ok() {
            Ok(())
        } else {
            Err(self.refused(Refusal::HttpRate(self.http_rate)))
        }
    }

    /// Admits one WebSocket connection from `ip`; the permit releases it when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refused(Refusal::ServerFull(self.max_connections)));
        }
        let mut permit = ConnectionPermit {
            guard: self.clone(),
            address: None,
        };
        if !self.is_exempt(ip) {
            if !self.per_address.try_add(ip, self.max_per_address) {
                // Dropping the permit gives the total slot back.
                drop(permit);
                return Err(self.refused(Refusal::PerAddress(self.max_per_address)));
            }
            permit.address = Some(ip);
        }
        Ok(permit)
    }

    /// Admits one accepted connection from `peer` until it is upgraded or closed: at most
    /// `--max-connections-per-ip` of them per address, so that one address cannot take the
    /// server's file descriptors with idle or slow connections. (An upgraded connection is
    /// counted by [`Guard::admit`] instead, by client address.)
    pub fn admit_open(self: &Arc<Self>, peer: IpAddr) -> Result<OpenPermit, Refusal> {
        let peer = peer.to_canonical();
        if self.is_exempt(peer) {
            return Ok(OpenPermit {
                guard: self.clone(),
                address: None,
            });
        }
        if !self.open_per_address.try_add(peer, self.max_per_address) {
            return Err(self.refused(Refusal::OpenPerAddress(self.max_per_address)));
        }
        Ok(OpenPermit {
            guard: self.clone(),
            address: Some(peer),
        })
    }

    /// A fresh message-rate limiter for one connection.
    pub fn message_limiter(&self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(self.message_quota)
    }

    /// A fresh session-switch limiter for one connection.
    pub fn switch_limiter(&self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(self.switch_quota)
    }

    /// Forgets idle per-address HTTP rate state (call now and then).
    pub fn forget_idle(&self) {
        self.http.retain_recent();
        self.http.shrink_to_fit();
    }

    fn refused(&self, r: Refusal) -> Refusal {
        self.metrics.error(r.kind());
        r
    }
}

/// One admitted connection; releases its place when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    guard: Arc<Guard>,
    address: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.guard.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.address {
            self.guard.per_address.remove(ip);
        }
    }
}

/// One accepted connection that is not upgraded; releases its place when dropped.
#[derive(Debug)]
pub struct OpenPermit {
    guard: Arc<Guard>,
    address: Option<IpAddr>,
}

impl Drop for OpenPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.address {
            self.guard.open_per_address.remove(ip);
        }
    }
}

/// Connections per address. A `std` mutex held for one map update; entries are removed
/// when they reach zero.
#[derive(Debug, Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    /// Counts one more for `ip` unless it has `max` already.
    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut per = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = per.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                per.remove(&ip);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn remove(&self, ip: IpAddr) {
        let mut per = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
}

/// The address every client counts as whose `X-Forwarded-For` entry does not parse: they
/// share one untrusted client's limits.
pub const UNPARSED_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// One `X-Forwarded-For` entry's address: `a.b.c.d`, `a.b.c.d:port`, an IPv6 address, with
/// brackets, with brackets and a port.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    let ip = e
        .parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// Raises the soft limit on open file descriptors to the hard limit (every connection
/// holds one; the soft limit is often 1024) and warns when `max_connections` is more than
/// the descriptors allow. Returns the limit in force, if it could be read.
pub fn raise_descriptor_limit(max_connections: usize) -> Option<u64> {
    /// Descriptors kept for everything but client connections (listeners, stores, Redis,
    /// PostgreSQL, connections being accepted).
    const RESERVED: u64 = 64;
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the file descriptor limit");
            return None;
        }
    };
    if max_connections as u64 + RESERVED > limit {
        tracing::warn!(
            max_connections,
            descriptors = limit,
            "--max-connections is more than the file descriptors allow (RLIMIT_NOFILE {limit}): \
             connections past about {} will fail; raise the hard limit (ulimit -Hn, systemd \
             LimitNOFILE=, docker run --ulimit nofile=) or lower --max-connections",
            limit.saturating_sub(RESERVED)
        );
    } else {
        tracing::debug!(descriptors = limit, "file descriptor limit");
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Settings};

    fn guard(s: Settings) -> Arc<Guard> {
        Arc::new(Guard::new(
            &Config::resolve(s).unwrap(),
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let g = guard(Settings {
            trusted_proxies: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.1.1.1".parse().unwrap());
        assert_eq!(
            g.client_ip("10.0.0.2".parse().unwrap(), &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            g.client_ip("198.51.100.1".parse().unwrap(), &h),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn per_address_cap_and_release() {
        let g = guard(Settings {
            max_connections_per_ip: Some(2),
            ..Default::default()
        });
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let a = g.admit(ip).unwrap();
        let _b = g.admit(ip).unwrap();
        assert_eq!(g.admit(ip).unwrap_err(), Refusal::PerAddress(2));
        drop(a);
        assert!(g.admit(ip).is_ok());
        // Loopback is exempt.
        for _ in 0..10 {
            std::mem::forget(g.admit("127.0.0.1".parse().unwrap()).unwrap());
        }
    }

    #[test]
    fn total_cap() {
        let g = guard(Settings {
            max_connections: Some(1),
            ..Default::default()
        });
        let _a = g.admit("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            g.admit("127.0.0.1".parse().unwrap()).unwrap_err(),
            Refusal::ServerFull(1)
        );
    }

    #[test]
    fn origins() {
        let g = guard(Settings {
            allowed_origins: Some(vec!["https://ok.example".into()]),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        assert!(g.check_origin(&h).is_ok());
        h.insert(header::ORIGIN, "https://ok.example".parse().unwrap());
        assert!(g.check_origin(&h).is_ok());
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert_eq!(g.check_origin(&h), Err(Refusal::Origin));
    }
}
