//! Histograms the hot path can feed without sharing a cache line per delivery.
//!
//! A [`Histogram`] is shared (atomic buckets, exported by the registry); a connection's
//! writer observes into its own [`Local`] (plain integers, owned by its task) and merges it
//! into the shared one at most once per [`MERGE_INTERVAL`] and when the writer ends. Under
//! load that is a few relaxed atomic adds per connection per second instead of one per
//! delivered message; the price is that a scrape misses what a connection observed since
//! its last merge, until its next batch or its close.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// How often a [`Local`] is merged into its shared histogram at most.
pub const MERGE_INTERVAL: Duration = Duration::from_secs(1);

/// The most buckets a histogram has (its bounds, plus the one above the last bound).
const MAX_BUCKETS: usize = 24;

/// A histogram of `u64` observations in a base unit (nanoseconds, bytes), exported in
/// `scale` times that unit (seconds: `1e-9`). A cheap-to-clone handle.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Upper bounds (inclusive, ascending), in the base unit.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: Vec<AtomicU64>,
    /// Sum of observations, in the base unit.
    sum: AtomicU64,
    scale: f64,
}

impl Histogram {
    /// A histogram with these inclusive upper bounds (ascending, at most 23).
    pub fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        assert!(bounds.len() < MAX_BUCKETS && bounds.is_sorted());
        Histogram(Arc::new(Shared {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            scale,
        }))
    }

    /// Observations so far (merged ones).
    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// A fresh accumulator for one task.
    pub fn local(&self) -> Local {
        Local {
            shared: self.clone(),
            counts: [0; MAX_BUCKETS],
            sum: 0,
            pending: 0,
            last_merge: None,
        }
    }
}

/// One task's observations, not yet in the shared histogram. Merged when dropped.
#[derive(Debug)]
pub struct Local {
    shared: Histogram,
    counts: [u64; MAX_BUCKETS],
    sum: u64,
    pending: u64,
    last_merge: Option<Instant>,
}

impl Local {
    /// Records one observation, in the base unit.
    pub fn observe(&mut self, value: u64) {
        let i = self.shared.0.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.sum = self.sum.saturating_add(value);
        self.pending += 1;
    }

    /// Merges into the shared histogram if there is something to merge and the last merge
    /// was [`MERGE_INTERVAL`] ago (the first merge is immediate).
    pub fn merge_every(&mut self, now: Instant) {
        if self.pending > 0
            && self
                .last_merge
                .is_none_or(|t| now.saturating_duration_since(t) >= MERGE_INTERVAL)
        {
            self.merge();
            self.last_merge = Some(now);
        }
    }

    /// Merges now.
    pub fn merge(&mut self) {
        if self.pending == 0 {
            return;
        }
        let shared = &self.shared.0;
        for (bucket, n) in shared.buckets.iter().zip(&mut self.counts) {
            if *n > 0 {
                bucket.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        shared
            .sum
            .fetch_add(std::mem::take(&mut self.sum), Ordering::Relaxed);
        self.pending = 0;
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.merge();
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        // Buckets first, then the sum: a merge in between makes the sum run ahead by one
        // merge, never the count.
        let counts: Vec<u64> = s
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let sum = s.sum.load(Ordering::Relaxed) as f64 * s.scale;
        let buckets: Vec<(f64, u64)> = s
            .bounds
            .iter()
            .map(|b| *b as f64 * s.scale)
            .chain([f64::INFINITY])
            .zip(counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_reach_the_shared_histogram_at_merges() {
        let h = Histogram::new(&[10, 100], 1.0);
        let mut local = h.local();
        let t = Instant::now();
        local.observe(10);
        local.merge_every(t);
        assert_eq!(h.count(), 1, "the first merge is immediate");
        local.observe(11);
        local.observe(1000);
        local.merge_every(t + Duration::from_millis(10));
        assert_eq!(h.count(), 1, "held until the interval is over");
        local.merge_every(t + MERGE_INTERVAL);
        assert_eq!(h.count(), 3);
        local.observe(5);
        drop(local);
        assert_eq!(h.count(), 4, "merged when dropped");
        let counts: Vec<u64> =
            h.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        assert_eq!(counts, [2, 1, 1]);
        assert_eq!(h.0.sum.load(Ordering::Relaxed), 10 + 11 + 1000 + 5);
    }
}
