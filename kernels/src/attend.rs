//! Attention of query heads over one KV head's f16 cache: `out_g = Σ_p softmax_p(s · q_g·k_p) v_p`
//! for the `group` query heads that share the KV head (grouped-query attention).
//!
//! One call covers a whole head group over all its positions, so a token's attention is a
//! handful of calls instead of two per position and head: each key and value row is loaded and
//! widened once for the whole group, scores stay in a scratch row, and on AVX-512 and AVX2 the
//! output accumulates in registers across positions. The portable version
//! ([`attend_f16_twin`]) is the per-position composition of [`Kernels::dot_f16`] and
//! [`Kernels::axpy_f16`] that attention used before; ISAs without a fused kernel run it.
//!
//! Exactness: ≤ ε class (f32 sums whose order depends on the ISA's lane count; FMA and a
//! polynomial `exp` on AVX-512 and AVX2). The bound against an f64 reference is derived next
//! to the tests (`tests/attend_kernels.rs`).
//!
//! ```
//! use ternmux_kernels::{Kernels, attend::F16Cache};
//! use half::f16;
//! // Two positions of a 16-dimension head: the query matches the second key only.
//! let bytes = |f: &dyn Fn(usize) -> f32| -> Vec<u8> {
//!     (0..32).flat_map(|i| f16::from_f32(f(i)).to_le_bytes()).collect()
//! };
//! let keys = bytes(&|i| if i == 16 { 8.0 } else { 0.0 });
//! let values = bytes(&|i| if i < 16 { 1.0 } else { 3.0 });
//! let cache = F16Cache::new(&keys, &values, 2, 16, 16).unwrap();
//! let mut q = vec![0.0f32; 16];
//! q[0] = 4.0; // position 1 scores 8 · 4 = 32, position 0 scores 0
//! let (mut scores, mut out) = (Vec::new(), vec![0.0f32; 16]);
//! Kernels::get().attend_f16(&q, &cache, 1.0, &mut scores, &mut out).unwrap();
//! assert!((out[0] - 3.0).abs() < 1e-6);
//! ```

use crate::{KernelError, Kernels};

/// One KV head's keys and values for `n_pos` positions, as little-endian f16 bytes borrowed from
/// a cache: position `p`'s key is the `head_dim` values starting at element `p · stride` of
/// `keys`, and its value the same of `values`.
#[derive(Clone, Copy, Debug)]
pub struct F16Cache<'a> {
    keys: &'a [u8],
    values: &'a [u8],
    n_pos: usize,
    stride: usize,
    head_dim: usize,
}

impl<'a> F16Cache<'a> {
    /// Checks that both byte slices hold `n_pos` rows of `head_dim` values `stride` elements
    /// apart (`n_pos ≥ 1`, `head_dim ≥ 1`, `stride ≥ head_dim`).
    pub fn new(
        keys: &'a [u8],
        values: &'a [u8],
        n_pos: usize,
        stride: usize,
        head_dim: usize,
    ) -> Result<Self, KernelError> {
        if n_pos == 0 || head_dim == 0 || stride < head_dim {
            return Err(KernelError::Shape(format!(
                "attention cache of {n_pos} positions, head dimension {head_dim}, stride \
                 {stride}: needs at least one position and a stride ≥ the head dimension"
            )));
        }
        let need = (n_pos - 1)
            .checked_mul(stride)
            .and_then(|e| e.checked_add(head_dim))
            .and_then(|e| e.checked_mul(2))
            .ok_or_else(|| KernelError::Shape("attention cache size overflows".into()))?;
        if keys.len() < need || values.len() < need {
            return Err(KernelError::Shape(format!(
                "attention cache of {n_pos} positions × stride {stride} (head dimension \
                 {head_dim}) needs {need} bytes of keys and of values; got {} and {}",
                keys.len(),
                values.len()
            )));
        }
        Ok(F16Cache {
            keys,
            values,
            n_pos,
            stride,
            head_dim,
        })
    }
    /// Positions attended.
    pub fn n_pos(&self) -> usize {
        self.n_pos
    }
    /// Values per key and value row.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Elements between the starts of consecutive positions.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Position `p`'s key as f16 bytes (`p < n_pos`).
    pub fn key(&self, p: usize) -> &'a [u8] {
        &self.keys[2 * p * self.stride..2 * (p * self.stride + self.head_dim)]
    }
    /// Position `p`'s value as f16 bytes (`p < n_pos`).
    pub fn value(&self, p: usize) -> &'a [u8] {
        &self.values[2 * p * self.stride..2 * (p * self.stride + self.head_dim)]
    }
    /// The key bytes from position 0 on (for kernels that step through them: the x86-64 tiles).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn key_bytes(&self) -> &'a [u8] {
        self.keys
    }
    /// The value bytes from position 0 on.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn value_bytes(&self) -> &'a [u8] {
        self.values
    }
}

/// `x ← softmax(x)` in f32: subtract the maximum, exponentiate, divide by the sum.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The portable attention: per position [`Kernels::dot_f16`] for the scores, [`softmax`], then
/// per position [`Kernels::axpy_f16`] (a multiply, then an add) into `out`. Shapes as in
/// [`Kernels::attend_f16`], already checked.
pub fn attend_f16_twin(
    kern: &Kernels,
    q: &[f32],
    cache: &F16Cache<'_>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, n) = (cache.head_dim, cache.n_pos);
    for ((qg, sg), og) in q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(n))
        .zip(out.chunks_exact_mut(hd))
    {
        for (p, s) in sg.iter_mut().enumerate() {
            *s = kern.dot_f16(cache.key(p), qg) * scale;
        }
        softmax(sg);
        og.fill(0.0);
        for (p, &a) in sg.iter().enumerate() {
            kern.axpy_f16(a, cache.value(p), og);
        }
    }
}

impl Kernels {
    /// Attention of `q.len() / head_dim` query heads (concatenated in `q`) over one KV head's
    /// cache: `out_g = Σ_p softmax_p(scale · q_g·k_p) · v_p`, written to `out` (same length as
    /// `q`). `scores` is scratch, resized to `group × n_pos`; after the call it holds each
    /// head's attention weights.
    ///
    /// Exactness: ≤ ε class (see the module docs).
    pub fn attend_f16(
        &self,
        q: &[f32],
        cache: &F16Cache<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let hd = cache.head_dim;
        if q.is_empty() || !q.len().is_multiple_of(hd) || out.len() != q.len() {
            return Err(KernelError::Shape(format!(
                "attention of {} query values and {} outputs over heads of {hd}: both must be \
                 the same non-zero multiple of the head dimension",
                q.len(),
                out.len()
            )));
        }
        let group = q.len() / hd;
        scores.clear();
        scores.resize(group * cache.n_pos, 0.0);
        match self.attend_f16 {
            Some((f, lanes)) if hd.is_multiple_of(lanes) => {
                // SAFETY: `self` exists only for an ISA this CPU supports; the cache's slices
                // were checked to hold every row read, `q`/`out` hold `group` heads and
                // `scores` `group × n_pos` values (checked above).
                unsafe { f(q, cache, scale, scores, out) }
            }
            _ => attend_f16_twin(self, q, cache, scale, scores, out),
        }
        Ok(())
    }
}
