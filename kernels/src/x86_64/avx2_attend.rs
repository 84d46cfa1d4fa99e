//! AVX2 attention over an f16 cache (see [`crate::attend`]); head dimensions that are a multiple
//! of 8. The AVX-512 kernel's structure ([`super::avx512_attend`]) at 8 lanes: keys widened
//! once per head group (F16C), up to 8 heads' scores per key, a polynomial `exp` for the
//! softmax, and the values of up to 4 heads × 32 dimensions in register accumulators.

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
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
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

/// Largest of eight f32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hmax_ps(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// `s ← softmax(s)`, 8 at a time; the `n mod 8` tail goes through a block padded with −∞.
#[target_feature(enable = "avx2,fma,f16c")]
fn softmax8(s: &mut [f32]) {
    let full = s.len() / 8 * 8;
    let (body, rest) = s.split_at_mut(full);
    let mut pad = [f32::NEG_INFINITY; 8];
    pad[..rest.len()].copy_from_slice(rest);
    let mut m = load_f32x8(&pad);
    for c in body.chunks_exact(8) {
        m = _mm256_max_ps(m, load_f32x8(c));
    }
    let m = _mm256_set1_ps(hmax_ps(m));
    // The padding's lanes: −∞ − m is −∞, clamped, then zeroed by this mask.
    let live = rest.len();
    let mut sum = _mm256_setzero_ps();
    for c in body.chunks_exact_mut(8) {
        let e = exp_nonpositive(_mm256_sub_ps(load_f32x8(c), m));
        store_f32x8(c, e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut e = [0f32; 8];
    store_f32x8(&mut e, exp_nonpositive(_mm256_sub_ps(load_f32x8(&pad), m)));
    e[live..].fill(0.0);
    pad = e;
    sum = _mm256_add_ps(sum, load_f32x8(&pad));
    let inv = _mm256_set1_ps(1.0 / hsum_ps(sum));
    for c in body.chunks_exact_mut(8).chain([&mut pad[..]]) {
        store_f32x8(c, _mm256_mul_ps(load_f32x8(c), inv));
    }
    rest.copy_from_slice(&pad[..live]);
}

/// Scores of `G` query heads (`q`: `G × hd`) against every key: `scores[g·n + p]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn scores_tile<const G: usize>(q: &[f32], cache: &F16Cache<'_>, scale: f32, scores: &mut [f32]) {
    let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
    let keys = cache.key_bytes();
    for p in 0..n {
        let row = &keys[2 * p * stride..2 * (p * stride + hd)];
        let mut acc = [_mm256_setzero_ps(); G];
        for c in 0..hd / 8 {
            let k = load_f16x8(&row[16 * c..]);
            for (g, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(k, load_f32x8(&q[g * hd + 8 * c..]), *a);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            scores[g * n + p] = hsum_ps(*a) * scale;
        }
    }
}

/// `out[g·hd + c0 + 8j …] = Σ_p w[g·n + p] · v_p[c0 + 8j …]` for `G` heads and `C` registers of
/// 8 dimensions from `c0`.
#[target_feature(enable = "avx2,fma,f16c")]
fn values_tile<const G: usize, const C: usize>(
    w: &[f32],
    cache: &F16Cache<'_>,
    c0: usize,
    out: &mut [f32],
) {
    let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
    let values = cache.value_bytes();
    let mut acc = [[_mm256_setzero_ps(); C]; G];
    for p in 0..n {
        let row = &values[2 * (p * stride + c0)..2 * (p * stride + c0 + 8 * C)];
        let mut v = [_mm256_setzero_ps(); C];
        for (j, vj) in v.iter_mut().enumerate() {
            *vj = load_f16x8(&row[16 * j..]);
        }
        for (g, ag) in acc.iter_mut().enumerate() {
            let a = _mm256_set1_ps(w[g * n + p]);
            for (aj, &vj) in ag.iter_mut().zip(&v) {
                *aj = _mm256_fmadd_ps(a, vj, *aj);
            }
        }
    }
    for (g, ag) in acc.iter().enumerate() {
        for (j, aj) in ag.iter().enumerate() {
            store_f32x8(&mut out[g * hd + c0 + 8 * j..], *aj);
        }
    }
}

/// Attention of `q.len() / hd` query heads over `cache` (see [`crate::Kernels::attend_f16`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `cache.head_dim()` must be a multiple of 8, `q` and
/// `out` the same multiple of it, `scores` `q.len() / hd × n_pos` long, and the cache's rows
/// checked by [`F16Cache::new`] (slicing checks every access regardless).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_f16(
    q: &[f32],
    cache: &F16Cache<'_>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, n) = (cache.head_dim(), cache.n_pos());
    let group = q.len() / hd;
    let mut g0 = 0;
    while g0 < group {
        let g = (group - g0).min(8);
        let (q, s) = (&q[g0 * hd..], &mut scores[g0 * n..]);
        match g {
            1 => scores_tile::<1>(q, cache, scale, s),
            2 => scores_tile::<2>(q, cache, scale, s),
            3 => scores_tile::<3>(q, cache, scale, s),
            4 => scores_tile::<4>(q, cache, scale, s),
            5 => scores_tile::<5>(q, cache, scale, s),
            6 => scores_tile::<6>(q, cache, scale, s),
            7 => scores_tile::<7>(q, cache, scale, s),
            _ => scores_tile::<8>(q, cache, scale, s),
        }
        g0 += g;
    }
    for s in scores.chunks_exact_mut(n).take(group) {
        softmax8(s);
    }
    let mut g0 = 0;
    while g0 < group {
        let g = (group - g0).min(4);
        let (w, o) = (&scores[g0 * n..], &mut out[g0 * hd..]);
        let mut c0 = 0;
        while c0 < hd {
            let c = ((hd - c0) / 8).min(4);
            macro_rules! tile {
                ($($gg:literal, $cc:literal);*) => {
                    match (g, c) {
                        $(($gg, $cc) => values_tile::<$gg, $cc>(w, cache, c0, o),)*
                        _ => values_tile::<4, 4>(w, cache, c0, o),
                    }
                };
            }
            tile!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
                  3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3);
            c0 += 8 * c;
        }
        g0 += g;
    }
}
