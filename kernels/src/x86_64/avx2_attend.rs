//! AVX2 attention over an f16 cache (see [`crate::attend`]); head dimensions that are a multiple
//! of 8. The kernel's body is [`super::attend_tiles`] at 8 lanes (F16C widening; values of up
//! to 4 heads × 32 dimensions in register accumulators); this module holds the width's loads,
//! stores, horizontal max and `exp`.

use super::attend_tiles::{EXP_POLY, LN2_HI, LN2_LO};
use super::avx2::hsum_ps;
use crate::attend::F16Cache;
use core::arch::x86_64::*;

/// Widens 8 f16 values from 16 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_f16x8(bytes: &[u8]) -> __m256 {
    _mm256_cvtph_ps(super::avx2::load16(bytes))
}

/// Loads 8 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_f32x8(x: &[f32]) -> __m256 {
    let x = &x[..8];
    // SAFETY: `x` holds exactly 8 readable f32; loadu has no alignment requirement.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

/// Stores 8 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn store_f32x8(x: &mut [f32], v: __m256) {
    let x = &mut x[..8];
    // SAFETY: `x` holds exactly 8 writable f32; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
}

/// `e^x` for `x ≤ 0`, 8 at a time: the AVX-512 kernel's range reduction and Cephes polynomial;
/// `2^n` is built in the exponent bits, so `x` is first clamped to `−87.3` (results below
/// `e^−87.3 ≈ 1.2·10⁻³⁸` — weights no softmax sum notices — come out as that value, not 0).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp_nonpositive(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(core::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n for n in [−126, 0]: (n + 127) << 23 as the bits of a float.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(e, pow2)
}

/// The horizontal sums of `a`, `b`, `c` and `d`, in that order: pairs interleaved and added
/// within each 128-bit half, then the two halves added.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> [f32; 4] {
    let ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    let cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    let s = _mm256_add_ps(
        _mm256_shuffle_ps::<0b0100_0100>(ab, cd),
        _mm256_shuffle_ps::<0b1110_1110>(ab, cd),
    );
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds exactly 4 writable f32; storeu has no alignment requirement.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    out
}

/// Largest of eight f32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hmax_ps(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

super::attend_tiles::attend_kernel!(
    features = "avx2,fma,f16c",
    lanes = 8,
    vector = __m256,
    zero = _mm256_setzero_ps,
    set1 = _mm256_set1_ps,
    fmadd = _mm256_fmadd_ps,
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    max = _mm256_max_ps,
    hsum = hsum_ps,
    hsum4 = hsum4,
    hmax = hmax_ps,
    load_f16 = load_f16x8,
    load_f32 = load_f32x8,
    store_f32 = store_f32x8,
    exp = exp_nonpositive,
    score_heads = 2
);
