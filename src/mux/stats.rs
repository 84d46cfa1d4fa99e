//! Counters the multiplexer keeps: per model, per unit, and for the whole budget.

use super::units::UnitId;
use std::time::Duration;

/// Page-in times in power-of-two buckets of microseconds: bucket `i` counts page-ins that took
/// less than `2^i` µs (the last bucket holds the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Counts per bucket.
    pub buckets: [u64; 24],
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().max(1) as u64;
        let i = (64 - us.leading_zeros()) as usize;
        self.buckets[i.min(self.buckets.len() - 1)] += 1;
    }
    /// Number of recorded durations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
    /// Upper bound in µs of the bucket holding quantile `q` (0–1), or 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let want = ((n as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1 << i;
            }
        }
        1 << (self.buckets.len() - 1)
    }
}

/// Counters of one unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Uses that found the unit resident.
    pub hits: u64,
    /// Uses that paged it in.
    pub misses: u64,
    /// Times it was evicted.
    pub evictions: u64,
    /// Whether it is resident now.
    pub resident: bool,
    /// Its size in bytes.
    pub bytes: usize,
}

/// Counters of one registered model.
#[derive(Clone, Debug, Default)]
pub struct ModelStats {
    /// The name it was registered under.
    pub name: String,
    /// Uses of a resident unit.
    pub hits: u64,
    /// Page-ins.
    pub misses: u64,
    /// Units of this model evicted.
    pub evictions: u64,
    /// Bytes copied in.
    pub bytes_in: u64,
    /// Bytes given up by evictions.
    pub bytes_out: u64,
    /// Bytes resident now.
    pub resident_bytes: usize,
    /// Bytes of all its units.
    pub total_bytes: usize,
    /// Whether it runs in streaming mode (larger than the whole budget).
    pub streaming: bool,
    /// How long page-ins held the requesting thread.
    pub page_in_time: Histogram,
    /// Total time page-ins held the requesting thread.
    pub page_in_total: Duration,
    /// Total time passes spent asking for units (hits and page-ins, waits for room and
    /// evictions included): the host's share of paging.
    pub acquire_total: Duration,
    /// Total time passes spent giving units back (each use's completion fence queued).
    pub release_total: Duration,
    /// Per unit, blocks then the head.
    pub units: Vec<(UnitId, UnitStats)>,
}

impl ModelStats {
    /// Fraction of uses that hit (1 when unused).
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// A snapshot of the whole multiplexer.
#[derive(Clone, Debug, Default)]
pub struct MuxStats {
    /// The weight budget in bytes.
    pub budget: usize,
    /// Bytes of weights allocated now.
    pub used: usize,
    /// Most bytes of weights ever allocated at once.
    pub peak: usize,
    /// Bytes held by KV caches and activation scratch.
    pub runtime_used: usize,
    /// Limit on those bytes.
    pub runtime_limit: usize,
    /// The pinned host cache ([`super::MuxOptions::host_cache`]).
    pub host_cache: super::HostCacheStats,
    /// Every registered model.
    pub models: Vec<ModelStats>,
}

impl MuxStats {
    /// The model registered as `name`.
    pub fn model(&self, name: &str) -> Option<&ModelStats> {
        self.models.iter().find(|m| m.name == name)
    }
    /// Page-ins of every model.
    pub fn misses(&self) -> u64 {
        self.models.iter().map(|m| m.misses).sum()
    }
    /// Uses that hit, over every model.
    pub fn hits(&self) -> u64 {
        self.models.iter().map(|m| m.hits).sum()
    }
    /// Bytes paged in, over every model.
    pub fn bytes_in(&self) -> u64 {
        self.models.iter().map(|m| m.bytes_in).sum()
    }
    /// Evictions, over every model.
    pub fn evictions(&self) -> u64 {
        self.models.iter().map(|m| m.evictions).sum()
    }
}
