//! AVX2 ternary kernels (bit-exact with `reference`: integer arithmetic only).
//!
//! Per 256-element super-block, the packed weights are decoded once into eight vectors of 32 `i8`
//! in {−1, 0, +1}, in natural element order, shared by every activation row of the batch:
//! * TQ2_0: `((byte >> 2l) & 3) − 1` (bytes `32c..32c+32`, plane l → elements `128c + 32l ..`).
//! * TQ1_0: trit n of a byte is `q = b·3^n mod 256` (built by byte adds, `q + q + q`), then
//!   `t = (3q) >> 8` is 0, 1 or 2 as `q < 86`, `86 ≤ q < 171`, `q ≥ 171` — two compares.
//! * I2_S: `((byte >> (6 − 2g)) & 3) − 1`, group 0 in the high bits.
//!
//! Weights then act on the int8 activations through `sign_epi8` (select: keep, negate or zero) —
//! multiplication-free. The horizontal add uses `maddubs` with a vector of ones (an add of byte
//! pairs, measured faster than unpack-and-add), accumulating at most 16 products of |q| ≤ 127 per
//! i16 lane (≤ 2 032), then `madd` with ones widens to i32: no saturation is possible.

use crate::act::TokActs;
use core::arch::x86_64::*;

/// Loads 32 bytes (unaligned).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn load32(bytes: &[u8]) -> __m256i {
    let bytes = &bytes[..32];
    // SAFETY: `bytes` has exactly 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

/// Loads 32 activations (unaligned).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn load32_i8(q: &[i8]) -> __m256i {
    let q = &q[..32];
    // SAFETY: `q` has exactly 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(q.as_ptr().cast()) }
}

/// Loads 16 bytes (unaligned).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn load16(bytes: &[u8]) -> __m128i {
    let bytes = &bytes[..16];
    // SAFETY: `bytes` has exactly 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

/// Sum of the eight i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// 2-bit codes in the low bits of each byte (other bits ignored) → weights {−1, 0, +1}.
#[target_feature(enable = "avx2")]
#[inline]
fn codes_to_w(v: __m256i) -> __m256i {
    _mm256_sub_epi8(
        _mm256_and_si256(v, _mm256_set1_epi8(3)),
        _mm256_set1_epi8(1),
    )
}

/// `3·x mod 256` per byte, by two adds.
#[target_feature(enable = "avx2")]
#[inline]
fn times3(x: __m256i) -> __m256i {
    _mm256_add_epi8(_mm256_add_epi8(x, x), x)
}

/// `3·x mod 256` per byte, 128-bit.
#[target_feature(enable = "avx2")]
#[inline]
fn times3_128(x: __m128i) -> __m128i {
    _mm_add_epi8(_mm_add_epi8(x, x), x)
}

/// A TQ1_0 fixed-point byte `q` → weight `(3q >> 8) − 1` by two unsigned threshold compares.
#[target_feature(enable = "avx2")]
#[inline]
fn trit_to_w(q: __m256i) -> __m256i {
    let s = _mm256_xor_si256(q, _mm256_set1_epi8(-128)); // unsigned order as signed: q − 128
    let ge86 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8((86i32 - 128 - 1) as i8));
    let ge171 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8((171i32 - 128 - 1) as i8));
    // −1 − (−1 if q ≥ 86) − (−1 if q ≥ 171)
    _mm256_sub_epi8(_mm256_sub_epi8(_mm256_set1_epi8(-1), ge86), ge171)
}

/// Decodes one 66-byte TQ2_0 block to 256 weights in element order.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn decode_tq2_0(blk: &[u8]) -> [__m256i; 8] {
    let c0 = load32(&blk[0..32]);
    let c1 = load32(&blk[32..64]);
    [
        codes_to_w(c0),
        codes_to_w(_mm256_srli_epi16::<2>(c0)),
        codes_to_w(_mm256_srli_epi16::<4>(c0)),
        codes_to_w(_mm256_srli_epi16::<6>(c0)),
        codes_to_w(c1),
        codes_to_w(_mm256_srli_epi16::<2>(c1)),
        codes_to_w(_mm256_srli_epi16::<4>(c1)),
        codes_to_w(_mm256_srli_epi16::<6>(c1)),
    ]
}

/// Decodes one 54-byte TQ1_0 block to 256 weights in element order.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn decode_tq1_0(blk: &[u8]) -> [__m256i; 8] {
    // qs[0..32): trit n of byte m is element 32n + m.
    let a0 = load32(&blk[0..32]);
    let a1 = times3(a0);
    let a2 = times3(a1);
    let a3 = times3(a2);
    let a4 = times3(a3);
    // qs[32..48): trit n of byte m is element 160 + 16n + m; pair planes (n, n+1) in one vector.
    let v = load16(&blk[32..48]);
    let z0 = _mm256_set_m128i(times3_128(v), v); // planes 0 | 1: elements 160..192
    let z1 = times3(times3(z0)); // planes 2 | 3: 192..224
    let z2 = times3(times3(z1)); // plane 4 (low half): 224..240
    // qh[0..4): trit n of byte j is element 240 + 4n + j: lanes 4n..4n+4 hold qh·3^n.
    let h = _mm_set1_epi32(i32::from_le_bytes([blk[48], blk[49], blk[50], blk[51]]));
    let h3 = times3_128(h);
    let h9 = times3_128(h3);
    let h27 = times3_128(h9);
    let hq = _mm_blend_epi32::<0b1000>(
        _mm_blend_epi32::<0b0100>(_mm_blend_epi32::<0b0010>(h, h3), h9),
        h27,
    );
    let z2 = _mm256_inserti128_si256::<1>(z2, hq); // 224..240 | 240..256
    [
        trit_to_w(a0),
        trit_to_w(a1),
        trit_to_w(a2),
        trit_to_w(a3),
        trit_to_w(a4),
        trit_to_w(z0),
        trit_to_w(z1),
        trit_to_w(z2),
    ]
}

/// Decodes 32 bytes of I2_S (one 128-element group) to 128 weights in element order.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn decode_i2_s_group(bytes: &[u8]) -> [__m256i; 4] {
    let c = load32(bytes);
    [
        codes_to_w(_mm256_srli_epi16::<6>(c)),
        codes_to_w(_mm256_srli_epi16::<4>(c)),
        codes_to_w(_mm256_srli_epi16::<2>(c)),
        codes_to_w(c),
    ]
}

/// `Σ w·q` over `32·N` elements as eight i32 partial sums (exact): sign-select, then
/// ones-maddubs horizontal adds, widened once with ones-madd.
#[target_feature(enable = "avx2")]
#[inline]
fn block_acc<const N: usize>(w: &[__m256i; N], q: &[i8]) -> __m256i {
    let q = &q[..32 * N];
    let ones8 = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_si256();
    for (j, &wj) in w.iter().enumerate() {
        let x = load32_i8(&q[32 * j..]);
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(ones8, _mm256_sign_epi8(x, wj)));
    }
    _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
}

/// Horizontal sums of four i32x8 vectors at once (a transposing hadd tree: 5 instructions for
/// four sums instead of ~6 each).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn reduce4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [i32; 4] {
    let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(abcd),
        _mm256_extracti128_si256::<1>(abcd),
    );
    let mut out = [0i32; 4];
    // SAFETY: `out` is 16 writable bytes; storeu has no alignment requirement.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), s) };
    out
}

/// The loop shared by every row kernel: per super-block `decode`, then exact sums for each
/// activation row, reduced four at a time — across four activation rows (batches), or across
/// four consecutive super-blocks (a single row). `$acc` yields an unreduced vector, `$reduce4`
/// and `$reduce1` turn those into i32 sums.
macro_rules! drive {
    ($nsb:expr, $n_act:expr, $k:expr, $q:expr, $sums:expr,
     |$b:ident| $decode:expr, |$w:ident, $qq:ident| $acc:expr, $reduce4:path, $reduce1:path) => {{
        let (nsb, n_act, k, q, sums): (usize, usize, usize, &[i8], &mut [i32]) =
            ($nsb, $n_act, $k, $q, $sums);
        // Sums of activation row t live at sums[t * nsb + b] (the callers' super-block count).
        let stride = nsb;
        if n_act == 1 {
            let mut b0 = 0;
            while b0 + 4 <= nsb {
                let mut v = [None; 4];
                for (i, vi) in v.iter_mut().enumerate() {
                    let $b = b0 + i;
                    let decoded = $decode;
                    let $w = &decoded;
                    let $qq = &q[(b0 + i) * 256..];
                    *vi = Some($acc);
                }
                let r = match v {
                    [Some(a), Some(b), Some(c), Some(d)] => $reduce4(a, b, c, d),
                    _ => [0; 4],
                };
                sums[b0..b0 + 4].copy_from_slice(&r);
                b0 += 4;
            }
            for bb in b0..nsb {
                let $b = bb;
                let decoded = $decode;
                let $w = &decoded;
                let $qq = &q[bb * 256..];
                sums[bb] = $reduce1($acc);
            }
        } else {
            for bb in 0..nsb {
                let $b = bb;
                let decoded = $decode;
                let mut t = 0;
                while t + 4 <= n_act {
                    let acc_t = |t: usize| {
                        let $qq = &q[t * k + bb * 256..];
                        let $w = &decoded;
                        $acc
                    };
                    let r = $reduce4(acc_t(t), acc_t(t + 1), acc_t(t + 2), acc_t(t + 3));
                    for (i, ri) in r.iter().enumerate() {
                        sums[(t + i) * stride + bb] = *ri;
                    }
                    t += 4;
                }
                for tt in t..n_act {
                    let $qq = &q[tt * k + bb * 256..];
                    let $w = &decoded;
                    sums[tt * stride + bb] = $reduce1($acc);
                }
            }
        }
    }};
}
pub(crate) use drive;

/// TQ2_0 super-block sums; same contract as `reference::dot_tq2_0`.
///
/// # Safety
/// The CPU must support AVX2. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_tq2_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    drive!(
        k / 256,
        n_act,
        k,
        q,
        sums,
        |b| decode_tq2_0(&w_row[b * 66..b * 66 + 66]),
        |w, qq| block_acc(w, qq),
        reduce4,
        hsum_i32
    );
}

/// TQ1_0 super-block sums; same contract as `reference::dot_tq1_0`.
///
/// # Safety
/// The CPU must support AVX2. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_tq1_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    drive!(
        k / 256,
        n_act,
        k,
        q,
        sums,
        |b| decode_tq1_0(&w_row[b * 54..b * 54 + 54]),
        |w, qq| block_acc(w, qq),
        reduce4,
        hsum_i32
    );
}

/// I2_S super-block sums; same contract as `reference::dot_i2_s`.
///
/// # Safety
/// The CPU must support AVX2. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2")]
pub unsafe fn dot_i2_s(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    let nsb = k.div_ceil(256);
    let full = k / 256;
    let decode = |b: usize| {
        let lo = decode_i2_s_group(&w_row[b * 64..]);
        let hi = decode_i2_s_group(&w_row[b * 64 + 32..]);
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    };
    if nsb == full {
        drive!(
            full,
            n_act,
            k,
            q,
            sums,
            |b| decode(b),
            |w, qq| block_acc(w, qq),
            reduce4,
            hsum_i32
        );
    } else {
        for b in 0..full {
            let w = decode(b);
            for t in 0..n_act {
                sums[t * nsb + b] = hsum_i32(block_acc(&w, &q[t * k + b * 256..]));
            }
        }
        let w = decode_i2_s_group(&w_row[full * 64..]);
        for t in 0..n_act {
            sums[t * nsb + full] = hsum_i32(block_acc(&w, &q[t * k + full * 256..]));
        }
    }
}

/// f32 dot product with four FMA accumulators (≤ ε class: lane order differs from the twin).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, accj) in acc.iter_mut().enumerate() {
            let (x, y) = (&a[i + 8 * j..i + 8 * j + 8], &b[i + 8 * j..i + 8 * j + 8]);
            // SAFETY: both slices hold exactly 8 readable f32; loadu has no alignment requirement.
            let (vx, vy) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())) };
            *accj = _mm256_fmadd_ps(vx, vy, *accj);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    let mut total = _mm_cvtss_f32(s);
    for j in i..n {
        total += a[j] * b[j];
    }
    total
}

/// Converts `out.len()` little-endian f16 values from `bytes` with F16C.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_to_f32(bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    let bytes = &bytes[..2 * n];
    let mut i = 0;
    while i + 8 <= n {
        let h = load16(&bytes[2 * i..]);
        let dst = &mut out[i..i + 8];
        // SAFETY: `dst` holds exactly 8 writable f32; storeu has no alignment requirement.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_cvtph_ps(h)) };
        i += 8;
    }
    for j in i..n {
        out[j] = half::f16::from_le_bytes([bytes[2 * j], bytes[2 * j + 1]]).to_f32();
    }
}

/// `out_i += a · f16(w_i)` for `out.len()` elements of little-endian f16 bytes `w`, 8 at a time
/// with F16C: a multiply, then an add (no FMA), so each element rounds exactly as the scalar
/// `*o += a * f16(w)` does.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f16(a: f32, w: &[u8], out: &mut [f32]) {
    let n = out.len().min(w.len() / 2);
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let h = load16(&w[2 * i..]);
        let o = &mut out[i..i + 8];
        // SAFETY: `o` holds exactly 8 readable and writable f32; loadu/storeu have no alignment
        // requirement.
        unsafe {
            let v = _mm256_add_ps(
                _mm256_loadu_ps(o.as_ptr()),
                _mm256_mul_ps(va, _mm256_cvtph_ps(h)),
            );
            _mm256_storeu_ps(o.as_mut_ptr(), v);
        }
        i += 8;
    }
    for j in i..n {
        out[j] += a * half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32();
    }
}

/// The per-token row loop: activation rows in tiles of 8, each with a vector accumulator that
/// lives across super-blocks (`$update` folds one super-block's unreduced integer vector into it)
/// and is reduced once per row (`$finish`). Weights are decoded once per tile.
macro_rules! tok_drive {
    ($nb:expr, $n_act:expr, $k:expr, $q:expr, $out:expr, $zero:expr,
     |$b:ident| $decode:expr, |$w:ident, $qq:ident| $acc:expr,
     |$a:ident, $x:ident, $bi:ident| $update:expr, $finish:path) => {{
        // `$bi` is bound to the decoded super-block (for its scale).
        let (nb, n_act, k, q, out): (usize, usize, usize, &[i8], &mut [f32]) =
            ($nb, $n_act, $k, $q, $out);
        let mut t0 = 0;
        while t0 < n_act {
            let nt = (n_act - t0).min(8);
            let mut accs = [$zero; 8];
            for bb in 0..nb {
                let $b = bb;
                let decoded = $decode;
                for (i, slot) in accs.iter_mut().enumerate().take(nt) {
                    let $qq = &q[(t0 + i) * k + bb * 256..];
                    let $w = &decoded;
                    let $x = $acc;
                    let $a = *slot;
                    let $bi = &decoded;
                    *slot = $update;
                }
            }
            for (i, slot) in accs.iter().enumerate().take(nt) {
                out[t0 + i] = $finish(*slot);
            }
            t0 += nt;
        }
    }};
}
pub(crate) use tok_drive;

/// A TQ block's f16 scale, widened with F16C.
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) fn block_d(w_row: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([w_row[at], w_row[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16)))
}

/// Sum of eight f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// Integer lanes of a row total as f32 (exact: |Σ| ≤ 127 · 65 536 < 2^24).
#[target_feature(enable = "avx2")]
#[inline]
fn hsum_i32_f32(v: __m256i) -> f32 {
    hsum_i32(v) as f32
}

/// Per-token TQ2_0 row products (≤ ε class: 8 float lanes accumulate `sumi · d_b`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tok_tq2_0(w_row: &[u8], acts: &TokActs<'_>, out: &mut [f32]) {
    let (q, k, n_act) = (acts.q, acts.k, acts.n_act);
    tok_drive!(
        k / 256,
        n_act,
        k,
        q,
        out,
        _mm256_setzero_ps(),
        |b| (
            decode_tq2_0(&w_row[b * 66..b * 66 + 66]),
            _mm256_set1_ps(block_d(w_row, b * 66 + 64))
        ),
        |w, qq| block_acc(&w.0, qq),
        |a, x, d| _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), d.1, a),
        hsum_ps
    );
}

/// Per-token TQ1_0 row products (≤ ε class).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,fma,f16c")]
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
        |w, qq| block_acc(&w.0, qq),
        |a, x, d| _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), d.1, a),
        hsum_ps
    );
}

/// Per-token I2_S row totals `Σ w·q` (exact integers: bit-exact with the twin).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Slice lengths are checked by indexing.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tok_i2_s(w_row: &[u8], acts: &TokActs<'_>, out: &mut [f32]) {
    let (q, k, n_act) = (acts.q, acts.k, acts.n_act);
    let full = k / 256;
    let decode = |b: usize| {
        let lo = decode_i2_s_group(&w_row[b * 64..]);
        let hi = decode_i2_s_group(&w_row[b * 64 + 32..]);
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    };
    tok_drive!(
        full,
        n_act,
        k,
        q,
        out,
        _mm256_setzero_si256(),
        |b| decode(b),
        |w, qq| block_acc(w, qq),
        |a, x, _b| _mm256_add_epi32(a, x),
        hsum_i32_f32
    );
    if !k.is_multiple_of(256) {
        let w = decode_i2_s_group(&w_row[full * 64..]);
        for (t, o) in out.iter_mut().enumerate().take(n_act) {
            *o += hsum_i32(block_acc(&w, &q[t * k + full * 256..])) as f32;
        }
    }
}

/// `Σ f16(w_i) · x_i` straight from f16 bytes: F16C widening fused with FMA, four accumulators
/// (≤ ε class). Used for single-token products with F16 heads, where converting into a buffer
/// first would cost a second pass.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len().min(w.len() / 2);
    let (w, x) = (&w[..2 * n], &x[..n]);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, accj) in acc.iter_mut().enumerate() {
            let h = load16(&w[2 * (i + 8 * j)..]);
            let xs = &x[i + 8 * j..i + 8 * j + 8];
            // SAFETY: `xs` holds exactly 8 readable f32; loadu has no alignment requirement.
            let vx = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
            *accj = _mm256_fmadd_ps(_mm256_cvtph_ps(h), vx, *accj);
        }
        i += 32;
    }
    // Short rows (attention heads of 8–24 dimensions, or a 32-tail) stay vectorized: 8 at a time.
    while i + 8 <= n {
        let h = load16(&w[2 * i..]);
        let xs = &x[i..i + 8];
        // SAFETY: `xs` holds exactly 8 readable f32; loadu has no alignment requirement.
        let vx = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
        acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(h), vx, acc[0]);
        i += 8;
    }
    let mut total = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        total += half::f16::from_le_bytes([w[2 * j], w[2 * j + 1]]).to_f32() * x[j];
    }
    total
}

/// Int8 row × per-block int8 activations (≤ ε class; see [`crate::int8`]): the codes `c + 128`
/// become signed bytes again (`xor 0x80`), and `maddubs(|c|, sign(q, c))` then `madd` with ones
/// sum each block exactly in i32 lanes (`|c · q| ≤ 127²`: no i16 saturation). Tiles of up to four
/// tokens share each load of the codes.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `codes` must hold `acts.k()` bytes and `out`
/// `acts.tokens()` values (checked by slicing).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn int8_row(codes: &[u8], acts: &crate::int8::Int8Acts, out: &mut [f32]) {
    let n = acts.tokens();
    let mut t = 0;
    while t < n {
        t += match n - t {
            1 => int8_tile::<1>(codes, acts, t, out),
            2 => int8_tile::<2>(codes, acts, t, out),
            3 => int8_tile::<3>(codes, acts, t, out),
            _ => int8_tile::<4>(codes, acts, t, out),
        };
    }
}

/// Tokens `t0 .. t0 + T` of [`int8_row`]; returns `T`.
#[target_feature(enable = "avx2,fma")]
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
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..k / INT8_BLOCK {
        let mut sums = [_mm256_setzero_si256(); T];
        for j in (b * INT8_BLOCK..(b + 1) * INT8_BLOCK).step_by(32) {
            let w = _mm256_xor_si256(load32(&codes[j..]), flip);
            let aw = _mm256_abs_epi8(w);
            for (s, row) in sums.iter_mut().zip(&rows) {
                let sq = _mm256_sign_epi8(load32_i8(&row[j..]), w);
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sq), ones));
            }
        }
        for ((a, s), sc) in acc.iter_mut().zip(sums).zip(&scales) {
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(sc[b]), *a);
        }
    }
    for (o, a) in out[t0..t0 + T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
    T
}
