//! AVX-512 per-token kernels for the 2-bit formats (TQ2_0, I2_S), reading activations in the
//! plane order of [`TokLayout`](crate::act::TokLayout).
//!
//! A 64-byte block is loaded once and shifted right by each plane's bit offset; with the
//! activations pre-arranged per plane, no lane shuffle is needed. Each code becomes the unsigned
//! byte `w + 1` (0, 1, 2; a corrupt 3 reads as 2, i.e. +1, as everywhere) and VNNI `dpbusd`
//! adds `(w + 1)·q` in groups of four into i32 lanes: the weight selects nothing, `q` or `q + q`,
//! it is never a multiplier. The `Σ q` this adds too is not recomputed per row: it was taken once
//! per activation row when the layout was built (`lane_sums`, `row_sums`) and is subtracted.
//!
//! Per 256 weights and token that is four `dpbusd` (plus, shared by the tile of tokens, one load,
//! three shifts and four code conversions); the scale is applied once per row when every block of
//! the row has the same `d` (ternary-trained models: one scale per tensor), else per block in
//! float lanes as llama.cpp does.
//!
//! Two builds of each kernel: with AVX-512 VBMI the code conversion is one `vpermb` table lookup
//! on the low six bits of each byte; without it, `and` + `min`.

use super::avx2::block_d;
use super::avx512::{load64, load64_i8};
use crate::act::TokActs;
use core::arch::x86_64::*;

/// Elements per super-block.
const QK: usize = 256;
/// How far ahead of the block being decoded the weights are prefetched, in bytes.
const PREFETCH: usize = 2048;
/// i32 lanes per 512-bit accumulator (the layout's `lane_sums` per super-block).
const LANES: usize = 16;

/// Loads sixteen i32 lanes (unaligned).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn load16_i32(v: &[i32]) -> __m512i {
    let v = &v[..16];
    // SAFETY: `v` has exactly 16 readable i32; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// The lane sums of a 4 × 4 tile of accumulators (`acc[r][t]`) as one vector, `r`-major:
/// lane `4r + t` holds `Σ acc[r][t]`. Three shuffle levels reduce all sixteen together in 45
/// instructions, against 144 for sixteen separate horizontal sums (nine each, as compiled),
/// which at one block per row (k = 256) outnumber the tile's 64 `dpbusd`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn reduce_4x4(acc: &[[__m512i; 4]; 4]) -> __m512i {
    // Per 128-bit lane of row r: [t0, t1, t2, t3] partial sums.
    let y = acc.map(|a| {
        let pair = |x: __m512i, z: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(x, z), _mm512_unpackhi_epi32(x, z))
        };
        let (x01, x23) = (pair(a[0], a[1]), pair(a[2], a[3]));
        _mm512_add_epi32(
            _mm512_unpacklo_epi64(x01, x23),
            _mm512_unpackhi_epi64(x01, x23),
        )
    });
    // Lanes 0 + 1 and 2 + 3 of two rows, then of the two pairs: lane r of the result is row
    // r's four lanes added.
    let halves = |a: __m512i, b: __m512i| {
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(a, b),
            _mm512_shuffle_i32x4::<0xDD>(a, b),
        )
    };
    halves(halves(y[0], y[1]), halves(y[2], y[3]))
}

/// Low two bits of each byte → `w + 1` with `and` + `min` (AVX-512 BW).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn codes_bw(s: __m512i) -> __m512i {
    _mm512_min_epu8(
        _mm512_and_si512(s, _mm512_set1_epi8(3)),
        _mm512_set1_epi8(2),
    )
}

/// Low two bits of each byte → `w + 1` with one VBMI table lookup: `vpermb` indexes a 64-byte
/// table by the low six bits of each byte, and `table[i] = [0, 1, 2, 2][i & 3]`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
#[inline]
fn codes_vbmi(s: __m512i) -> __m512i {
    // Little-endian bytes 00 01 02 02, repeated.
    _mm512_permutexvar_epi8(s, _mm512_set1_epi32(0x0202_0100))
}

/// A block's `d` is the same for every block of the row: returns it (f16 bits compared).
#[inline]
fn uniform_scale(w_row: &[u8], nb: usize, stride: usize, at: usize) -> Option<u16> {
    let bits = |b: usize| u16::from_le_bytes([w_row[b * stride + at], w_row[b * stride + at + 1]]);
    let first = bits(0);
    (1..nb).all(|b| bits(b) == first).then_some(first)
}

/// Emits one build of the kernels: `$feat` the target features, `$codes` the code conversion.
macro_rules! planes_kernels {
    ($module:ident, $feat:literal, $codes:ident, $doc:literal) => {
        #[doc = $doc]
        pub mod $module {
            use super::*;

            /// Plane `l` of a raw block as `w + 1` bytes (`I2S` picks the bit order).
            #[target_feature(enable = $feat)]
            #[inline]
            fn plane<const I2S: bool>(raw: __m512i, l: usize) -> __m512i {
                let shifted = match (I2S, l) {
                    (false, 0) | (true, 3) => raw,
                    (false, 1) | (true, 2) => _mm512_srli_epi16::<2>(raw),
                    (false, 2) | (true, 1) => _mm512_srli_epi16::<4>(raw),
                    _ => _mm512_srli_epi16::<6>(raw),
                };
                $codes(shifted)
            }

            /// Decodes block `b` of a row (`I2S` picks the plane order and the 64-byte stride).
            #[target_feature(enable = $feat)]
            #[inline]
            fn planes<const I2S: bool>(w_row: &[u8], b: usize) -> [__m512i; 4] {
                let stride = if I2S { 64 } else { 66 };
                // Weights stream from memory once: ask for the bytes PREFETCH ahead (the next
                // rows, past this slice; a prefetch never faults) to keep more misses in flight.
                let ahead = w_row.as_ptr().wrapping_add(b * stride + PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                let raw = load64(&w_row[b * stride..]);
                [0, 1, 2, 3].map(|l| plane::<I2S>(raw, l))
            }

            /// `Σ_b dpbusd(w + 1, q)` over `nb` blocks for `T` tokens (rows of `q512`, `k` apart).
            #[target_feature(enable = $feat)]
            #[inline]
            fn tile_sums<const T: usize, const I2S: bool>(
                w_row: &[u8],
                nb: usize,
                q512: &[i8],
                k: usize,
            ) -> [__m512i; T] {
                let mut rows: [&[i8]; T] = [&[]; T];
                for (i, r) in rows.iter_mut().enumerate() {
                    *r = &q512[i * k..i * k + nb * QK];
                }
                // Independent dependency chains per token (a `dpbusd` has a latency of several
                // cycles): four for one or two tokens, two for four, one for eight.
                let chains = (8 / T).clamp(1, 4);
                let mut acc = [[_mm512_setzero_si512(); 4]; T];
                for b in 0..nb {
                    let c = planes::<I2S>(w_row, b);
                    for (a, row) in acc.iter_mut().zip(&rows) {
                        let qb = &row[b * QK..b * QK + QK];
                        for (l, &cl) in c.iter().enumerate() {
                            let ch = l % chains;
                            a[ch] = _mm512_dpbusd_epi32(a[ch], cl, load64_i8(&qb[64 * l..]));
                        }
                    }
                }
                acc.map(|a| {
                    _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]))
                })
            }

            /// Per-block float accumulation `Σ_b d_b · (dpbusd(w + 1, q) − lane_sums_b)` for
            /// `T` tokens: rows whose blocks have different scales.
            #[target_feature(enable = $feat)]
            #[inline]
            fn tile_scaled<const T: usize>(
                w_row: &[u8],
                nb: usize,
                acts: &TokActs<'_>,
                t0: usize,
            ) -> [__m512; T] {
                let k = acts.k;
                let mut rows: [&[i8]; T] = [&[]; T];
                let mut sums: [&[i32]; T] = [&[]; T];
                for (i, (r, s)) in rows.iter_mut().zip(sums.iter_mut()).enumerate() {
                    let t = t0 + i;
                    *r = &acts.q512[t * k..t * k + nb * QK];
                    *s = &acts.lane_sums[t * nb * LANES..(t + 1) * nb * LANES];
                }
                let mut acc = [_mm512_setzero_ps(); T];
                for b in 0..nb {
                    let c = planes::<false>(w_row, b);
                    let d = _mm512_set1_ps(block_d(w_row, b * 66 + 64));
                    for ((a, row), s) in acc.iter_mut().zip(&rows).zip(&sums) {
                        let qb = &row[b * QK..b * QK + QK];
                        let mut x = _mm512_setzero_si512();
                        for (l, &cl) in c.iter().enumerate() {
                            x = _mm512_dpbusd_epi32(x, cl, load64_i8(&qb[64 * l..]));
                        }
                        x = _mm512_sub_epi32(x, load16_i32(&s[b * LANES..]));
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), d, *a);
                    }
                }
                acc
            }

            /// Exact `Σ w·q` over the full blocks of tokens `t0..t0 + T`, into `out`.
            #[target_feature(enable = $feat)]
            #[inline]
            fn int_rows<const T: usize, const I2S: bool>(
                w_row: &[u8],
                nb: usize,
                acts: &TokActs<'_>,
                t0: usize,
                out: &mut [i32],
            ) {
                let k = acts.k;
                let acc = tile_sums::<T, I2S>(w_row, nb, &acts.q512[t0 * k..], k);
                for (i, a) in acc.iter().enumerate() {
                    out[t0 + i] = _mm512_reduce_add_epi32(*a) - acts.row_sums[t0 + i];
                }
            }

            /// [`int_rows`] over all tokens of `acts`, in tiles of 8, 4, 2 and 1.
            #[target_feature(enable = $feat)]
            #[inline]
            fn int_all<const I2S: bool>(
                w_row: &[u8],
                nb: usize,
                acts: &TokActs<'_>,
                out: &mut [i32],
            ) {
                let mut t0 = 0;
                while t0 < acts.n_act {
                    let left = acts.n_act - t0;
                    let step = if left >= 8 {
                        int_rows::<8, I2S>(w_row, nb, acts, t0, out);
                        8
                    } else if left >= 4 {
                        int_rows::<4, I2S>(w_row, nb, acts, t0, out);
                        4
                    } else if left >= 2 {
                        int_rows::<2, I2S>(w_row, nb, acts, t0, out);
                        2
                    } else {
                        int_rows::<1, I2S>(w_row, nb, acts, t0, out);
                        1
                    };
                    t0 += step;
                }
            }

            /// [`tile_scaled`] for tokens `t0..t0 + T`, reduced into `out`.
            #[target_feature(enable = $feat)]
            #[inline]
            fn scaled_rows<const T: usize>(
                w_row: &[u8],
                nb: usize,
                acts: &TokActs<'_>,
                t0: usize,
                out: &mut [f32],
            ) {
                let acc = tile_scaled::<T>(w_row, nb, acts, t0);
                for (i, a) in acc.iter().enumerate() {
                    out[t0 + i] = _mm512_reduce_add_ps(*a);
                }
            }

            /// `Σ_b dpbusd(w + 1, q)` for `R` weight rows (`row_bytes` apart in `w`) × `T`
            /// tokens (rows of `q512`, `k` apart): a register tile of `R·T` accumulators, so
            /// each activation load serves `R` rows and each decoded plane `T` tokens (one
            /// load per `dpbusd` was the bound of the one-row kernel in batches).
            #[target_feature(enable = $feat)]
            #[inline]
            fn tile2d<const R: usize, const T: usize, const I2S: bool>(
                w: &[u8],
                row_bytes: usize,
                nb: usize,
                q512: &[i8],
                k: usize,
            ) -> [[__m512i; T]; R] {
                let stride = if I2S { 64 } else { 66 };
                let mut wrows: [&[u8]; R] = [&[]; R];
                for (i, wr) in wrows.iter_mut().enumerate() {
                    *wr = &w[i * row_bytes..i * row_bytes + nb * stride];
                }
                let mut qrows: [&[i8]; T] = [&[]; T];
                for (i, qr) in qrows.iter_mut().enumerate() {
                    *qr = &q512[i * k..i * k + nb * QK];
                }
                let mut acc = [[_mm512_setzero_si512(); T]; R];
                for b in 0..nb {
                    let mut raw = [_mm512_setzero_si512(); R];
                    for (v, wr) in raw.iter_mut().zip(&wrows) {
                        let ahead = wr.as_ptr().wrapping_add(b * stride + PREFETCH);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                        *v = load64(&wr[b * stride..]);
                    }
                    for l in 0..4 {
                        let mut c = [_mm512_setzero_si512(); R];
                        for (cv, &rv) in c.iter_mut().zip(&raw) {
                            *cv = plane::<I2S>(rv, l);
                        }
                        for (t, qr) in qrows.iter().enumerate() {
                            let x = load64_i8(&qr[b * QK + 64 * l..]);
                            for (ar, &cv) in acc.iter_mut().zip(&c) {
                                ar[t] = _mm512_dpbusd_epi32(ar[t], cv, x);
                            }
                        }
                    }
                }
                acc
            }

            /// Exact `Σ w·q` of 4 rows × all tokens of `acts` (`out[r·n + t]`), in token tiles
            /// of 4, 2 and 1.
            #[target_feature(enable = $feat)]
            #[inline]
            fn quad_sums<const I2S: bool>(
                w: &[u8],
                row_bytes: usize,
                nb: usize,
                acts: &TokActs<'_>,
                out: &mut [i32],
            ) {
                let (k, n) = (acts.k, acts.n_act);
                let mut t0 = 0;
                while t0 < n {
                    let q = &acts.q512[t0 * k..];
                    let left = n - t0;
                    let step = if left >= 4 {
                        4
                    } else if left >= 2 {
                        2
                    } else {
                        1
                    };
                    let mut put = |r: usize, t: usize, a: __m512i| {
                        out[r * n + t0 + t] = _mm512_reduce_add_epi32(a) - acts.row_sums[t0 + t];
                    };
                    match step {
                        4 => {
                            let acc = tile2d::<4, 4, I2S>(w, row_bytes, nb, q, k);
                            let mut tot = [0i32; 16];
                            // SAFETY: `tot` holds exactly 16 writable i32; storeu has no
                            // alignment requirement.
                            unsafe {
                                _mm512_storeu_si512(tot.as_mut_ptr().cast(), reduce_4x4(&acc))
                            };
                            let own = &acts.row_sums[t0..t0 + 4];
                            for (r, four) in tot.chunks_exact(4).enumerate() {
                                let dst = &mut out[r * n + t0..r * n + t0 + 4];
                                for ((o, &v), &s) in dst.iter_mut().zip(four).zip(own) {
                                    *o = v - s;
                                }
                            }
                        }
                        2 => {
                            let acc = tile2d::<4, 2, I2S>(w, row_bytes, nb, q, k);
                            for (r, ar) in acc.iter().enumerate() {
                                for (t, &a) in ar.iter().enumerate() {
                                    put(r, t, a);
                                }
                            }
                        }
                        _ => {
                            let acc = tile2d::<4, 1, I2S>(w, row_bytes, nb, q, k);
                            for (r, ar) in acc.iter().enumerate() {
                                put(r, 0, ar[0]);
                            }
                        }
                    }
                    t0 += step;
                }
            }

            /// Per-token products of `rows` consecutive TQ2_0 rows (`row_bytes` apart in `w`)
            /// for every token of `acts`, into `out[r·n_act + t]`; the same values as
            /// [`tok_tq2_0`] row by row. Four rows whose block scales agree (each row with
            /// itself) go through the register tile; others, and a batch of one, row by row.
            ///
            /// # Safety
            /// The CPU must support the features of this build. Slice lengths are checked.
            #[target_feature(enable = $feat)]
            pub unsafe fn tok_rows_tq2_0(
                w: &[u8],
                row_bytes: usize,
                rows: usize,
                acts: &TokActs<'_>,
                out: &mut [f32],
            ) {
                let (nb, n) = (acts.k / QK, acts.n_act);
                let mut sums = [0i32; 4 * crate::ternary::MAX_BATCH];
                let mut r = 0;
                while r < rows {
                    let quad = &w[r * row_bytes..];
                    // The quad's scales, or the number of rows to take one by one: up to and
                    // including the first whose block scales differ.
                    let mut scales = Err(1);
                    if n >= 2 && nb > 0 && rows - r >= 4 {
                        let mut d = [0u16; 4];
                        let mut differing = None;
                        for (i, di) in d.iter_mut().enumerate() {
                            match uniform_scale(&quad[i * row_bytes..], nb, 66, 64) {
                                Some(bits) => *di = bits,
                                None => {
                                    differing = Some(i);
                                    break;
                                }
                            }
                        }
                        scales = differing.map_or(Ok(d), |i| Err(i + 1));
                    }
                    match scales {
                        Ok(d) => {
                            quad_sums::<false>(quad, row_bytes, nb, acts, &mut sums);
                            for (i, &bits) in d.iter().enumerate() {
                                let di = block_d(&bits.to_le_bytes(), 0);
                                let dst = &mut out[(r + i) * n..(r + i + 1) * n];
                                for (o, &v) in dst.iter_mut().zip(&sums[i * n..(i + 1) * n]) {
                                    *o = v as f32 * di;
                                }
                            }
                            r += 4;
                        }
                        Err(one_by_one) => {
                            for i in r..r + one_by_one {
                                // SAFETY: same features; the slice starts at row i.
                                unsafe {
                                    tok_tq2_0(
                                        &w[i * row_bytes..],
                                        acts,
                                        &mut out[i * n..(i + 1) * n],
                                    )
                                };
                            }
                            r += one_by_one;
                        }
                    }
                }
            }

            /// Per-token I2_S totals of `rows` consecutive rows (`row_bytes` apart in `w`), into
            /// `out[r·n_act + t]`; the same values as [`tok_i2_s`] row by row (exact).
            ///
            /// # Safety
            /// The CPU must support the features of this build. Slice lengths are checked.
            #[target_feature(enable = $feat)]
            pub unsafe fn tok_rows_i2_s(
                w: &[u8],
                row_bytes: usize,
                rows: usize,
                acts: &TokActs<'_>,
                out: &mut [f32],
            ) {
                let (k, n) = (acts.k, acts.n_act);
                let full = k / QK;
                let mut sums = [0i32; 4 * crate::ternary::MAX_BATCH];
                let mut r = 0;
                while r < rows {
                    let quad = &w[r * row_bytes..];
                    if n >= 2 && full > 0 && k.is_multiple_of(QK) && rows - r >= 4 {
                        quad_sums::<true>(quad, row_bytes, full, acts, &mut sums);
                        for (o, &s) in out[r * n..(r + 4) * n].iter_mut().zip(&sums) {
                            *o = s as f32;
                        }
                        r += 4;
                    } else {
                        // SAFETY: same features; `quad` starts at row r.
                        unsafe { tok_i2_s(quad, acts, &mut out[r * n..(r + 1) * n]) };
                        r += 1;
                    }
                }
            }

            /// Per-token TQ2_0 row products (≤ ε class: one scaling of an exact integer sum
            /// when the row's block scales agree, else 16 float lanes of `sumi · d_b`).
            ///
            /// # Safety
            /// The CPU must support the features of this build. Slice lengths are checked.
            #[target_feature(enable = $feat)]
            pub unsafe fn tok_tq2_0(w_row: &[u8], acts: &TokActs<'_>, out: &mut [f32]) {
                let (nb, n) = (acts.k / QK, acts.n_act);
                if nb == 0 {
                    out[..n].fill(0.0);
                    return;
                }
                if let Some(bits) = uniform_scale(w_row, nb, 66, 64) {
                    let d = block_d(&bits.to_le_bytes(), 0);
                    let mut sums = [0i32; crate::ternary::MAX_BATCH];
                    int_all::<false>(w_row, nb, acts, &mut sums);
                    for (o, &s) in out[..n].iter_mut().zip(&sums) {
                        *o = s as f32 * d;
                    }
                    return;
                }
                let mut t0 = 0;
                while t0 < n {
                    let left = n - t0;
                    t0 += if left >= 8 {
                        scaled_rows::<8>(w_row, nb, acts, t0, out);
                        8
                    } else if left >= 4 {
                        scaled_rows::<4>(w_row, nb, acts, t0, out);
                        4
                    } else if left >= 2 {
                        scaled_rows::<2>(w_row, nb, acts, t0, out);
                        2
                    } else {
                        scaled_rows::<1>(w_row, nb, acts, t0, out);
                        1
                    };
                }
            }

            /// Per-token I2_S row totals `Σ w·q` (exact integers: bit-exact with the twin).
            ///
            /// # Safety
            /// The CPU must support the features of this build. Slice lengths are checked.
            #[target_feature(enable = $feat)]
            pub unsafe fn tok_i2_s(w_row: &[u8], acts: &TokActs<'_>, out: &mut [f32]) {
                let (k, n) = (acts.k, acts.n_act);
                let full = k / QK;
                let mut sums = [0i32; crate::ternary::MAX_BATCH];
                if full > 0 {
                    int_all::<true>(w_row, full, acts, &mut sums);
                }
                if !k.is_multiple_of(QK) {
                    // The trailing 128-element half: one 32-byte chunk, natural activation order.
                    let half = &w_row[full * 64..full * 64 + 32];
                    // SAFETY: `half` has exactly 32 readable bytes; loadu has no alignment
                    // requirement.
                    let c = unsafe { _mm256_loadu_si256(half.as_ptr().cast()) };
                    // [C | C] shifted by (6, 4) and (2, 0) per half: planes 0‥3 in element order.
                    let c = _mm512_broadcast_i64x4(c);
                    let count = |lo: i16, hi: i16| {
                        _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi))
                    };
                    let p = [
                        $codes(_mm512_srlv_epi16(c, count(6, 4))),
                        $codes(_mm512_srlv_epi16(c, count(2, 0))),
                    ];
                    let ones = _mm512_set1_epi8(1);
                    for (t, s) in sums[..n].iter_mut().enumerate() {
                        let q = &acts.q[t * k + full * QK..t * k + k];
                        let mut x = _mm512_setzero_si512();
                        for (l, &pl) in p.iter().enumerate() {
                            let v = load64_i8(&q[64 * l..]);
                            x = _mm512_dpbusd_epi32(x, pl, v);
                            x = _mm512_sub_epi32(
                                x,
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v),
                            );
                        }
                        *s += _mm512_reduce_add_epi32(x);
                    }
                }
                for (o, &s) in out[..n].iter_mut().zip(&sums) {
                    *o = s as f32;
                }
            }
        }
    };
}

planes_kernels!(
    bw,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    codes_bw,
    "Kernels for AVX-512 F/BW/VL/VNNI (codes by `and` + `min`)."
);
planes_kernels!(
    vbmi,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi",
    codes_vbmi,
    "Kernels for AVX-512 with VBMI (codes by one `vpermb`)."
);
