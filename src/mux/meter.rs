//! Exact accounting of bytes outside the weight budget: KV caches and activation scratch.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A byte limit with the bytes currently charged against it.
#[derive(Debug)]
pub struct Meter {
    used: AtomicUsize,
    limit: AtomicUsize,
    what: &'static str,
}

impl Meter {
    /// A meter for `what` (named in errors) with `limit` bytes.
    pub fn new(what: &'static str, limit: usize) -> Arc<Meter> {
        Arc::new(Meter {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            what,
        })
    }
    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }
    /// Changes the limit (charges already made stay).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }
    /// Charges `bytes`, or fails without charging when that would pass the limit.
    pub fn reserve(self: &Arc<Meter>, bytes: usize) -> Result<Reservation> {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|&n| n <= limit)
            })
            .map_err(|u| {
                Error::Mux(format!(
                    "{} would need {bytes} more bytes but {u} of the {limit}-byte limit are in \
                     use; raise the limit or end other sequences",
                    self.what
                ))
            })?;
        Ok(Reservation {
            meter: self.clone(),
            bytes,
        })
    }
}

/// Bytes charged to a [`Meter`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    meter: Arc<Meter>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.meter.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}
