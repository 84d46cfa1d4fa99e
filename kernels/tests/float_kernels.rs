//! Float and block-quantized matrix products (heads and embeddings) × every ISA, against an f64
//! reference on fresh random inputs.
//!
//! Reference: the weights as the scalar dequantizer gives them (the definition of each format,
//! checked bit-exactly against gguf-py in the library's tests), multiplied with the activations
//! in f64. Bound: each product and each addition rounds once in f32, in whatever order the ISA's
//! lanes use, so `|out − exact| ≤ γ_{K+2} · Σ_j |w_j · x_j|` (γ_n = n·u/(1 − n·u), u = 2^-24);
//! FMA only removes roundings.

use half::f16;
use proptest::prelude::*;
use ternmux_kernels::Kernels;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::matmul::FloatMatrix;

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

const FORMATS: [FloatFormat; 9] = [
    FloatFormat::F32,
    FloatFormat::F16,
    FloatFormat::BF16,
    FloatFormat::Q8_0,
    FloatFormat::Q4_0,
    FloatFormat::Q4_1,
    FloatFormat::Q4K,
    FloatFormat::Q5K,
    FloatFormat::Q6K,
];

/// Random bytes for `rows × k` of `fmt`, with every f16/f32 field set to a finite value.
fn random_tensor(fmt: FloatFormat, rows: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut bytes: Vec<u8> = (0..rows * fmt.row_bytes(k)).map(|_| next() as u8).collect();
    let h = |v: f32| f16::from_f32(v).to_le_bytes();
    let bb = fmt.block_bytes();
    for (i, blk) in bytes.chunks_exact_mut(bb).enumerate() {
        let scale = 0.001 + (i % 13) as f32 * 0.003;
        match fmt {
            FloatFormat::F32 => blk.copy_from_slice(&((i % 97) as f32 * 0.37 - 17.0).to_le_bytes()),
            FloatFormat::F16 => blk.copy_from_slice(&h((i % 89) as f32 * 0.11 - 4.0)),
            FloatFormat::BF16 => {
                let v = ((i % 83) as f32 * 0.13 - 5.0).to_bits();
                blk.copy_from_slice(&((v >> 16) as u16).to_le_bytes());
            }
            FloatFormat::Q8_0 | FloatFormat::Q4_0 => blk[..2].copy_from_slice(&h(scale)),
            FloatFormat::Q4_1 | FloatFormat::Q4K | FloatFormat::Q5K => {
                blk[..2].copy_from_slice(&h(scale));
                blk[2..4].copy_from_slice(&h(-scale * 0.5));
            }
            FloatFormat::Q6K => blk[bb - 2..].copy_from_slice(&h(scale)),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
    ))]

    #[test]
    fn float_matmul_within_bound_of_f64(
        fi in 0usize..9,
        rows in 1usize..9,
        kb in 1usize..5,
        batch in prop_oneof![Just(1usize), 2usize..5],
        seed in any::<u64>(),
        odd in 0usize..40,
        xs in prop::collection::vec(-4.0f32..4.0, 4 * (4 * 256 + 40)),
    ) {
        let fmt = FORMATS[fi];
        // Formats with one-element blocks (F32, F16, BF16) also get row lengths off the
        // vector width (the batched kernels' scalar tails).
        let k = kb * 256 + if fmt.block_elems() == 1 { odd } else { 0 };
        let bytes = random_tensor(fmt, rows, k, seed);
        let m = FloatMatrix::new(fmt, &bytes, rows, k).unwrap();
        let x = &xs[..batch * k];
        // Reference weights from the scalar dequantizer.
        let mut wref = vec![0f32; rows * k];
        for r in 0..rows {
            fmt.dequantize(m.row(r), &mut wref[r * k..(r + 1) * k]);
        }
        for kern in Kernels::available() {
            let mut out = vec![0f32; batch * rows];
            kern.float_matmul(&m, x, &mut out).unwrap();
            for t in 0..batch {
                for r in 0..rows {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for j in 0..k {
                        let p = f64::from(wref[r * k + j]) * f64::from(x[t * k + j]);
                        exact += p;
                        mag += p.abs();
                    }
                    let got = f64::from(out[t * rows + r]);
                    let bound = gamma(k + 2) * mag + 1e-30;
                    prop_assert!((got - exact).abs() <= bound,
                        "{} {} batch {}: got {} exact {} bound {}", kern.isa(), fmt.name(), batch, got, exact, bound);
                }
            }
        }
    }
}

#[test]
fn float_shape_errors_are_reported() {
    let bytes = vec![0u8; 34];
    assert!(FloatMatrix::new(FloatFormat::Q8_0, &bytes, 1, 31).is_err());
    assert!(FloatMatrix::new(FloatFormat::Q8_0, &bytes, 2, 32).is_err());
    let m = FloatMatrix::new(FloatFormat::Q8_0, &bytes, 1, 32).unwrap();
    let mut out = [0f32; 2];
    assert!(
        Kernels::get()
            .float_matmul(&m, &[0.0; 33], &mut out)
            .is_err()
    );
    assert!(
        Kernels::get()
            .float_matmul(&m, &[0.0; 64], &mut out[..1])
            .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The f16 vector kernels used by the f16 KV cache, every ISA, against f64.
    #[test]
    fn f16_dot_and_axpy_within_bound(
        hs in prop::collection::vec(-8.0f32..8.0, 1..300),
        xs in prop::collection::vec(-8.0f32..8.0, 300),
        a in -3.0f32..3.0,
    ) {
        let n = hs.len();
        let w: Vec<u8> = hs.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let wv: Vec<f64> = hs.iter().map(|&v| f64::from(f16::from_f32(v).to_f32())).collect();
        let x = &xs[..n];
        let exact: f64 = wv.iter().zip(x).map(|(p, &q)| p * f64::from(q)).sum();
        let mag: f64 = wv.iter().zip(x).map(|(p, &q)| (p * f64::from(q)).abs()).sum();
        // axpy does one multiply and one add per element on every ISA: the same bits.
        let mut scalar_out: Vec<f32> = x.to_vec();
        Kernels::for_isa(ternmux_kernels::Isa::Scalar).unwrap().axpy_f16(a, &w, &mut scalar_out);
        for kern in Kernels::available() {
            let mut same: Vec<f32> = x.to_vec();
            kern.axpy_f16(a, &w, &mut same);
            prop_assert!(same.iter().zip(&scalar_out).all(|(p, q)| p.to_bits() == q.to_bits()), "{} axpy_f16 differs from scalar", kern.isa());
            let got = f64::from(kern.dot_f16(&w, x));
            prop_assert!((got - exact).abs() <= gamma(n + 2) * mag + 1e-30, "{} dot_f16 {} vs {}", kern.isa(), got, exact);
            let mut out: Vec<f32> = x.to_vec();
            kern.axpy_f16(a, &w, &mut out);
            for i in 0..n {
                let e = f64::from(x[i]) + f64::from(a) * wv[i];
                let tol = 2.0 * U * (f64::from(x[i]).abs() + (f64::from(a) * wv[i]).abs()) + 1e-30;
                prop_assert!((f64::from(out[i]) - e).abs() <= tol, "{} axpy_f16 [{}] {} vs {}", kern.isa(), i, out[i], e);
            }
        }
    }
}
