//! Where units live: host memory (CPU backend) or device memory (OpenCL), and how bytes get
//! there. On a device, page-ins run on the device's copy queue, so they overlap kernels on the
//! compute queue; from pageable memory (the mapping) the driver stages the copy itself
//! (`Direct`), or ternmux stages it through a ring of pinned buffers (`Staged`), copying chunk
//! n+1 from the mapping while chunk n is in flight.

use crate::backend::Resident;
use crate::backend::cpu::HostUnit;
use crate::backend::opencl::device::retain_event;
use crate::backend::opencl::{ClDevice, DevBuf, DevStorage, DevUnit, Pinned};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::mux::core::{Key, ModelId};
use crate::mux::host_cache::{HostCache, HostCacheStats};
use crate::mux::units::{UnitLayout, piece_bytes};
use opencl3::event::Event;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// How a device page-in copies from the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PageIn {
    /// `Staged` on devices with their own memory, `Direct` on devices that share the host's.
    #[default]
    Auto,
    /// One driver copy per tensor straight from the mapping (the driver stages pageable memory).
    Direct,
    /// Through pinned staging buffers, pipelined in chunks.
    Staged,
}

/// Bytes of one pinned staging buffer (`TERNMUX_STAGE_KIB` overrides, for tuning).
pub const STAGE_CHUNK: usize = 16 << 20;
/// Pinned host memory of the staging ring (outside the weight budget): 64 MiB.
pub const STAGE_BYTES: usize = 64 << 20;

struct Stage {
    mem: Pinned,
    busy: Option<Event>,
}

/// Device memory with its page-in path.
pub(crate) struct DeviceStore {
    pub dev: Arc<ClDevice>,
    staging: Option<Mutex<(Vec<Stage>, usize)>>,
    /// Bytes per staging chunk (and per DMA of a host-cache fill).
    chunk: usize,
    /// Pinned copies of units (staged page-ins only; off while its budget is 0).
    cache: Option<HostCache>,
}

/// Where a mux keeps units.
pub(crate) enum Store {
    /// Host copies (CPU backend).
    Host,
    /// An OpenCL device.
    Device(DeviceStore),
}

/// The storage of one unit, empty or reclaimed from an evicted unit.
pub(crate) enum Mem {
    Host(Vec<u8>),
    Device(DevStorage),
}

/// Copies each `(offset, src)` into `dst` at `offset`, on all cores when the total is large:
/// one parallel job over parts of at most 256 KiB of every piece (a unit's pieces are a dozen,
/// some small; a fork and join per piece cost more than the small ones' copies). The pieces
/// must not overlap and must fit in `dst` (unit layouts place them so; checked). `stream`: with
/// streaming stores, for pinned staging memory a device copies from next (a copy out of memory
/// just written with ordinary stores ran at a third of the speed on the H100 host: the written
/// lines were still in the cores' caches).
fn par_copy_pieces(dst: &mut [u8], mut pieces: Vec<(usize, &[u8])>, stream: bool) -> Result<()> {
    const PART: usize = 256 << 10;
    pieces.sort_by_key(|p| p.0);
    let total: usize = pieces.iter().map(|p| p.1.len()).sum();
    let mut jobs: Vec<(&mut [u8], &[u8])> = Vec::new();
    let (mut rest, mut at) = (dst, 0usize);
    for (off, src) in pieces {
        let skip = off.checked_sub(at);
        let end = skip.and_then(|k| k.checked_add(src.len()));
        let Some((skip, end)) = skip.zip(end).filter(|&(_, e)| e <= rest.len()) else {
            return Err(Error::Mux(format!(
                "unit layout: a piece at {off} overlaps the previous one or passes the end"
            )));
        };
        let (piece, tail) = std::mem::take(&mut rest)[skip..].split_at_mut(end - skip);
        rest = tail;
        at = off + src.len();
        jobs.extend(piece.chunks_mut(PART).zip(src.chunks(PART)));
    }
    let copy = |(d, s): (&mut [u8], &[u8])| {
        if stream {
            ternmux_kernels::copy::copy_streaming(d, s);
        } else {
            d.copy_from_slice(s);
        }
    };
    if total <= PART {
        jobs.into_iter().for_each(copy);
    } else {
        jobs.into_par_iter().for_each(copy);
    }
    Ok(())
}

impl Store {
    /// A store on `dev` (or the host for `None`), with a pinned host cache of `host_cache`
    /// bytes when page-ins are staged.
    pub fn new(dev: Option<Arc<ClDevice>>, mode: PageIn, host_cache: usize) -> Result<Store> {
        let Some(dev) = dev else {
            return Ok(Store::Host);
        };
        let staged = match mode {
            PageIn::Auto => !dev.info().host_unified,
            PageIn::Direct => false,
            PageIn::Staged => true,
        };
        let chunk = std::env::var("TERNMUX_STAGE_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(STAGE_CHUNK, |k| (k << 10).clamp(64 << 10, STAGE_BYTES / 2));
        let staging = if staged {
            let n = (STAGE_BYTES / chunk).max(2);
            let mut ring = Vec::with_capacity(n);
            for _ in 0..n {
                ring.push(Stage {
                    mem: dev.pinned(chunk)?,
                    busy: None,
                });
            }
            Some(Mutex::new((ring, 0)))
        } else {
            None
        };
        let cache = staged.then(|| HostCache::new(host_cache));
        Ok(Store::Device(DeviceStore {
            dev,
            staging,
            chunk,
            cache,
        }))
    }

    /// The pinned host cache's counters (all 0 without one).
    pub fn host_cache_stats(&self) -> HostCacheStats {
        match self {
            Store::Device(DeviceStore { cache: Some(c), .. }) => c.stats(),
            _ => HostCacheStats::default(),
        }
    }

    /// Sets the pinned host cache's budget (dropping least recently used copies to fit).
    /// Stores without staged page-ins have no cache and ignore it.
    pub fn set_host_cache(&self, bytes: usize) -> Result<()> {
        match self {
            Store::Device(DeviceStore { cache: Some(c), .. }) => c.set_budget(bytes),
            _ => Ok(()),
        }
    }

    /// Drops model `id`'s copies from the host cache.
    pub fn forget(&self, id: ModelId) {
        if let Store::Device(DeviceStore { cache: Some(c), .. }) = self {
            c.forget(id);
        }
    }

    /// Alignment of pieces inside a unit.
    pub fn align(&self) -> usize {
        match self {
            Store::Host => 64,
            Store::Device(d) => d.dev.info().base_align.max(256),
        }
    }

    /// Whether units carry their norms and biases (devices) or leave them to the model (CPU).
    pub fn with_vectors(&self) -> bool {
        matches!(self, Store::Device(_))
    }

    /// How page-ins copy, in words.
    pub fn describe(&self) -> String {
        match self {
            Store::Host => "host memory (CPU backend): page-in = copy from the mapping".into(),
            Store::Device(d) => format!(
                "opencl: {} — page-in {}{}",
                d.dev.info(),
                if d.staging.is_some() {
                    "staged through pinned buffers on the copy queue"
                } else {
                    "direct from the mapping on the copy queue"
                },
                match d.cache.as_ref().map(|c| c.stats().budget) {
                    Some(b) if b > 0 => format!(
                        ", pinned host cache of {:.1} MiB",
                        b as f64 / (1u64 << 20) as f64
                    ),
                    _ => String::new(),
                }
            ),
        }
    }

    /// Fresh storage for `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<Mem> {
        Ok(match self {
            Store::Host => {
                let mut v = Vec::new();
                v.try_reserve_exact(bytes).map_err(|_| {
                    Error::Mux(format!("host memory: cannot allocate {bytes} bytes"))
                })?;
                Mem::Host(v)
            }
            Store::Device(d) => Mem::Device(DevStorage::new(d.dev.alloc(bytes)?)),
        })
    }

    /// Copies `layout`'s pieces of `model` (unit `key`) into `mem` (after the events `after`:
    /// the previous users of reclaimed storage finishing) and returns the resident unit, with the event
    /// the compute queue must wait for when the copy is still in flight, and whether the bytes
    /// came from the pinned host cache.
    pub fn fill(
        &self,
        mem: Mem,
        key: Key,
        layout: &UnitLayout,
        model: &Model,
        after: &[Event],
    ) -> Result<(Resident, Option<Event>, bool)> {
        match (self, mem) {
            (Store::Host, Mem::Host(mut data)) => {
                data.clear();
                data.resize(layout.bytes, 0);
                let mut pieces = Vec::with_capacity(layout.pieces.len());
                for p in &layout.pieces {
                    let src = piece_bytes(model, layout.id, p.kind);
                    if src.len() != p.len {
                        return Err(Error::Mux(format!(
                            "unit {}: {:?} has {} bytes but its layout says {} (an int8 head that \
                             could not be made: see Model::head_description)",
                            layout.id,
                            p.kind,
                            src.len(),
                            p.len
                        )));
                    }
                    pieces.push((p.offset, src));
                }
                par_copy_pieces(&mut data, pieces, false)?;
                Ok((
                    Resident::Host(HostUnit::owned(data, layout.clone())),
                    None,
                    false,
                ))
            }
            (Store::Device(d), Mem::Device(mut storage)) => {
                let buf = storage.alloc_mut();
                let mut from_cache = false;
                let ready = match &d.staging {
                    None => {
                        for (i, p) in layout.pieces.iter().enumerate() {
                            let wait: Vec<&Event> = if i == 0 {
                                after.iter().collect()
                            } else {
                                Vec::new()
                            };
                            d.dev.write_direct(
                                buf,
                                p.offset,
                                piece_bytes(model, layout.id, p.kind),
                                &wait,
                            )?;
                        }
                        None
                    }
                    Some(ring) => match d.cached_copy(key, buf, layout, model, after)? {
                        Some((ev, hit)) => {
                            from_cache = hit;
                            Some(ev)
                        }
                        None => Some(d.staged_copy(ring, buf, layout, model, after)?),
                    },
                };
                let unit = DevUnit::new(&d.dev, storage, layout, model)?;
                Ok((Resident::Device(unit), ready, from_cache))
            }
            _ => Err(Error::Mux(
                "storage of another backend handed to the store".into(),
            )),
        }
    }

    /// An event that completes when the kernels queued so far (a pass's use of a unit) have
    /// run; `None` on the CPU, where work is done when the call returns.
    pub fn fence(&self) -> Result<Option<Event>> {
        match self {
            Store::Host => Ok(None),
            Store::Device(d) => d.dev.fence().map(Some),
        }
    }

    /// Makes the kernels that will read a paged-in unit wait for its copy. Normally the calling
    /// thread waits (`on_device` false): a compute queue may be shared by several models (one
    /// per engine worker by default, fewer with `TERNMUX_CL_QUEUES`), and a barrier there would
    /// make the kernels of a model whose units are resident wait behind another model's page-in. A streaming model (larger than the budget; the
    /// engine runs it alone) uses a barrier on the compute queue instead, so the host keeps
    /// queueing and the next copy overlaps more of the compute (measured: 74 vs 57 tok/s at 2×
    /// the budget on the H200).
    /// `TERNMUX_PAGE_IN_BARRIER=1` makes every page-in use the barrier, `=0` none (the
    /// calling thread waits), for measurements.
    pub fn wait_ready(&self, ready: &Event, on_device: bool) -> Result<()> {
        static BARRIER: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let forced = *BARRIER.get_or_init(|| match std::env::var("TERNMUX_PAGE_IN_BARRIER") {
            Ok(v) if v == "1" => Some(true),
            Ok(v) if v == "0" => Some(false),
            _ => None,
        });
        let on_device = forced.unwrap_or(on_device);
        match self {
            Store::Host => Ok(()),
            Store::Device(d) if on_device => d.dev.wait_on_device(&[ready]),
            Store::Device(d) => d.dev.wait_host(&[ready]),
        }
    }

    /// The storage of an evicted unit, for the next page-in.
    pub fn reclaim(res: Resident) -> Mem {
        match res {
            Resident::Host(h) => Mem::Host(h.into_data().unwrap_or_default()),
            Resident::Device(u) => Mem::Device(u.into_storage()),
        }
    }
}

/// The end of a unit's last piece: the bytes a page-in copies.
fn layout_end(layout: &UnitLayout) -> usize {
    layout
        .pieces
        .iter()
        .map(|p| p.offset + p.len)
        .max()
        .unwrap_or(0)
}

/// Copies the parts of `layout`'s pieces that fall in `[c0, c1)` of the unit into `dst` (which
/// holds that range), with streaming stores: `dst` is pinned memory a device copies from next.
fn fill_range(dst: &mut [u8], layout: &UnitLayout, model: &Model, c0: usize) -> Result<()> {
    let c1 = c0 + dst.len();
    let pieces = layout
        .pieces
        .iter()
        .filter_map(|p| {
            let (a, b) = (p.offset.max(c0), (p.offset + p.len).min(c1));
            (a < b).then(|| {
                let src = piece_bytes(model, layout.id, p.kind);
                (a - c0, &src[a - p.offset..b - p.offset])
            })
        })
        .collect();
    par_copy_pieces(dst, pieces, true)
}

impl DeviceStore {
    /// A page-in through the pinned host cache: one DMA from the unit's cached copy, or (the
    /// first time) a fill of a new cache entry, chunk by chunk, each chunk's DMA queued as soon
    /// as it is filled. Returns the last copy's event and whether it was a hit; `Ok(None)` when
    /// the cache is off or cannot take the unit (larger than its budget, or pinned memory
    /// refused): the caller stages it through the ring.
    fn cached_copy(
        &self,
        key: Key,
        buf: &mut DevBuf,
        layout: &UnitLayout,
        model: &Model,
        after: &[Event],
    ) -> Result<Option<(Event, bool)>> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        let end = layout_end(layout);
        let wait: Vec<&Event> = after.iter().collect();
        let mut c = cache.lock()?;
        if c.stats.budget == 0 {
            return Ok(None);
        }
        if let Some(e) = c.hit(key) {
            let ev = self.dev.write_async(buf, 0, &e.mem, 0, end, &wait)?;
            self.dev.flush_copies()?;
            e.set_busy(retain_event(&ev)?);
            c.stats.hits += 1;
            c.stats.bytes_from_cache += end as u64;
            return Ok(Some((ev, true)));
        }
        if end == 0 || end > c.stats.budget {
            c.stats.bypasses += 1;
            return Ok(None);
        }
        let mut mem = match c.make_room(end)? {
            Some(mem) => mem,
            None => {
                c.reserve(end);
                match self.dev.pinned(end) {
                    Ok(mem) => mem,
                    Err(_) => {
                        // Pinned memory refused (a locked-memory limit): stage as without
                        // the cache.
                        c.release(end);
                        c.stats.bypasses += 1;
                        return Ok(None);
                    }
                }
            }
        };
        let mut last: Option<Event> = None;
        let mut copy = || -> Result<Event> {
            for c0 in (0..end).step_by(self.chunk.max(1)) {
                let c1 = (c0 + self.chunk).min(end);
                fill_range(&mut mem.as_mut_slice()[c0..c1], layout, model, c0)?;
                let deps: &[&Event] = if c0 == 0 { &wait } else { &[] };
                last = Some(self.dev.write_async(buf, c0, &mem, c0, c1 - c0, deps)?);
                self.dev.flush_copies()?;
            }
            let ev = last
                .as_ref()
                .ok_or_else(|| Error::Mux(format!("unit {} is empty", layout.id)))?;
            retain_event(ev)
        };
        match copy() {
            Ok(busy) => {
                c.insert(key, mem, busy);
                c.stats.fills += 1;
                Ok(last.map(|ev| (ev, false)))
            }
            Err(err) => {
                // Chunks already queued read `mem`: it is freed only after them.
                if let Some(ev) = &last {
                    let _ = ev.wait();
                }
                drop(mem);
                c.release(end);
                Err(err)
            }
        }
    }

    fn staged_copy(
        &self,
        ring: &Mutex<(Vec<Stage>, usize)>,
        buf: &mut DevBuf,
        layout: &UnitLayout,
        model: &Model,
        after: &[Event],
    ) -> Result<Event> {
        let mut guard = ring
            .lock()
            .map_err(|_| Error::Mux("staging ring poisoned".into()))?;
        let (stages, next) = &mut *guard;
        let end = layout_end(layout);
        let mut last = None;
        let mut first = true;
        let chunk = stages
            .first()
            .map_or(STAGE_CHUNK, |s| s.mem.as_slice().len());
        for c0 in (0..end.max(1)).step_by(chunk) {
            let c1 = (c0 + chunk).min(end);
            let n_stages = stages.len();
            let stage = &mut stages[*next % n_stages];
            *next += 1;
            if let Some(ev) = stage.busy.take() {
                ev.wait()
                    .map_err(|e| Error::Device(format!("opencl: waiting for a page-in: {e}")))?;
            }
            fill_range(&mut stage.mem.as_mut_slice()[..c1 - c0], layout, model, c0)?;
            let wait: Vec<&Event> = if first {
                after.iter().collect()
            } else {
                Vec::new()
            };
            first = false;
            let ev = self
                .dev
                .write_async(buf, c0, &stage.mem, 0, c1 - c0, &wait)?;
            self.dev.flush_copies()?;
            // The ring keeps one handle to wait on before reuse; the caller gets the last one.
            last = Some(ev);
            stage.busy = last.as_ref().map(retain_event).transpose()?;
        }
        last.ok_or_else(|| Error::Mux(format!("unit {} is empty", layout.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::par_copy_pieces;

    #[test]
    fn pieces_land_at_their_offsets_and_overlaps_are_refused() {
        let a: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let b = [7u8; 10];
        let mut dst = vec![0u8; 700_100];
        // Out of order, with a gap between them; large enough for the parallel path.
        par_copy_pieces(&mut dst, vec![(700_000, &b[..]), (64, &a[..])], false).unwrap();
        assert!(dst[..64].iter().all(|&x| x == 0));
        assert_eq!(&dst[64..600_064], &a[..]);
        assert!(dst[600_064..700_000].iter().all(|&x| x == 0));
        assert_eq!(&dst[700_000..700_010], &b[..]);
        assert!(par_copy_pieces(&mut dst, vec![(0, &a[..]), (10, &b[..])], false).is_err());
        assert!(par_copy_pieces(&mut dst, vec![(700_095, &b[..])], false).is_err());
        // The streaming copy lands the same bytes.
        let mut streamed = vec![0u8; 700_100];
        par_copy_pieces(&mut streamed, vec![(700_000, &b[..]), (64, &a[..])], true).unwrap();
        assert_eq!(streamed, dst);
    }
}
