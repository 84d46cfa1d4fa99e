//! AVX-512 attention over an f16 cache (see [`crate::attend`]); head dimensions that are a
//! multiple of 16. The kernel's body is [`super::attend_tiles`] at 16 lanes (`vcvtph2ps`
//! widening; values of up to 4 heads × 64 dimensions in 16 register accumulators); this module
//! holds the width's loads, stores and `exp`.

use super::attend_tiles::{EXP_POLY, LN2_HI, LN2_LO};
use crate::attend::F16Cache;
use core::arch::x86_64::*;

/// Widens 16 f16 values from 32 bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn load_f16x16(bytes: &[u8]) -> __m512 {
    let bytes = &bytes[..32];
    // SAFETY: `bytes` holds exactly 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(bytes.as_ptr().cast())) }
}

/// Loads 16 f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn load_f32x16(x: &[f32]) -> __m512 {
    let x = &x[..16];
    // SAFETY: `x` holds exactly 16 readable f32; loadu has no alignment requirement.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

/// `e^x` for `x ≤ 0` (softmax arguments), 16 at a time: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`,
/// Cephes' degree-7 polynomial for `e^r` (relative error ≤ 1.7·10⁻⁷ ≈ 3 ε), then `·2^n` by
/// `scalef` (exact; below `e^−87` the result goes denormal, then 0).
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn exp_nonpositive(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(core::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(e, n)
}

/// The horizontal sums of `a`, `b`, `c` and `d`, in that order: pairs interleaved and added
/// within each 128-bit lane, then the four lanes added.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn hsum4(a: __m512, b: __m512, c: __m512, d: __m512) -> [f32; 4] {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per 128-bit lane: [a, b, c, d] partial sums.
    let s = _mm512_add_ps(
        _mm512_shuffle_ps::<0b0100_0100>(ab, cd),
        _mm512_shuffle_ps::<0b1110_1110>(ab, cd),
    );
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    let s = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds exactly 4 writable f32; storeu has no alignment requirement.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    out
}

/// Stores 16 f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn store_f32x16(x: &mut [f32], v: __m512) {
    let x = &mut x[..16];
    // SAFETY: `x` holds exactly 16 writable f32; storeu has no alignment requirement.
    unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
}

super::attend_tiles::attend_kernel!(
    features = "avx2,fma,f16c,avx512f",
    lanes = 16,
    vector = __m512,
    zero = _mm512_setzero_ps,
    set1 = _mm512_set1_ps,
    fmadd = _mm512_fmadd_ps,
    add = _mm512_add_ps,
    sub = _mm512_sub_ps,
    mul = _mm512_mul_ps,
    max = _mm512_max_ps,
    hsum = _mm512_reduce_add_ps,
    hsum4 = hsum4,
    hmax = _mm512_reduce_max_ps,
    load_f16 = load_f16x16,
    load_f32 = load_f32x16,
    store_f32 = store_f32x16,
    exp = exp_nonpositive,
    score_heads = 4
);
