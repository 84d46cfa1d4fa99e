//! Attention over an f16 cache × every ISA, against f64 on fresh random inputs.
//!
//! The inputs (f16 keys and values, f32 queries, the scale) are exact in f64, so the reference
//! is exact up to f64 rounding. The f32 kernel's error, first order:
//!
//! * **Scores.** Each `ŝ_p = scale · Σ_i k_i q_i` is a sum of `hd` products in some order (FMA
//!   or not) and one multiply: `|ŝ_p − s_p| ≤ δ_p = γ_{hd+2} · scale · Σ_i |k_i q_i|`; let `Δ =
//!   max_p δ_p`.
//! * **Weights.** Shifting every score by at most `Δ` scales each softmax weight by a factor in
//!   `[e^{−2Δ}, e^{2Δ}]`. The f32 softmax adds one rounding for `ŝ_p − max` (relative to
//!   `|ŝ_p − max|`, which moves `e^{−x}` by at most `x·ε·e^{−x} ≤ ε`), one `exp` (≤ 3 ε
//!   relative: libm's, or the AVX-512 kernel's polynomial), the sum of `n` terms (`γ_n`) and
//!   the division: `|ŵ_p − w_p| ≤ w_p · η` with `η = e^{2Δ} − 1 + γ_{n+8}`, plus `ε` absolute
//!   from the subtraction.
//! * **Output.** `Σ_p ŵ_p v_p` over `n` positions adds `γ_{n+1} · Σ_p ŵ_p |v_p|`.
//!
//! So `|out − exact| ≤ (η + γ_{n+1}) · Σ_p w_p |v_p| · (1 + η) + n · ε · max|v|`, checked per
//! output value with a factor 2 of slack for the second-order terms.

use half::f16;
use proptest::prelude::*;
use ternmux_kernels::Kernels;
use ternmux_kernels::attend::F16Cache;

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

/// f16 values of `xs` (rounded) and their little-endian bytes.
fn to_f16(xs: &[f32]) -> (Vec<f64>, Vec<u8>) {
    let h: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
    (
        h.iter().map(|x| x.to_f64()).collect(),
        h.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// The exact attention and the bound of each output value.
fn reference(
    q: &[f32],
    k: &[f64],
    v: &[f64],
    (n, stride, hd): (usize, usize, usize),
    scale: f32,
) -> (Vec<f64>, Vec<f64>) {
    let (mut exact, mut bound) = (Vec::new(), Vec::new());
    for qg in q.chunks_exact(hd) {
        let row = |p: usize| p * stride..p * stride + hd;
        let s: Vec<f64> = (0..n)
            .map(|p| {
                k[row(p)]
                    .iter()
                    .zip(qg)
                    .map(|(&a, &b)| a * b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let delta = (0..n)
            .map(|p| {
                let abs: f64 = k[row(p)]
                    .iter()
                    .zip(qg)
                    .map(|(&a, &b)| (a * b as f64).abs())
                    .sum();
                gamma(hd + 2) * scale as f64 * abs
            })
            .fold(0.0, f64::max);
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let w: Vec<f64> = e.iter().map(|x| x / sum).collect();
        let eta = (2.0 * delta).exp() - 1.0 + gamma(n + 8);
        let vmax = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        for i in 0..hd {
            exact.push((0..n).map(|p| w[p] * v[p * stride + i]).sum::<f64>());
            let wv: f64 = (0..n).map(|p| w[p] * v[p * stride + i].abs()).sum();
            bound.push(2.0 * ((eta + gamma(n + 1)) * wv * (1.0 + eta) + n as f64 * U * vmax));
        }
    }
    (exact, bound)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn attend_f16_within_bounds_of_f64(
        hd in prop_oneof![Just(16usize), Just(32), Just(48), Just(64), Just(80), Just(128),
                          Just(8), Just(40)],
        group in 1usize..10,
        n in prop_oneof![1usize..4, 4usize..300],
        extra in 0usize..3,
        qmag in prop_oneof![Just(0.0f32), 0.01f32..4.0],
        ks in prop::collection::vec(-2.0f32..2.0, 300 * 130 * 3),
        vs in prop::collection::vec(-2.0f32..2.0, 300 * 130 * 3),
        qs in prop::collection::vec(-1.0f32..1.0, 9 * 128),
    ) {
        // Positions `stride` apart, as in a cache of several KV heads.
        let stride = hd * (1 + extra);
        let len = (n - 1) * stride + hd;
        let (k, kb) = to_f16(&ks[..len]);
        let (v, vb) = to_f16(&vs[..len]);
        let q: Vec<f32> = qs[..group * hd].iter().map(|x| x * qmag).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let cache = F16Cache::new(&kb, &vb, n, stride, hd).unwrap();
        let (exact, bound) = reference(&q, &k, &v, (n, stride, hd), scale);
        for kern in Kernels::available() {
            let (mut scores, mut out) = (Vec::new(), vec![f32::NAN; group * hd]);
            kern.attend_f16(&q, &cache, scale, &mut scores, &mut out).unwrap();
            prop_assert_eq!(scores.len(), group * n);
            for (i, ((&o, &x), &b)) in out.iter().zip(&exact).zip(&bound).enumerate() {
                prop_assert!(
                    (o as f64 - x).abs() <= b,
                    "{}: head {} dim {}: {} vs exact {} (bound {})",
                    kern.isa(), i / hd, i % hd, o, x, b
                );
            }
            // The weights each head used sum to one.
            for s in scores.chunks_exact(n) {
                prop_assert!((s.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() <= gamma(n + 8));
            }
        }
    }
}

#[test]
fn attend_f16_rejects_bad_shapes() {
    let bytes = vec![0u8; 2 * 64];
    // No positions, a stride shorter than a row, rows past the end of the bytes.
    assert!(F16Cache::new(&bytes, &bytes, 0, 16, 16).is_err());
    assert!(F16Cache::new(&bytes, &bytes, 2, 8, 16).is_err());
    assert!(F16Cache::new(&bytes, &bytes, 3, 32, 16).is_err());
    assert!(F16Cache::new(&bytes, &bytes[..60], 2, 16, 16).is_err());
    assert!(F16Cache::new(&bytes, &bytes, usize::MAX, usize::MAX, 16).is_err());
    let cache = F16Cache::new(&bytes, &bytes, 4, 16, 16).unwrap();
    let kern = Kernels::get();
    let mut scores = Vec::new();
    // Queries not a multiple of the head dimension, or a different output length.
    assert!(
        kern.attend_f16(&[0.0; 24], &cache, 1.0, &mut scores, &mut [0.0; 24])
            .is_err()
    );
    assert!(
        kern.attend_f16(&[0.0; 32], &cache, 1.0, &mut scores, &mut [0.0; 16])
            .is_err()
    );
    assert!(
        kern.attend_f16(&[], &cache, 1.0, &mut scores, &mut [])
            .is_err()
    );
    // All-zero keys: uniform weights over the four positions.
    let mut out = [1.0f32; 16];
    kern.attend_f16(&[1.0; 16], &cache, 1.0, &mut scores, &mut out)
        .unwrap();
    assert_eq!(scores, vec![0.25; 4]);
    assert_eq!(out, [0.0; 16]);
}
