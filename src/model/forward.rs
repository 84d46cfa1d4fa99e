//! The forward pass, written once over [`Backend`]: batched prefill and decode over a KV cache,
//! for every architecture. A prompt of T tokens goes through every linear layer as one GEMM, so
//! weights are read once per layer for the whole prompt (a backend may split long prompts into
//! passes of [`Backend::max_tokens_per_pass`] tokens).

use super::Model;
use crate::backend::cpu::{CpuExec, CpuKv};
use crate::backend::opencl::{ClExec, ClKv};
use crate::backend::{Backend, LayerMat, Mat, Norm, Placement};
use crate::error::{Error, Result};
use crate::mux::meter::Reservation;
use crate::mux::units::UnitId;

/// Storage type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// Half precision (llama.cpp's default): half the memory.
    #[default]
    F16,
    /// Single precision (CPU backend only).
    F32,
}

enum KvStorage {
    Cpu(CpuKv),
    OpenCl(ClKv),
}

/// Keys and values of every layer for up to `n_ctx` positions of one sequence, held by the
/// model's backend (host memory on the CPU, device memory on OpenCL).
pub struct KvCache {
    store: KvStorage,
    n_ctx: usize,
    len: usize,
    _charge: Option<Reservation>,
}

impl KvCache {
    /// A cache for `n_ctx` positions on the model's backend.
    pub fn new(model: &Model, n_ctx: usize, ty: KvType) -> Result<KvCache> {
        let meter = model.runtime_meter();
        let (store, charge) = match &model.placement {
            Placement::Cpu => {
                let bytes = CpuKv::planned_bytes(model, n_ctx, ty);
                let charge = meter.map(|m| m.reserve(bytes)).transpose()?;
                (KvStorage::Cpu(CpuKv::new(model, n_ctx, ty)), charge)
            }
            Placement::OpenCl(dev) => (
                KvStorage::OpenCl(ClKv::new(dev, model, n_ctx, ty, meter)?),
                None,
            ),
        };
        Ok(KvCache {
            store,
            n_ctx,
            len: 0,
            _charge: charge,
        })
    }
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Capacity in positions.
    pub fn capacity(&self) -> usize {
        self.n_ctx
    }
    /// Forgets everything (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Keeps only the first `len` positions (reuse of a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Bytes held (host or device).
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStorage::Cpu(c) => c.bytes(),
            KvStorage::OpenCl(c) => c.bytes(),
        }
    }
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, tests).
    All,
}

impl Model {
    /// Runs `tokens` (positions `cache.len()..`) through the model on its backend, appending to
    /// the cache, and returns logits (`n_vocab` per returned token).
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::Quant("forward: no tokens".into()));
        }
        let pos0 = cache.len;
        if pos0 + tokens.len() > cache.n_ctx {
            return Err(Error::Context {
                needed: pos0 + tokens.len(),
                limit: cache.n_ctx,
            });
        }
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::Quant(format!(
                "token id {tok} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        let logits = match &mut cache.store {
            KvStorage::Cpu(kv) => run(&CpuExec::new(self), self, kv, pos0, tokens, which)?,
            KvStorage::OpenCl(kv) => {
                let Placement::OpenCl(dev) = &self.placement else {
                    return Err(Error::Device(
                        "a device KV cache used with a model on the CPU: make a new cache".into(),
                    ));
                };
                let exec = ClExec::new(dev, self, kv);
                run(&exec, self, kv, pos0, tokens, which)?
            }
        };
        cache.len = pos0 + tokens.len();
        Ok(logits)
    }
}

/// Splits `tokens` into passes the backend accepts and concatenates their logits.
fn run<B: Backend>(
    be: &B,
    model: &Model,
    kv: &mut B::Kv,
    pos0: usize,
    tokens: &[u32],
    which: Logits,
) -> Result<Vec<f32>> {
    let step = be.max_tokens_per_pass(kv).max(1);
    let n_chunks = tokens.len().div_ceil(step);
    let mut logits = Vec::new();
    for (i, chunk) in tokens.chunks(step).enumerate() {
        let last = i + 1 == n_chunks;
        let want = match which {
            Logits::All => Some(Logits::All),
            Logits::Last if last => Some(Logits::Last),
            Logits::Last => None,
        };
        pass(be, model, kv, pos0 + i * step, chunk, want, &mut logits)?;
    }
    Ok(logits)
}

/// One pass of `tokens` at positions `pos0..`: the architecture's op list.
fn pass<B: Backend>(
    be: &B,
    model: &Model,
    kv: &mut B::Kv,
    pos0: usize,
    tokens: &[u32],
    which: Option<Logits>,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let t_n = tokens.len();
    let (e, qd, kvd, ff) = (
        c.n_embd,
        c.n_head * c.head_dim,
        c.n_head_kv * c.head_dim,
        c.n_ff,
    );
    let mut x = be.alloc(t_n * e)?;
    {
        // A tied head that is resident already serves the lookup on the device.
        let head = if w.tied && matches!(model.placement, Placement::OpenCl(_)) {
            model.peek(UnitId::Head)?
        } else {
            None
        };
        let head = head.as_ref().map(|g| be.unit(g)).transpose()?;
        be.embed(head, tokens, &mut x)?;
    }
    let mut h = be.alloc(t_n * e)?;
    let (mut q, mut k, mut v) = (
        be.alloc(t_n * qd)?,
        be.alloc(t_n * kvd)?,
        be.alloc(t_n * kvd)?,
    );
    let mut qr = be.alloc(t_n * qd)?;
    let mut att = be.alloc(t_n * qd)?;
    let (mut g, mut u) = (be.alloc(t_n * ff)?, be.alloc(t_n * ff)?);
    for (li, l) in w.layers.iter().enumerate() {
        // Pinned while this block's ops are issued; the next page-in may start as soon as the
        // guard drops (the device keeps computing while the host copies).
        let guard = model.acquire(UnitId::Block(li))?;
        let blk = be.unit(&guard)?;
        be.norm(blk, Norm::Attn, &x, 0, t_n, &mut h)?;
        be.project(
            blk,
            &h,
            t_n,
            &mut [
                (Mat::Layer(LayerMat::Q), &mut q),
                (Mat::Layer(LayerMat::K), &mut k),
                (Mat::Layer(LayerMat::V), &mut v),
            ],
            false,
        )?;
        be.rope_store(kv, li, pos0, t_n, &q, &k, &v, &mut qr)?;
        be.attention(kv, li, pos0, t_n, &qr, &mut att)?;
        if l.attn_sub_norm.is_some() {
            be.norm_inplace(blk, Norm::AttnSub, &mut att, t_n)?;
        }
        be.project(
            blk,
            &att,
            t_n,
            &mut [(Mat::Layer(LayerMat::O), &mut x)],
            true,
        )?;

        be.norm(blk, Norm::Ffn, &x, 0, t_n, &mut h)?;
        be.project(
            blk,
            &h,
            t_n,
            &mut [
                (Mat::Layer(LayerMat::Gate), &mut g),
                (Mat::Layer(LayerMat::Up), &mut u),
            ],
            false,
        )?;
        be.ffn_act(blk, &mut g, &u, t_n, c.ffn_act, l.ffn_sub_norm.is_some())?;
        be.project(
            blk,
            &g,
            t_n,
            &mut [(Mat::Layer(LayerMat::Down), &mut x)],
            true,
        )?;
    }
    let (row0, rows) = match which {
        None => return Ok(()),
        Some(Logits::Last) => (t_n - 1, 1),
        Some(Logits::All) => (0, t_n),
    };
    let guard = model.acquire(UnitId::Head)?;
    let head = be.unit(&guard)?;
    be.norm(head, Norm::Output, &x, row0, rows, &mut h)?;
    let mut out = be.alloc(rows * c.n_vocab)?;
    be.project(head, &h, rows, &mut [(Mat::Output, &mut out)], false)?;
    drop(guard);
    be.read(&out, rows * c.n_vocab, logits)
}
