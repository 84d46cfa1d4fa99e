//! Int8 matrices (requantized heads) × every ISA, against f64 on fresh random inputs.
//!
//! Two checks per case:
//!
//! * **Kernel**: the product of the quantized values, computed in f64 from the codes, scales and
//!   activations the quantizers produced. Each block's integer sum is exact on every ISA; after
//!   that at most `nb + 6` f32 roundings touch any term (lane conversion is exact, one multiply
//!   by `s_b`, one add per block, the lane reduction, the multiply by `d_r`), so `|out − exact| ≤
//!   γ_{nb+20} · d_r · Σ_b s_b · Σ_lanes |lane|`, where a lane may carry the `128 · Σ q` seed of
//!   the VNNI kernel: bounded by `d_r · Σ_b s_b · Σ_j (|c_j| + 256) · |q_j|`.
//! * **Quantization**: against the float matrix itself, `|Σ w x − out| ≤ Σ_j (|w_j| s_b / 2 +
//!   |x_j| d / 2 + d s_b / 4)` plus the rounding bound above.

use proptest::prelude::*;
use ternmux_kernels::Kernels;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::int8::{INT8_BLOCK, Int8Acts, Int8Matrix, Int8View};
use ternmux_kernels::matmul::FloatMatrix;

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn int8_matmul_within_bounds_of_f64(
        rows in 1usize..12,
        nb in 1usize..5,
        tokens in prop_oneof![Just(1usize), 2usize..12],
        wscale in prop_oneof![Just(0.0f32), 1e-3f32..10.0],
        ws in prop::collection::vec(-1.0f32..1.0, 11 * 4 * 256),
        xs in prop::collection::vec(-4.0f32..4.0, 11 * 4 * 256),
        outlier in 0usize..1000,
    ) {
        let k = nb * INT8_BLOCK;
        let mut w: Vec<f32> = ws[..rows * k].iter().map(|v| v * wscale).collect();
        // Row 0 is all zero when wscale is 0; otherwise one weight stands out.
        w[outlier % (rows * k)] *= 30.0;
        let mut x = xs[..tokens * k].to_vec();
        x[outlier % (tokens * k)] = 0.0;
        if tokens > 1 {
            // A block of zeros (scale 0) in the second token.
            x[k..k + INT8_BLOCK].fill(0.0);
        }
        let bytes = f32_bytes(&w);
        let fm = FloatMatrix::new(FloatFormat::F32, &bytes, rows, k).unwrap();
        let mut acts = Int8Acts::default();
        acts.quantize(&x, k).unwrap();
        for kern in Kernels::available() {
            let m = Int8Matrix::quantize(kern, &fm).unwrap();
            let mut out = vec![f32::NAN; rows * tokens];
            kern.int8_matmul(&m.view(), &acts, &mut out).unwrap();
            for t in 0..tokens {
                let (q, s) = (acts.row(t), acts.block_scales(t));
                for r in 0..rows {
                    let (c, d) = (m.view().row_codes(r), f64::from(m.view().row_scale(r)));
                    let (mut exact, mut mag, mut float, mut qbound) = (0.0, 0.0, 0.0, 0.0);
                    for j in 0..k {
                        let cj = f64::from(i32::from(c[j]) - 128);
                        let (qj, sb) = (f64::from(q[j]), f64::from(s[j / INT8_BLOCK]));
                        exact += d * sb * cj * qj;
                        mag += d * sb * (cj.abs() + 256.0) * qj.abs();
                        let (wj, xj) = (f64::from(w[r * k + j]), f64::from(x[t * k + j]));
                        float += wj * xj;
                        qbound += wj.abs() * sb / 2.0 + xj.abs() * d / 2.0 + d * sb / 4.0;
                    }
                    let got = f64::from(out[t * rows + r]);
                    let eps = gamma(nb + 20) * mag + 1e-30;
                    prop_assert!(
                        (got - exact).abs() <= eps,
                        "{}: row {r} token {t}: {got} vs {exact} (bound {eps})",
                        kern.isa()
                    );
                    prop_assert!(
                        (got - float).abs() <= qbound * (1.0 + 1e-6) + eps,
                        "{}: row {r} token {t}: {got} vs float {float} (bound {qbound})",
                        kern.isa()
                    );
                }
            }
        }
    }
}

#[test]
fn every_isa_gives_the_same_codes() {
    let k = 2 * INT8_BLOCK;
    let w: Vec<f32> = (0..3 * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
        .collect();
    let bytes = f32_bytes(&w);
    let fm = FloatMatrix::new(FloatFormat::F32, &bytes, 3, k).unwrap();
    let all: Vec<Int8Matrix> = Kernels::available()
        .into_iter()
        .map(|kern| Int8Matrix::quantize(kern, &fm).unwrap())
        .collect();
    for m in &all[1..] {
        for r in 0..3 {
            assert_eq!(m.view().row_codes(r), all[0].view().row_codes(r));
            assert_eq!(m.view().row_scale(r), all[0].view().row_scale(r));
        }
    }
    // The largest magnitude of each row maps to ±127.
    for r in 0..3 {
        let c = all[0].view().row_codes(r);
        assert!(c.iter().any(|&v| v == 1 || v == 255), "row {r}: {c:?}");
        assert!(c.iter().all(|&v| v >= 1), "row {r}: a code below −127");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let bytes = f32_bytes(&[1.0; 3 * 64]);
    let fm = FloatMatrix::new(FloatFormat::F32, &bytes, 3, 64).unwrap();
    assert!(Int8Matrix::quantize(Kernels::get(), &fm).is_err());
    let mut acts = Int8Acts::default();
    assert!(acts.quantize(&[1.0; 100], 100).is_err());
    assert!(acts.quantize(&[1.0; 300], 256).is_err());
    let bytes = f32_bytes(&[1.0; 2 * 256]);
    let fm = FloatMatrix::new(FloatFormat::F32, &bytes, 2, 256).unwrap();
    let m = Int8Matrix::quantize(Kernels::get(), &fm).unwrap();
    acts.quantize(&[1.0; 512], 512).unwrap();
    let mut out = [0.0f32; 2];
    assert!(
        Kernels::get()
            .int8_matmul(&m.view(), &acts, &mut out)
            .is_err()
    );
    acts.quantize(&[1.0; 512], 256).unwrap();
    assert!(
        Kernels::get()
            .int8_matmul(&m.view(), &acts, &mut out)
            .is_err()
    );
    let mut out = [0.0f32; 4];
    Kernels::get()
        .int8_matmul(&m.view(), &acts, &mut out)
        .unwrap();
    assert_eq!(out, [256.0; 4]);
    // A borrowed view checks its lengths: codes, scales, and the row length's block multiple.
    let (codes, scales) = (m.codes(), m.scales());
    assert!(Int8View::new(codes, scales, 2, 256).is_ok());
    assert!(Int8View::new(&codes[1..], scales, 2, 256).is_err());
    assert!(Int8View::new(codes, &scales[1..], 2, 256).is_err());
    assert!(Int8View::new(codes, &[1.0; 4], 4, 128).is_err());
}
