//! I2_S results are bit-exact with bitnet.cpp's arithmetic (FORMATS.md 3.2).
//!
//! `bitnet_reference` is bitnet.cpp's computation written out literally, independent of our
//! kernels: `quantize_row_i8_s` (max in f64 from 1e-5, `s = (float)(127/max)`, `nearest_int`,
//! clamp to [−128, 127], `act_sum = Σq`), the integer `sumi = Σ code·q` with codes 0..2 (not
//! ternary values), then `((float)sumi − act_sum) / s · w_s`. Our kernels compute `Σ (code−1)·q`
//! by sign/select instead; this test shows the two agree bit for bit on fresh random inputs.

use proptest::prelude::*;
use ternmux_kernels::Kernels;
use ternmux_kernels::act::{ActQuant, QuantizedActs};
use ternmux_kernels::pack::pack_i2_s_row;
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};

fn bitnet_reference(codes: &[u8], rows: usize, k: usize, w_s: f32, x: &[f32]) -> Vec<f32> {
    let mut max = 0.00001f64;
    for &v in x {
        max = max.max(f64::from(v).abs());
    }
    let s = (127.0 / max) as f32;
    let mut act_sum = 0i32;
    let q: Vec<i32> = x
        .iter()
        .map(|&v| {
            // bitnet_nearest_int: round half to even of the f32 product.
            let r = (v * s).round_ties_even() as i32;
            let r = r.clamp(-128, 127);
            act_sum += r;
            r
        })
        .collect();
    (0..rows)
        .map(|r| {
            let sumi: i32 = (0..k).map(|j| i32::from(codes[r * k + j]) * q[j]).sum();
            (sumi as f32 - act_sum as f32) / s * w_s
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128)
    ))]
    #[test]
    fn i2s_matches_bitnet_cpp_bit_for_bit(
        (rows, k, codes) in (1usize..8, 1usize..12).prop_flat_map(|(rows, kb)| {
            let k = kb * 128;
            (Just(rows), Just(k), prop::collection::vec(0u8..3, rows * k))
        }),
        w_s in 1e-3f32..3.0,
        xs in prop::collection::vec(-20.0f32..20.0, 12 * 128),
        tiny in any::<bool>(),
    ) {
        let x: Vec<f32> = xs[..k].iter().map(|&v| if tiny { v * 1e-7 } else { v }).collect();
        let mut bytes = vec![0u8; rows * k / 4 + 32];
        for r in 0..rows {
            pack_i2_s_row(&codes[r * k..(r + 1) * k], &mut bytes[r * k / 4..]);
        }
        bytes[rows * k / 4..rows * k / 4 + 4].copy_from_slice(&w_s.to_le_bytes());
        let want = bitnet_reference(&codes, rows, k, w_s, &x);
        let m = TernaryMatrix::new(TernaryFormat::I2S, &bytes, rows, k).unwrap();
        let mut acts = QuantizedActs::new(ActQuant::PerToken);
        acts.quantize(&x, k).unwrap();
        for kern in Kernels::available() {
            let mut got = vec![0f32; rows];
            kern.ternary_matmul(&m, &acts, &mut got).unwrap();
            for r in 0..rows {
                prop_assert_eq!(got[r].to_bits(), want[r].to_bits(), "{} row {}: {} vs bitnet {}", kern.isa(), r, got[r], want[r]);
            }
        }
    }
}
