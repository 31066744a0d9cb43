//! Limits on what clients may do, shared by every front-end.
//!
//! Owns the client address (the peer, or the `X-Forwarded-For` client when the peer is a
//! trusted proxy), the connection caps (total and per address), the per-address HTTP request
//! rate, the Origin allowlist and the per-connection message rate. Knows nothing of any
//! protocol: a refusal is an HTTP status and a text that names the limit. Per-address limits
//! never apply to loopback or to trusted proxies, so local benchmarks and a local nginx work.

use std::collections::HashMap;
use std::net::IpAddr;
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
            Refusal::PerAddress(_) | Refusal::HttpRate(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Origin => StatusCode::FORBIDDEN,
        }
    }

    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::ServerFull(_) => "limit_max_connections",
            Refusal::PerAddress(_) => "limit_connections_per_ip",
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
    /// Open WebSocket connections per (non-exempt) address. A `std` mutex held for one map
    /// update; entries are removed when they reach zero.
    per_address: Mutex<HashMap<IpAddr, usize>>,
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
            per_address: Mutex::new(HashMap::new()),
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
    /// address in `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !self.is_trusted(*ip))
            .unwrap_or(peer)
    }

    /// Whether per-address limits skip this address.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.to_canonical().is_loopback() || self.is_trusted(ip)
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
            let mut per = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let count = per.entry(ip).or_insert(0);
            if *count >= self.max_per_address {
                drop(per);
                // Dropping the permit gives the total slot back.
                drop(permit);
                return Err(self.refused(Refusal::PerAddress(self.max_per_address)));
            }
            *count += 1;
            permit.address = Some(ip);
        }
        Ok(permit)
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
            let mut per = self
                .guard
                .per_address
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
    }
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
