//! Int8 matrices: a float matrix (an output head) requantized to one signed byte per weight and
//! one scale per row, multiplied by activations quantized to int8 per 256-element block.
//!
//! Why: the head of a ternary model is the one large matrix that is not ternary. BitNet
//! 2B-4T's tied F16 embeddings are 656 MB, more than all its ternary layers together (520 MB), and
//! a batch-1 token reads all of them. As int8 the head is 328 MB, and its dot products are VNNI
//! `dpbusd` instructions instead of widening f16 conversions.
//!
//! The arithmetic (the definition; [`int8_row`] is its scalar twin):
//!
//! * **Weights**, row `r`: `d_r = max_j |w_rj| / 127` (0 for an all-zero row), `c_rj =
//!   round_half_even(w_rj · 127 / max_j |w_rj|)` in `[-127, 127]`, stored as the unsigned byte
//!   `c + 128` (what `dpbusd` multiplies; the AVX2 kernel flips it back to a signed byte).
//! * **Activations**, token `t`, block `b` of [`INT8_BLOCK`] values: `s_b = max |x| / 127`, `q =
//!   round_half_even(x · 127 / max |x|)` in `[-127, 127]`; `Σ q` of each block is kept.
//! * **Product**: `out[t, r] = d_r · Σ_b s_b · Σ_{j ∈ b} c_rj · q_j`. Each block's integer sum is
//!   exact in i32 lanes (`|c · q| ≤ 127²`, 256 terms); the lanes, the block scales and the row scale
//!   are combined in f32 in the ISA's lane order, so the kernels are in the ≤ ε class.
//!
//! Quantization error, per product: `|Σ w x − out| ≤ Σ_j (|w_j| s_b / 2 + |x_j| d / 2 + d s_b /
//! 4)` plus the f32 roundings (each weight is within `d / 2` of `d c`, each activation within
//! `s_b / 2` of `s_b q`); the tests check it.
//!
//! ```
//! use ternmux_kernels::Kernels;
//! use ternmux_kernels::dequant::FloatFormat;
//! use ternmux_kernels::int8::{Int8Acts, Int8Matrix};
//! use ternmux_kernels::matmul::FloatMatrix;
//! let k = 256;
//! // Two F32 rows: all 0.5, and all -1.
//! let rows: Vec<f32> = [vec![0.5f32; k], vec![-1.0f32; k]].concat();
//! let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
//! let w = FloatMatrix::new(FloatFormat::F32, &bytes, 2, k)?;
//! let kern = Kernels::get();
//! let head = Int8Matrix::quantize(kern, &w)?;
//! let mut acts = Int8Acts::default();
//! acts.quantize(&vec![2.0f32; k], k)?;
//! let mut out = [0.0f32; 2];
//! kern.int8_matmul(&head.view(), &acts, &mut out)?;
//! assert_eq!(out, [256.0, -512.0]);
//! # Ok::<(), ternmux_kernels::KernelError>(())
//! ```

use crate::KernelError;
use crate::act::nearest_int;
use crate::dequant::FloatFormat;
use crate::dispatch::Kernels;
use crate::matmul::FloatMatrix;
use rayon::prelude::*;

/// Activation values per block scale.
pub const INT8_BLOCK: usize = 256;

/// A float matrix requantized to int8 with one scale per row (owned: built once from a
/// borrowed [`FloatMatrix`]).
#[derive(Debug)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols` codes `c + 128`, in an anonymous mapping: its pages are zero until first
    /// written (by the threads that quantize them, not by one `memset`), and the kernel is asked
    /// to back it with huge pages (a batch-1 token streams the whole matrix; fewer TLB misses).
    codes: memmap2::MmapMut,
    /// `d_r` per row.
    scales: Vec<f32>,
}

/// Grows `v` to `len` elements of `fill`, or says how much memory could not be had.
fn try_filled<T: Clone>(len: usize, fill: T, what: &str) -> Result<Vec<T>, KernelError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        KernelError::Memory(format!(
            "{what}: cannot allocate {len} elements of {} bytes",
            size_of::<T>()
        ))
    })?;
    v.resize(len, fill);
    Ok(v)
}

/// Absmax quantization of `v` to `[-127, 127]`, the one rule of weights and activations:
/// `emit(j, q_j)` for every element, and the scale `max |v| / 127` returned. An all-zero or
/// non-finite `v` emits nothing and returns 0 (the caller's zero-filled values stand).
fn quantize_absmax(v: &[f32], mut emit: impl FnMut(usize, i32)) -> f32 {
    let max = v.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return 0.0;
    }
    let inv = 127.0 / max;
    for (j, &x) in v.iter().enumerate() {
        emit(j, nearest_int(x * inv).clamp(-127, 127));
    }
    max / 127.0
}

/// `c + 128` codes of one row and its scale `d` (see the module's arithmetic).
fn quantize_row(w: &[f32], codes: &mut [u8]) -> f32 {
    codes.fill(128);
    quantize_absmax(w, |j, c| codes[j] = (c + 128) as u8)
}

impl Int8Matrix {
    /// Requantizes every row of `w` (in parallel, except inside [`crate::serial::serial`]; the
    /// rows are dequantized with `kern`'s converters). Rows whose largest magnitude is not finite become zero rows.
    ///
    /// Errors: a row length that is not a multiple of [`INT8_BLOCK`], or no memory for the
    /// codes.
    pub fn quantize(kern: &Kernels, w: &FloatMatrix<'_>) -> Result<Int8Matrix, KernelError> {
        Int8Matrix::quantize_in_chunks(kern, w, usize::MAX, |_| {})
    }

    /// As [`Int8Matrix::quantize`], `chunk_rows` rows at a time, calling `done(rows)` after
    /// each chunk: a caller reading `w` from a memory mapping can release the chunk's pages
    /// there, so the source and the copy are never resident whole at once.
    pub fn quantize_in_chunks(
        kern: &Kernels,
        w: &FloatMatrix<'_>,
        chunk_rows: usize,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Int8Matrix, KernelError> {
        let (rows, cols) = (w.rows(), w.cols());
        if !cols.is_multiple_of(INT8_BLOCK) {
            return Err(KernelError::Shape(format!(
                "an int8 matrix needs a row length divisible by {INT8_BLOCK}, got {cols}"
            )));
        }
        let len = rows.checked_mul(cols).ok_or_else(|| {
            KernelError::Shape(format!("{rows} x {cols} int8 matrix overflows usize"))
        })?;
        let mut codes = memmap2::MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|e| {
                KernelError::Memory(format!("int8 matrix codes: cannot map {len} bytes: {e}"))
            })?;
        #[cfg(target_os = "linux")]
        let _ = codes.advise(memmap2::Advice::HugePage);
        let mut scales = try_filled(rows, 0.0f32, "int8 matrix scales")?;
        let f16_to_f32 = kern.f16_to_f32;
        let chunk_rows = chunk_rows.max(1);
        // Inside [`crate::serial::serial`] the rows stay on the calling thread: no fork, so no
        // join that could steal a job of the caller's (e.g. another part of a split pass that
        // would then wait for this very matrix, made once under a `OnceLock`).
        let min_len = if crate::serial::is_serial() {
            usize::MAX
        } else {
            64
        };
        for r0 in (0..rows).step_by(chunk_rows) {
            let r1 = (r0 + chunk_rows).min(rows);
            codes[r0 * cols..r1 * cols]
                .par_chunks_mut(cols)
                .zip(scales[r0..r1].par_iter_mut())
                .enumerate()
                .with_min_len(min_len)
                .for_each_init(
                    || vec![0.0f32; cols],
                    |buf, (i, (c, d))| {
                        let row = w.row(r0 + i);
                        match w.format() {
                            // SAFETY: `kern` exists only for an ISA this CPU supports; the
                            // row holds `cols` f16 values, `buf` `cols` floats.
                            FloatFormat::F16 => unsafe { f16_to_f32(row, buf) },
                            f => f.dequantize(row, buf),
                        }
                        *d = quantize_row(buf, c);
                    },
                );
            done(r0..r1);
        }
        Ok(Int8Matrix {
            rows,
            cols,
            codes,
            scales,
        })
    }

    /// A borrowed view (what [`Kernels::int8_matmul`] reads).
    pub fn view(&self) -> Int8View<'_> {
        Int8View {
            rows: self.rows,
            cols: self.cols,
            codes: &self.codes[..self.rows * self.cols],
            scales: &self.scales,
        }
    }
    /// All codes `c + 128`, row after row (`rows × cols` bytes).
    pub fn codes(&self) -> &[u8] {
        &self.codes[..self.rows * self.cols]
    }
    /// The row scales `d_r`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.rows * self.cols + self.scales.len() * 4
    }
}

/// An int8 matrix borrowed from wherever its codes and scales are (an [`Int8Matrix`], or a copy
/// of both, e.g. a multiplexer's).
#[derive(Clone, Copy, Debug)]
pub struct Int8View<'a> {
    rows: usize,
    cols: usize,
    codes: &'a [u8],
    scales: &'a [f32],
}

impl<'a> Int8View<'a> {
    /// Wraps `rows × cols` codes and `rows` scales, checking the lengths.
    pub fn new(
        codes: &'a [u8],
        scales: &'a [f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(INT8_BLOCK)
            || rows.checked_mul(cols) != Some(codes.len())
            || scales.len() != rows
        {
            return Err(KernelError::Shape(format!(
                "a {rows} x {cols} int8 matrix (rows a multiple of {INT8_BLOCK}) needs {} codes and                  {rows} scales, got {} and {}",
                rows.saturating_mul(cols),
                codes.len(),
                scales.len()
            )));
        }
        Ok(Int8View {
            rows,
            cols,
            codes,
            scales,
        })
    }
    /// Output rows (N).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row length (K).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Codes `c + 128` of row `r`.
    pub fn row_codes(&self, r: usize) -> &'a [u8] {
        &self.codes[r * self.cols..(r + 1) * self.cols]
    }
    /// Scale `d_r` of row `r`.
    pub fn row_scale(&self, r: usize) -> f32 {
        self.scales[r]
    }
}

/// Activation rows quantized per [`INT8_BLOCK`] for [`Kernels::int8_matmul`], reusable across
/// calls without reallocating.
#[derive(Clone, Debug, Default)]
pub struct Int8Acts {
    k: usize,
    tokens: usize,
    q: Vec<i8>,
    /// `s_b` per token and block.
    scales: Vec<f32>,
    /// `Σ q` per token and block.
    sums: Vec<i32>,
}

impl Int8Acts {
    /// Quantizes `x` (rows of `k` values; `k` a multiple of [`INT8_BLOCK`]). A block that is
    /// all zero or holds a non-finite value becomes zeros with scale 0.
    pub fn quantize(&mut self, x: &[f32], k: usize) -> Result<(), KernelError> {
        if k == 0 || !k.is_multiple_of(INT8_BLOCK) || !x.len().is_multiple_of(k) {
            return Err(KernelError::Shape(format!(
                "int8 activations need rows of a multiple of {INT8_BLOCK} values, got {} values \
                 in rows of {k}",
                x.len()
            )));
        }
        self.k = k;
        self.tokens = x.len() / k;
        self.q.clear();
        self.q.resize(x.len(), 0);
        self.scales.clear();
        self.sums.clear();
        for (xb, qb) in x
            .chunks_exact(INT8_BLOCK)
            .zip(self.q.chunks_exact_mut(INT8_BLOCK))
        {
            let mut sum = 0i32;
            let s = quantize_absmax(xb, |j, c| {
                sum += c;
                qb[j] = c as i8;
            });
            self.scales.push(s);
            self.sums.push(sum);
        }
        Ok(())
    }

    /// Row length.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Activation rows (tokens).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Quantized values of token `t`.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.q[t * self.k..(t + 1) * self.k]
    }
    /// Block scales `s_b` of token `t`.
    pub fn block_scales(&self, t: usize) -> &[f32] {
        let nb = self.k / INT8_BLOCK;
        &self.scales[t * nb..(t + 1) * nb]
    }
    /// Block sums `Σ q` of token `t`.
    pub fn block_sums(&self, t: usize) -> &[i32] {
        let nb = self.k / INT8_BLOCK;
        &self.sums[t * nb..(t + 1) * nb]
    }
}

/// Scalar twin of the row kernels: `out[t] = Σ_b s_b · Σ_{j ∈ b} c_j · q_j` for every token of
/// `acts` (the row scale `d_r` is applied by the caller). `codes` holds the row's `c + 128`.
pub fn int8_row(codes: &[u8], acts: &Int8Acts, out: &mut [f32]) {
    let k = acts.k();
    for (t, o) in out.iter_mut().enumerate().take(acts.tokens()) {
        let mut acc = 0.0f32;
        for ((cb, qb), &s) in codes[..k]
            .chunks_exact(INT8_BLOCK)
            .zip(acts.row(t).chunks_exact(INT8_BLOCK))
            .zip(acts.block_scales(t))
        {
            let sum: i32 = cb
                .iter()
                .zip(qb)
                .map(|(&c, &q)| (i32::from(c) - 128) * i32::from(q))
                .sum();
            acc += s * sum as f32;
        }
        *o = acc;
    }
}
