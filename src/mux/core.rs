//! The residency table: which units of which models are resident, their recency, pins and
//! byte accounting, and the page-in / eviction decisions. One table per [`super::Mux`] (and a
//! private, unlimited one per model placed on a device without a mux).
//!
//! Invariants, kept under one lock:
//! * `used` (bytes of storage the table holds: resident, loading and reclaimed-for-reuse) never
//!   exceeds `budget` — storage is freed (after the device finished with it) before new storage
//!   is counted;
//! * a unit with pins (a forward pass using it) or holds ([`super::Mux::pin`]) is never evicted;
//! * a forward pass pins one unit at a time and never waits while holding a pin, so waiting
//!   for space cannot deadlock.

use super::meter::Meter;
use super::stats::{ModelStats, MuxStats, UnitStats};
use super::store::{Mem, Store};
use super::units::{UnitId, UnitLayout};
use crate::backend::Resident;
use crate::backend::opencl::device::retain_event;
use crate::error::{Error, Result};
use crate::model::Model;
use opencl3::event::Event;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Identifies a model inside one table.
pub(crate) type ModelId = u64;
/// A unit of one model.
pub(crate) type Key = (ModelId, UnitId);

/// How victims are chosen when a page-in needs room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// The least recently used unit of any model (ternmux's policy).
    #[default]
    LayerLru,
    /// Every unit of the least recently used other model at once (what Ollama, llama.cpp's
    /// router and LM Studio do with whole models) — kept as the baseline the bench compares.
    WholeModelLru,
}

/// What the multiplexer did, for traces and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum MuxEvent {
    /// A pass used a resident unit.
    Hit {
        /// Model name.
        model: Arc<str>,
        /// Unit.
        unit: UnitId,
    },
    /// A unit was copied in.
    PageIn {
        /// Model name.
        model: Arc<str>,
        /// Unit.
        unit: UnitId,
        /// Its size.
        bytes: usize,
        /// How long the page-in held the requesting thread.
        micros: u64,
        /// Weight bytes allocated after it.
        used: usize,
        /// The budget.
        budget: usize,
        /// Whether the bytes came from the pinned host cache (one DMA) rather than the mapping.
        from_host_cache: bool,
    },
    /// A unit was evicted to make room.
    Evict {
        /// Model name.
        model: Arc<str>,
        /// Unit.
        unit: UnitId,
        /// Its size.
        bytes: usize,
        /// The model whose page-in needed the room (empty for a budget change).
        for_model: Arc<str>,
        /// Weight bytes allocated after it.
        used: usize,
    },
}

/// One line a person reads: what moved, how big, how long, and the budget after it.
impl std::fmt::Display for MuxEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kib = |b: usize| b as f64 / 1024.0;
        match self {
            MuxEvent::Hit { model, unit } => {
                write!(f, "hit      {:<16}", format!("{model}/{unit}"))
            }
            MuxEvent::PageIn {
                model,
                unit,
                bytes,
                micros,
                used,
                budget,
                from_host_cache,
            } => write!(
                f,
                "page-in  {:<16} {:>8.1} KiB {micros:>7} µs   {:.2}/{:.2} MiB{}",
                format!("{model}/{unit}"),
                kib(*bytes),
                mib(*used),
                mib(*budget),
                if *from_host_cache {
                    "   (from the host cache)"
                } else {
                    ""
                }
            ),
            MuxEvent::Evict {
                model,
                unit,
                bytes,
                for_model,
                used,
            } => write!(
                f,
                "evict    {:<16} {:>8.1} KiB   for {for_model:<8}  {:.2} MiB used",
                format!("{model}/{unit}"),
                kib(*bytes),
                mib(*used)
            ),
        }
    }
}

/// Receives every [`MuxEvent`].
pub type Sink = Arc<dyn Fn(&MuxEvent) + Send + Sync>;

enum Slot {
    Loading,
    Ready(Arc<Resident>),
}

struct Entry {
    bytes: usize,
    last_use: u64,
    pins: u32,
    held: u32,
    slot: Slot,
    /// Complete when the passes that used the unit have finished with it (devices): one
    /// marker per use whose queue may still run it (passes on several queues can share a
    /// unit; the storage is reused or freed only after all of them).
    fence: Vec<Event>,
    /// The copy that paged the unit in (until seen complete): a pass that finds the unit
    /// makes its kernels wait for it.
    copying: Option<Event>,
}

struct ModelEntry {
    name: Arc<str>,
    layouts: Arc<Vec<UnitLayout>>,
    total: usize,
    last_use: u64,
    /// Clock when the model's current pass asked for its first unit, and when its previous
    /// pass did (0: none yet).
    pass_start: u64,
    prev_pass_start: u64,
    stats: ModelStats,
    unit_stats: BTreeMap<UnitId, UnitStats>,
}

struct Table {
    budget: usize,
    used: usize,
    peak: usize,
    clock: u64,
    policy: Policy,
    stream_slots: usize,
    next_id: ModelId,
    models: BTreeMap<ModelId, ModelEntry>,
    units: HashMap<Key, Entry>,
}

/// The table with its store.
pub(crate) struct Core {
    pub store: Store,
    /// Whether units record a completion fence per use (not needed when nothing is evicted).
    fenced: bool,
    table: Mutex<Table>,
    changed: Condvar,
    sink: Mutex<Option<Sink>>,
    has_sink: AtomicBool,
    /// KV caches and activation scratch, under their own limit.
    pub runtime: Arc<Meter>,
}

/// Events to emit when dropped.
struct Emit<'a> {
    core: &'a Core,
    events: Vec<MuxEvent>,
}

impl Drop for Emit<'_> {
    fn drop(&mut self) {
        self.core.emit(std::mem::take(&mut self.events));
    }
}

/// A unit pinned for use by a forward pass; unpinned (and fenced) when dropped.
pub(crate) struct UnitGuard {
    // Fields drop in declaration order: the unit goes before the pin, so an evicting thread
    // holds the only reference once the unit is unpinned.
    res: Arc<Resident>,
    _pin: Option<Pin>,
}

/// One pin on a table entry, released when dropped.
struct Pin {
    core: Arc<Core>,
    key: Key,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.core.unpin(self.key);
    }
}

impl UnitGuard {
    /// A unit read straight from the mapping (CPU, no mux).
    pub fn unmanaged(res: Resident) -> UnitGuard {
        UnitGuard {
            res: Arc::new(res),
            _pin: None,
        }
    }
}

impl std::ops::Deref for UnitGuard {
    type Target = Resident;
    fn deref(&self) -> &Resident {
        &self.res
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Mux("the residency table's lock is poisoned (a thread panicked)".into())
}

/// Whether a copy's or a fence's event has completed (or failed: then the use's own wait
/// reports it).
fn event_done(ev: &Event) -> bool {
    ev.command_execution_status()
        .is_ok_and(|st| st.0 == opencl3::event::CL_COMPLETE || st.0 < 0)
}

/// Whether storage of `storage` bytes may take a unit of `want` bytes: the same size, or for a
/// streaming model (`slack`) at most an eighth larger. A model's last block lacks the next
/// block's norm, so it is a few KiB smaller than the others; without the slack, a pass that
/// cycles it through a slot frees and allocates storage instead of reusing it, and the host
/// waits for the device to finish with the freed storage first. Models that fit keep exact
/// sizes, so pinning a whole model needs no more than its bytes.
fn fits(storage: usize, want: usize, slack: bool) -> bool {
    storage == want || (slack && storage > want && storage - want <= want / 8)
}

fn mib(b: usize) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl Core {
    pub fn new(store: Store, budget: usize, fenced: bool, runtime_limit: usize) -> Core {
        Core {
            store,
            fenced,
            table: Mutex::new(Table {
                budget,
                used: 0,
                peak: 0,
                clock: 0,
                policy: Policy::LayerLru,
                stream_slots: 2,
                next_id: 0,
                models: BTreeMap::new(),
                units: HashMap::new(),
            }),
            changed: Condvar::new(),
            sink: Mutex::new(None),
            has_sink: AtomicBool::new(false),
            runtime: Meter::new("KV caches and activation scratch", runtime_limit),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Table>> {
        self.table.lock().map_err(poisoned)
    }

    fn emit(&self, events: Vec<MuxEvent>) {
        for e in events.iter().filter(|e| !matches!(e, MuxEvent::Hit { .. })) {
            tracing::debug!(target: "ternmux::mux", "{e}");
        }
        if !self.has_sink.load(Ordering::Acquire) {
            return;
        }
        let sink = self.sink.lock().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            events.iter().for_each(|e| sink(e));
        }
    }

    pub fn set_sink(&self, sink: Option<Sink>) {
        if let Ok(mut s) = self.sink.lock() {
            self.has_sink.store(sink.is_some(), Ordering::Release);
            *s = sink;
        }
    }

    pub fn set_policy(&self, policy: Policy) -> Result<()> {
        self.lock()?.policy = policy;
        Ok(())
    }

    /// Adds a model's unit table; no storage is used until its units are.
    pub fn add_model(&self, name: &str, model: &Model) -> Result<(ModelId, usize)> {
        let layouts = super::units::layouts(model, self.store.align(), self.store.with_vectors());
        let total = layouts.iter().map(|l| l.bytes).sum();
        let mut t = self.lock()?;
        let id = t.next_id;
        t.next_id += 1;
        let unit_stats = layouts
            .iter()
            .map(|l| {
                (
                    l.id,
                    UnitStats {
                        bytes: l.bytes,
                        ..UnitStats::default()
                    },
                )
            })
            .collect();
        t.models.insert(
            id,
            ModelEntry {
                name: name.into(),
                layouts: Arc::new(layouts),
                total,
                last_use: 0,
                pass_start: 0,
                prev_pass_start: 0,
                stats: ModelStats {
                    name: name.into(),
                    total_bytes: total,
                    ..ModelStats::default()
                },
                unit_stats,
            },
        );
        Ok((id, total))
    }

    /// Drops a model's units (waiting for the device to finish with them).
    pub fn remove_model(&self, id: ModelId) {
        let Ok(mut t) = self.lock() else { return };
        let keys: Vec<Key> = t.units.keys().filter(|k| k.0 == id).copied().collect();
        for k in keys {
            if let Some(e) = t.units.remove(&k) {
                for f in &e.fence {
                    let _ = f.wait();
                }
                t.used -= e.bytes;
            }
        }
        t.models.remove(&id);
        self.changed.notify_all();
        drop(t);
        self.store.forget(id);
    }

    /// Pins unit `unit` of model `id`, paging it in (and evicting) when needed.
    pub fn acquire(
        self: &Arc<Self>,
        model: &Model,
        id: ModelId,
        unit: UnitId,
    ) -> Result<UnitGuard> {
        let entered = Instant::now();
        let r = self.acquire_timed(model, id, unit);
        let took = entered.elapsed();
        if let Some(m) = self.lock()?.models.get_mut(&id) {
            m.stats.acquire_total += took;
        }
        r
    }

    fn acquire_timed(
        self: &Arc<Self>,
        model: &Model,
        id: ModelId,
        unit: UnitId,
    ) -> Result<UnitGuard> {
        let key = (id, unit);
        // Emitted when dropped, on every path (after the table's lock, declared later, is released).
        let mut events = Emit {
            core: self,
            events: Vec::new(),
        };
        let mut t = self.lock()?;
        let (layouts, total, name) = {
            let m = t
                .models
                .get(&id)
                .ok_or_else(|| Error::Mux(format!("model #{id} is not registered")))?;
            (m.layouts.clone(), m.total, m.name.clone())
        };
        let index = match unit {
            UnitId::Block(n) => n,
            UnitId::Head => layouts.len().saturating_sub(1),
        };
        let layout = layouts
            .get(index)
            .filter(|l| l.id == unit)
            .ok_or_else(|| Error::Mux(format!("model {name} has no unit {unit}")))?;
        let bytes = layout.bytes;
        if index == 0 {
            // A pass begins (passes ask for their units in order).
            let start = t.clock + 1;
            if let Some(m) = t.models.get_mut(&id) {
                m.prev_pass_start = m.pass_start;
                m.pass_start = start;
            }
        }
        // Reclaimed storage for this page-in: the memory, the fences of its last unit's uses,
        // and its size (it may be a little larger than this unit: see [`fits`]).
        let mut reuse: Option<(Mem, Vec<Event>, usize)> = None;
        let mut streaming: bool;
        'retry: loop {
            t.clock += 1;
            let now = t.clock;
            if let Some(e) = t.units.get(&key) {
                match &e.slot {
                    Slot::Ready(_) => {
                        let (res, copying) = t
                            .pin_hit(key)
                            .ok_or_else(|| Error::Mux(format!("unit {unit} of {name} vanished")))?;
                        drop(t);
                        let guard = self.pinned_after(key, res, copying)?;
                        if let Some((mem, fence, storage)) = reuse {
                            // Another thread paged the unit in meanwhile: give the room back.
                            self.return_reserved(mem, fence, storage)?;
                        }
                        if self.has_sink.load(Ordering::Relaxed) {
                            events.events.push(MuxEvent::Hit {
                                model: name.clone(),
                                unit,
                            });
                        }
                        return Ok(guard);
                    }
                    Slot::Loading => {
                        t = self.changed.wait(t).map_err(poisoned)?;
                        continue 'retry;
                    }
                }
            }
            if bytes > t.budget {
                return Err(Error::Mux(format!(
                    "unit {unit} of {name} needs {bytes} bytes but the whole budget is {}; raise \
                     the budget",
                    t.budget
                )));
            }
            streaming = total > t.budget;
            // Refuse a page-in that cannot fit even after evicting everything evictable, before
            // evicting anything for it.
            let evictable: usize = t
                .units
                .iter()
                .filter(|(k, e)| t.evictable(k, e, key))
                .map(|(_, e)| e.bytes)
                .sum();
            if reuse.is_none() && !t.busy() && t.budget - t.used + evictable < bytes {
                return Err(t.no_room(unit, &name, bytes));
            }
            while t.used + if reuse.is_some() { 0 } else { bytes } > t.budget {
                let victims = t.victims(key, bytes, streaming);
                if victims.is_empty() {
                    if !t.busy() {
                        return Err(t.no_room(unit, &name, bytes));
                    }
                    // Pins are short (one unit of one pass); wait for one to go.
                    t = self.changed.wait(t).map_err(poisoned)?;
                    continue 'retry;
                }
                for v in victims {
                    let evicted = self.evict(&mut t, v, &name, bytes, streaming, &mut reuse)?;
                    events.events.push(evicted);
                }
            }
            // The unit is charged for its storage.
            let charged = reuse.as_ref().map_or(bytes, |r| r.2);
            t.units.insert(
                key,
                Entry {
                    bytes: charged,
                    last_use: now,
                    pins: 1,
                    held: 0,
                    slot: Slot::Loading,
                    fence: Vec::new(),
                    copying: None,
                },
            );
            // Reclaimed storage was already counted in `used`.
            if reuse.is_none() {
                t.used += bytes;
            }
            t.peak = t.peak.max(t.used);
            if let Some(m) = t.models.get_mut(&id) {
                m.last_use = now;
                m.stats.misses += 1;
                if let Some(u) = m.unit_stats.get_mut(&unit) {
                    u.misses += 1;
                }
            }
            break;
        }
        drop(t);
        let started = Instant::now();
        let filled = (|| {
            let (mem, after) = match reuse {
                Some((mem, fence, _)) => (mem, fence),
                None => (self.store.alloc(bytes)?, Vec::new()),
            };
            self.store.fill(mem, key, layout, model, &after)
        })();
        let took = started.elapsed();
        let mut t = self.lock()?;
        let (res, copying, from_host_cache) = match filled {
            Ok(v) => v,
            Err(err) => {
                if let Some(e) = t.units.remove(&key) {
                    t.used -= e.bytes;
                }
                self.changed.notify_all();
                return Err(err);
            }
        };
        let res = Arc::new(res);
        if let Some(e) = t.units.get_mut(&key) {
            e.slot = Slot::Ready(res.clone());
            // Passes of other threads that find the unit before its copy has run wait for it
            // too (this thread waits below).
            e.copying = copying.as_ref().map(retain_event).transpose()?;
        }
        let (used, budget) = (t.used, t.budget);
        if let Some(m) = t.models.get_mut(&id) {
            m.stats.bytes_in += bytes as u64;
            m.stats.page_in_time.record(took);
            m.stats.page_in_total += took;
        }
        self.changed.notify_all();
        drop(t);
        events.events.push(MuxEvent::PageIn {
            model: name,
            unit,
            bytes,
            micros: took.as_micros() as u64,
            used,
            budget,
            from_host_cache,
        });
        drop(events);
        let guard = self.pinned(key, res);
        // The pass's kernels that read the unit wait for the copy: this thread waits, or (for
        // a streaming model) the compute queue does.
        if let Some(copy) = copying {
            self.store.wait_ready(&copy, streaming)?;
        }
        Ok(guard)
    }

    /// [`Self::pinned`] for a hit: when the copy that paged the unit in may still run
    /// (`copying`, from [`Table::pin_hit`]), the caller's queue waits for it first.
    fn pinned_after(
        self: &Arc<Self>,
        key: Key,
        res: Arc<Resident>,
        copying: Option<Event>,
    ) -> Result<UnitGuard> {
        let guard = self.pinned(key, res);
        if let Some(copy) = copying {
            self.store.wait_ready(&copy, true)?;
        }
        Ok(guard)
    }

    fn pinned(self: &Arc<Self>, key: Key, res: Arc<Resident>) -> UnitGuard {
        UnitGuard {
            res,
            _pin: Some(Pin {
                core: self.clone(),
                key,
            }),
        }
    }

    /// Pins unit `unit` of `id` only if it is resident already (no page-in).
    pub fn peek(self: &Arc<Self>, id: ModelId, unit: UnitId) -> Result<Option<UnitGuard>> {
        let key = (id, unit);
        let mut events = Emit {
            core: self,
            events: Vec::new(),
        };
        let mut t = self.lock()?;
        t.clock += 1;
        let Some((res, copying)) = t.pin_hit(key) else {
            return Ok(None);
        };
        if self.has_sink.load(Ordering::Relaxed)
            && let Some(m) = t.models.get(&id)
        {
            events.events.push(MuxEvent::Hit {
                model: m.name.clone(),
                unit,
            });
        }
        drop(t);
        self.pinned_after(key, res, copying).map(Some)
    }

    /// Storage reclaimed for a page-in that turned out not to be needed: free it.
    fn return_reserved(&self, mem: Mem, fence: Vec<Event>, bytes: usize) -> Result<()> {
        for f in &fence {
            f.wait().map_err(|e| {
                Error::Device(format!("opencl: waiting for a unit's last use: {e}"))
            })?;
        }
        drop(mem);
        let mut t = self.lock()?;
        t.used -= bytes;
        self.changed.notify_all();
        Ok(())
    }

    /// Removes victim `k`. Storage that [`fits`] the page-in is kept for it (`reuse`, still
    /// counted in `used`); other storage is freed once the device is done with it.
    fn evict(
        &self,
        t: &mut Table,
        k: Key,
        for_model: &Arc<str>,
        want: usize,
        slack: bool,
        reuse: &mut Option<(Mem, Vec<Event>, usize)>,
    ) -> Result<MuxEvent> {
        let e = t
            .units
            .remove(&k)
            .ok_or_else(|| Error::Mux("victim vanished".into()))?;
        let Slot::Ready(res) = e.slot else {
            return Err(Error::Mux("a loading unit was chosen as a victim".into()));
        };
        match Arc::try_unwrap(res) {
            Ok(resident) if reuse.is_none() && fits(e.bytes, want, slack) => {
                *reuse = Some((Store::reclaim(resident), e.fence, e.bytes));
            }
            other => {
                for f in &e.fence {
                    f.wait().map_err(|err| {
                        Error::Device(format!("opencl: waiting for a unit's last use: {err}"))
                    })?;
                }
                drop(other);
                t.used -= e.bytes;
            }
        }
        let used = t.used;
        let name = match t.models.get_mut(&k.0) {
            Some(m) => {
                m.stats.evictions += 1;
                m.stats.bytes_out += e.bytes as u64;
                if let Some(u) = m.unit_stats.get_mut(&k.1) {
                    u.evictions += 1;
                }
                m.name.clone()
            }
            None => "?".into(),
        };
        Ok(MuxEvent::Evict {
            model: name,
            unit: k.1,
            bytes: e.bytes,
            for_model: for_model.clone(),
            used,
        })
    }

    fn unpin(&self, key: Key) {
        let entered = Instant::now();
        let fence = if self.fenced {
            self.store.fence().ok().flatten()
        } else {
            None
        };
        if let Ok(mut t) = self.lock() {
            if let Some(e) = t.units.get_mut(&key) {
                e.pins = e.pins.saturating_sub(1);
                if let Some(f) = fence {
                    e.fence.retain(|x| !event_done(x));
                    e.fence.push(f);
                }
            }
            if let Some(m) = t.models.get_mut(&key.0) {
                m.stats.release_total += entered.elapsed();
            }
            self.changed.notify_all();
        }
    }

    /// Makes unit `unit` of `id` unevictable until [`Core::unhold`].
    pub fn hold(self: &Arc<Self>, model: &Model, id: ModelId, unit: UnitId) -> Result<()> {
        let g = self.acquire(model, id, unit)?;
        let mut t = self.lock()?;
        if let Some(e) = t.units.get_mut(&(id, unit)) {
            e.held += 1;
        }
        drop(t);
        drop(g);
        Ok(())
    }

    pub fn unhold(&self, id: ModelId, unit: UnitId) {
        if let Ok(mut t) = self.lock() {
            if let Some(e) = t.units.get_mut(&(id, unit)) {
                e.held = e.held.saturating_sub(1);
            }
            self.changed.notify_all();
        }
    }

    /// Units of a model, blocks then the head.
    pub fn units_of(&self, id: ModelId) -> Result<Vec<UnitId>> {
        let t = self.lock()?;
        Ok(t.models
            .get(&id)
            .map(|m| m.layouts.iter().map(|l| l.id).collect())
            .unwrap_or_default())
    }

    /// Changes the budget, evicting least recently used units until the new one holds.
    pub fn set_budget(&self, budget: usize) -> Result<()> {
        let mut events = Emit {
            core: self,
            events: Vec::new(),
        };
        let mut t = self.lock()?;
        let old = t.budget;
        t.budget = budget;
        while t.used > t.budget {
            let victims = t.victims((u64::MAX, UnitId::Head), 0, false);
            if victims.is_empty() {
                if t.busy() {
                    t = self.changed.wait(t).map_err(poisoned)?;
                    continue;
                }
                t.budget = old;
                self.changed.notify_all();
                return Err(Error::Mux(format!(
                    "cannot shrink the budget to {budget} bytes: {} bytes are held by Mux::pin",
                    t.used
                )));
            }
            for v in victims {
                let mut none = None;
                let evicted =
                    self.evict(&mut t, v, &Arc::from(""), usize::MAX, false, &mut none)?;
                events.events.push(evicted);
            }
        }
        self.changed.notify_all();
        Ok(())
    }

    pub fn budget(&self) -> usize {
        self.lock().map(|t| t.budget).unwrap_or(0)
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> MuxStats {
        let Ok(t) = self.lock() else {
            return MuxStats::default();
        };
        let models = t
            .models
            .iter()
            .map(|(&id, m)| {
                let mut s = m.stats.clone();
                s.resident_bytes = t
                    .units
                    .iter()
                    .filter(|(k, _)| k.0 == id)
                    .map(|(_, e)| e.bytes)
                    .sum();
                s.streaming = m.total > t.budget;
                s.units = m
                    .unit_stats
                    .iter()
                    .map(|(&u, st)| {
                        let resident = t
                            .units
                            .get(&(id, u))
                            .is_some_and(|e| matches!(e.slot, Slot::Ready(_)));
                        (
                            u,
                            UnitStats {
                                resident,
                                ..st.clone()
                            },
                        )
                    })
                    .collect();
                s
            })
            .collect();
        MuxStats {
            budget: t.budget,
            used: t.used,
            peak: t.peak,
            runtime_used: self.runtime.used(),
            runtime_limit: self.runtime.limit(),
            host_cache: self.store.host_cache_stats(),
            models,
        }
    }

    /// Resident bytes per model name, in registration order, with the total used.
    pub fn residency(&self) -> (Vec<(Arc<str>, usize)>, usize, usize) {
        let Ok(t) = self.lock() else {
            return (Vec::new(), 0, 0);
        };
        let per = t
            .models
            .iter()
            .map(|(&id, m)| {
                let b = t
                    .units
                    .iter()
                    .filter(|(k, _)| k.0 == id)
                    .map(|(_, e)| e.bytes)
                    .sum();
                (m.name.clone(), b)
            })
            .collect();
        (per, t.used, t.budget)
    }

    /// Waits until no page-in is in flight and returns how long that took.
    pub fn quiesce(&self) -> Result<Duration> {
        let start = Instant::now();
        if let Store::Device(d) = &self.store {
            d.dev.finish_copies()?;
            d.dev.finish()?;
        }
        Ok(start.elapsed())
    }
}

impl Table {
    /// Pins a resident unit for a use at the current clock and counts the hit; `None` when the
    /// unit is not resident (absent or still loading).
    fn pin_hit(&mut self, key: Key) -> Option<(Arc<Resident>, Option<Event>)> {
        let now = self.clock;
        let e = self.units.get_mut(&key)?;
        let Slot::Ready(res) = &e.slot else {
            return None;
        };
        let res = res.clone();
        // The copy that paged the unit in may still run (another thread paged it in and has not
        // waited yet): this use waits for it too, every use until it is seen complete.
        let copying = match e.copying.take() {
            Some(ev) if !event_done(&ev) => {
                let mine = retain_event(&ev).ok();
                e.copying = Some(ev);
                mine
            }
            _ => None,
        };
        e.pins += 1;
        e.last_use = now;
        if let Some(m) = self.models.get_mut(&key.0) {
            m.last_use = now;
            m.stats.hits += 1;
            if let Some(u) = m.unit_stats.get_mut(&key.1) {
                u.hits += 1;
            }
        }
        Some((res, copying))
    }

    /// Whether a pass holds a pin or a page-in is under way (either will free or settle soon).
    fn busy(&self) -> bool {
        self.units
            .values()
            .any(|e| e.pins > 0 || matches!(e.slot, Slot::Loading))
    }

    /// The error for a unit that cannot fit even after every evictable unit is gone.
    fn no_room(&self, unit: UnitId, name: &str, bytes: usize) -> Error {
        let held: usize = self
            .units
            .values()
            .filter(|e| e.held > 0)
            .map(|e| e.bytes)
            .sum();
        Error::Mux(format!(
            "unit {unit} of {name} needs {bytes} bytes; {} of the {}-byte budget are in use and \
             {held} of them are held by Mux::pin — release a pin or raise the budget",
            self.used, self.budget
        ))
    }

    fn evictable(&self, k: &Key, e: &Entry, want: Key) -> bool {
        e.pins == 0 && e.held == 0 && matches!(e.slot, Slot::Ready(_)) && *k != want
    }

    /// Units to evict next so that `want` can be paged in (empty: none can go now).
    ///
    /// The requesting model's own units count as in use by its request (a pass goes round all
    /// of them every token; evicting them for each other is LRU's cyclic worst case), so they
    /// are chosen only when no other model's unit can go. A model larger than the whole budget
    /// streams: once it holds `stream_slots` units it evicts its own before anyone else's.
    fn victims(&self, want: Key, want_bytes: usize, streaming: bool) -> Vec<Key> {
        let (me, _) = want;
        // Own evictable units, most recent first: evict the second most recent (the most recent
        // may still be computing while the next copy runs) and keep every older one that
        // stayed resident, so cycling through a model keeps what fits. Among all but the most
        // recent, the most recent whose storage fits the page-in goes first: storage of
        // another size is freed only once the device is done with it, which makes the host
        // wait (a block evicting the head, or the head two blocks, in every streamed pass).
        let own_victim = || {
            let mut own: Vec<(u64, Key, usize)> = self
                .units
                .iter()
                .filter(|(k, e)| k.0 == me && self.evictable(k, e, want))
                .map(|(k, e)| (e.last_use, *k, e.bytes))
                .collect();
            own.sort_unstable_by(|a, b| b.cmp(a));
            own.iter()
                .skip(1)
                .find(|x| fits(x.2, want_bytes, streaming))
                .or(own.get(1))
                .or(own.first())
                .map(|x| vec![x.1])
                .unwrap_or_default()
        };
        let others = || {
            self.units
                .iter()
                .filter(|(k, e)| k.0 != me && self.evictable(k, e, want))
        };
        if streaming && self.units.keys().filter(|k| k.0 == me).count() >= self.stream_slots {
            // Layer-level: another model's unit that nothing has used since this model's
            // previous pass began is colder than any of this model's own (each of which that
            // pass used): it goes first, so a streamed model keeps more of itself when the rest
            // of the budget has gone cold, and still never flushes layers in use meanwhile.
            let prev = self.models.get(&me).map_or(0, |m| m.prev_pass_start);
            if self.policy == Policy::LayerLru
                && let Some((k, _)) = others()
                    .filter(|(_, e)| e.last_use < prev)
                    .min_by_key(|(k, e)| (e.last_use, **k))
            {
                return vec![*k];
            }
            let v = own_victim();
            if !v.is_empty() {
                return v;
            }
        }
        let chosen: Vec<Key> = match self.policy {
            Policy::LayerLru => others()
                .min_by_key(|(k, e)| (e.last_use, **k))
                .map(|(k, _)| vec![*k])
                .unwrap_or_default(),
            Policy::WholeModelLru => {
                let victim_model = others()
                    .map(|(k, _)| k.0)
                    .min_by_key(|m| (self.models.get(m).map_or(0, |x| x.last_use), *m));
                match victim_model {
                    Some(vm) => others()
                        .filter(|(k, _)| k.0 == vm)
                        .map(|(k, _)| *k)
                        .collect(),
                    None => Vec::new(),
                }
            }
        };
        if chosen.is_empty() {
            own_victim()
        } else {
            chosen
        }
    }
}
