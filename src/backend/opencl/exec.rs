//! A model on an OpenCL device: each resident unit is one device allocation laid out by the
//! multiplexer with every tensor at an aligned offset (read-only sub-buffer views, so the
//! file's own unaligned offsets never matter); the KV cache lives in device memory (f16); the
//! forward ops are launches of the `cl/` kernels. Nothing waits for the device until logits
//! are read.

use super::device::{ClDevice, DevBuf, Pinned, TICKETS};
use super::ops::{ActTail, Places, RopeShape, RowTail, TernaryOut, pick_part_bytes};
use crate::backend::cpu::extend_rope_tables;
use crate::backend::{Backend, LayerMat, Mat, Norm, Resident, RowPlace, project_act_apart};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::model::{FfnAct, KvType, Model};
use crate::mux::UnitId;
use crate::mux::meter::{Meter, Reservation};
use crate::mux::units::{PieceKind, UnitLayout, piece_bytes};
use opencl3::event::Event;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};

/// Most tokens in one pass (sizes every activation's per-token scale buffer).
const MAX_PASS_ROWS: usize = 128;

/// Whether RoPE, the KV store and attention go in one launch when every row of a pass has its
/// own slot (`TERNMUX_CL_FUSE_ROPE=0` turns it off, to measure what it saves).
fn fuse_rope() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_FUSE_ROPE").is_none_or(|v| v != "0"))
}

/// Whether a one-token pass does the FFN's gate/up GEMV and its activation in one launch
/// (`TERNMUX_CL_ACT_TAIL=0` turns it off, to measure what it saves).
fn act_tail() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_ACT_TAIL").is_none_or(|v| v != "0"))
}

/// Whether a pass gives its resident blocks' pins back together ([`Backend::unpins_together`];
/// `TERNMUX_CL_UNPIN_TOGETHER=0` gives each back after its block, to compare).
fn unpin_together() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_UNPIN_TOGETHER").is_none_or(|v| v != "0"))
}

/// One matrix of a resident unit.
pub struct DevMat {
    buf: DevBuf,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Output scale: the layer's `.scale` times I2_S's per-tensor `w_s`.
    scale: f32,
    bias: Option<DevBuf>,
}

/// A unit's weights on the device: one allocation (the multiplexer's accounting unit) with a
/// read-only view per tensor at an aligned offset.
pub struct DevUnit {
    /// Declared first so the views go before the allocation.
    mats: Vec<(Mat, DevMat)>,
    norms: Vec<(Norm, DevBuf)>,
    alloc: DevBuf,
}

/// A unit's device allocation between units, with the views the last unit in it made.
///
/// A page-in into reclaimed storage takes the views it needs from here instead of creating
/// one per tensor (and releasing the old ones): a streamed model cycles units of one layout
/// through the same storage, so each page-in finds every view it needs, and the kernel objects
/// that last read this storage find their buffer arguments already set.
pub struct DevStorage {
    alloc: DevBuf,
    /// `(origin, bytes, view)`.
    views: Vec<(usize, usize, DevBuf)>,
}

impl DevStorage {
    /// A fresh allocation, with no views yet.
    pub fn new(alloc: DevBuf) -> DevStorage {
        DevStorage {
            alloc,
            views: Vec::new(),
        }
    }

    /// The allocation, to copy a unit's bytes into.
    pub fn alloc_mut(&mut self) -> &mut DevBuf {
        &mut self.alloc
    }

    /// A read-only view of `bytes` bytes at `origin`: a kept one, or a new one.
    fn view(&mut self, dev: &ClDevice, origin: usize, bytes: usize) -> Result<DevBuf> {
        match self
            .views
            .iter()
            .position(|v| v.0 == origin && v.1 == bytes)
        {
            Some(i) => Ok(self.views.swap_remove(i).2),
            None => dev.sub_buffer(&self.alloc, origin, bytes),
        }
    }
}

impl DevUnit {
    /// Views into `storage`, which holds `layout`'s pieces of `model`'s unit (already copied).
    pub(crate) fn new(
        dev: &ClDevice,
        mut storage: DevStorage,
        layout: &UnitLayout,
        model: &Model,
    ) -> Result<DevUnit> {
        let w = model.weights();
        let mut mats = Vec::new();
        let mut norms = Vec::new();
        for p in &layout.pieces {
            match p.kind {
                PieceKind::Mat(m) => {
                    let (t, layer_scale, _) = w.matrix(layout.id, m).ok_or_else(|| {
                        Error::Device(format!("opencl: unit {} holds no {m:?}", layout.id))
                    })?;
                    let bias = match m {
                        Mat::Layer(which) => layout
                            .piece(PieceKind::Bias(which))
                            .map(|b| storage.view(dev, b.offset, b.len))
                            .transpose()?,
                        Mat::Output => None,
                    };
                    let scale = match t.ty {
                        GgmlType::Ternary(f) => {
                            let data = piece_bytes(model, layout.id, p.kind);
                            layer_scale
                                * TernaryMatrix::new(f, data, t.rows, t.cols)?.tensor_scale()
                        }
                        GgmlType::Float(_) => layer_scale,
                    };
                    mats.push((
                        m,
                        DevMat {
                            buf: storage.view(dev, p.offset, p.len)?,
                            ty: t.ty,
                            rows: t.rows,
                            cols: t.cols,
                            scale,
                            bias,
                        },
                    ));
                }
                PieceKind::Norm(n) => norms.push((n, storage.view(dev, p.offset, p.len)?)),
                PieceKind::Bias(_) => {}
                PieceKind::Int8Codes | PieceKind::Int8Scales => {
                    return Err(Error::Device(format!(
                        "opencl: unit {} is packed for the CPU's int8 head",
                        layout.id
                    )));
                }
            }
        }
        // Views of the last unit that this one does not use go now (they hold the storage).
        storage.views.clear();
        Ok(DevUnit {
            mats,
            norms,
            alloc: storage.alloc,
        })
    }

    /// The allocation with this unit's views, for reuse by the next page-in of the same size.
    pub(crate) fn into_storage(self) -> DevStorage {
        let DevUnit { mats, norms, alloc } = self;
        let mut views = Vec::with_capacity(mats.len() + norms.len());
        let mut keep = |b: DevBuf| {
            if let Some(origin) = b.origin() {
                views.push((origin, b.bytes(), b));
            }
        };
        for (_, m) in mats {
            keep(m.buf);
            if let Some(b) = m.bias {
                keep(b);
            }
        }
        for (_, b) in norms {
            keep(b);
        }
        DevStorage { alloc, views }
    }

    /// Bytes of the unit's allocation.
    pub fn bytes(&self) -> usize {
        self.alloc.bytes()
    }

    fn mat(&self, m: Mat) -> Result<&DevMat> {
        self.mats
            .iter()
            .find(|(k, _)| *k == m)
            .map(|(_, d)| d)
            .ok_or_else(|| Error::Device(format!("opencl: the unit holds no {m:?} matrix")))
    }

    fn norm(&self, n: Norm) -> Result<&DevBuf> {
        self.norms
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, d)| d)
            .ok_or_else(|| Error::Device(format!("opencl: the unit holds no {n:?} norm")))
    }
}

/// Device buffers of one activation: f32 values, their int8 quantization and per-row scales.
struct Raw {
    f: DevBuf,
    q: DevBuf,
    s: DevBuf,
    cap: usize,
    _charge: Option<Reservation>,
}

/// Activation buffers of one sequence, reused across passes.
type Pool = Arc<Mutex<Vec<Raw>>>;

/// The KV cache of `slots` sequences in device memory (f16), with the RoPE table, the rows'
/// places of the current pass, and attention scratch.
pub struct ClKv {
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    rope: DevBuf,
    cos: Vec<f32>,
    sin: Vec<f32>,
    rope_filled: usize,
    scores: DevBuf,
    places: Option<Places>,
    /// The picks of a sequence decoding alone, on their way to the host (boxed, as
    /// `pick_bufs`).
    picks: Option<Box<Picks>>,
    /// Where device picks write their tokens and partial results (boxed: most caches never
    /// pick on the device).
    pick_bufs: Option<Box<PickBufs>>,
    max_pass: usize,
    n_ctx: usize,
    slots: usize,
    bytes: usize,
    pool: Pool,
    meter: Option<Arc<Meter>>,
    _charge: Option<Reservation>,
}

impl ClKv {
    /// A cache for `slots` sequences of `n_ctx` positions on `dev`. With a `meter`, the cache
    /// and the activation buffers of its passes are charged to it (and refused past its limit).
    pub fn new(
        dev: &ClDevice,
        model: &Model,
        n_ctx: usize,
        slots: usize,
        ty: KvType,
        meter: Option<&Arc<Meter>>,
    ) -> Result<ClKv> {
        if ty != KvType::F16 {
            return Err(Error::Device(
                "opencl: the KV cache is f16 on OpenCL (KvType::F32 is CPU-only)".into(),
            ));
        }
        let c = &model.config;
        let kvd = c.n_head_kv * c.head_dim;
        let layer_bytes = slots * n_ctx * kvd * 2;
        let per_token = c.n_head * n_ctx * 4;
        let max_pass = ((64usize << 20) / per_token.max(1)).clamp(1, MAX_PASS_ROWS);
        let bytes = 2 * c.n_layer * layer_bytes + max_pass * per_token + n_ctx * (c.n_rot / 2) * 8;
        let charge = meter.map(|m| m.reserve(bytes)).transpose()?;
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            k.push(dev.alloc(layer_bytes)?);
            v.push(dev.alloc(layer_bytes)?);
        }
        // Attention scores of one pass: keep the scratch near 64 MiB.
        let scores = dev.alloc(max_pass * per_token)?;
        let rope = dev.alloc(n_ctx * (c.n_rot / 2) * 8)?;
        Ok(ClKv {
            k,
            v,
            rope,
            cos: Vec::new(),
            sin: Vec::new(),
            rope_filled: 0,
            scores,
            places: None,
            picks: None,
            pick_bufs: None,
            max_pass,
            n_ctx,
            slots,
            bytes,
            pool: Arc::new(Mutex::new(Vec::new())),
            meter: meter.cloned(),
            _charge: charge,
        })
    }

    /// The most rows one pass may hold (the attention scratch is sized for it).
    pub fn max_pass(&self) -> usize {
        self.max_pass
    }

    /// Device bytes held (the cache; activation buffers are charged to the meter as made).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Slots of the pinned ring that greedy picks come back through (at most this many passes run
/// ahead of the host).
const PICK_RING: usize = 8;

/// The device buffers of greedy picks (`cl/pick.cl`) of up to `rows` rows: their tokens (`ids`;
/// for a sequence decoding alone, `ids[0]` is also what its next pass embeds) and the partial
/// results of the picks' work-groups.
struct PickBufs {
    ids: DevBuf,
    part: DevBuf,
    rows: usize,
}

impl PickBufs {
    /// `slot`'s buffers, made (or replaced by larger ones) to hold `rows` rows. A replaced
    /// buffer lives on while queued work still uses it (OpenCL keeps the memory objects of
    /// enqueued commands).
    fn at_least<'s>(
        slot: &'s mut Option<Box<PickBufs>>,
        dev: &ClDevice,
        rows: usize,
    ) -> Result<&'s PickBufs> {
        if slot.as_ref().is_none_or(|b| b.rows < rows) {
            let rows = rows.next_power_of_two();
            *slot = Some(Box::new(PickBufs {
                ids: dev.alloc(rows * 4)?,
                part: dev.alloc(pick_part_bytes(rows))?,
                rows,
            }));
        }
        slot.as_deref()
            .ok_or_else(|| Error::Device("opencl: pick buffers missing".into()))
    }
}

/// Greedy tokens chosen on the device for a sequence decoding alone, on their way back to the
/// host, oldest first, each a read into a slot of the pinned `ring`.
struct Picks {
    ring: Pinned,
    next: usize,
    pending: VecDeque<Pick>,
    /// The token of the last pick taken.
    last_taken: Option<u32>,
}

/// A greedy pick the host has not taken yet.
enum Pick {
    /// Being read back into ring slot `at`.
    Flight { at: usize, event: Event },
    /// Read already (a pass that could not embed on the device needed it early).
    Known(u32),
}

impl Picks {
    fn new(dev: &ClDevice) -> Result<Picks> {
        Ok(Picks {
            ring: dev.pinned(PICK_RING * 4)?,
            next: 0,
            pending: VecDeque::new(),
            last_taken: None,
        })
    }

    /// Waits for pick `p` and returns its token.
    fn land(&self, dev: &ClDevice, p: Pick) -> Result<u32> {
        match p {
            Pick::Known(t) => Ok(t),
            Pick::Flight { at, event } => {
                dev.wait_read(&event)?;
                let b = &self.ring.as_slice()[at * 4..at * 4 + 4];
                Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            }
        }
    }
}

impl Drop for Picks {
    fn drop(&mut self) {
        // The ring must outlive every read into it.
        for p in &self.pending {
            if let Pick::Flight { event, .. } = p {
                let _ = event.wait();
            }
        }
    }
}

impl ClKv {
    /// Greedy picks queued on the device whose tokens the host has not taken.
    pub fn picks_pending(&self) -> usize {
        self.picks.as_ref().map_or(0, |p| p.pending.len())
    }

    /// The oldest pick the host has not taken: waits for it to come back.
    pub fn take_pick(&mut self, dev: &ClDevice) -> Result<u32> {
        let picks = self
            .picks
            .as_mut()
            .ok_or_else(|| Error::Device("opencl: no greedy pick was queued".into()))?;
        let p = picks
            .pending
            .pop_front()
            .ok_or_else(|| Error::Device("opencl: no greedy pick is pending".into()))?;
        let t = picks.land(dev, p)?;
        picks.last_taken = Some(t);
        Ok(t)
    }

    /// The newest pick's token, waiting for it (a pass that has to embed on the host); it
    /// stays pending for [`ClKv::take_pick`].
    pub fn newest_pick(&mut self, dev: &ClDevice) -> Result<u32> {
        let picks = self
            .picks
            .as_mut()
            .ok_or_else(|| Error::Device("opencl: no greedy pick was queued".into()))?;
        let Some(p) = picks.pending.pop_back() else {
            return picks
                .last_taken
                .ok_or_else(|| Error::Device("opencl: no greedy pick was made".into()));
        };
        let t = picks.land(dev, p)?;
        picks.pending.push_back(Pick::Known(t));
        Ok(t)
    }
}

/// An activation on the device. Its buffers return to the model's pool when dropped.
pub struct ClBuf {
    raw: Option<Raw>,
    quantized: Cell<bool>,
    pool: Pool,
}

impl ClBuf {
    fn raw(&self) -> Result<&Raw> {
        self.raw
            .as_ref()
            .ok_or_else(|| Error::Device("opencl: activation buffer already released".into()))
    }
}

impl Drop for ClBuf {
    fn drop(&mut self) {
        if let (Some(raw), Ok(mut pool)) = (self.raw.take(), self.pool.lock())
            && pool.len() < 32
        {
            pool.push(raw);
        }
    }
}

/// The OpenCL backend bound to one model and one sequence's activation pool.
pub struct ClExec<'a> {
    dev: &'a ClDevice,
    model: &'a Model,
    pool: Pool,
    meter: Option<Arc<Meter>>,
}

impl<'a> ClExec<'a> {
    /// Runs `model` on `dev`, with activation buffers from `kv`'s pool.
    pub fn new(dev: &'a ClDevice, model: &'a Model, kv: &ClKv) -> ClExec<'a> {
        ClExec {
            dev,
            model,
            pool: kv.pool.clone(),
            meter: kv.meter.clone(),
        }
    }

    fn dev(&self) -> &ClDevice {
        self.dev
    }

    fn shape(&self) -> RopeShape {
        let c = &self.model.config;
        RopeShape {
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            neox: c.rope_neox,
            n_head: c.n_head,
            n_kv: c.n_head_kv,
        }
    }
}

fn ternary_out<'b>(m: &'b DevMat, o: &'b Raw) -> TernaryOut<'b> {
    TernaryOut {
        w: &m.buf,
        rows: m.rows,
        out: &o.f,
        scale: m.scale,
        bias: m.bias.as_ref(),
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if need > have {
        return Err(Error::Device(format!(
            "opencl: {what} needs {need} values but the buffer holds {have}"
        )));
    }
    Ok(())
}

impl ClExec<'_> {
    /// Unit `u`'s matrix `mat` when its one-token product can be a GEMV launch ending with a
    /// row epilogue over its `n` output values: one token, its activations already quantized,
    /// the matrix TQ2_0 (or I2_S with rows of a multiple of 256) with `n` rows, and a device
    /// that takes epilogues.
    fn gemv_with_tail<'u>(
        &self,
        u: &'u DevUnit,
        inp: &ClBuf,
        rows: usize,
        mat: Mat,
        n: usize,
    ) -> Result<Option<&'u DevMat>> {
        if rows != 1 || !inp.quantized.get() || !self.dev().row_tails() {
            return Ok(None);
        }
        let m = u.mat(mat)?;
        let fits =
            matches!(m.ty, GgmlType::Ternary(f) if ClDevice::gemv_takes(f, m.cols)) && m.rows == n;
        Ok(fits.then_some(m))
    }

    /// Extends the RoPE table to the rows' last position and uploads the rows' places (once per
    /// pass: every layer's rows are the same).
    fn prepare_places(&self, kv: &mut ClKv, rows: &[RowPlace]) -> Result<()> {
        let half = self.model.config.n_rot / 2;
        let end = rows.iter().map(|r| r.pos as usize + 1).max().unwrap_or(0);
        if end > kv.n_ctx {
            return Err(Error::Context {
                needed: end,
                limit: kv.n_ctx,
            });
        }
        if end > kv.rope_filled {
            // Ahead of need, doubling: the write waits for the queue (it is blocking), so one
            // per token would stall passes queued ahead (device picks) at every position.
            let end = end.max(2 * kv.rope_filled).max(64).min(kv.n_ctx);
            extend_rope_tables(self.model, end, &mut kv.cos, &mut kv.sin);
            let from = kv.rope_filled;
            let mut inter = Vec::with_capacity((end - from) * half * 2);
            for i in from * half..end * half {
                inter.push(kv.cos[i]);
                inter.push(kv.sin[i]);
            }
            self.dev()
                .write(&mut kv.rope, from * half * 8, bytemuck::cast_slice(&inter))?;
            kv.rope_filled = end;
        }
        // The places are uploaded once per pass (every layer's rows are the same).
        if kv.places.as_ref().is_none_or(|p| p.rows() != rows) {
            let old = kv.places.take();
            kv.places = Some(Places::new(self.dev(), rows, kv.slots, kv.n_ctx, old)?);
        }
        Ok(())
    }
}

impl ClKv {
    /// The places of the current pass (uploaded by `prepare_places`).
    fn pass_places(&self) -> Result<&Places> {
        self.places
            .as_ref()
            .ok_or_else(|| Error::Device("opencl: row places missing".into()))
    }
}

impl Backend for ClExec<'_> {
    type Buf = ClBuf;
    type Kv = ClKv;
    type Unit = DevUnit;

    fn unit<'r>(&self, r: &'r Resident) -> Result<&'r DevUnit> {
        match r {
            Resident::Device(u) => Ok(u),
            Resident::Host(_) => Err(Error::Device(
                "opencl: a host-resident unit was handed to the OpenCL backend".into(),
            )),
        }
    }

    fn max_tokens_per_pass(&self, kv: &ClKv) -> usize {
        kv.max_pass
    }

    /// On unless `TERNMUX_CL_UNPIN_TOGETHER=0` (to compare): a pass's resident blocks share
    /// one fence instead of queueing and flushing one each.
    fn unpins_together(&self) -> bool {
        unpin_together()
    }

    /// Queues `ops` holding the device's queueing baton ([`ClDevice::queueing`]): models side
    /// by side take turns per block instead of per launch.
    fn compute<R: Send>(&self, work: usize, ops: impl FnOnce() -> R + Send) -> R {
        let _ = work;
        self.dev.queueing(ops)
    }

    fn alloc(&self, len: usize) -> Result<ClBuf> {
        let mut pool = self
            .pool
            .lock()
            .map_err(|_| Error::Device("opencl: buffer pool poisoned".into()))?;
        // Smallest pooled buffer that fits, else a new one; among equals the oldest. Passes
        // ask for their buffers in the same order and give them all back, so each pass gets
        // the same buffer for the same use: launches then find their kernel objects with these
        // arguments already set (the choice by position permuted them from pass to pass).
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, r)| r.cap >= len)
            .min_by_key(|(_, r)| (r.cap, r.f.id()))
            .map(|(i, _)| i);
        let raw = match best {
            Some(i) => pool.swap_remove(i),
            None => {
                let dev = self.dev();
                let bytes = len * 5 + MAX_PASS_ROWS * 4;
                Raw {
                    _charge: self.meter.as_ref().map(|m| m.reserve(bytes)).transpose()?,
                    f: dev.alloc(len * 4)?,
                    q: dev.alloc(len)?,
                    s: dev.alloc(MAX_PASS_ROWS * 4)?,
                    cap: len,
                }
            }
        };
        Ok(ClBuf {
            raw: Some(raw),
            quantized: Cell::new(false),
            pool: self.pool.clone(),
        })
    }

    fn embed(&self, tied_head: Option<&DevUnit>, tokens: &[u32], x: &mut ClBuf) -> Result<()> {
        if let Some(head) = tied_head {
            let m = head.mat(Mat::Output)?;
            if let GgmlType::Float(fmt) = m.ty {
                let mut ids = self.alloc(tokens.len())?;
                let as_i32: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
                // The f32 slots of a pooled buffer hold the i32 token ids here (same width).
                let ids_raw = ids.raw.as_mut().ok_or_else(|| {
                    Error::Device("opencl: activation buffer already released".into())
                })?;
                self.dev
                    .write(&mut ids_raw.f, 0, bytemuck::cast_slice(&as_i32))?;
                self.dev.get_rows(
                    fmt,
                    m.cols,
                    &m.buf,
                    m.rows,
                    &ids.raw()?.f,
                    tokens.len(),
                    &x.raw()?.f,
                )?;
                x.quantized.set(false);
                return Ok(());
            }
        }
        let (w, e) = (self.model.weights(), self.model.config.n_embd);
        let mut rows = vec![0f32; tokens.len() * e];
        for (&tok, row) in tokens.iter().zip(rows.chunks_exact_mut(e)) {
            w.token_embd.row_f32(self.model.file(), tok as usize, row)?;
        }
        let raw = x
            .raw
            .as_mut()
            .ok_or_else(|| Error::Device("opencl: activation buffer already released".into()))?;
        check_len("embed", raw.cap, rows.len())?;
        self.dev.write(&mut raw.f, 0, bytemuck::cast_slice(&rows))?;
        x.quantized.set(false);
        Ok(())
    }

    fn norm(
        &self,
        u: &DevUnit,
        norm: Norm,
        x: &ClBuf,
        row0: usize,
        rows: usize,
        out: &mut ClBuf,
    ) -> Result<()> {
        let w = u.norm(norm)?;
        let n = w.bytes() / 4;
        let y = out.raw()?;
        self.dev().norm_quant(
            &x.raw()?.f,
            n,
            row0,
            rows,
            Some(w),
            self.model.config.rms_eps,
            Some(&y.f),
            Some((&y.q, &y.s)),
        )?;
        out.quantized.set(true);
        Ok(())
    }

    fn norm_inplace(&self, u: &DevUnit, norm: Norm, x: &mut ClBuf, rows: usize) -> Result<()> {
        let w = u.norm(norm)?;
        let n = w.bytes() / 4;
        let r = x.raw()?;
        self.dev().norm_quant(
            &r.f,
            n,
            0,
            rows,
            Some(w),
            self.model.config.rms_eps,
            Some(&r.f),
            Some((&r.q, &r.s)),
        )?;
        x.quantized.set(true);
        Ok(())
    }

    fn project(
        &self,
        u: &DevUnit,
        x: &ClBuf,
        rows: usize,
        outs: &mut [(Mat, &mut ClBuf)],
        accumulate: bool,
    ) -> Result<()> {
        let xr = x.raw()?;
        let mats: Vec<&DevMat> = outs.iter().map(|(m, _)| u.mat(*m)).collect::<Result<_>>()?;
        let k = mats.first().map_or(0, |m| m.cols);
        let formats: Vec<Option<TernaryFormat>> = mats
            .iter()
            .map(|m| match m.ty {
                GgmlType::Ternary(f) => Some(f),
                GgmlType::Float(_) => None,
            })
            .collect();
        if formats.iter().any(Option::is_some) && !x.quantized.get() {
            self.dev()
                .norm_quant(&xr.f, k, 0, rows, None, 0.0, None, Some((&xr.q, &xr.s)))?;
            x.quantized.set(true);
        }
        let raws: Vec<&Raw> = outs.iter().map(|(_, o)| o.raw()).collect::<Result<_>>()?;
        // Matrices of one ternary format sharing the input go in one launch.
        let one_launch = formats[0].is_some()
            && formats.iter().all(|f| *f == formats[0])
            && mats.iter().all(|m| m.cols == k)
            && mats.len() <= 3;
        if let (true, Some(fmt)) = (one_launch, formats[0]) {
            let group: Vec<TernaryOut<'_>> = mats
                .iter()
                .zip(&raws)
                .map(|(m, o)| ternary_out(m, o))
                .collect();
            self.dev()
                .ternary_matmul(fmt, k, &xr.q, &xr.s, rows, &group, accumulate)?;
        } else {
            for (m, o) in mats.iter().zip(&raws) {
                match m.ty {
                    GgmlType::Ternary(f) => self.dev().ternary_matmul(
                        f,
                        m.cols,
                        &xr.q,
                        &xr.s,
                        rows,
                        &[ternary_out(m, o)],
                        accumulate,
                    )?,
                    GgmlType::Float(f) => {
                        if m.bias.is_some() {
                            return Err(Error::Device(
                                "opencl: biases on float-typed layer matrices are not supported"
                                    .into(),
                            ));
                        }
                        self.dev().float_matmul(
                            f, m.cols, &xr.f, rows, &m.buf, m.rows, &o.f, m.scale, accumulate,
                        )?
                    }
                }
            }
        }
        for (_, o) in outs.iter() {
            o.quantized.set(false);
        }
        Ok(())
    }

    fn norms_in_projections(&self, rows: usize) -> bool {
        let w = self.model.weights();
        let k = self.model.config.n_embd;
        [LayerMat::Q, LayerMat::Gate].iter().all(|&m| {
            match w.matrix(UnitId::Block(0), Mat::Layer(m)).map(|(t, _, _)| t.ty) {
                Some(GgmlType::Ternary(f)) => self.dev().few_mma_norm_takes(f, k, rows),
                _ => false,
            }
        })
    }

    fn norm_project(
        &self,
        u: &DevUnit,
        norm: Norm,
        x: &ClBuf,
        rows: usize,
        h: &mut ClBuf,
        outs: &mut [(Mat, &mut ClBuf)],
    ) -> Result<()> {
        let mats: Vec<&DevMat> = outs.iter().map(|(m, _)| u.mat(*m)).collect::<Result<_>>()?;
        let k = self.model.config.n_embd;
        // One ternary format of rows of n_embd, which the normed kernel takes: one launch.
        let fmt = match mats.first().map(|m| m.ty) {
            Some(GgmlType::Ternary(f))
                if mats.iter().all(|m| m.ty == GgmlType::Ternary(f) && m.cols == k)
                    && mats.len() <= 3
                    && self.dev().few_mma_norm_takes(f, k, rows) =>
            {
                f
            }
            _ => {
                self.norm(u, norm, x, 0, rows, h)?;
                return self.project(u, h, rows, outs, false);
            }
        };
        let raws: Vec<&Raw> = outs.iter().map(|(_, o)| o.raw()).collect::<Result<_>>()?;
        let group: Vec<TernaryOut<'_>> = mats
            .iter()
            .zip(&raws)
            .map(|(m, o)| ternary_out(m, o))
            .collect();
        self.dev().ternary_few_mma_norm(
            fmt,
            k,
            &x.raw()?.f,
            u.norm(norm)?,
            self.model.config.rms_eps,
            rows,
            &group,
            false,
        )?;
        for (_, o) in outs.iter() {
            o.quantized.set(false);
        }
        Ok(())
    }

    fn rope_attention(
        &self,
        kv: &mut ClKv,
        layer: usize,
        rows: &[RowPlace],
        q: &ClBuf,
        k: &ClBuf,
        v: &ClBuf,
        q_rot: &mut ClBuf,
        out: &mut ClBuf,
        sub_norm: Option<&DevUnit>,
    ) -> Result<()> {
        self.prepare_places(kv, rows)?;
        let fuse = fuse_rope() && kv.pass_places()?.one_row_per_slot();
        // The sub-norm as the fused launch's row epilogue where the device takes one, else its
        // own launch.
        let epilogue = sub_norm.filter(|_| fuse && self.dev().row_tails() && rows.len() <= TICKETS);
        if fuse {
            let o = out.raw()?;
            let tail = match epilogue {
                Some(u) => Some(RowTail {
                    w: u.norm(Norm::AttnSub)?,
                    eps: self.model.config.rms_eps,
                    y: &o.f,
                    q: &o.q,
                    s: &o.s,
                }),
                None => None,
            };
            self.dev().attention_rope(
                &q.raw()?.f,
                &k.raw()?.f,
                &v.raw()?.f,
                &kv.k[layer],
                &kv.v[layer],
                &kv.rope,
                &kv.scores,
                kv.pass_places()?,
                self.shape(),
                &o.f,
                tail.as_ref(),
            )?;
            out.quantized.set(epilogue.is_some());
        } else {
            self.rope_store(kv, layer, rows, q, k, v, q_rot)?;
            self.attention(kv, layer, rows, q_rot, out)?;
        }
        match (sub_norm, epilogue) {
            (Some(u), None) => self.norm_inplace(u, Norm::AttnSub, out, rows.len()),
            _ => Ok(()),
        }
    }

    fn project_residual_norm(
        &self,
        u: &DevUnit,
        inp: &ClBuf,
        rows: usize,
        mat: Mat,
        x: &mut ClBuf,
        norm: Norm,
        out: &mut ClBuf,
    ) -> Result<()> {
        let n = self.model.config.n_embd;
        match self.gemv_with_tail(u, inp, rows, mat, n)? {
            Some(m) => {
                let (xr, o) = (x.raw()?, out.raw()?);
                let tail = RowTail {
                    w: u.norm(norm)?,
                    eps: self.model.config.rms_eps,
                    y: &o.f,
                    q: &o.q,
                    s: &o.s,
                };
                let ir = inp.raw()?;
                let outs = [ternary_out(m, xr)];
                let GgmlType::Ternary(fmt) = m.ty else {
                    return Err(Error::Device(
                        "opencl: a GEMV epilogue on a float matrix".into(),
                    ));
                };
                self.dev()
                    .ternary_gemv(fmt, m.cols, &ir.q, &ir.s, &outs, true, Some(&tail))?;
                x.quantized.set(false);
                out.quantized.set(true);
                Ok(())
            }
            None => {
                self.project(u, inp, rows, &mut [(mat, &mut *x)], true)?;
                self.norm(u, norm, x, 0, rows, out)
            }
        }
    }

    fn rope_store(
        &self,
        kv: &mut ClKv,
        layer: usize,
        rows: &[RowPlace],
        q: &ClBuf,
        k: &ClBuf,
        v: &ClBuf,
        q_out: &mut ClBuf,
    ) -> Result<()> {
        self.prepare_places(kv, rows)?;
        let places = kv.pass_places()?;
        self.dev().rope_store(
            &q.raw()?.f,
            &k.raw()?.f,
            &v.raw()?.f,
            &q_out.raw()?.f,
            &kv.k[layer],
            &kv.v[layer],
            &kv.rope,
            places,
            self.shape(),
        )?;
        q_out.quantized.set(false);
        Ok(())
    }

    fn attention(
        &self,
        kv: &ClKv,
        layer: usize,
        rows: &[RowPlace],
        q: &ClBuf,
        out: &mut ClBuf,
    ) -> Result<()> {
        let places = kv
            .places
            .as_ref()
            .filter(|p| p.rows() == rows)
            .ok_or_else(|| {
                Error::Device("opencl: attention over rows whose keys were not stored".into())
            })?;
        self.dev().attention(
            &q.raw()?.f,
            &kv.k[layer],
            &kv.v[layer],
            &kv.scores,
            places,
            self.shape(),
            &out.raw()?.f,
        )?;
        out.quantized.set(false);
        Ok(())
    }

    fn ffn_act(
        &self,
        unit: &DevUnit,
        g: &mut ClBuf,
        u: &ClBuf,
        rows: usize,
        act: FfnAct,
        sub_norm: bool,
    ) -> Result<()> {
        let w = if sub_norm {
            Some(unit.norm(Norm::FfnSub)?)
        } else {
            None
        };
        let gr = g.raw()?;
        self.dev().ffn_act_quant(
            &gr.f,
            &u.raw()?.f,
            self.model.config.n_ff,
            rows,
            act,
            w,
            self.model.config.rms_eps,
            &gr.q,
            &gr.s,
        )?;
        g.quantized.set(true);
        Ok(())
    }

    fn project_act(
        &self,
        unit: &DevUnit,
        x: &ClBuf,
        rows: usize,
        g: &mut ClBuf,
        u: &mut ClBuf,
        act: FfnAct,
        sub_norm: bool,
    ) -> Result<()> {
        let n = self.model.config.n_ff;
        let gate = self.gemv_with_tail(unit, x, rows, Mat::Layer(LayerMat::Gate), n)?;
        let up = self.gemv_with_tail(unit, x, rows, Mat::Layer(LayerMat::Up), n)?;
        // Both GEMV-shaped (so ternary), of one format and row length; else two launches.
        let pair = gate
            .zip(up)
            .filter(|(g, u)| act_tail() && g.ty == u.ty && g.cols == u.cols);
        let Some((gm, um, fmt)) = pair.and_then(|(g, u)| match g.ty {
            GgmlType::Ternary(f) => Some((g, u, f)),
            GgmlType::Float(_) => None,
        }) else {
            return project_act_apart(self, unit, x, rows, g, u, act, sub_norm);
        };
        let (xr, gr, ur) = (x.raw()?, g.raw()?, u.raw()?);
        let tail = ActTail {
            act,
            norm: if sub_norm {
                Some(unit.norm(Norm::FfnSub)?)
            } else {
                None
            },
            eps: self.model.config.rms_eps,
            q: &gr.q,
            s: &gr.s,
        };
        self.dev().ternary_gemv_act(
            fmt,
            gm.cols,
            (&xr.q, &xr.s),
            ternary_out(gm, gr),
            ternary_out(um, ur),
            &tail,
        )?;
        u.quantized.set(false);
        g.quantized.set(true);
        Ok(())
    }

    fn embed_picked(
        &self,
        kv: &mut ClKv,
        tied_head: Option<&DevUnit>,
        x: &mut ClBuf,
    ) -> Result<()> {
        let head = tied_head.and_then(|h| h.mat(Mat::Output).ok());
        if let (Some(m), Some(bufs)) = (head, kv.pick_bufs.as_deref())
            && let GgmlType::Float(fmt) = m.ty
        {
            self.dev
                .get_rows(fmt, m.cols, &m.buf, m.rows, &bufs.ids, 1, &x.raw()?.f)?;
            x.quantized.set(false);
            return Ok(());
        }
        // No table on the device to look the token up in: it comes to the host first.
        let token = kv.newest_pick(self.dev)?;
        self.embed(tied_head, &[token], x)
    }

    fn pick_greedy(&self, kv: &mut ClKv, logits: &ClBuf, n_vocab: usize) -> Result<()> {
        if kv.picks.is_none() {
            kv.picks = Some(Box::new(Picks::new(self.dev)?));
        }
        let (Some(picks), Some(places)) = (kv.picks.as_mut(), kv.places.as_mut()) else {
            return Err(Error::Device(
                "opencl: a greedy pick needs the pass's places".into(),
            ));
        };
        if picks.pending.len() >= PICK_RING {
            return Err(Error::Device(format!(
                "opencl: more than {PICK_RING} greedy picks queued ahead of the host"
            )));
        }
        let bufs = PickBufs::at_least(&mut kv.pick_bufs, self.dev, 1)?;
        self.dev.greedy_pick(
            &logits.raw()?.f,
            0,
            n_vocab,
            1,
            &bufs.ids,
            &bufs.part,
            Some(places),
        )?;
        places.advance()?;
        // Slot `at` was last used PICK_RING picks ago, and that pick has been taken (waited
        // for), since fewer than PICK_RING are pending.
        let at = picks.next % PICK_RING;
        picks.next += 1;
        let event = self
            .dev
            .read_async(&bufs.ids, 0, &mut picks.ring, at * 4, 4)?;
        picks.pending.push_back(Pick::Flight { at, event });
        Ok(())
    }

    fn pick_rows(
        &self,
        kv: &mut ClKv,
        logits: &ClBuf,
        row0: usize,
        rows: usize,
        n_vocab: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let bufs = PickBufs::at_least(&mut kv.pick_bufs, self.dev, rows)?;
        self.dev.greedy_pick(
            &logits.raw()?.f,
            row0,
            n_vocab,
            rows,
            &bufs.ids,
            &bufs.part,
            None,
        )?;
        let mut got = vec![0u8; rows * 4];
        self.dev.read(&bufs.ids, 0, &mut got)?;
        out.extend(
            got.chunks_exact(4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }

    fn read(&self, x: &ClBuf, len: usize, out: &mut Vec<f32>) -> Result<()> {
        let r = x.raw()?;
        check_len("read", r.cap, len)?;
        self.dev().read_f32_append(&r.f, len, out)
    }
}
