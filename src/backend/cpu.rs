//! The CPU backend: the `ternmux-kernels` crate (scalar / AVX2 / AVX-512 / NEON, rayon over rows)
//! over weights borrowed from the memory mapping — nothing is copied.
//!
//! Ternary layers quantize their input per token (int8 absmax, the BitNet training arithmetic);
//! layers sharing an input (q/k/v, gate/up) quantize it once.

use super::{Backend, Mat, Norm, Resident, RowPlace};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::model::{FfnAct, KvType, Model, TensorRef, ops};
use crate::mux::units::{PieceKind, UnitId, UnitLayout};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use ternmux_kernels::Kernels;
use ternmux_kernels::act::{ActQuant, QuantizedActs};
use ternmux_kernels::attend::F16Cache;
use ternmux_kernels::int8::{Int8Acts, Int8View};
use ternmux_kernels::matmul::FloatMatrix;
use ternmux_kernels::ternary::TernaryMatrix;

enum KvStore {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvStore {
    fn new(ty: KvType, len: usize) -> KvStore {
        match ty {
            KvType::F16 => KvStore::F16(vec![f16::ZERO; len]),
            KvType::F32 => KvStore::F32(vec![0.0; len]),
        }
    }
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            // half's slice conversion uses F16C when the CPU has it (8 values an instruction).
            KvStore::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }
    /// Writes one position's values of every KV head (`src`, heads of `hd` one after another)
    /// into a layer's head-major cache of `n_ctx` positions per head.
    fn write_heads(&mut self, pos: usize, src: &[f32], hd: usize, n_ctx: usize) {
        for (h, head) in src.chunks_exact(hd).enumerate() {
            self.write((h * n_ctx + pos) * hd, head);
        }
    }
    /// Attention of the query heads `q` (a group sharing one KV head) over `n_pos` positions of
    /// `keys`/`values` from element `at`, positions `stride` apart: `out = softmax(s·q·K)·V`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        kern: &Kernels,
        (keys, values): (&KvStore, &KvStore),
        at: usize,
        (n_pos, stride, hd): (usize, usize, usize),
        q: &[f32],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        let end = at + (n_pos - 1) * stride + hd;
        match (keys, values) {
            (KvStore::F16(k), KvStore::F16(v)) => {
                let (k, v) = (
                    bytemuck::cast_slice(&k[at..end]),
                    bytemuck::cast_slice(&v[at..end]),
                );
                let cache = F16Cache::new(k, v, n_pos, stride, hd)?;
                kern.attend_f16(q, &cache, scale, scores, out)?;
            }
            (KvStore::F32(k), KvStore::F32(v)) => {
                let (k, v) = (&k[at..end], &v[at..end]);
                for (qg, og) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    scores.clear();
                    scores.extend((0..n_pos).map(|p| {
                        let kp = &k[p * stride..p * stride + hd];
                        kp.iter().zip(qg).map(|(a, b)| a * b).sum::<f32>() * scale
                    }));
                    ops::softmax(scores);
                    og.fill(0.0);
                    for (p, &a) in scores.iter().enumerate() {
                        for (o, x) in og.iter_mut().zip(&v[p * stride..p * stride + hd]) {
                            *o += a * x;
                        }
                    }
                }
            }
            _ => {
                return Err(Error::Request(
                    "attention over keys and values of different types".into(),
                ));
            }
        }
        Ok(())
    }
    fn bytes(&self) -> usize {
        match self {
            KvStore::F16(v) => v.len() * 2,
            KvStore::F32(v) => v.len() * 4,
        }
    }
}

/// One sequence's keys and values, every layer (`n_ctx × kv_dim` values each), head-major: a
/// KV head's positions are contiguous, so attention streams each head's keys and values in
/// order (position-major, a head read 64 of every 256 bytes with the bundled model's shape).
struct SlotKv {
    k: Vec<KvStore>,
    v: Vec<KvStore>,
}

/// RoPE cos/sin per position and rotated pair (`n_rot/2` per position, filled as positions are
/// used).
#[derive(Clone, Default)]
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Keys and values of every layer for `slots` sequences of up to `n_ctx` positions each, in host
/// memory, with the RoPE table of those positions.
///
/// Each slot owns its storage, so a batch split by sequence (`CpuKv::lend`) runs its parts on
/// several threads at once, each part holding its own sequences' slots.
pub struct CpuKv {
    /// Per slot; `None` while lent to a part ([`CpuKv::lend`]).
    slots: Vec<Option<SlotKv>>,
    kv_dim: usize,
    n_ctx: usize,
    /// Shared with the parts, which never extend it (the lender covers their positions).
    rope: Arc<RopeTables>,
}

impl CpuKv {
    /// A cache for `slots` sequences of `n_ctx` positions.
    pub fn new(model: &Model, n_ctx: usize, slots: usize, ty: KvType) -> CpuKv {
        let c = &model.config;
        let kv_dim = c.n_head_kv * c.head_dim;
        let len = n_ctx * kv_dim;
        let layers = || (0..c.n_layer).map(|_| KvStore::new(ty, len)).collect();
        CpuKv {
            slots: (0..slots)
                .map(|_| {
                    Some(SlotKv {
                        k: layers(),
                        v: layers(),
                    })
                })
                .collect(),
            kv_dim,
            n_ctx,
            rope: Arc::default(),
        }
    }
    /// Bytes the keys and values of a cache for `slots × n_ctx` positions take (known before
    /// making it).
    pub fn planned_bytes(model: &Model, n_ctx: usize, slots: usize, ty: KvType) -> usize {
        let c = &model.config;
        let width = if ty == KvType::F16 { 2 } else { 4 };
        2 * c.n_layer * slots * n_ctx * c.n_head_kv * c.head_dim * width
    }

    /// `row`'s slot, checked against the cache's shape (and against the slot being lent out).
    fn slot_of(&self, row: RowPlace) -> Result<&SlotKv> {
        let (slot, pos) = (row.slot as usize, row.pos as usize);
        if pos >= self.n_ctx {
            return Err(Error::Context {
                needed: pos + 1,
                limit: self.n_ctx,
            });
        }
        match self.slots.get(slot) {
            Some(Some(s)) => Ok(s),
            Some(None) => Err(Error::Engine(format!(
                "cache slot {slot} is lent to another part of a split pass"
            ))),
            None => Err(Error::Request(format!(
                "row for cache slot {slot} of a cache with {} slots",
                self.slots.len()
            ))),
        }
    }
    /// [`CpuKv::slot_of`] for writing.
    fn slot_of_mut(&mut self, row: RowPlace) -> Result<&mut SlotKv> {
        let slot = row.slot as usize;
        self.slot_of(row)?;
        match self.slots.get_mut(slot) {
            Some(Some(s)) => Ok(s),
            _ => Err(Error::Engine(format!("cache slot {slot} vanished"))),
        }
    }
    /// Extends the RoPE tables to positions `0..end` (a no-op when they cover them).
    fn cover_positions(&mut self, model: &Model, end: usize) {
        let half = (model.config.n_rot / 2).max(1);
        if self.rope.cos.len() < end * half {
            let rope = Arc::make_mut(&mut self.rope);
            extend_rope_tables(model, end, &mut rope.cos, &mut rope.sin);
        }
    }
    /// Moves the slots `which` into a new cache, a part of a split pass whose rows reach
    /// positions below `end`; they stay lent (unusable here) until [`CpuKv::take_back`]. No
    /// values are copied: each slot's storage moves.
    pub(crate) fn lend(&mut self, model: &Model, which: &[usize], end: usize) -> Result<CpuKv> {
        self.cover_positions(model, end);
        let mut part = CpuKv {
            slots: (0..self.slots.len()).map(|_| None).collect(),
            kv_dim: self.kv_dim,
            n_ctx: self.n_ctx,
            rope: Arc::clone(&self.rope),
        };
        for &s in which {
            let taken = self.slots.get_mut(s).and_then(Option::take);
            match taken {
                Some(kv) => part.slots[s] = Some(kv),
                None => {
                    self.take_back(part);
                    return Err(Error::Engine(format!(
                        "cache slot {s} cannot be lent (out of range or lent already)"
                    )));
                }
            }
        }
        Ok(part)
    }
    /// Takes back the slots lent to `part` ([`CpuKv::lend`]).
    pub(crate) fn take_back(&mut self, part: CpuKv) {
        for (mine, lent) in self.slots.iter_mut().zip(part.slots) {
            if lent.is_some() {
                *mine = lent;
            }
        }
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .flat_map(|s| s.k.iter().chain(&s.v))
            .map(KvStore::bytes)
            .sum::<usize>()
            + (self.rope.cos.len() + self.rope.sin.len()) * 4
    }
}

/// Extends RoPE cos/sin tables (`n_rot / 2` pairs per position, as ggml builds them) to cover
/// positions `0..end`.
pub(crate) fn extend_rope_tables(
    model: &Model,
    end: usize,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let c = &model.config;
    let half = c.n_rot / 2;
    let from = cos.len().checked_div(half).unwrap_or(end);
    cos.resize(end.max(from) * half, 0.0);
    sin.resize(end.max(from) * half, 0.0);
    for p in from..end {
        ops::rope_table(
            p,
            c.n_rot,
            c.rope_base,
            model.weights.rope_freqs.as_deref(),
            &mut cos[p * half..(p + 1) * half],
            &mut sin[p * half..(p + 1) * half],
        );
    }
}

/// A unit's weights on the CPU: the mapping itself (zero copy), or a host copy the
/// multiplexer owns (its pieces packed as [`UnitLayout`] says).
pub struct HostUnit {
    id: UnitId,
    copy: Option<(Vec<u8>, UnitLayout)>,
}

impl HostUnit {
    /// A unit read straight from the mapping.
    pub(crate) fn mapped(id: UnitId) -> HostUnit {
        HostUnit { id, copy: None }
    }
    /// A unit held in `data`, laid out as `layout`.
    pub(crate) fn owned(data: Vec<u8>, layout: UnitLayout) -> HostUnit {
        HostUnit {
            id: layout.id,
            copy: Some((data, layout)),
        }
    }
    /// The host copy's storage, for reuse by the next page-in.
    pub(crate) fn into_data(self) -> Option<Vec<u8>> {
        self.copy.map(|(d, _)| d)
    }
    /// The int8 head of this head unit when the CPU computes it so: the model's own (a unit
    /// read from the mapping, [`crate::model::HeadMode::Int8`]) or the copy packed in this unit
    /// (a multiplexer's, whose layout says so).
    fn int8_head<'a>(&'a self, model: &'a Model, t: &TensorRef) -> Result<Option<Int8View<'a>>> {
        match &self.copy {
            None => Ok(model.int8_head().map(|h| h.matrix.view())),
            Some((data, layout)) => {
                let (Some(c), Some(s)) = (
                    layout.piece(PieceKind::Int8Codes),
                    layout.piece(PieceKind::Int8Scales),
                ) else {
                    return Ok(None);
                };
                let scales: &[f32] = bytemuck::try_cast_slice(&data[s.offset..s.offset + s.len])
                    .map_err(|e| Error::Mux(format!("unit {}: int8 head scales: {e}", self.id)))?;
                let codes = &data[c.offset..c.offset + c.len];
                Ok(Some(Int8View::new(codes, scales, t.rows, t.cols)?))
            }
        }
    }

    fn bytes<'a>(&'a self, model: &'a Model, m: Mat) -> Result<&'a [u8]> {
        match &self.copy {
            None => Ok(crate::mux::units::piece_bytes(
                model,
                self.id,
                PieceKind::Mat(m),
            )),
            Some((data, layout)) => {
                let p = layout
                    .piece(PieceKind::Mat(m))
                    .ok_or_else(|| Error::Mux(format!("unit {} holds no {m:?} matrix", self.id)))?;
                Ok(&data[p.offset..p.offset + p.len])
            }
        }
    }
}

/// Applies a layer's output scale (`.scale`, 1 when absent) and bias to `out` (rows of `n`).
fn scale_bias(out: &mut [f32], n: usize, scale: f32, bias: Option<&[f32]>) {
    if scale != 1.0 {
        out.iter_mut().for_each(|v| *v *= scale);
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
        }
    }
}

/// Logits from which [`Backend::pick_rows`] splits its rows between threads (fewer are scanned
/// faster than the pool wakes).
const PICK_PARALLEL_MIN: usize = 1 << 18;

/// `m`'s scratch. A pass's scratch is only ever used by that pass, one op at a time, so the
/// lock is uncontended; a panic mid-op leaves nothing another op relies on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The CPU backend bound to one model. Its scratch sits behind (uncontended) locks so a
/// block's ops can run on a pool thread ([`Backend::compute`]).
pub struct CpuExec<'m> {
    model: &'m Model,
    acts: Mutex<QuantizedActs>,
    /// Activations of the int8 head (per 256-block).
    head_acts: Mutex<Int8Acts>,
    tmp: Mutex<Vec<f32>>,
}

impl<'m> CpuExec<'m> {
    /// Runs `model` on the CPU.
    pub fn new(model: &'m Model) -> CpuExec<'m> {
        CpuExec {
            model,
            acts: Mutex::new(QuantizedActs::new(ActQuant::PerToken)),
            head_acts: Mutex::new(Int8Acts::default()),
            tmp: Mutex::new(Vec::new()),
        }
    }

    fn norm_weight(&self, u: &HostUnit, n: Norm) -> Result<&'m [f32]> {
        self.model
            .weights
            .norm(u.id, n)
            .ok_or_else(|| Error::Gguf(format!("unit {} of the model has no {n:?} norm", u.id)))
    }

    /// [`Backend::project`] of several ternary matrices sharing the input `x` (q, k and v;
    /// gate and up) as one parallel product: the input is quantized once and the rows of all
    /// matrices are split between threads at once. Returns `false`, having done nothing, when
    /// not every matrix is ternary.
    fn project_ternary_many(
        &self,
        u: &HostUnit,
        x: &[f32],
        rows: usize,
        outs: &mut [(Mat, &mut Vec<f32>)],
        acts: &mut QuantizedActs,
    ) -> Result<bool> {
        let mut mats = Vec::with_capacity(outs.len());
        for (m, _) in outs.iter() {
            let (t, scale, bias) = self.matrix(u, *m)?;
            let GgmlType::Ternary(f) = t.ty else {
                return Ok(false);
            };
            let mat = TernaryMatrix::new(f, u.bytes(self.model, *m)?, t.rows, t.cols)?;
            mats.push((mat, scale, bias));
        }
        let cols = mats.first().map_or(0, |(m, ..)| m.cols());
        if mats.iter().any(|(m, ..)| m.cols() != cols) {
            return Ok(false);
        }
        acts.quantize(&x[..rows * cols], cols)?;
        let mut jobs: Vec<(&TernaryMatrix<'_>, &mut [f32])> = mats
            .iter()
            .zip(outs.iter_mut())
            .map(|((m, ..), (_, out))| (m, &mut out[..rows * m.rows()]))
            .collect();
        Kernels::get().ternary_matmul_many(&mut jobs, acts)?;
        for ((m, scale, bias), (_, out)) in mats.iter().zip(outs.iter_mut()) {
            scale_bias(&mut out[..rows * m.rows()], m.rows(), *scale, *bias);
        }
        Ok(true)
    }

    /// The tensor, its output scale and its bias.
    fn matrix(&self, u: &HostUnit, m: Mat) -> Result<(&'m TensorRef, f32, Option<&'m [f32]>)> {
        self.model
            .weights
            .matrix(u.id, m)
            .ok_or_else(|| Error::Mux(format!("unit {} holds no {m:?} matrix", u.id)))
    }
}

impl Backend for CpuExec<'_> {
    type Buf = Vec<f32>;
    type Kv = CpuKv;
    type Unit = HostUnit;

    fn compute<R: Send>(&self, work: usize, ops: impl FnOnce() -> R + Send) -> R {
        // Below this, every product of the block is too small to split, and entering the pool
        // would cost a wake-up and a latch for nothing (the bundled model's batch-1 decode).
        if work < Kernels::PARALLEL_MIN_WORK || ternmux_kernels::serial::is_serial() {
            return ops();
        }
        // A job of the rayon pool (run in place when already on a pool thread).
        rayon::scope(|_| ops())
    }

    fn runs_of_blocks(&self) -> bool {
        true
    }

    fn prepare_head(&self, head: &HostUnit) -> Result<()> {
        let (t, ..) = self.matrix(head, Mat::Output)?;
        head.int8_head(self.model, t).map(|_| ())
    }

    fn unit<'r>(&self, r: &'r Resident) -> Result<&'r HostUnit> {
        match r {
            Resident::Host(u) => Ok(u),
            Resident::Device(_) => Err(Error::Mux(
                "a device-resident unit was handed to the CPU backend".into(),
            )),
        }
    }

    fn max_tokens_per_pass(&self, _kv: &CpuKv) -> usize {
        usize::MAX
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn embed(&self, _head: Option<&HostUnit>, tokens: &[u32], x: &mut Vec<f32>) -> Result<()> {
        let (w, e) = (&self.model.weights, self.model.config.n_embd);
        for (i, &tok) in tokens.iter().enumerate() {
            w.token_embd
                .row_f32(&self.model.file, tok as usize, &mut x[i * e..(i + 1) * e])?;
        }
        Ok(())
    }

    fn norm(
        &self,
        u: &HostUnit,
        norm: Norm,
        x: &Vec<f32>,
        row0: usize,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let w = self.norm_weight(u, norm)?;
        let n = w.len();
        ops::rms_norm(
            &x[row0 * n..(row0 + rows) * n],
            w,
            self.model.config.rms_eps,
            &mut out[..rows * n],
        );
        Ok(())
    }

    fn norm_inplace(&self, u: &HostUnit, norm: Norm, x: &mut Vec<f32>, rows: usize) -> Result<()> {
        let w = self.norm_weight(u, norm)?;
        ops::rms_norm_inplace(&mut x[..rows * w.len()], w, self.model.config.rms_eps);
        Ok(())
    }

    fn project(
        &self,
        u: &HostUnit,
        x: &Vec<f32>,
        rows: usize,
        outs: &mut [(Mat, &mut Vec<f32>)],
        accumulate: bool,
    ) -> Result<()> {
        let kern = Kernels::get();
        let mut acts = lock(&self.acts);
        if !accumulate
            && outs.len() > 1
            && self.project_ternary_many(u, x, rows, outs, &mut acts)?
        {
            return Ok(());
        }
        let mut tmp = lock(&self.tmp);
        let mut quantized = false;
        for (m, out) in outs.iter_mut() {
            let (t, scale, bias) = self.matrix(u, *m)?;
            let x = &x[..rows * t.cols];
            let n = rows * t.rows;
            let dst: &mut [f32] = if accumulate {
                tmp.resize(n, 0.0);
                &mut tmp[..]
            } else {
                &mut out[..n]
            };
            let int8 = match *m {
                Mat::Output => u.int8_head(self.model, t)?,
                Mat::Layer(_) => None,
            };
            if let Some(h) = int8 {
                let mut a8 = lock(&self.head_acts);
                a8.quantize(x, t.cols)?;
                kern.int8_matmul(&h, &a8, dst)?;
            } else {
                let bytes = u.bytes(self.model, *m)?;
                match t.ty {
                    GgmlType::Ternary(f) => {
                        if !quantized {
                            acts.quantize(x, t.cols)?;
                            quantized = true;
                        }
                        let mat = TernaryMatrix::new(f, bytes, t.rows, t.cols)?;
                        kern.ternary_matmul(&mat, &acts, dst)?;
                    }
                    GgmlType::Float(f) => {
                        let mat = FloatMatrix::new(f, bytes, t.rows, t.cols)?;
                        kern.float_matmul(&mat, x, dst)?
                    }
                }
            }
            scale_bias(dst, t.rows, scale, bias);
            if accumulate {
                out[..n]
                    .iter_mut()
                    .zip(tmp.iter())
                    .for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    fn rope_store(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        rows: &[RowPlace],
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        q_out: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &self.model.config;
        let (qd, kvd, half) = (c.n_head * c.head_dim, kv.kv_dim, c.n_rot / 2);
        let n = rows.len();
        q_out[..n * qd].copy_from_slice(&q[..n * qd]);
        let end = rows.iter().map(|r| r.pos as usize + 1).max().unwrap_or(0);
        kv.cover_positions(self.model, end);
        let rope = Arc::clone(&kv.rope);
        let (hd, n_ctx) = (c.head_dim, kv.n_ctx);
        let mut kr = vec![0f32; kvd];
        for (t, &row) in rows.iter().enumerate() {
            let slot = kv.slot_of_mut(row)?;
            let p = row.pos as usize;
            let (ct, st) = (
                &rope.cos[p * half..(p + 1) * half],
                &rope.sin[p * half..(p + 1) * half],
            );
            ops::rope(
                &mut q_out[t * qd..(t + 1) * qd],
                c.head_dim,
                c.n_rot,
                c.rope_neox,
                ct,
                st,
            );
            kr.copy_from_slice(&k[t * kvd..(t + 1) * kvd]);
            ops::rope(&mut kr, c.head_dim, c.n_rot, c.rope_neox, ct, st);
            let bad_layer = || Error::Engine(format!("no KV layer {layer}"));
            let (k_layer, v_layer) = (slot.k.get_mut(layer), slot.v.get_mut(layer));
            k_layer
                .ok_or_else(bad_layer)?
                .write_heads(p, &kr, hd, n_ctx);
            v_layer
                .ok_or_else(bad_layer)?
                .write_heads(p, &v[t * kvd..(t + 1) * kvd], hd, n_ctx);
        }
        Ok(())
    }

    fn attention(
        &self,
        kv: &CpuKv,
        layer: usize,
        rows: &[RowPlace],
        q: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &self.model.config;
        let hd = c.head_dim;
        let qd = c.n_head * hd;
        let group = c.n_head / c.n_head_kv;
        let kq_scale = 1.0 / (hd as f32).sqrt();
        let kern = Kernels::get();
        // Each row's keys and values of this layer, checked once.
        let caches: Vec<(&KvStore, &KvStore)> = rows
            .iter()
            .map(|&r| {
                let slot = kv.slot_of(RowPlace { pos: 0, ..r })?;
                slot.k
                    .get(layer)
                    .zip(slot.v.get(layer))
                    .ok_or_else(|| Error::Engine(format!("no KV layer {layer}")))
            })
            .collect::<Result<_>>()?;
        let work: usize = rows.iter().map(|r| r.pos as usize + 1).sum::<usize>() * c.n_head * hd;
        // One job per (row, KV head): the `group` query heads that read KV head `kvh` are
        // `kvh·group … (kvh+1)·group`, contiguous in `q` and `out`.
        let n_kv = c.n_head_kv;
        let gw = group * hd;
        let group_job = |scores: &mut Vec<f32>, (idx, o): (usize, &mut [f32])| -> Result<()> {
            let (t, kvh) = (idx / n_kv, idx % n_kv);
            let qg = &q[t * qd + kvh * gw..t * qd + (kvh + 1) * gw];
            // Head-major: this KV head's positions are one contiguous run.
            let (at, n_pos) = (kvh * kv.n_ctx * hd, rows[t].pos as usize + 1);
            KvStore::attend(
                kern,
                caches[t],
                at,
                (n_pos, hd, hd),
                qg,
                kq_scale,
                scores,
                o,
            )
        };
        let out = &mut out[..rows.len() * qd];
        if work > 1 << 16 && !ternmux_kernels::serial::is_serial() {
            out.par_chunks_mut(gw)
                .enumerate()
                .try_for_each_init(Vec::new, group_job)
        } else {
            let mut scores = Vec::new();
            out.chunks_mut(gw)
                .enumerate()
                .try_for_each(|job| group_job(&mut scores, job))
        }
    }

    fn ffn_act(
        &self,
        w: &HostUnit,
        g: &mut Vec<f32>,
        u: &Vec<f32>,
        rows: usize,
        act: FfnAct,
        sub_norm: bool,
    ) -> Result<()> {
        let n = rows * self.model.config.n_ff;
        match act {
            FfnAct::Silu => ops::silu_mul(&mut g[..n], &u[..n]),
            FfnAct::Relu2 => ops::relu2_mul(&mut g[..n], &u[..n]),
        }
        if sub_norm {
            self.norm_inplace(w, Norm::FfnSub, g, rows)?;
        }
        Ok(())
    }

    fn read(&self, x: &Vec<f32>, len: usize, out: &mut Vec<f32>) -> Result<()> {
        out.extend_from_slice(&x[..len]);
        Ok(())
    }

    fn pick_rows(
        &self,
        _kv: &mut CpuKv,
        logits: &Vec<f32>,
        row0: usize,
        rows: usize,
        n_vocab: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        // Where the logits already are: no copy, rows in parallel (a step's batch).
        let rows = logits
            .get(row0 * n_vocab..(row0 + rows) * n_vocab)
            .ok_or_else(|| Error::Request("pick_rows: rows past the logits".into()))?;
        let per_row = rows.chunks_exact(n_vocab.max(1));
        if rows.len() < PICK_PARALLEL_MIN || ternmux_kernels::serial::is_serial() {
            out.extend(per_row.map(crate::sampling::argmax));
        } else {
            out.par_extend(
                rows.par_chunks_exact(n_vocab.max(1))
                    .map(crate::sampling::argmax),
            );
        }
        Ok(())
    }
}
