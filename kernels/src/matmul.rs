//! Safe matrix products: ternary × int8 activations and float/quantized × f32 activations.
//!
//! Shapes are validated once here (typed errors); the row kernels then run over independent
//! output rows in parallel with rayon. Each output depends only on its own row and the
//! activations, so results are identical for every thread count.
//!
//! Layout: activations are `B × K` row-major (one row per token), outputs `B × N` row-major.

use crate::KernelError;
use crate::act::QuantizedActs;
use crate::dequant::FloatFormat;
use crate::dispatch::Kernels;
use crate::int8::{Int8Acts, Int8View};
use crate::ternary::{MAX_BATCH, TernaryFormat, TernaryMatrix, combine};
use rayon::prelude::*;

/// Below this much work (weight bytes × activation rows) a product runs on the calling thread:
/// rayon's fork/join costs a few microseconds, more than a small matrix takes. From a pool
/// thread (a CPU pass runs each block's ops as one pool job) a fork is a push onto its own
/// deque and the join is often its own; from outside, each product pays a wake-up and a latch,
/// so the bar is higher there (32 KiB from outside made the bundled model's batch-1 decode
/// 2–3× slower).
const PARALLEL_MIN_WORK_IN_POOL: usize = 32 * 1024;

impl Kernels {
    /// The work (weight bytes × activation rows) from which a product called from outside the
    /// rayon pool splits its rows between threads; below it the product runs on the calling
    /// thread. From a pool thread the bar is lower (32 KiB): forking there is cheap.
    pub const PARALLEL_MIN_WORK: usize = 256 * 1024;
}

/// Output pointer shared by row tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: `OutPtr` is only used by `for_row_ranges` tasks, each writing a disjoint set of rows.
unsafe impl Send for OutPtr {}
// SAFETY: as above: no two tasks write the same element, and nothing reads during the product.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The `len` outputs from `start`, to write.
    ///
    /// # Safety
    /// `start + len` must be within the output slice, and no other task may access those
    /// elements while the returned slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    unsafe fn run<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: guaranteed by the caller (bounds and exclusivity).
        unsafe { core::slice::from_raw_parts_mut(self.0.add(start), len) }
    }

    /// # Safety
    /// `idx` must be in bounds of the output slice, and no other task may access element `idx`.
    #[inline(always)]
    unsafe fn write(self, idx: usize, v: f32) {
        // SAFETY: guaranteed by the caller (bounds and exclusivity).
        unsafe { *self.0.add(idx) = v }
    }
}

/// Runs `f(r0, r1)` over `[0, n)` split into row ranges, in parallel when the work is large
/// (never inside [`crate::serial::serial`]).
fn for_row_ranges(n: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads();
    let min_work = if rayon::current_thread_index().is_some() {
        PARALLEL_MIN_WORK_IN_POOL
    } else {
        Kernels::PARALLEL_MIN_WORK
    };
    if threads <= 1 || work < min_work || n < 2 || crate::serial::is_serial() {
        f(0, n);
        return;
    }
    let chunk = n.div_ceil(threads * 4).max(4);
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| f(c * chunk, ((c + 1) * chunk).min(n)));
}

/// A validated, borrowed matrix of non-ternary weights (`rows` outputs × `cols` inputs).
#[derive(Clone, Copy, Debug)]
pub struct FloatMatrix<'a> {
    format: FloatFormat,
    data: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> FloatMatrix<'a> {
    /// Wraps `data` (exactly `rows · row_bytes(cols)` long) without copying.
    pub fn new(
        format: FloatFormat,
        data: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if cols == 0 || !cols.is_multiple_of(format.block_elems()) {
            return Err(KernelError::Shape(format!(
                "{} needs a row length divisible by {}, got {cols}",
                format.name(),
                format.block_elems()
            )));
        }
        let want = rows.checked_mul(format.row_bytes(cols)).ok_or_else(|| {
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
        Ok(FloatMatrix {
            format,
            data,
            rows,
            cols,
        })
    }
    /// Storage format.
    pub fn format(&self) -> FloatFormat {
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
    /// Bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.format.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Rows per block of the per-token path (their weights stay in L1 across token tiles).
const TOK_ROW_BLOCK: usize = 16;
/// Activation bytes of one token tile that fit in L1 beside a block of rows (most x86 and Arm
/// cores have a 32–64 KiB L1 data cache).
const TOK_TILE_BYTES: usize = 32 * 1024;

/// Tokens per tile of the per-token path for row length `k`: 8 (the kernels' largest register
/// tile) when they fit in [`TOK_TILE_BYTES`], else the largest power of two that does (the
/// register tiles are 8, 4, 2 and 1), at least one.
fn tok_tile(k: usize) -> usize {
    let fit = (TOK_TILE_BYTES / k.max(1)).clamp(1, 8);
    1 << fit.ilog2()
}

/// Rows per block of the batched f16 path.
const FLOAT_ROW_BLOCK: usize = 16;

/// Elements dequantized at a time by the float kernels (a multiple of every block size).
const FLOAT_CHUNK: usize = 256;

impl Kernels {
    /// Exact super-block sums of one row (safe wrapper over the ISA kernel, for tests).
    pub fn ternary_row_sums(
        &self,
        format: TernaryFormat,
        w_row: &[u8],
        q: &[i8],
        k: usize,
        n_act: usize,
        sums: &mut [i32],
    ) -> Result<(), KernelError> {
        check_row_args(format, w_row, q, k, n_act)?;
        if sums.len() < n_act * k.div_ceil(256) {
            return Err(KernelError::Shape(format!(
                "row kernel needs {} sums, got {}",
                n_act * k.div_ceil(256),
                sums.len()
            )));
        }
        let f = self.row_fn(format);
        // SAFETY: `self` exists only for an ISA this CPU supports (`Kernels::for_isa`); lengths
        // were checked above and the kernels index their slices with bounds checks.
        unsafe { f(w_row, q, k, n_act, sums) };
        Ok(())
    }

    fn row_fn(&self, format: TernaryFormat) -> crate::dispatch::TernaryRowFn {
        match format {
            TernaryFormat::Tq2_0 => self.tq2_0,
            TernaryFormat::Tq1_0 => self.tq1_0,
            TernaryFormat::I2S => self.i2_s,
        }
    }

    /// `out[t·N + r] = Σ_k W[r, k] · act[t, k]` for a ternary `W` (GEMV when one row of
    /// activations, GEMM otherwise). Exactness (see [`crate::ternary`]): bit-exact across ISAs for
    /// I2_S and for Q8_K activations; TQ formats with per-token activations use the ISA's
    /// float lanes on AVX2/AVX-512 (≤ ε of the scalar twin, bound in the tests).
    ///
    /// ```
    /// use ternmux_kernels::{Kernels, act::{ActQuant, QuantizedActs}, ternary::{TernaryFormat, TernaryMatrix}};
    /// // One TQ2_0 row whose 256 codes are all 2 (weight +1), scale d = 1.0.
    /// let mut row = vec![0b1010_1010u8; 64];
    /// row.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
    /// let w = TernaryMatrix::new(TernaryFormat::Tq2_0, &row, 1, 256).unwrap();
    /// let mut acts = QuantizedActs::new(ActQuant::PerToken);
    /// acts.quantize(&vec![0.5f32; 256], 256).unwrap();
    /// let mut out = [0.0f32];
    /// Kernels::get().ternary_matmul(&w, &acts, &mut out).unwrap();
    /// assert!((out[0] - 128.0).abs() < 1e-3);
    /// ```
    pub fn ternary_matmul(
        &self,
        w: &TernaryMatrix<'_>,
        acts: &QuantizedActs,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let (n, k, b) = (w.rows(), w.cols(), acts.rows());
        if acts.k() != k {
            return Err(KernelError::Shape(format!(
                "activation rows have {} values but the matrix has {k} columns",
                acts.k()
            )));
        }
        check_out(n, b, out.len())?;
        if acts.flavor() == crate::act::ActQuant::PerToken
            && let Some(tok) = self.tok
        {
            self.ternary_matmul_tok(tok, w, acts, out);
            return Ok(());
        }
        let f = self.row_fn(w.format());
        let nsb = w.superblocks();
        let q = acts.q();
        let ptr = OutPtr(out.as_mut_ptr());
        let work = n * w.format().row_bytes(k) * b.max(1);
        for_row_ranges(n, work, |r0, r1| {
            let mut sums = vec![0i32; MAX_BATCH * nsb];
            let mut scales = vec![0f32; nsb];
            for t0 in (0..b).step_by(MAX_BATCH) {
                let nt = MAX_BATCH.min(b - t0);
                let qt = &q[t0 * k..(t0 + nt) * k];
                for r in r0..r1 {
                    let row = w.row(r);
                    // SAFETY: `self` exists only for an ISA this CPU supports; `row` holds one
                    // validated row, `qt` nt·k activations in [-127, 127] (QuantizedActs'
                    // invariant), `sums` nt·nsb slots; the kernels bounds-check their indexing.
                    unsafe { f(row, qt, k, nt, &mut sums) };
                    w.block_scales(row, &mut scales);
                    combine(w, &scales, acts, t0, nt, &sums, |t, v| {
                        // SAFETY: (t0 + t) < b and r < n, so the index is < b·n = out.len();
                        // row r belongs to this task alone.
                        unsafe { ptr.write((t0 + t) * n + r, v) }
                    });
                }
            }
        });
        Ok(())
    }

    /// The per-token fast path: one vector accumulator per activation row, reduced once per row.
    fn ternary_matmul_tok(
        &self,
        tok: [crate::dispatch::TokRowFn; 3],
        w: &TernaryMatrix<'_>,
        acts: &QuantizedActs,
        out: &mut [f32],
    ) {
        let job = TokJob::new(self, tok, w, acts, out);
        for_row_ranges(job.n, job.work(), |r0, r1| job.rows(r0, r1));
    }

    /// Several ternary products of the same activations (a block's q, k and v; its gate and
    /// up): `jobs[i].1 = acts · jobs[i].0ᵀ`, as [`Kernels::ternary_matmul`] gives each, with the
    /// rows of all of them split between threads at once — one fork/join instead of one per
    /// matrix, which at batch 1 on a few cores costs as much as a small matrix.
    pub fn ternary_matmul_many(
        &self,
        jobs: &mut [(&TernaryMatrix<'_>, &mut [f32])],
        acts: &QuantizedActs,
    ) -> Result<(), KernelError> {
        let tok = match self.tok {
            Some(tok) if acts.flavor() == crate::act::ActQuant::PerToken => tok,
            _ => {
                for (w, out) in jobs.iter_mut() {
                    self.ternary_matmul(w, acts, out)?;
                }
                return Ok(());
            }
        };
        let b = acts.rows();
        for (w, out) in jobs.iter() {
            if acts.k() != w.cols() || out.len() != w.rows() * b {
                return Err(KernelError::Shape(format!(
                    "{} activation rows of {} values and {} outputs for a {} x {} matrix",
                    b,
                    acts.k(),
                    out.len(),
                    w.rows(),
                    w.cols()
                )));
            }
        }
        let tasks: Vec<TokJob<'_>> = jobs
            .iter_mut()
            .map(|(w, out)| TokJob::new(self, tok, w, acts, out))
            .collect();
        let total: usize = tasks.iter().map(|t| t.n).sum();
        let work: usize = tasks.iter().map(TokJob::work).sum();
        for_row_ranges(total, work, |g0, g1| {
            let mut first = 0;
            for t in &tasks {
                let (lo, hi) = (g0.max(first), g1.min(first + t.n));
                if lo < hi {
                    t.rows(lo - first, hi - first);
                }
                first += t.n;
            }
        });
        Ok(())
    }

    /// Per-token row products of one row (safe wrapper over the fast kernel, or the scalar
    /// twin where this ISA has none), for tests: see `reference::tok_row`.
    pub fn ternary_row_tok(
        &self,
        format: TernaryFormat,
        w_row: &[u8],
        q: &[i8],
        k: usize,
        n_act: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_row_args(format, w_row, q, k, n_act)?;
        if out.len() < n_act {
            return Err(KernelError::Shape(format!(
                "need {n_act} outputs, got {}",
                out.len()
            )));
        }
        match self.tok {
            Some(tok) => {
                let mut layout = crate::act::TokLayout::default();
                layout.rebuild(&q[..n_act * k], k);
                let view = crate::act::TokActs::new(q, &layout, 0, n_act);
                // SAFETY: as in `ternary_row_sums`: supported ISA, lengths validated above.
                unsafe { tok[format_index(format)](w_row, &view, out) }
            }
            None => crate::reference::tok_row(format, w_row, q, k, n_act, out),
        }
        Ok(())
    }

    /// `Σ f16(w_i) · x_i` for little-endian f16 bytes `w` (reads `min(x.len(), w.len() / 2)`
    /// elements); F16C + FMA where available (≤ ε class), for f16 KV caches.
    pub fn dot_f16(&self, w: &[u8], x: &[f32]) -> f32 {
        match self.dot_f16 {
            // SAFETY: `self` exists only for an ISA this CPU supports; the kernel reads
            // min(x.len(), w.len() / 2) elements, checked by slicing.
            Some(f) => unsafe { f(w, x) },
            None => {
                let mut acc = 0.0f32;
                for (c, &v) in w.chunks_exact(2).zip(x) {
                    acc += crate::blocks::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])) * v;
                }
                acc
            }
        }
    }

    /// `out_i += a · f16(w_i)` for little-endian f16 bytes `w` (`out.len()` elements).
    pub fn axpy_f16(&self, a: f32, w: &[u8], out: &mut [f32]) {
        if let Some(f) = self.axpy_f16
            && w.len() >= 2 * out.len()
        {
            // SAFETY: `self` exists only for an ISA this CPU supports; `w` holds the
            // 2·out.len() bytes the kernel reads (checked above).
            unsafe { f(a, w, out) };
            return;
        }
        let mut buf = [0f32; 64];
        for (o, c) in out.chunks_mut(64).zip(w.chunks(128)) {
            let b = &mut buf[..o.len()];
            // SAFETY: `self` exists only for an ISA this CPU supports; `c` holds 2·b.len() bytes
            // (checked by the converter's slicing).
            unsafe { (self.f16_to_f32)(c, b) };
            for (x, &y) in o.iter_mut().zip(b.iter()) {
                *x += a * y;
            }
        }
    }

    /// Whether this ISA has fast per-token kernels (TQ results then follow its lane order).
    pub fn has_tok_kernels(&self) -> bool {
        self.tok.is_some()
    }

    /// `out[t·N + r] = Σ_k W[r, k] · x[t, k]` for float or quantized (F32, F16, BF16, Q8_0, Q4_0,
    /// Q4_1, Q4_K, Q5_K, Q6_K) `W`, dequantizing 256 weights at a time on the fly; f32 activations.
    ///
    /// Exactness: ≤ ε (the f32 sum order depends on the ISA's lane count).
    pub fn float_matmul(
        &self,
        w: &FloatMatrix<'_>,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let (n, k) = (w.rows(), w.cols());
        if !x.len().is_multiple_of(k) {
            return Err(KernelError::Shape(format!(
                "activation length {} is not a multiple of the matrix's {k} columns",
                x.len()
            )));
        }
        let b = x.len() / k;
        check_out(n, b, out.len())?;
        let fmt = w.format();
        let ptr = OutPtr(out.as_mut_ptr());
        let work = n * fmt.row_bytes(k) * b.max(1);
        if let (FloatFormat::F16, 1, Some(dot_f16)) = (fmt, b, self.dot_f16) {
            // One token: a fused widening dot product reads each weight once, with no buffer.
            for_row_ranges(n, work, |r0, r1| {
                for r in r0..r1 {
                    // SAFETY: `self` exists only for an ISA this CPU supports; the row holds k f16.
                    let v = unsafe { dot_f16(w.row(r), x) };
                    // SAFETY: r < n = out.len() (b = 1); row r is this task's alone.
                    unsafe { ptr.write(r, v) }
                }
            });
            return Ok(());
        }
        if let (FloatFormat::F16, true, Some(rows_f16)) = (fmt, b > 1, self.rows_f16) {
            // A batch: register tiles of rows × tokens straight from the f16 bytes, rows in
            // blocks so a block's weights stay in cache across the token tiles.
            let row_bytes = fmt.row_bytes(k);
            let data = w.data;
            for_row_ranges(n, work, |r0, r1| {
                let mut buf = vec![0.0f32; FLOAT_ROW_BLOCK * b];
                for rb in (r0..r1).step_by(FLOAT_ROW_BLOCK) {
                    let re = (rb + FLOAT_ROW_BLOCK).min(r1);
                    let got = &mut buf[..(re - rb) * b];
                    let block = &data[rb * row_bytes..re * row_bytes];
                    // SAFETY: `self` exists only for an ISA this CPU supports; `block` holds
                    // rows rb..re, `x` b rows of k values (checked above); the kernel slices.
                    unsafe { rows_f16(block, row_bytes, re - rb, x, k, b, got) };
                    for (i, vals) in got.chunks_exact(b).enumerate() {
                        for (t, &v) in vals.iter().enumerate() {
                            // SAFETY: t < b and rb + i < n; rows rb..re are this task's alone.
                            unsafe { ptr.write(t * n + rb + i, v) }
                        }
                    }
                }
            });
            return Ok(());
        }
        for_row_ranges(n, work, |r0, r1| {
            // The row is dequantized once (k floats, in L1/L2) and shared by every token; each
            // token's product is then one dot product over the whole row.
            let mut wrow = vec![0.0f32; k];
            for r in r0..r1 {
                let row = w.row(r);
                for c0 in (0..k).step_by(FLOAT_CHUNK) {
                    let len = FLOAT_CHUNK.min(k - c0);
                    let bytes = &row[fmt.row_bytes(c0)..fmt.row_bytes(c0 + len)];
                    let wbuf = &mut wrow[c0..c0 + len];
                    match fmt {
                        // SAFETY: `self` exists only for an ISA this CPU supports.
                        FloatFormat::F16 => unsafe { (self.f16_to_f32)(bytes, wbuf) },
                        _ => fmt.dequantize(bytes, wbuf),
                    }
                }
                for t in 0..b {
                    // SAFETY: as above; `dot_f32` reads min(k) elements of both slices.
                    let a = unsafe { (self.dot_f32)(&wrow, &x[t * k..(t + 1) * k]) };
                    // SAFETY: t < b and r < n, so the index is < out.len(); row r is this task's.
                    unsafe { ptr.write(t * n + r, a) }
                }
            }
        });
        Ok(())
    }
}

impl Kernels {
    /// `out[t·N + r] = d_r · Σ_b s_b · Σ c_rj · q_tj`: an int8 matrix (a requantized head, see
    /// [`crate::int8::Int8Matrix::view`])
    /// against [`Int8Acts`] (see [`crate::int8`] for the arithmetic), rows in parallel.
    ///
    /// Exactness: each block's integer sum is exact; ≤ ε in f32 after that.
    pub fn int8_matmul(
        &self,
        w: &Int8View<'_>,
        acts: &Int8Acts,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let (n, k, b) = (w.rows(), w.cols(), acts.tokens());
        if acts.k() != k {
            return Err(KernelError::Shape(format!(
                "activations of {} values per row against an int8 matrix of {k} columns",
                acts.k()
            )));
        }
        check_out(n, b, out.len())?;
        let ptr = OutPtr(out.as_mut_ptr());
        let row_fn = self.int8_row;
        for_row_ranges(n, n * k * b.max(1), |r0, r1| {
            let mut vals = vec![0.0f32; b];
            for r in r0..r1 {
                // SAFETY: `self` exists only for an ISA this CPU supports; the row holds k codes
                // and `vals` one value per token (the kernel slices both).
                unsafe { row_fn(w.row_codes(r), acts, &mut vals) };
                let d = w.row_scale(r);
                for (t, &v) in vals.iter().enumerate() {
                    // SAFETY: t < b and r < n, so the index is < out.len(); row r is this task's.
                    unsafe { ptr.write(t * n + r, d * v) }
                }
            }
        });
        Ok(())
    }
}

/// One per-token product, ready to run over any range of its rows.
struct TokJob<'a> {
    f: crate::dispatch::TokRowFn,
    rows_fn: Option<crate::dispatch::TokRowsFn>,
    w: TernaryMatrix<'a>,
    acts: &'a QuantizedActs,
    ptr: OutPtr,
    n: usize,
    tile: usize,
    /// The CPU has AVX-512: the epilogue is compiled for it ([`TokJob::rows_avx512`]). Read on
    /// x86-64 only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    wide: bool,
}

impl<'a> TokJob<'a> {
    /// The job of `w` (validated against `acts` and `out` by the caller).
    fn new(
        kern: &Kernels,
        tok: [crate::dispatch::TokRowFn; 3],
        w: &TernaryMatrix<'a>,
        acts: &'a QuantizedActs,
        out: &mut [f32],
    ) -> TokJob<'a> {
        let fi = format_index(w.format());
        TokJob {
            f: tok[fi],
            rows_fn: kern.tok_rows[fi],
            w: *w,
            acts,
            ptr: OutPtr(out.as_mut_ptr()),
            n: w.rows(),
            tile: tok_tile(w.cols()),
            wide: matches!(
                kern.isa(),
                crate::dispatch::Isa::Avx512 | crate::dispatch::Isa::Avx512Vbmi
            ),
        }
    }

    /// Weight bytes times activation rows (what decides whether to fork).
    fn work(&self) -> usize {
        self.n * self.w.format().row_bytes(self.w.cols()) * self.acts.rows().max(1)
    }

    /// Rows `r0..r1` of the product (this task's alone).
    fn rows(&self, r0: usize, r1: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.wide {
            // SAFETY: `wide` is set only when the CPU runs the AVX-512 kernels, so it has
            // these features.
            unsafe { self.rows_avx512(r0, r1) };
            return;
        }
        self.rows_body(r0, r1)
    }

    /// [`TokJob::rows`] compiled for AVX-512: the epilogue's divisions and copies, one 16-lane
    /// vector at a time instead of four (the same IEEE divisions, so the same bits).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn rows_avx512(&self, r0: usize, r1: usize) {
        self.rows_body(r0, r1)
    }

    /// Rows `rb..re` of `NT` tokens from `t0`, `got[(r − rb)·NT + t]`, to their outputs: a
    /// constant stride, so the compiler untangles the tokens with vector shuffles.
    #[inline(always)]
    fn store_tile<const NT: usize>(
        &self,
        got: &[f32],
        scales: &[f32],
        t0: usize,
        rb: usize,
        re: usize,
    ) {
        let n = self.n;
        let mut dst: [&mut [f32]; NT] = core::array::from_fn(|t| {
            // SAFETY: (t0 + t) < b and re ≤ n, so each run (t0 + t)·n + rb .. re is in bounds
            // of the b·n outputs, the runs of different tokens are disjoint, and rows rb..re
            // are this task's alone.
            unsafe { self.ptr.run((t0 + t) * n + rb, re - rb) }
        });
        let scales: [f32; NT] = core::array::from_fn(|t| scales[t]);
        for (i, vals) in got.chunks_exact(NT).take(re - rb).enumerate() {
            for ((d, &v), &s) in dst.iter_mut().zip(vals).zip(&scales) {
                d[i] = self.finish(v, s);
            }
        }
    }

    /// A row sum `v` of a token quantized with scale `s` as the product's output.
    #[inline(always)]
    fn finish(&self, v: f32, s: f32) -> f32 {
        if self.w.format() == TernaryFormat::I2S {
            // bitnet.cpp's order for I2_S: sumi / s · w_s.
            v / s * self.w.tensor_scale()
        } else {
            v / s
        }
    }

    /// The body of [`TokJob::rows`], inlined into each build.
    #[inline(always)]
    fn rows_body(&self, r0: usize, r1: usize) {
        let (w, acts, n) = (&self.w, self.acts, self.n);
        let (k, b) = (w.cols(), acts.rows());
        let scales = acts.scales();
        let row_bytes = w.format().row_bytes(k);
        let data = w.data();
        let mut buf = [0f32; TOK_ROW_BLOCK * MAX_BATCH];
        // Rows in blocks, tokens in L1-sized tiles: a tile's activations are read from L2
        // once per block of rows instead of once per row (the weights, a quarter of the
        // bytes per element, are the ones read again, from L1).
        for rb in (r0..r1).step_by(TOK_ROW_BLOCK) {
            let re = (rb + TOK_ROW_BLOCK).min(r1);
            for t0 in (0..b).step_by(self.tile) {
                let nt = self.tile.min(b - t0);
                let view = acts.tok_view(t0, nt);
                let got = &mut buf[..(re - rb) * nt];
                match self.rows_fn {
                    // SAFETY: the table exists only for an ISA this CPU supports; the slice
                    // holds rows rb..re of the validated matrix, `view` nt rows of k
                    // activations in [-127, 127] with their layout; kernels bounds-check.
                    Some(g) => unsafe {
                        g(
                            &data[rb * row_bytes..re * row_bytes],
                            row_bytes,
                            re - rb,
                            &view,
                            got,
                        )
                    },
                    None => {
                        for (r, o) in (rb..re).zip(got.chunks_exact_mut(nt)) {
                            // SAFETY: as above, one validated row at a time.
                            unsafe { (self.f)(w.row(r), &view, o) };
                        }
                    }
                }
                // Each token's outputs stored as one contiguous run of rows, divided on the
                // way: one scalar division and one strided store per output cost as much as the
                // kernel at the bundled model's size.
                let own = &scales[t0..t0 + nt];
                match nt {
                    1 => self.store_tile::<1>(got, own, t0, rb, re),
                    2 => self.store_tile::<2>(got, own, t0, rb, re),
                    3 => self.store_tile::<3>(got, own, t0, rb, re),
                    4 => self.store_tile::<4>(got, own, t0, rb, re),
                    5 => self.store_tile::<5>(got, own, t0, rb, re),
                    6 => self.store_tile::<6>(got, own, t0, rb, re),
                    7 => self.store_tile::<7>(got, own, t0, rb, re),
                    _ => {
                        for (t, &s) in own.iter().enumerate() {
                            // SAFETY: (t0 + t) < b and re ≤ n, so the run (t0 + t)·n + rb .. re
                            // is in bounds of the b·n outputs; rows rb..re are this task's alone.
                            let dst = unsafe { self.ptr.run((t0 + t) * n + rb, re - rb) };
                            for (d, &v) in dst.iter_mut().zip(got[t..].iter().step_by(nt)) {
                                *d = self.finish(v, s);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An output of `b` rows of `n` values must be exactly `n · b` long.
fn check_out(n: usize, b: usize, len: usize) -> Result<(), KernelError> {
    if len != n * b {
        return Err(KernelError::Shape(format!(
            "output needs {} values ({b} x {n}), got {len}",
            n * b
        )));
    }
    Ok(())
}

/// Validates one row kernel call: row length and bytes, batch size, activation buffer and range.
fn check_row_args(
    format: TernaryFormat,
    w_row: &[u8],
    q: &[i8],
    k: usize,
    n_act: usize,
) -> Result<(), KernelError> {
    if k == 0
        || !k.is_multiple_of(format.k_multiple())
        || k > crate::ternary::MAX_K
        || w_row.len() < format.row_bytes(k)
    {
        return Err(KernelError::Shape(format!(
            "{} row of {k} weights needs {} bytes, got {}",
            format.name(),
            format.row_bytes(k),
            w_row.len()
        )));
    }
    if n_act > MAX_BATCH || q.len() < n_act * k {
        return Err(KernelError::Shape(format!(
            "row kernel needs n_act <= {MAX_BATCH} and {} activations, got {n_act} rows, {} values",
            n_act * k,
            q.len()
        )));
    }
    if q[..n_act * k].contains(&i8::MIN) {
        return Err(KernelError::Shape(
            "activation value -128 is outside [-127, 127]".into(),
        ));
    }
    Ok(())
}

fn format_index(f: TernaryFormat) -> usize {
    match f {
        TernaryFormat::Tq2_0 => 0,
        TernaryFormat::Tq1_0 => 1,
        TernaryFormat::I2S => 2,
    }
}

/// [`Kernels::ternary_matmul`] with the process-wide kernel choice.
pub fn ternary_matmul(
    w: &TernaryMatrix<'_>,
    acts: &QuantizedActs,
    out: &mut [f32],
) -> Result<(), KernelError> {
    Kernels::get().ternary_matmul(w, acts, out)
}

/// [`Kernels::float_matmul`] with the process-wide kernel choice.
pub fn float_matmul(w: &FloatMatrix<'_>, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    Kernels::get().float_matmul(w, x, out)
}
