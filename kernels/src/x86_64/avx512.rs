//! AVX-512 (F, BW, VL, VNNI) ternary kernels (bit-exact with `reference`).
//!
//! TQ2_0 and I2_S decode a 64-byte super-block with 512-bit registers: the block is duplicated
//! per 256-bit half (`[C0 | C0]`, `[C1 | C1]`) and shifted by a different count per half
//! (`srlv_epi16`), which yields the 2-bit codes of 64 consecutive elements per register. Each
//! register becomes two masks — `pos` (bit 1 set) and `neg` (code 0) — shared by the whole batch.
//! AVX-512 has no `vpsignb`, so an activation vector is applied by selection:
//! `maskz_mov(pos, q)`, then `mask_sub(neg, 0 − q)`; VNNI `dpbusd` with a vector of ones then adds
//! groups of four bytes into i32 lanes (a horizontal add, no weight multiply). The per-token
//! kernels for TQ2_0 and I2_S are in [`super::avx512_tok`] (activations in plane order, codes as
//! the unsigned bytes `w + 1`).
//!
//! TQ1_0's base-3 packing has 48 + 4 byte regions that do not fill a 512-bit register; it uses the
//! AVX2 decoder and 256-bit `sign` + VNNI `dpbusd` (AVX-512 VL), saving the i16 widening step.

use super::avx2::{block_d, decode_tq1_0, drive, hsum_i32, hsum_ps, load32_i8, reduce4, tok_drive};
use crate::act::TokActs;
use core::arch::x86_64::*;

/// Loads 64 bytes (unaligned).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) fn load64(bytes: &[u8]) -> __m512i {
    let bytes = &bytes[..64];
    // SAFETY: `bytes` has exactly 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// Loads 64 activations (unaligned).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) fn load64_i8(q: &[i8]) -> __m512i {
    let q = &q[..64];
    // SAFETY: `q` has exactly 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(q.as_ptr().cast()) }
}

/// Selection masks of 64 weights: `pos` where the code has bit 1 set, `neg` where it is 0.
#[derive(Clone, Copy)]
struct Masks {
    pos: __mmask64,
    neg: __mmask64,
}

/// Codes in bits [1:0] of each byte of `s` (higher bits ignored) → masks.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn masks(s: __m512i) -> Masks {
    Masks {
        pos: _mm512_test_epi8_mask(s, _mm512_set1_epi8(2)),
        neg: _mm512_testn_epi8_mask(s, _mm512_set1_epi8(3)),
    }
}

/// Per-half shift counts for `srlv_epi16`: `lo` in the low 256 bits, `hi` in the high 256 bits.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn counts(lo: i16, hi: i16) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi))
}

/// Decodes 64 bytes laid out as two 32-byte chunks whose planes are selected by `shifts`
/// (four shift counts, one per 32-element plane in element order) into four mask pairs.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn decode_two_chunks(raw: __m512i, shifts: [i16; 4]) -> [Masks; 4] {
    let c0 = _mm512_shuffle_i64x2::<0x44>(raw, raw); // [C0 | C0]
    let c1 = _mm512_shuffle_i64x2::<0xEE>(raw, raw); // [C1 | C1]
    let s01 = counts(shifts[0], shifts[1]);
    let s23 = counts(shifts[2], shifts[3]);
    [
        masks(_mm512_srlv_epi16(c0, s01)),
        masks(_mm512_srlv_epi16(c0, s23)),
        masks(_mm512_srlv_epi16(c1, s01)),
        masks(_mm512_srlv_epi16(c1, s23)),
    ]
}

/// `Σ w·q` over `64·N` elements given as selection masks, as sixteen i32 partial sums.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn block_acc_masks<const N: usize>(m: &[Masks; N], q: &[i8]) -> __m512i {
    let q = &q[..64 * N];
    let ones = _mm512_set1_epi8(1);
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_si512();
    for (j, mj) in m.iter().enumerate() {
        let x = load64_i8(&q[64 * j..]);
        let v = _mm512_mask_sub_epi8(_mm512_maskz_mov_epi8(mj.pos, x), mj.neg, zero, x);
        acc = _mm512_dpbusd_epi32(acc, ones, v);
    }
    acc
}

/// Sum of sixteen i32 lanes.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn hsum512(a: __m512i) -> i32 {
    _mm512_reduce_add_epi32(a)
}

/// Folds a 512-bit accumulator to 256 bits (exact integer adds).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn fold256(a: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a))
}

/// Horizontal sums of four 512-bit accumulators at once.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn reduce4_512(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> [i32; 4] {
    reduce4(fold256(a), fold256(b), fold256(c), fold256(d))
}

/// `Σ w·q` over 256 elements with weights as i8 vectors (256-bit sign + VNNI), as eight i32
/// partial sums.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn block_acc_sign(w: &[__m256i; 8], q: &[i8]) -> __m256i {
    let q = &q[..256];
    let ones = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_si256();
    for (j, &wj) in w.iter().enumerate() {
        let x = load32_i8(&q[32 * j..]);
        acc = _mm256_dpbusd_epi32(acc, ones, _mm256_sign_epi8(x, wj));
    }
    acc
}

/// TQ2_0 super-block sums; same contract as `reference::dot_tq2_0`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_tq2_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    // Chunk c holds plane l of elements 128c + 32l + m at shift 2l.
    drive!(
        k / 256,
        n_act,
        k,
        q,
        sums,
        |b| decode_two_chunks(load64(&w_row[b * 66..]), [0, 2, 4, 6]),
        |m, qq| block_acc_masks(m, qq),
        reduce4_512,
        hsum512
    );
}

/// TQ1_0 super-block sums; same contract as `reference::dot_tq1_0`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_tq1_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    drive!(
        k / 256,
        n_act,
        k,
        q,
        sums,
        |b| decode_tq1_0(&w_row[b * 54..b * 54 + 54]),
        |w, qq| block_acc_sign(w, qq),
        reduce4,
        hsum_i32
    );
}

/// I2_S super-block sums; same contract as `reference::dot_i2_s`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_i2_s(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    let nsb = k.div_ceil(256);
    let full = k / 256;
    // Group g of a 128-element chunk sits at shift 6 − 2g.
    const SHIFTS: [i16; 4] = [6, 4, 2, 0];
    if nsb == full {
        drive!(
            full,
            n_act,
            k,
            q,
            sums,
            |b| decode_two_chunks(load64(&w_row[b * 64..]), SHIFTS),
            |m, qq| block_acc_masks(m, qq),
            reduce4_512,
            hsum512
        );
        return;
    }
    for b in 0..full {
        let m = decode_two_chunks(load64(&w_row[b * 64..]), SHIFTS);
        for t in 0..n_act {
            sums[t * nsb + b] = hsum512(block_acc_masks(&m, &q[t * k + b * 256..]));
        }
    }
    {
        let half = &w_row[full * 64..full * 64 + 32];
        // SAFETY: `half` has exactly 32 readable bytes; loadu has no alignment requirement.
        let c = unsafe { _mm256_loadu_si256(half.as_ptr().cast()) };
        let c = _mm512_broadcast_i64x4(c);
        let m = [
            masks(_mm512_srlv_epi16(c, counts(6, 4))),
            masks(_mm512_srlv_epi16(c, counts(2, 0))),
        ];
        for t in 0..n_act {
            sums[t * nsb + full] = hsum512(block_acc_masks(&m, &q[t * k + full * 256..]));
        }
    }
}

/// f32 dot product with four 16-lane FMA accumulators (≤ ε class).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, accj) in acc.iter_mut().enumerate() {
            let (x, y) = (
                &a[i + 16 * j..i + 16 * j + 16],
                &b[i + 16 * j..i + 16 * j + 16],
            );
            // SAFETY: both slices hold exactly 16 readable f32; loadu has no alignment requirement.
            let (vx, vy) = unsafe { (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(y.as_ptr())) };
            *accj = _mm512_fmadd_ps(vx, vy, *accj);
        }
        i += 64;
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut total = _mm512_reduce_add_ps(s);
    for j in i..n {
        total += a[j] * b[j];
    }
    total
}

/// Per-token TQ1_0 row products (≤ ε class; 256-bit sign + VNNI, 8 float lanes).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL, VNNI, FMA and F16C. Slice lengths are checked.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tok_tq1_0(w_row: &[u8], acts: &TokActs<'_>, out: &mut [f32]) {
    let (q, k, n_act) = (acts.q, acts.k, acts.n_act);
    tok_drive!(
        k / 256,
        n_act,
        k,
        q,
        out,
        _mm256_setzero_ps(),
        |b| (
            decode_tq1_0(&w_row[b * 54..b * 54 + 54]),
            _mm256_set1_ps(block_d(w_row, b * 54 + 52))
        ),
        |w, qq| block_acc_sign(&w.0, qq),
        |a, x, d| _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), d.1, a),
        hsum_ps
    );
}

/// `Σ f16(w_i) · x_i` straight from f16 bytes with 512-bit widening and FMA (≤ ε class).
///
/// # Safety
/// The CPU must support AVX-512 F and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(w.len() / 2);
    let (w, x) = (&w[..2 * n], &x[..n]);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, accj) in acc.iter_mut().enumerate() {
            let hb = &w[2 * (i + 16 * j)..2 * (i + 16 * j) + 32];
            let xs = &x[i + 16 * j..i + 16 * j + 16];
            // SAFETY: `hb` holds 32 readable bytes and `xs` 16 readable f32; loadu has no
            // alignment requirement.
            let (h, vx) = unsafe {
                (
                    _mm256_loadu_si256(hb.as_ptr().cast()),
                    _mm512_loadu_ps(xs.as_ptr()),
                )
            };
            *accj = _mm512_fmadd_ps(_mm512_cvtph_ps(h), vx, *accj);
        }
        i += 64;
    }
    // Short rows (attention heads of 16–48 dimensions, or a 64-tail) stay vectorized: 16 at a
    // time.
    while i + 16 <= n {
        let hb = &w[2 * i..2 * i + 32];
        let xs = &x[i..i + 16];
        // SAFETY: `hb` holds 32 readable bytes and `xs` 16 readable f32; loadu has no alignment
        // requirement.
        let (h, vx) = unsafe {
            (
                _mm256_loadu_si256(hb.as_ptr().cast()),
                _mm512_loadu_ps(xs.as_ptr()),
            )
        };
        acc[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(h), vx, acc[0]);
        i += 16;
    }
    let mut total = _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        total += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
    }
    total
}

/// `Σ_j f16(w[r, j]) · x[t, j]` for `R` rows (`row_bytes` apart in `w`) × `T` tokens (rows of
/// `x`, `k` apart): a register tile of `R·T` FMA accumulators, so each widened weight vector
/// serves `T` tokens and each activation load `R` rows (≤ ε class: 16 lanes, then a tree).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn f16_tile<const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
    k: usize,
) -> [[f32; T]; R] {
    let mut wr: [&[u8]; R] = [&[]; R];
    for (i, r) in wr.iter_mut().enumerate() {
        *r = &w[i * row_bytes..i * row_bytes + 2 * k];
    }
    let mut xr: [&[f32]; T] = [&[]; T];
    for (i, r) in xr.iter_mut().enumerate() {
        *r = &x[i * k..(i + 1) * k];
    }
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let k16 = k / 16 * 16;
    let mut i = 0;
    while i < k16 {
        let mut wv = [_mm512_setzero_ps(); R];
        for (v, r) in wv.iter_mut().zip(&wr) {
            let hb = &r[2 * i..2 * i + 32];
            // SAFETY: `hb` holds 32 readable bytes; loadu has no alignment requirement.
            *v = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(hb.as_ptr().cast()) });
        }
        for (t, xt) in xr.iter().enumerate() {
            let xs = &xt[i..i + 16];
            // SAFETY: `xs` holds 16 readable f32; loadu has no alignment requirement.
            let xv = unsafe { _mm512_loadu_ps(xs.as_ptr()) };
            for (a, &v) in acc.iter_mut().zip(&wv) {
                a[t] = _mm512_fmadd_ps(v, xv, a[t]);
            }
        }
        i += 16;
    }
    let mut out = [[0f32; T]; R];
    for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        for (t, (ot, &at)) in o.iter_mut().zip(a).enumerate() {
            let mut s = _mm512_reduce_add_ps(at);
            for j in k16..k {
                let h = half::f16::from_le_bytes([wr[r][2 * j], wr[r][2 * j + 1]]);
                s += h.to_f32() * xr[t][j];
            }
            *ot = s;
        }
    }
    out
}

/// F16 rows × a batch of f32 activations: `out[r · n_tok + t] = Σ_j f16(w[r, j]) · x[t, j]`
/// for `rows` rows (`row_bytes` apart in `w`) and `n_tok` tokens (rows of `x`, `k` apart), in
/// register tiles of 4 rows × 4, 2 or 1 tokens (≤ ε class).
///
/// # Safety
/// The CPU must support AVX-512 F, FMA and F16C. Slice lengths are checked.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn rows_f16(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[f32],
    k: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let mut r = 0;
    while r < rows {
        let wq = &w[r * row_bytes..];
        let quad = rows - r >= 4;
        let mut t = 0;
        while t < n_tok {
            let xt = &x[t * k..];
            let left = n_tok - t;
            let step = if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            let mut put = |rr: usize, tt: usize, v: f32| out[(r + rr) * n_tok + t + tt] = v;
            match (quad, step) {
                (true, 4) => {
                    for (rr, o) in f16_tile::<4, 4>(wq, row_bytes, xt, k).iter().enumerate() {
                        o.iter().enumerate().for_each(|(tt, &v)| put(rr, tt, v));
                    }
                }
                (true, 2) => {
                    for (rr, o) in f16_tile::<4, 2>(wq, row_bytes, xt, k).iter().enumerate() {
                        o.iter().enumerate().for_each(|(tt, &v)| put(rr, tt, v));
                    }
                }
                (true, _) => {
                    for (rr, o) in f16_tile::<4, 1>(wq, row_bytes, xt, k).iter().enumerate() {
                        put(rr, 0, o[0]);
                    }
                }
                (false, 4) => {
                    let o = f16_tile::<1, 4>(wq, row_bytes, xt, k);
                    o[0].iter().enumerate().for_each(|(tt, &v)| put(0, tt, v));
                }
                (false, 2) => {
                    let o = f16_tile::<1, 2>(wq, row_bytes, xt, k);
                    o[0].iter().enumerate().for_each(|(tt, &v)| put(0, tt, v));
                }
                (false, _) => {
                    let o = f16_tile::<1, 1>(wq, row_bytes, xt, k);
                    put(0, 0, o[0][0]);
                }
            }
            t += step;
        }
        r += if quad { 4 } else { 1 };
    }
}

/// Int8 row × per-block int8 activations (≤ ε class; see [`crate::int8`]): VNNI `dpbusd` of the
/// unsigned codes `c + 128` with `q`, each block's accumulator seeded with `−128 · Σ q` in lane
/// 0, so the block's sixteen i32 lanes add up to the exact `Σ c · q` (every lane stays below
/// 2^24 in magnitude, so its conversion to f32 is exact). Tiles of up to eight tokens share each
/// load of the codes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI. `codes` must hold `acts.k()` bytes and `out`
/// `acts.tokens()` values (checked by slicing).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn int8_row(codes: &[u8], acts: &crate::int8::Int8Acts, out: &mut [f32]) {
    let n = acts.tokens();
    let mut t = 0;
    while t < n {
        t += match n - t {
            1 => int8_tile::<1>(codes, acts, t, out),
            2 => int8_tile::<2>(codes, acts, t, out),
            3 => int8_tile::<3>(codes, acts, t, out),
            4 => int8_tile::<4>(codes, acts, t, out),
            5 => int8_tile::<5>(codes, acts, t, out),
            6 => int8_tile::<6>(codes, acts, t, out),
            7 => int8_tile::<7>(codes, acts, t, out),
            _ => int8_tile::<8>(codes, acts, t, out),
        };
    }
}

/// Tokens `t0 .. t0 + T` of [`int8_row`]; returns `T`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn int8_tile<const T: usize>(
    codes: &[u8],
    acts: &crate::int8::Int8Acts,
    t0: usize,
    out: &mut [f32],
) -> usize {
    use crate::int8::INT8_BLOCK;
    let k = acts.k();
    let codes = &codes[..k];
    let rows: [&[i8]; T] = core::array::from_fn(|i| acts.row(t0 + i));
    let scales: [&[f32]; T] = core::array::from_fn(|i| acts.block_scales(t0 + i));
    let sums: [&[i32]; T] = core::array::from_fn(|i| acts.block_sums(t0 + i));
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..k / INT8_BLOCK {
        let at = b * INT8_BLOCK;
        let w: [__m512i; 4] = core::array::from_fn(|j| load64(&codes[at + 64 * j..]));
        for i in 0..T {
            let q = &rows[i][at..at + INT8_BLOCK];
            let mut d = _mm512_maskz_set1_epi32(1, -128 * sums[i][b]);
            for (j, &wj) in w.iter().enumerate() {
                d = _mm512_dpbusd_epi32(d, wj, load64_i8(&q[64 * j..]));
            }
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(scales[i][b]), acc[i]);
        }
    }
    for (o, a) in out[t0..t0 + T].iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(a);
    }
    T
}
