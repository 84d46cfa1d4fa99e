//! AVX-512 attention over an f16 cache (see [`crate::attend`]); head dimensions that are a
//! multiple of 16.
//!
//! Scores: each key row is widened once (`vcvtph2ps`, 16 values a register) and multiplied into
//! up to 8 query heads' accumulators, reduced once per position. Values: the output of up to 4
//! heads × 64 dimensions stays in registers (16 accumulators) across all positions, each value
//! row widened once for the whole group. The register tiles are monomorphized on their sizes so
//! the accumulators are registers, not stack slots.

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
    // ln 2 in two parts, so `n · 0.693359375` is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(e, n)
}

/// Stores 16 f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
fn store_f32x16(x: &mut [f32], v: __m512) {
    let x = &mut x[..16];
    // SAFETY: `x` holds exactly 16 writable f32; storeu has no alignment requirement.
    unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
}

/// `s ← softmax(s)`, 16 at a time: the `n mod 16` tail goes through a padded block (−∞ in the
/// unused lanes, whose `e^x` is then 0).
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn softmax16(s: &mut [f32]) {
    let full = s.len() / 16 * 16;
    let (body, rest) = s.split_at_mut(full);
    let mut pad = [f32::NEG_INFINITY; 16];
    pad[..rest.len()].copy_from_slice(rest);
    let mut m = load_f32x16(&pad);
    for c in body.chunks_exact(16) {
        m = _mm512_max_ps(m, load_f32x16(c));
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    for c in body.chunks_exact_mut(16).chain([&mut pad[..]]) {
        let e = exp_nonpositive(_mm512_sub_ps(load_f32x16(c), m));
        store_f32x16(c, e);
        sum = _mm512_add_ps(sum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for c in body.chunks_exact_mut(16).chain([&mut pad[..]]) {
        store_f32x16(c, _mm512_mul_ps(load_f32x16(c), inv));
    }
    rest.copy_from_slice(&pad[..rest.len()]);
}

/// Scores of `G` query heads (`q`: `G × hd`) against every key: `scores[g·n + p]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn scores_tile<const G: usize>(q: &[f32], cache: &F16Cache<'_>, scale: f32, scores: &mut [f32]) {
    let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
    let keys = cache.key_bytes();
    for p in 0..n {
        let row = &keys[2 * p * stride..2 * (p * stride + hd)];
        let mut acc = [_mm512_setzero_ps(); G];
        for c in 0..hd / 16 {
            let k = load_f16x16(&row[32 * c..]);
            for (g, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(k, load_f32x16(&q[g * hd + 16 * c..]), *a);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            scores[g * n + p] = _mm512_reduce_add_ps(*a) * scale;
        }
    }
}

/// `out[g·hd + c0 + 16j …] = Σ_p w[g·n + p] · v_p[c0 + 16j …]` for `G` heads and `C` registers
/// of 16 dimensions from `c0`.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn values_tile<const G: usize, const C: usize>(
    w: &[f32],
    cache: &F16Cache<'_>,
    c0: usize,
    out: &mut [f32],
) {
    let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
    let values = cache.value_bytes();
    let mut acc = [[_mm512_setzero_ps(); C]; G];
    for p in 0..n {
        let row = &values[2 * (p * stride + c0)..2 * (p * stride + c0 + 16 * C)];
        let mut v = [_mm512_setzero_ps(); C];
        for (j, vj) in v.iter_mut().enumerate() {
            *vj = load_f16x16(&row[32 * j..]);
        }
        for (g, ag) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(w[g * n + p]);
            for (aj, &vj) in ag.iter_mut().zip(&v) {
                *aj = _mm512_fmadd_ps(a, vj, *aj);
            }
        }
    }
    for (g, ag) in acc.iter().enumerate() {
        for (j, aj) in ag.iter().enumerate() {
            store_f32x16(&mut out[g * hd + c0 + 16 * j..], *aj);
        }
    }
}

/// Attention of `q.len() / hd` query heads over `cache` (see [`crate::Kernels::attend_f16`]).
///
/// # Safety
/// The CPU must support AVX-512 F, FMA and F16C. `cache.head_dim()` must be a multiple of 16,
/// `q` and `out` the same multiple of it, `scores` `q.len() / hd × n_pos` long, and the cache's
/// rows checked by [`F16Cache::new`] (slicing checks every access regardless).
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
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
        softmax16(s);
    }
    let mut g0 = 0;
    while g0 < group {
        let g = (group - g0).min(4);
        let (w, o) = (&scores[g0 * n..], &mut out[g0 * hd..]);
        let mut c0 = 0;
        while c0 < hd {
            let c = ((hd - c0) / 16).min(4);
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
            c0 += 16 * c;
        }
        g0 += g;
    }
}
