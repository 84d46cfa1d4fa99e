//! The attention kernel's body, written once for both x86 vector widths (see
//! [`crate::attend`]): `attend_kernel!` expands, inside [`super::avx2_attend`] and
//! [`super::avx512_attend`], to their `softmax`, register tiles and `attend_f16`, from the
//! width's intrinsics and helpers.
//!
//! Scores: four key rows at a time are widened once and multiplied into the accumulators of up
//! to `score_heads` query heads (4 with 32 vector registers, 2 with 16), and each head's four
//! dot products end in one transposing reduction. Softmax: `lanes` scores at a time, the `n mod lanes` tail through
//! a block padded with −∞ whose dead lanes are zeroed after `exp`. Values: the output of up to
//! 4 heads × 4 registers stays in registers across all positions, each value row widened once
//! for the whole group. The tiles are monomorphized on their sizes, so the accumulators are
//! registers, not stack slots.

/// The high part of `ln 2` for both widths' `exp_nonpositive` (`x = n·ln 2 + r`): short
/// enough that `n · LN2_HI` is exact.
pub(super) const LN2_HI: f32 = 0.693_359_4;
/// The low part of `ln 2` ([`LN2_HI`]).
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial `p` of `e^r ≈ 1 + r + r²·p(r)`, highest coefficient first.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Defines `softmax`, `scores_tile`, `values_tile` and `pub unsafe fn attend_f16` in the
/// invoking module, for vectors of `lanes` f32 with the given target features and operations
/// (`load_f16` widens `lanes` f16 values from their bytes; `exp` is `e^x` for `x ≤ 0`).
macro_rules! attend_kernel {
    (features = $feat:tt, lanes = $l:literal, vector = $v:ty, zero = $zero:path,
     set1 = $set1:path, fmadd = $fma:path, add = $add:path, sub = $sub:path, mul = $mul:path,
     max = $max:path, hsum = $hsum:path, hsum4 = $h4:path, hmax = $hmax:path,
     load_f16 = $lh:path, load_f32 = $lf:path, store_f32 = $sf:path, exp = $exp:path,
     score_heads = $sh:literal) => {
        /// `s ← softmax(s)`, `lanes` at a time.
        #[target_feature(enable = $feat)]
        fn softmax(s: &mut [f32]) {
            let full = s.len() / $l * $l;
            let (body, rest) = s.split_at_mut(full);
            let live = rest.len();
            let mut pad = [f32::NEG_INFINITY; $l];
            pad[..live].copy_from_slice(rest);
            let mut m = $lf(&pad);
            for c in body.chunks_exact($l) {
                m = $max(m, $lf(c));
            }
            let m = $set1($hmax(m));
            let mut sum = $zero();
            for c in body.chunks_exact_mut($l) {
                let e = $exp($sub($lf(c), m));
                $sf(c, e);
                sum = $add(sum, e);
            }
            let e = $exp($sub($lf(&pad), m));
            $sf(&mut pad, e);
            pad[live..].fill(0.0);
            sum = $add(sum, $lf(&pad));
            let inv = $set1(1.0 / $hsum(sum));
            for c in body.chunks_exact_mut($l).chain([&mut pad[..]]) {
                $sf(c, $mul($lf(c), inv));
            }
            rest.copy_from_slice(&pad[..live]);
        }

        /// Scores of `G` query heads (`q`: `G × hd`) against every key: `scores[g·n + p]`.
        /// Four positions at a time, so one transposing reduction (`hsum4`) ends four dot
        /// products of a head instead of four full horizontal sums; each key row is widened
        /// once for all `G` heads.
        #[target_feature(enable = $feat)]
        fn scores_tile<const G: usize>(
            q: &[f32],
            cache: &F16Cache<'_>,
            scale: f32,
            scores: &mut [f32],
        ) {
            let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
            let keys = cache.key_bytes();
            let by4 = n / 4 * 4;
            for p in (0..by4).step_by(4) {
                let rows: [&[u8]; 4] = core::array::from_fn(|j| {
                    &keys[2 * (p + j) * stride..2 * ((p + j) * stride + hd)]
                });
                let mut acc: [[$v; 4]; G] = [[$zero(); 4]; G];
                for c in 0..hd / $l {
                    let k: [$v; 4] = core::array::from_fn(|j| $lh(&rows[j][2 * $l * c..]));
                    for (g, ag) in acc.iter_mut().enumerate() {
                        let qv = $lf(&q[g * hd + $l * c..]);
                        for (a, &kj) in ag.iter_mut().zip(&k) {
                            *a = $fma(kj, qv, *a);
                        }
                    }
                }
                for (g, ag) in acc.iter().enumerate() {
                    let s4 = $h4(ag[0], ag[1], ag[2], ag[3]);
                    for (o, s) in scores[g * n + p..g * n + p + 4].iter_mut().zip(s4) {
                        *o = s * scale;
                    }
                }
            }
            for p in by4..n {
                let row = &keys[2 * p * stride..2 * (p * stride + hd)];
                let mut acc: [$v; G] = [$zero(); G];
                for c in 0..hd / $l {
                    let k = $lh(&row[2 * $l * c..]);
                    for (g, a) in acc.iter_mut().enumerate() {
                        *a = $fma(k, $lf(&q[g * hd + $l * c..]), *a);
                    }
                }
                for (g, a) in acc.iter().enumerate() {
                    scores[g * n + p] = $hsum(*a) * scale;
                }
            }
        }

        /// `out[g·hd + c0 + lanes·j …] = Σ_p w[g·n + p] · v_p[c0 + lanes·j …]` for `G` heads and
        /// `C` registers from dimension `c0`.
        #[target_feature(enable = $feat)]
        fn values_tile<const G: usize, const C: usize>(
            w: &[f32],
            cache: &F16Cache<'_>,
            c0: usize,
            out: &mut [f32],
        ) {
            let (hd, n, stride) = (cache.head_dim(), cache.n_pos(), cache.stride());
            let values = cache.value_bytes();
            let mut acc: [[$v; C]; G] = [[$zero(); C]; G];
            for p in 0..n {
                let row = &values[2 * (p * stride + c0)..2 * (p * stride + c0 + $l * C)];
                let mut v: [$v; C] = [$zero(); C];
                for (j, vj) in v.iter_mut().enumerate() {
                    *vj = $lh(&row[2 * $l * j..]);
                }
                for (g, ag) in acc.iter_mut().enumerate() {
                    let a = $set1(w[g * n + p]);
                    for (aj, &vj) in ag.iter_mut().zip(&v) {
                        *aj = $fma(a, vj, *aj);
                    }
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                for (j, aj) in ag.iter().enumerate() {
                    $sf(&mut out[g * hd + c0 + $l * j..], *aj);
                }
            }
        }

        /// Attention of `q.len() / hd` query heads over `cache` (see
        /// [`crate::Kernels::attend_f16`]).
        ///
        /// # Safety
        /// The CPU must support this module's target features. `cache.head_dim()` must be a
        /// multiple of the lane count, `q` and `out` the same multiple of it, `scores`
        /// `q.len() / hd × n_pos` long, and the cache's rows checked by [`F16Cache::new`]
        /// (slicing checks every access regardless).
        #[target_feature(enable = $feat)]
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
                let g = (group - g0).min($sh);
                let (q, s) = (&q[g0 * hd..], &mut scores[g0 * n..]);
                match g {
                    1 => scores_tile::<1>(q, cache, scale, s),
                    2 => scores_tile::<2>(q, cache, scale, s),
                    3 => scores_tile::<3>(q, cache, scale, s),
                    _ => scores_tile::<4>(q, cache, scale, s),
                }
                g0 += g;
            }
            for s in scores.chunks_exact_mut(n).take(group) {
                softmax(s);
            }
            let mut g0 = 0;
            while g0 < group {
                let g = (group - g0).min(4);
                let (w, o) = (&scores[g0 * n..], &mut out[g0 * hd..]);
                let mut c0 = 0;
                while c0 < hd {
                    let c = ((hd - c0) / $l).min(4);
                    match (g, c) {
                        (1, 1) => values_tile::<1, 1>(w, cache, c0, o),
                        (1, 2) => values_tile::<1, 2>(w, cache, c0, o),
                        (1, 3) => values_tile::<1, 3>(w, cache, c0, o),
                        (1, 4) => values_tile::<1, 4>(w, cache, c0, o),
                        (2, 1) => values_tile::<2, 1>(w, cache, c0, o),
                        (2, 2) => values_tile::<2, 2>(w, cache, c0, o),
                        (2, 3) => values_tile::<2, 3>(w, cache, c0, o),
                        (2, 4) => values_tile::<2, 4>(w, cache, c0, o),
                        (3, 1) => values_tile::<3, 1>(w, cache, c0, o),
                        (3, 2) => values_tile::<3, 2>(w, cache, c0, o),
                        (3, 3) => values_tile::<3, 3>(w, cache, c0, o),
                        (3, 4) => values_tile::<3, 4>(w, cache, c0, o),
                        (4, 1) => values_tile::<4, 1>(w, cache, c0, o),
                        (4, 2) => values_tile::<4, 2>(w, cache, c0, o),
                        (4, 3) => values_tile::<4, 3>(w, cache, c0, o),
                        _ => values_tile::<4, 4>(w, cache, c0, o),
                    }
                    c0 += $l * c;
                }
                g0 += g;
            }
        }
    };
}
pub(crate) use attend_kernel;
