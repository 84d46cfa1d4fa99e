//! The forward pass on the CPU: batched prefill and decode over a KV cache.
//!
//! A prompt of T tokens goes through every linear layer as one GEMM (the kernels tile T by 64),
//! so weights are read once per layer for the whole prompt. Ternary layers quantize their input
//! per token (int8 absmax, the BitNet training arithmetic); layers sharing an input (q/k/v,
//! gate/up) quantize it once.

use super::Model;
use super::config::FfnAct;
use super::ops;
use super::weights::{Linear, TensorRef};
use crate::error::{Error, Result};
use half::f16;
use rayon::prelude::*;
use ternmux_kernels::Kernels;
use ternmux_kernels::act::{ActQuant, QuantizedActs};

/// Storage type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// Half precision (llama.cpp's default): half the memory.
    #[default]
    F16,
    /// Single precision.
    F32,
}

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
            KvStore::F16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }
    fn dot(&self, kern: &Kernels, at: usize, q: &[f32]) -> f32 {
        match self {
            KvStore::F16(v) => kern.dot_f16(bytemuck::cast_slice(&v[at..at + q.len()]), q),
            KvStore::F32(v) => v[at..at + q.len()].iter().zip(q).map(|(a, b)| a * b).sum(),
        }
    }
    fn axpy(&self, kern: &Kernels, at: usize, a: f32, out: &mut [f32]) {
        let n = out.len();
        match self {
            KvStore::F16(v) => kern.axpy_f16(a, bytemuck::cast_slice(&v[at..at + n]), out),
            KvStore::F32(v) => {
                for (o, x) in out.iter_mut().zip(&v[at..at + n]) {
                    *o += a * x;
                }
            }
        }
    }
    fn bytes(&self) -> usize {
        match self {
            KvStore::F16(v) => v.len() * 2,
            KvStore::F32(v) => v.len() * 4,
        }
    }
}

/// Keys and values of every layer for up to `n_ctx` positions of one sequence.
pub struct KvCache {
    k: Vec<KvStore>,
    v: Vec<KvStore>,
    n_ctx: usize,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    /// A cache for `n_ctx` positions.
    pub fn new(model: &Model, n_ctx: usize, ty: KvType) -> KvCache {
        let c = &model.config;
        let kv_dim = c.n_head_kv * c.head_dim;
        KvCache {
            k: (0..c.n_layer)
                .map(|_| KvStore::new(ty, n_ctx * kv_dim))
                .collect(),
            v: (0..c.n_layer)
                .map(|_| KvStore::new(ty, n_ctx * kv_dim))
                .collect(),
            n_ctx,
            kv_dim,
            len: 0,
        }
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
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvStore::bytes).sum()
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

/// One projection of a shared input: weights, output buffer, output scale, optional bias.
type Projection<'a> = (&'a TensorRef, &'a mut Vec<f32>, f32, Option<&'a Vec<f32>>);

/// Reusable per-call buffers.
struct Scratch {
    acts: QuantizedActs,
}

impl Model {
    fn linear(
        &self,
        t: &TensorRef,
        x: &[f32],
        out: &mut [f32],
        acts: &mut QuantizedActs,
        quantized: bool,
    ) -> Result<()> {
        let kern = Kernels::get();
        match t.linear(&self.file)? {
            Linear::Ternary(m) => {
                if !quantized {
                    acts.quantize(x, t.cols)?;
                }
                kern.ternary_matmul(&m, acts, out)?;
            }
            Linear::Float(m) => kern.float_matmul(&m, x, out)?,
        }
        Ok(())
    }

    /// Multiplies the same input by several weights, quantizing it once for the ternary ones.
    fn project(&self, x: &[f32], outs: &mut [Projection<'_>], s: &mut Scratch) -> Result<()> {
        let t_tokens = x.len() / outs[0].0.cols;
        let mut quantized = false;
        for (t, out, scale, bias) in outs.iter_mut() {
            out.resize(t_tokens * t.rows, 0.0);
            let is_ternary = matches!(t.ty, crate::gguf::GgmlType::Ternary(_));
            self.linear(t, x, out, &mut s.acts, quantized && is_ternary)?;
            quantized |= is_ternary;
            if *scale != 1.0 {
                out.iter_mut().for_each(|v| *v *= *scale);
            }
            if let Some(b) = bias {
                for row in out.chunks_exact_mut(t.rows) {
                    row.iter_mut().zip(b.iter()).for_each(|(v, &bv)| *v += bv);
                }
            }
        }
        Ok(())
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending to the cache, and
    /// returns logits (`n_vocab` per returned token).
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        let w = &self.weights;
        let t_n = tokens.len();
        if t_n == 0 {
            return Err(Error::Quant("forward: no tokens".into()));
        }
        let pos0 = cache.len;
        if pos0 + t_n > cache.n_ctx {
            return Err(Error::Context {
                needed: pos0 + t_n,
                limit: cache.n_ctx,
            });
        }
        let (e, qd, kvd, ff, hd) = (
            c.n_embd,
            c.n_head * c.head_dim,
            cache.kv_dim,
            c.n_ff,
            c.head_dim,
        );
        let mut s = Scratch {
            acts: QuantizedActs::new(ActQuant::PerToken),
        };
        let mut x = vec![0f32; t_n * e];
        for (i, &tok) in tokens.iter().enumerate() {
            if tok as usize >= c.n_vocab {
                return Err(Error::Quant(format!(
                    "token id {tok} is outside the vocabulary of {}",
                    c.n_vocab
                )));
            }
            w.token_embd
                .row_f32(&self.file, tok as usize, &mut x[i * e..(i + 1) * e])?;
        }
        let mut cos = vec![0f32; t_n * c.n_rot / 2];
        let mut sin = vec![0f32; t_n * c.n_rot / 2];
        let half = c.n_rot / 2;
        for t in 0..t_n {
            ops::rope_table(
                pos0 + t,
                c.n_rot,
                c.rope_base,
                w.rope_freqs.as_deref(),
                &mut cos[t * half..(t + 1) * half],
                &mut sin[t * half..(t + 1) * half],
            );
        }
        let mut h = vec![0f32; t_n * e];
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let mut att = vec![0f32; t_n * qd];
        let (mut o, mut g, mut u, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let group = c.n_head / c.n_head_kv;
        let kq_scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in w.layers.iter().enumerate() {
            ops::rms_norm(&x, &l.attn_norm, c.rms_eps, &mut h);
            self.project(
                &h,
                &mut [
                    (&l.wq, &mut q, l.scales[0], l.biases[0].as_ref()),
                    (&l.wk, &mut k, l.scales[1], l.biases[1].as_ref()),
                    (&l.wv, &mut v, l.scales[2], l.biases[2].as_ref()),
                ],
                &mut s,
            )?;
            for t in 0..t_n {
                let (ct, st) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                ops::rope(
                    &mut q[t * qd..(t + 1) * qd],
                    hd,
                    c.n_rot,
                    c.rope_neox,
                    ct,
                    st,
                );
                ops::rope(
                    &mut k[t * kvd..(t + 1) * kvd],
                    hd,
                    c.n_rot,
                    c.rope_neox,
                    ct,
                    st,
                );
                cache.k[li].write((pos0 + t) * kvd, &k[t * kvd..(t + 1) * kvd]);
                cache.v[li].write((pos0 + t) * kvd, &v[t * kvd..(t + 1) * kvd]);
            }
            // Causal GQA attention: query head h reads KV head h / group.
            let (kc, vc) = (&cache.k[li], &cache.v[li]);
            let kern = Kernels::get();
            let work = t_n * c.n_head * (pos0 + t_n) * hd;
            let head_job = |(idx, out): (usize, &mut [f32])| {
                let (t, head) = (idx / c.n_head, idx % c.n_head);
                let kvh = head / group;
                let qh = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                let n_pos = pos0 + t + 1;
                let mut scores: Vec<f32> = (0..n_pos)
                    .map(|p| kc.dot(kern, p * kvd + kvh * hd, qh) * kq_scale)
                    .collect();
                ops::softmax(&mut scores);
                out.fill(0.0);
                for (p, &a) in scores.iter().enumerate() {
                    vc.axpy(kern, p * kvd + kvh * hd, a, out);
                }
            };
            if work > 1 << 16 {
                att.par_chunks_mut(hd).enumerate().for_each(head_job);
            } else {
                att.chunks_mut(hd).enumerate().for_each(head_job);
            }
            if let Some(sn) = &l.attn_sub_norm {
                ops::rms_norm_inplace(&mut att, sn, c.rms_eps);
            }
            self.project(
                &att,
                &mut [(&l.wo, &mut o, l.scales[3], l.biases[3].as_ref())],
                &mut s,
            )?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            ops::rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
            self.project(
                &h,
                &mut [
                    (&l.w_gate, &mut g, l.scales[4], None),
                    (&l.w_up, &mut u, l.scales[5], None),
                ],
                &mut s,
            )?;
            match c.ffn_act {
                FfnAct::Silu => ops::silu_mul(&mut g, &u),
                FfnAct::Relu2 => ops::relu2_mul(&mut g, &u),
            }
            if let Some(sn) = &l.ffn_sub_norm {
                ops::rms_norm_inplace(&mut g, sn, c.rms_eps);
            }
            debug_assert_eq!(g.len(), t_n * ff);
            self.project(&g, &mut [(&l.w_down, &mut d, l.scales[6], None)], &mut s)?;
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        cache.len = pos0 + t_n;
        let rows = match which {
            Logits::Last => &x[(t_n - 1) * e..],
            Logits::All => &x[..],
        };
        let n_rows = rows.len() / e;
        let mut normed = vec![0f32; rows.len()];
        ops::rms_norm(rows, &w.output_norm, c.rms_eps, &mut normed);
        let mut logits = vec![0f32; n_rows * c.n_vocab];
        self.linear(&w.output, &normed, &mut logits, &mut s.acts, false)?;
        Ok(logits)
    }
}
