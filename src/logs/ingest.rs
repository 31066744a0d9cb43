//! What `POST /logs/add` takes in per client address: entries and bytes per second, beside
//! the requests per second counted in [`super`]. One request of 1 MB carries as many
//! entries as thousands of the plugin's batches, so requests alone do not bound a flood: a
//! flooding address is refused its own entries here, before they reach the stream or the
//! store's queue, so they never crowd out anyone else's.
//!
//! Owns the two per-address limiters (token buckets holding ten seconds' worth) and the
//! answer to a refusal. Loopback and trusted proxies are exempt, as from every per-address
//! limit (the caller checks).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Seconds' worth of entries and bytes an address may post at once.
const BURST_SECONDS: u32 = 10;

/// Why a body was not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestRefusal {
    /// Over the address's rate: try again after `retry_after`.
    #[error(
        "log rate limit: at most {entries} entries and {bytes} bytes per second per address \
         (bursts of ten seconds' worth): these entries were not stored"
    )]
    Rate {
        entries: u32,
        bytes: u32,
        retry_after: Duration,
    },
    /// More in one body than an address may ever post at once.
    #[error("too much in one request: at most {entries} entries and {bytes} bytes")]
    TooLarge { entries: u32, bytes: u32 },
}

/// The per-address ingest limits of `/logs/add`.
#[derive(Debug)]
pub struct Ingest {
    entries_per_second: u32,
    bytes_per_second: u32,
    entries: DefaultKeyedRateLimiter<IpAddr>,
    bytes: DefaultKeyedRateLimiter<IpAddr>,
}

fn bucket(per_second: u32) -> DefaultKeyedRateLimiter<IpAddr> {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(per_second.saturating_mul(BURST_SECONDS)).unwrap_or(rate);
    RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
}

impl Ingest {
    pub fn new(entries_per_second: u32, bytes_per_second: u32) -> Ingest {
        Ingest {
            entries_per_second,
            bytes_per_second,
            entries: bucket(entries_per_second),
            bytes: bucket(bytes_per_second),
        }
    }

    /// Charges a body of `entries` entries and `bytes` bytes to `ip`. A refused body is
    /// refused whole; what it was charged before the refusal stays charged (it is the
    /// flooder's own loss).
    pub fn charge(&self, ip: IpAddr, entries: usize, bytes: usize) -> Result<(), IngestRefusal> {
        let too_large = IngestRefusal::TooLarge {
            entries: self.entries_per_second.saturating_mul(BURST_SECONDS),
            bytes: self.bytes_per_second.saturating_mul(BURST_SECONDS),
        };
        for (limiter, n) in [(&self.entries, entries), (&self.bytes, bytes)] {
            let Some(n) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
                continue;
            };
            match limiter.check_key_n(&ip, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let now = governor::clock::Clock::now(limiter.clock());
                    return Err(IngestRefusal::Rate {
                        entries: self.entries_per_second,
                        bytes: self.bytes_per_second,
                        retry_after: not_until.wait_time_from(now),
                    });
                }
                Err(_) => return Err(too_large),
            }
        }
        Ok(())
    }

    /// Forgets addresses whose buckets are full again (call now and then).
    pub fn forget_idle(&self) {
        self.entries.retain_recent();
        self.bytes.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_bytes_per_address() {
        let ingest = Ingest::new(10, 1000);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(ingest.charge(a, 100, 500).is_ok());
        assert!(matches!(
            ingest.charge(a, 1, 10),
            Err(IngestRefusal::Rate { .. })
        ));
        // Another address is not affected; bytes alone are limited too.
        assert!(ingest.charge(b, 1, 9_000).is_ok());
        assert!(matches!(
            ingest.charge(b, 1, 2_000),
            Err(IngestRefusal::Rate { .. })
        ));
        // More than ten seconds' worth can never pass.
        let c: IpAddr = "198.51.100.3".parse().unwrap();
        assert_eq!(
            ingest.charge(c, 101, 10),
            Err(IngestRefusal::TooLarge {
                entries: 100,
                bytes: 10_000
            })
        );
    }
}
