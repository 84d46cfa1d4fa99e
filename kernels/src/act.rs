//! Int8 activation quantization, in both flavours the peers use.
//!
//! * [`ActQuant::PerToken`]: one scale per activation row (token), bitnet.cpp's
//!   `quantize_row_i8_s` and the training arithmetic of BitNet b1.58: `max` is taken in f64 starting
//!   from `1e-5`, `s = (f32)(127 / max)`, `q = round_half_even(x * s)` clamped to the int8 range.
//! * [`ActQuant::Q8K`]: one scale per 256-element block, llama.cpp's `quantize_row_q8_K_ref`: the
//!   signed value `m` of largest magnitude gives `iscale = -127 / m`, `q = min(127,
//!   round_half_even(iscale * x))`, `d = 1 / iscale`; an all-zero block has `d = 0` and `q = 0`.
//!
//! Invariant relied on by the ternary kernels: every stored `q` lies in `[-127, 127]`. Both
//! quantizers guarantee it: `|x * s| <= 127` up to one rounding of the product, which rounds back to
//! 127, so the `-128` that bitnet.cpp's clamp allows is never produced (and its results are equal).

use crate::KernelError;
use crate::blocks::QK_K;

/// How activations are quantized to int8 before a ternary matrix product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// One absmax scale per token (bitnet.cpp, the training arithmetic).
    PerToken,
    /// One absmax scale per 256-element block (llama.cpp's Q8_K).
    Q8K,
}

impl ActQuant {
    /// Lower-case name used in benchmarks and messages.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::PerToken => "per-token",
            ActQuant::Q8K => "q8_k",
        }
    }
}

/// Quantized activation rows, reusable across calls without reallocating.
///
/// ```
/// use ternmux_kernels::act::{ActQuant, QuantizedActs};
/// let mut acts = QuantizedActs::new(ActQuant::PerToken);
/// acts.quantize(&[0.5, -1.0, 0.25, 0.0], 4).unwrap();
/// assert_eq!(acts.row(0), &[64, -127, 32, 0]);
/// ```
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    flavor: ActQuant,
    k: usize,
    rows: usize,
    q: Vec<i8>,
    /// PerToken: one `s` per row (value = q / s). Q8K: `rows * k / 256` block scales `d` (value = q * d).
    scales: Vec<f32>,
}

/// Round half to even, exactly as ggml's `nearest_int`: adding 1.5·2^23 leaves the rounded
/// integer in the low mantissa bits (valid for |x| < 2^22, which covers every use here: values
/// are at most 127 in magnitude before clamping). Branch-free and vectorizable, unlike a
/// `round_ties_even` call on targets without SSE4.1.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

impl QuantizedActs {
    /// An empty set of activations of the given flavour.
    pub fn new(flavor: ActQuant) -> Self {
        QuantizedActs {
            flavor,
            k: 0,
            rows: 0,
            q: Vec::new(),
            scales: Vec::new(),
        }
    }

    /// Builds activations directly from int8 values and scales (tests and benchmarks).
    ///
    /// `scales` holds one `s` per row for [`ActQuant::PerToken`] or one `d` per 256-block for
    /// [`ActQuant::Q8K`]. Fails if a length disagrees or a value is `-128`.
    pub fn from_parts(
        flavor: ActQuant,
        k: usize,
        q: Vec<i8>,
        scales: Vec<f32>,
    ) -> Result<Self, KernelError> {
        if k == 0 || !q.len().is_multiple_of(k) {
            return Err(KernelError::Shape(format!(
                "activation length {} is not a multiple of k = {k}",
                q.len()
            )));
        }
        let rows = q.len() / k;
        let want = match flavor {
            ActQuant::PerToken => rows,
            ActQuant::Q8K => {
                if !k.is_multiple_of(QK_K) {
                    return Err(KernelError::Shape(format!(
                        "q8_k activations need k divisible by 256, got {k}"
                    )));
                }
                rows * k / QK_K
            }
        };
        if scales.len() != want {
            return Err(KernelError::Shape(format!(
                "expected {want} activation scales, got {}",
                scales.len()
            )));
        }
        if q.contains(&i8::MIN) {
            return Err(KernelError::Shape(
                "activation value -128 is outside [-127, 127]".into(),
            ));
        }
        Ok(QuantizedActs {
            flavor,
            k,
            rows,
            q,
            scales,
        })
    }

    /// Quantizes `x` (`rows * k` values, row-major) in place of the previous contents.
    pub fn quantize(&mut self, x: &[f32], k: usize) -> Result<(), KernelError> {
        if k == 0 || !x.len().is_multiple_of(k) {
            return Err(KernelError::Shape(format!(
                "activation length {} is not a multiple of k = {k}",
                x.len()
            )));
        }
        if self.flavor == ActQuant::Q8K && !k.is_multiple_of(QK_K) {
            return Err(KernelError::Shape(format!(
                "q8_k activations need k divisible by 256, got {k}"
            )));
        }
        self.k = k;
        self.rows = x.len() / k;
        self.q.resize(x.len(), 0);
        self.scales.clear();
        match self.flavor {
            ActQuant::PerToken => {
                for (xr, qr) in x.chunks_exact(k).zip(self.q.chunks_exact_mut(k)) {
                    self.scales.push(quantize_row_per_token(xr, qr));
                }
            }
            ActQuant::Q8K => {
                for (xb, qb) in x.chunks_exact(QK_K).zip(self.q.chunks_exact_mut(QK_K)) {
                    self.scales.push(quantize_block_q8_k(xb, qb));
                }
            }
        }
        Ok(())
    }

    /// The flavour of these activations.
    pub fn flavor(&self) -> ActQuant {
        self.flavor
    }
    /// Row length.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Number of activation rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// All int8 values, row-major.
    pub fn q(&self) -> &[i8] {
        &self.q
    }
    /// Int8 values of row `t`.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.q[t * self.k..(t + 1) * self.k]
    }
    /// Scales: per row (`PerToken`, value = q / s) or per 256-block (`Q8K`, value = q * d).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The real value an int8 entry stands for (test and reference helper).
    pub fn value(&self, t: usize, j: usize) -> f64 {
        let q = f64::from(self.q[t * self.k + j]);
        match self.flavor {
            ActQuant::PerToken => q / f64::from(self.scales[t]),
            ActQuant::Q8K => q * f64::from(self.scales[(t * self.k + j) / QK_K]),
        }
    }
}

/// bitnet.cpp `quantize_row_i8_s`: returns `s`; writes `q = clamp(round_half_even(x * s))`.
pub fn quantize_row_per_token(x: &[f32], q: &mut [i8]) -> f32 {
    // max over f32 then widened: equal to bitnet.cpp's max over f64(|x|), exactly.
    let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let max = f64::from(amax).max(0.00001);
    let s = (127.0 / max) as f32;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = nearest_int(v * s).clamp(-127, 127) as i8;
    }
    s
}

/// llama.cpp `quantize_row_q8_K_ref` for one 256-block: returns `d`.
pub fn quantize_block_q8_k(x: &[f32], q: &mut [i8]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = nearest_int(iscale * v).clamp(-127, 127) as i8;
    }
    1.0 / iscale
}
