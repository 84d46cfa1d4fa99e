//! The pinned host cache: copies of units in page-locked host memory, under their own byte
//! budget, so that paging a unit in again is one DMA at the PCIe peak.
//!
//! A page-in out of the mapping costs two copies: the host copies the unit's pieces into
//! pinned staging memory, then the device copies that over PCIe. The first runs on the host's
//! cores and, below one staging chunk, cannot overlap the second (BENCHMARKS.md: 51% of the
//! pinned peak for a 7 MiB unit, 58% for 29 MiB on the H100 host). CUDA programs avoid the first
//! copy by registering the mapping (`cudaHostRegister`); OpenCL 1.2 has no such call — a buffer
//! over the mapping made NVIDIA's driver move the whole file into device memory. The host cache
//! is the OpenCL way to the same end, as ServerlessLLM's pinned pool and vLLM's CPU offload
//! do it: the first page-in of a unit fills a pinned copy kept in the cache (and copies from it
//! chunk by chunk as it fills); every later page-in of that unit, after it was evicted from the
//! device, is a single DMA from that copy.
//!
//! The cache has its own least-recently-used order and budget ([`crate::mux::MuxOptions::host_cache`]),
//! counted exactly as allocated, never exceeded. An entry that a DMA still reads is waited for
//! before its memory is freed or reused.

use crate::backend::opencl::Pinned;
use crate::error::{Error, Result};
use opencl3::event::Event;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::core::{Key, ModelId};

/// What the pinned host cache holds and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCacheStats {
    /// Bytes of pinned host memory it may hold (0: no cache).
    pub budget: usize,
    /// Bytes it holds now.
    pub used: usize,
    /// Most bytes it ever held at once.
    pub peak: usize,
    /// Page-ins copied from a cached unit (one DMA each).
    pub hits: u64,
    /// Page-ins that filled a cache entry from the mapping.
    pub fills: u64,
    /// Page-ins that went past the cache (the unit larger than its budget, or pinned memory
    /// refused).
    pub bypasses: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    /// Bytes copied to the device from cached units.
    pub bytes_from_cache: u64,
}

/// One cached unit.
pub(crate) struct Cached {
    /// The unit's bytes as laid out on the device.
    pub mem: Pinned,
    last_use: u64,
    /// The last DMA that reads `mem`; waited for before `mem` is freed or refilled.
    busy: Option<Event>,
}

impl Cached {
    /// Records the DMA that now reads this entry.
    pub fn set_busy(&mut self, ev: Event) {
        self.busy = Some(ev);
    }
}

pub(crate) struct Inner {
    clock: u64,
    entries: HashMap<Key, Cached>,
    pub stats: HostCacheStats,
}

/// The pinned host cache of one device store.
pub(crate) struct HostCache {
    inner: Mutex<Inner>,
}

/// Waits for the DMA that reads an entry, so its memory may be freed or refilled.
fn settle(c: &mut Cached) -> Result<()> {
    if let Some(ev) = c.busy.take() {
        ev.wait().map_err(|e| {
            Error::Device(format!(
                "opencl: waiting for a copy out of the host cache: {e}"
            ))
        })?;
    }
    Ok(())
}

impl HostCache {
    /// An empty cache of `budget` bytes.
    pub fn new(budget: usize) -> HostCache {
        HostCache {
            inner: Mutex::new(Inner {
                clock: 0,
                entries: HashMap::new(),
                stats: HostCacheStats {
                    budget,
                    ..HostCacheStats::default()
                },
            }),
        }
    }

    /// The cache, locked.
    pub fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Mux("host cache poisoned".into()))
    }

    /// Its counters.
    pub fn stats(&self) -> HostCacheStats {
        self.lock().map(|c| c.stats).unwrap_or_default()
    }

    /// Sets the budget, dropping least recently used entries until they fit it.
    pub fn set_budget(&self, budget: usize) -> Result<()> {
        let mut c = self.lock()?;
        c.stats.budget = budget;
        c.make_room(0).map(drop)
    }

    /// Drops every entry of model `id` (waiting for DMAs that still read them).
    pub fn forget(&self, id: ModelId) {
        let Ok(mut c) = self.lock() else { return };
        let keys: Vec<Key> = c.entries.keys().filter(|k| k.0 == id).copied().collect();
        for k in keys {
            if let Some(mut e) = c.entries.remove(&k) {
                let _ = settle(&mut e);
                c.stats.used -= e.mem.as_slice().len();
            }
        }
    }
}

impl Inner {
    /// The cached copy of `key`, marked most recently used.
    pub fn hit(&mut self, key: Key) -> Option<&mut Cached> {
        self.clock += 1;
        let now = self.clock;
        let e = self.entries.get_mut(&key)?;
        e.last_use = now;
        Some(e)
    }

    /// Room for `bytes` more: the least recently used entries are dropped until they fit.
    /// Returns the storage of a dropped entry of exactly `bytes` bytes, still counted in
    /// `used`, for the caller to refill; `Ok(None)` when the room is free (counted by
    /// [`Self::insert`]); `Err` only when waiting for a DMA failed. `bytes` must be at most the
    /// budget.
    pub fn make_room(&mut self, bytes: usize) -> Result<Option<Pinned>> {
        let mut reuse = None;
        while self.stats.used + if reuse.is_some() { 0 } else { bytes } > self.stats.budget {
            let Some(&victim) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k)
            else {
                break;
            };
            let Some(mut e) = self.entries.remove(&victim) else {
                break;
            };
            settle(&mut e)?;
            self.stats.evictions += 1;
            let len = e.mem.as_slice().len();
            if reuse.is_none() && len == bytes {
                reuse = Some(e.mem);
            } else {
                self.stats.used -= len;
            }
        }
        Ok(reuse)
    }

    /// Counts fresh storage of `bytes` bytes before it is allocated (undone by
    /// [`Self::release`] when the allocation fails).
    pub fn reserve(&mut self, bytes: usize) {
        self.stats.used += bytes;
        self.stats.peak = self.stats.peak.max(self.stats.used);
    }

    /// Gives back a reservation whose allocation failed.
    pub fn release(&mut self, bytes: usize) {
        self.stats.used -= bytes;
    }

    /// Adds a filled entry (its bytes already counted), most recently used.
    pub fn insert(&mut self, key: Key, mem: Pinned, busy: Event) {
        self.clock += 1;
        self.entries.insert(
            key,
            Cached {
                mem,
                last_use: self.clock,
                busy: Some(busy),
            },
        );
    }
}
