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
    /// PerToken only: the same values in the order the 512-bit kernels read them, with sums.
    lanes: TokLayout,
}

/// Elements per 512-bit plane group: one 256-element super-block.
const LANE_BLOCK: usize = 256;
/// i32 lanes of a 512-bit accumulator.
const LANES: usize = 16;

/// Per-token activations rearranged for the 512-bit ternary kernels, built once per quantization
/// and shared by every weight row.
///
/// A 64-byte TQ2_0 / I2_S block holds two 128-element chunks of 32 bytes; shifting the whole
/// 512-bit register right by one plane's bit offset puts plane `l` of chunk 0 (elements
/// `32l..32l+32`) in the low 32 bytes and plane `l` of chunk 1 (elements `128+32l..`) in the high
/// 32. `q512` stores each full super-block's activations in that order — plane by plane, 64 bytes
/// each — so a kernel needs no lane shuffles on the weights. `lane_sums` holds, per super-block,
/// the sixteen i32 lanes of `dpbusd(1, q)` over its four planes (what a kernel subtracts when it
/// multiplies the unsigned codes `w + 1`), and `row_sums` their total per row. A trailing
/// 128-element half (I2_S) keeps its natural order and is not summed.
///
/// ```
/// use ternmux_kernels::act::TokLayout;
/// let q: Vec<i8> = (0..256).map(|i| (i % 7) as i8 - 3).collect();
/// let mut lay = TokLayout::default();
/// lay.rebuild(&q, 256);
/// assert_eq!(&lay.q512()[32..64], &q[128..160]); // plane 0 of chunk 1 follows plane 0 of chunk 0
/// assert_eq!(lay.row_sums()[0], q.iter().map(|&v| i32::from(v)).sum::<i32>());
/// ```
#[derive(Clone, Debug, Default)]
pub struct TokLayout {
    k: usize,
    q512: Vec<i8>,
    lane_sums: Vec<i32>,
    row_sums: Vec<i32>,
}

impl TokLayout {
    /// Rebuilds the layout from `q` (rows of `k` values), reusing the buffers.
    pub fn rebuild(&mut self, q: &[i8], k: usize) {
        let rows = q.len().checked_div(k).unwrap_or(0);
        let full = k / LANE_BLOCK;
        self.k = k;
        self.q512.clear();
        self.q512.extend_from_slice(&q[..rows * k]);
        self.lane_sums.clear();
        self.lane_sums.resize(rows * full * LANES, 0);
        self.row_sums.clear();
        for (r, qr) in q.chunks_exact(k.max(1)).take(rows).enumerate() {
            let mut total = 0i32;
            for b in 0..full {
                let src = &qr[b * LANE_BLOCK..(b + 1) * LANE_BLOCK];
                let dst = &mut self.q512[r * k + b * LANE_BLOCK..r * k + (b + 1) * LANE_BLOCK];
                let sums = &mut self.lane_sums[(r * full + b) * LANES..(r * full + b + 1) * LANES];
                for plane in 0..4 {
                    let (lo, hi) = (32 * plane, 128 + 32 * plane);
                    dst[64 * plane..64 * plane + 32].copy_from_slice(&src[lo..lo + 32]);
                    dst[64 * plane + 32..64 * plane + 64].copy_from_slice(&src[hi..hi + 32]);
                }
                for (lane, s) in sums.iter_mut().enumerate() {
                    *s = (0..4)
                        .map(|plane| {
                            let at = 64 * plane + 4 * lane;
                            dst[at..at + 4].iter().map(|&v| i32::from(v)).sum::<i32>()
                        })
                        .sum();
                    total += *s;
                }
            }
            self.row_sums.push(total);
        }
    }

    /// Row length the layout was built for.
    pub fn k(&self) -> usize {
        self.k
    }
    /// All rows, each full super-block in plane order (see the type's documentation).
    pub fn q512(&self) -> &[i8] {
        &self.q512
    }
    /// Per row and full super-block, the sixteen i32 lanes of `dpbusd(1, q)` over its planes.
    pub fn lane_sums(&self) -> &[i32] {
        &self.lane_sums
    }
    /// Per row, `Σ q` over its full super-blocks.
    pub fn row_sums(&self) -> &[i32] {
        &self.row_sums
    }
}

/// What a per-token row kernel reads for `n_act` activation rows: the natural order, the 512-bit
/// order with its sums ([`TokLayout`]), and the shape. Built by [`QuantizedActs::tok_view`] or
/// [`TokActs::new`].
#[derive(Clone, Copy, Debug)]
pub struct TokActs<'a> {
    /// `n_act × k` values in element order.
    pub q: &'a [i8],
    /// `n_act × k` values, full super-blocks in plane order.
    pub q512: &'a [i8],
    /// `n_act × (k / 256) × 16` lane sums.
    pub lane_sums: &'a [i32],
    /// `n_act` row sums over full super-blocks.
    pub row_sums: &'a [i32],
    /// Row length.
    pub k: usize,
    /// Activation rows.
    pub n_act: usize,
}

impl<'a> TokActs<'a> {
    /// Rows `t0..t0 + n` of `q` (natural order) and `layout` (built from the same `q`).
    ///
    /// Panics if the range is outside either; callers validate shapes first.
    pub fn new(q: &'a [i8], layout: &'a TokLayout, t0: usize, n: usize) -> Self {
        let k = layout.k;
        let full = k / LANE_BLOCK;
        TokActs {
            q: &q[t0 * k..(t0 + n) * k],
            q512: &layout.q512[t0 * k..(t0 + n) * k],
            lane_sums: &layout.lane_sums[t0 * full * LANES..(t0 + n) * full * LANES],
            row_sums: &layout.row_sums[t0..t0 + n],
            k,
            n_act: n,
        }
    }
}

/// Round half to even, exactly as ggml's `nearest_int`: adding 1.5·2^23 leaves the rounded
/// integer in the low mantissa bits (valid for |x| < 2^22, which covers every use here: values
/// are at most 127 in magnitude before clamping). Branch-free and vectorizable, unlike a
/// `round_ties_even` call on targets without SSE4.1.
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
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
            lanes: TokLayout::default(),
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
        let mut lanes = TokLayout::default();
        if flavor == ActQuant::PerToken {
            lanes.rebuild(&q, k);
        }
        Ok(QuantizedActs {
            flavor,
            k,
            rows,
            q,
            scales,
            lanes,
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
                self.lanes.rebuild(&self.q, k);
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
    /// Rows `t0..t0 + n` as the per-token kernels read them (`PerToken` activations only: for
    /// `Q8K` the 512-bit layout is empty). Panics if the range is out of bounds.
    pub fn tok_view(&self, t0: usize, n: usize) -> TokActs<'_> {
        TokActs::new(&self.q, &self.lanes, t0, n)
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
