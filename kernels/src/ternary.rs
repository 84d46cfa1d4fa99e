//! Ternary weight matrices and the arithmetic contract every ternary kernel follows.
//!
//! A ternary matrix has `rows = N` output rows of `cols = K` weights in one of three packings
//! ([`TernaryFormat`]). There are two kernel families:
//!
//! * **Super-block kernels** (every ISA): for one weight row and up to [`MAX_BATCH`] activation
//!   rows, the **exact integer** dot product `Σ w·q` (w ∈ {−1, 0, +1}, q ∈ [−127, 127]) of each
//!   256-element super-block (I2_S: the last may hold 128 elements), then scaled in one fixed f32
//!   order shared by all ISAs ([`combine`]) — **bit-exact** with the scalar twin. Used for Q8_K
//!   activations and on ISAs without per-token kernels.
//! * **Per-token kernels** (AVX2, AVX-512): one vector accumulator per activation row, reduced
//!   once per row. I2_S accumulates exact integers (**bit-exact**, the same result as below);
//!   TQ1_0/TQ2_0 accumulate `sumi · d_b` in 8 or 16 float lanes, llama.cpp's structure
//!   (**≤ ε** of the twin: `|Δ| ≤ γ_{nsb+8} · Σ_j |w_j · q_j|`, enforced by the tests).
//!
//! The f32 orders of the super-block path:
//!
//! | weights | activations | per super-block b (in order) | result |
//! |---|---|---|---|
//! | TQ1_0/TQ2_0 | per-token `s` | `acc += sumi_b · d_b` | `acc / s` |
//! | TQ1_0/TQ2_0 | Q8_K `a_b` | `acc += sumi_b · (d_b · a_b)` (llama.cpp's scalar order) | `acc` |
//! | I2_S `w_s` | per-token `s` | `acc += sumi_b` (exact: < 2^24) | `acc / s · w_s` (bitnet.cpp's order) |
//! | I2_S `w_s` | Q8_K `a_b` | `acc += sumi_b · a_b` | `acc · w_s` |
//!
//! Integer bound: `|sumi_b| ≤ 256 · 127 < 2^15`, and for I2_S per-token the running sum is at most
//! `127 · K`, exactly representable in f32 for `K ≤ 132 104` (we require `K ≤ 65 536`). Hence
//! `(float)Σcode·q − (float)Σq` in bitnet.cpp equals our `(float)Σw·q`: bit-exact with its
//! arithmetic (`tests/bitnet_parity.rs` checks it against bitnet.cpp's formula written out).
//!
//! Agreement with llama.cpp (TQ1_0/TQ2_0 × Q8_K): our order is its scalar `vec_dot_tq*_q8_K`
//! order (`sumf += (float)sumi · (d_y · d_x)` block by block), so we equal its scalar build bit
//! for bit. Its AVX2 build accumulates `sumi · d` in 8 float lanes and sums them at the end; the
//! difference from ours is then bounded by the reassociation error
//! `|Δ| ≤ γ_{nb+3} · Σ_b |sumi_b · d_b · a_b|` with `γ_n = n·2^-24 / (1 − n·2^-24)` — about
//! `(nb + 3) · 6e-8` relative to the magnitude sum, e.g. ≤ 7.7e-7 of it for K = 2560.

use crate::KernelError;
use crate::blocks::{I2S_BLOCK, I2S_TAIL, QK_K, read_f16};

/// Largest number of activation rows one kernel call handles (longer batches are tiled).
pub const MAX_BATCH: usize = 64;
/// Largest row length accepted (keeps every integer sum exact in f32, see the module docs).
pub const MAX_K: usize = 65_536;

/// Packing of a ternary weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TernaryFormat {
    /// llama.cpp TQ2_0: 66-byte blocks of 256, 2-bit codes, f16 scale per block.
    Tq2_0,
    /// llama.cpp TQ1_0: 54-byte blocks of 256, base-3 packed, f16 scale per block.
    Tq1_0,
    /// bitnet.cpp I2_S: 2-bit codes in 128-element groups, one f32 scale per tensor.
    I2S,
}

impl TernaryFormat {
    /// All formats, for tests and benchmarks.
    pub const ALL: [TernaryFormat; 3] = [
        TernaryFormat::Tq2_0,
        TernaryFormat::Tq1_0,
        TernaryFormat::I2S,
    ];

    /// Lower-case name as ggml spells it.
    pub fn name(self) -> &'static str {
        match self {
            TernaryFormat::Tq2_0 => "tq2_0",
            TernaryFormat::Tq1_0 => "tq1_0",
            TernaryFormat::I2S => "i2_s",
        }
    }

    /// `K` must be a multiple of this.
    pub fn k_multiple(self) -> usize {
        match self {
            TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0 => QK_K,
            TernaryFormat::I2S => I2S_BLOCK,
        }
    }

    /// Packed bytes of one row of `k` weights (for I2_S, without the tensor's 32-byte tail);
    /// saturates instead of overflowing, so an absurd `k` fails the length check that follows.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            TernaryFormat::Tq2_0 => (k / QK_K).saturating_mul(66),
            TernaryFormat::Tq1_0 => (k / QK_K).saturating_mul(54),
            TernaryFormat::I2S => k / 4,
        }
    }

    /// Bytes of a whole `rows × k` tensor as stored in a GGUF file (I2_S includes its tail).
    pub fn tensor_bytes(self, rows: usize, k: usize) -> Option<usize> {
        let body = rows.checked_mul(self.row_bytes(k))?;
        match self {
            TernaryFormat::I2S => body.checked_add(I2S_TAIL),
            _ => Some(body),
        }
    }
}

/// A validated, borrowed ternary weight matrix (`rows` outputs × `cols` inputs).
#[derive(Clone, Copy, Debug)]
pub struct TernaryMatrix<'a> {
    format: TernaryFormat,
    data: &'a [u8],
    rows: usize,
    cols: usize,
    tensor_scale: f32,
}

impl<'a> TernaryMatrix<'a> {
    /// Wraps `data` (exactly [`TernaryFormat::tensor_bytes`] long) without copying.
    ///
    /// ```
    /// use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};
    /// let bytes = vec![0u8; 2 * 66];
    /// let m = TernaryMatrix::new(TernaryFormat::Tq2_0, &bytes, 2, 256).unwrap();
    /// assert_eq!(m.rows(), 2);
    /// assert!(TernaryMatrix::new(TernaryFormat::Tq2_0, &bytes, 2, 255).is_err());
    /// ```
    pub fn new(
        format: TernaryFormat,
        data: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if cols == 0 || !cols.is_multiple_of(format.k_multiple()) {
            return Err(KernelError::Shape(format!(
                "{} needs a row length divisible by {}, got {cols}",
                format.name(),
                format.k_multiple()
            )));
        }
        if cols > MAX_K {
            return Err(KernelError::Shape(format!(
                "row length {cols} exceeds the limit {MAX_K}"
            )));
        }
        let want = format.tensor_bytes(rows, cols).ok_or_else(|| {
            KernelError::Shape(format!(
                "{rows} x {cols} {} matrix overflows usize",
                format.name()
            ))
        })?;
        if data.len() != want {
            return Err(KernelError::Shape(format!(
                "{rows} x {cols} {} matrix needs {want} bytes, got {}",
                format.name(),
                data.len()
            )));
        }
        let tensor_scale = match format {
            TernaryFormat::I2S => {
                let at = want - I2S_TAIL;
                f32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
            }
            _ => 1.0,
        };
        Ok(TernaryMatrix {
            format,
            data,
            rows,
            cols,
            tensor_scale,
        })
    }

    /// The packing.
    pub fn format(&self) -> TernaryFormat {
        self.format
    }
    /// Output rows (N).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row length (K).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// I2_S per-tensor scale `w_s` (1.0 for the TQ formats).
    pub fn tensor_scale(&self) -> f32 {
        self.tensor_scale
    }
    /// The whole tensor's bytes, as borrowed.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    /// Packed bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.format.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }
    /// Number of 256-element super-blocks per row (the last may be a 128-element I2_S half).
    pub fn superblocks(&self) -> usize {
        self.cols.div_ceil(QK_K)
    }
    /// Writes the f16 block scales `d_b` of a TQ row into `out` (one per super-block); I2_S rows
    /// have none and leave `out` untouched.
    #[inline]
    pub fn block_scales(&self, row: &[u8], out: &mut [f32]) {
        if self.format != TernaryFormat::I2S {
            for (b, d) in out.iter_mut().enumerate().take(self.superblocks()) {
                *d = self.block_scale(row, b);
            }
        }
    }

    /// f16 block scale `d_b` of a TQ row (1.0 for I2_S).
    #[inline(always)]
    pub fn block_scale(&self, row: &[u8], b: usize) -> f32 {
        match self.format {
            TernaryFormat::Tq2_0 => read_f16(row, b * 66 + 64),
            TernaryFormat::Tq1_0 => read_f16(row, b * 54 + 52),
            TernaryFormat::I2S => 1.0,
        }
    }
}

/// Turns one row's exact super-block sums into outputs for `n_act` activation rows.
///
/// `sums[t * nsb + b]` is super-block b of activation row `t0 + t`; `block_scales` holds the
/// row's `d_b` ([`TernaryMatrix::block_scales`], unused for I2_S); `out[t]` receives the result.
/// The f32 order is the one in the module table; every ISA shares it.
#[inline]
pub fn combine(
    m: &TernaryMatrix<'_>,
    block_scales: &[f32],
    acts: &crate::act::QuantizedActs,
    t0: usize,
    n_act: usize,
    sums: &[i32],
    mut out: impl FnMut(usize, f32),
) {
    use crate::act::ActQuant;
    let (act_flavor, act_scales) = (acts.flavor(), acts.scales());
    let nsb = m.superblocks();
    let per_row = m.cols / QK_K; // Q8K scales per activation row (Q8K requires cols % 256 == 0)
    for t in 0..n_act {
        let s = &sums[t * nsb..(t + 1) * nsb];
        let v = match (m.format, act_flavor) {
            (TernaryFormat::I2S, ActQuant::PerToken) => {
                let mut acc = 0.0f32;
                for &x in s {
                    acc += x as f32;
                }
                acc / act_scales[t0 + t] * m.tensor_scale
            }
            (TernaryFormat::I2S, ActQuant::Q8K) => {
                let a = &act_scales[(t0 + t) * per_row..(t0 + t + 1) * per_row];
                let mut acc = 0.0f32;
                for (b, &x) in s.iter().enumerate() {
                    acc += x as f32 * a[b];
                }
                acc * m.tensor_scale
            }
            (_, ActQuant::PerToken) => {
                let mut acc = 0.0f32;
                for (&x, &d) in s.iter().zip(block_scales) {
                    acc += x as f32 * d;
                }
                acc / act_scales[t0 + t]
            }
            (_, ActQuant::Q8K) => {
                let a = &act_scales[(t0 + t) * per_row..(t0 + t + 1) * per_row];
                let mut acc = 0.0f32;
                for ((&x, &d), &ab) in s.iter().zip(block_scales).zip(a) {
                    acc += x as f32 * (d * ab);
                }
                acc
            }
        };
        out(t, v);
    }
}
