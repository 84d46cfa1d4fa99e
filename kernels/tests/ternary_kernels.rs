//! Every ternary kernel × every ISA this machine has, on fresh random inputs.
//!
//! Three levels, each a property over random shapes (K at and across block boundaries, batches
//! across the 64-row tile), weights (all-zero rows, corrupt code 3 in 2-bit formats) and
//! activations (±127 extremes):
//!
//! 1. Row kernels: each ISA's super-block sums equal the scalar twin's, which equal an i64
//!    evaluation of `Σ (code − 1)·q` (with code 3 read as +1, see `reference::apply`). Exact.
//! 2. Matrix products: each ISA's output is bit-identical to the scalar twin's for I2_S and for
//!    Q8_K activations; TQ formats with per-token activations may use the ISA's float lanes.
//!    Every output is within the derived bound of an f64 evaluation of the same quantized
//!    arithmetic. Derivation: the
//!    super-block sums are exact integers (|sumi| < 2^15, partial sums < 2^24); each f32 term
//!    `sumi_b · c_b` takes at most two roundings (`d_b·a_b` then the product); the ordered sum of
//!    `nsb` terms adds at most `nsb − 1`; the final division / scaling at most two. With
//!    `u = 2^-24`, `|out − exact| ≤ γ_{nsb+4} · Σ_b |sumi_b · c_b|`, `γ_n = n·u / (1 − n·u)`;
//!    a lane-parallel accumulation (16 lanes, reduced by a 4-level tree) adds at most 4
//!    roundings per term path, so `γ_{nsb+8} · Σ_j |w_j · a_j|` bounds every ISA.
//! 3. Against real-valued activations: the product of dequantized weights with the original f32
//!    activations differs from the kernel output by at most the activation quantization error
//!    `Σ_j |w_j| · |x_j − x̂_j|`, with `|x − x̂| ≤ (0.5 + 127u) / s` per token (round to nearest of
//!    `fl(x·s)`), `≤ (0.5 + 255u)(1 + u)·|d|` per Q8_K block (the stored `d = fl(1/iscale)` adds one
//!    relative rounding on |q| ≤ 127), plus the arithmetic bound of level 2.

use half::f16;
use proptest::prelude::*;
use ternmux_kernels::act::{ActQuant, QuantizedActs};
use ternmux_kernels::pack::{pack_i2_s_row, pack_tq1_0, pack_tq2_0};
use ternmux_kernels::reference;
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};
use ternmux_kernels::{Isa, Kernels};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

/// A random ternary matrix with its codes (row-major `rows × k`) and scales.
#[derive(Debug, Clone)]
struct Case {
    format: TernaryFormat,
    rows: usize,
    k: usize,
    codes: Vec<u8>,
    block_d: Vec<f16>, // TQ: one per 256-block per row
    w_s: f32,          // I2_S tensor scale
    bytes: Vec<u8>,
}

impl Case {
    fn build(format: TernaryFormat, rows: usize, k: usize, codes: Vec<u8>, scales: &[f32]) -> Case {
        Case::build_with(format, rows, k, codes, scales, false)
    }

    /// `per_row`: every block of row `r` takes `scales[r % len]` (one scale per row, as in
    /// ternary-trained models, where the fast kernels scale once per row), else block `i` of
    /// the matrix takes `scales[i % len]`.
    fn build_with(
        format: TernaryFormat,
        rows: usize,
        k: usize,
        codes: Vec<u8>,
        scales: &[f32],
        per_row: bool,
    ) -> Case {
        let nb = k / 256;
        let mut block_d = Vec::new();
        let mut bytes = Vec::new();
        let w_s = scales.first().copied().unwrap_or(1.0);
        match format {
            TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0 => {
                let bb = if format == TernaryFormat::Tq2_0 {
                    66
                } else {
                    54
                };
                bytes.resize(rows * nb * bb, 0);
                for r in 0..rows {
                    for b in 0..nb {
                        let at = if per_row { r } else { r * nb + b };
                        let d = f16::from_f32(scales[at % scales.len()]);
                        block_d.push(d);
                        let c: [u8; 256] = codes[r * k + b * 256..r * k + b * 256 + 256]
                            .try_into()
                            .unwrap();
                        let out = &mut bytes[(r * nb + b) * bb..];
                        if format == TernaryFormat::Tq2_0 {
                            pack_tq2_0(&c, d, out);
                        } else {
                            pack_tq1_0(&c, d, out);
                        }
                    }
                }
            }
            TernaryFormat::I2S => {
                bytes.resize(rows * k / 4 + 32, 0);
                for r in 0..rows {
                    pack_i2_s_row(&codes[r * k..(r + 1) * k], &mut bytes[r * k / 4..]);
                }
                let at = rows * k / 4;
                bytes[at..at + 4].copy_from_slice(&w_s.to_le_bytes());
            }
        }
        Case {
            format,
            rows,
            k,
            codes,
            block_d,
            w_s,
            bytes,
        }
    }

    fn matrix(&self) -> TernaryMatrix<'_> {
        TernaryMatrix::new(self.format, &self.bytes, self.rows, self.k).unwrap()
    }

    /// Weight value as f64 (code 3, only reachable in corrupt 2-bit data, acts as +1).
    fn weight(&self, r: usize, j: usize) -> f64 {
        let w = match self.codes[r * self.k + j] {
            0 => -1.0,
            1 => 0.0,
            _ => 1.0,
        };
        match self.format {
            TernaryFormat::I2S => w * f64::from(self.w_s),
            _ => w * f64::from(self.block_d[r * (self.k / 256) + j / 256].to_f32()),
        }
    }
}

fn ternary_value(code: u8) -> i64 {
    match code {
        0 => -1,
        1 => 0,
        _ => 1,
    }
}

fn format_strategy() -> impl Strategy<Value = TernaryFormat> {
    prop_oneof![
        Just(TernaryFormat::Tq2_0),
        Just(TernaryFormat::Tq1_0),
        Just(TernaryFormat::I2S)
    ]
}

/// Codes for `rows × k`, some rows all zero-weight, some all ±1, code 3 allowed for 2-bit formats.
fn codes_strategy(rows: usize, k: usize, allow3: bool) -> impl Strategy<Value = Vec<u8>> {
    let hi = if allow3 { 4u8 } else { 3u8 };
    prop::collection::vec(
        prop_oneof![
            6 => prop::collection::vec(0u8..hi, k),
            1 => Just(vec![1u8; k]),
            1 => prop::collection::vec(prop_oneof![Just(0u8), Just(2u8)], k),
        ],
        rows,
    )
    .prop_map(|v| v.concat())
}

fn acts_strategy(len: usize) -> impl Strategy<Value = Vec<i8>> {
    prop::collection::vec(
        prop_oneof![4 => -127i8..=127, 1 => Just(127i8), 1 => Just(-127i8), 1 => Just(0i8)],
        len,
    )
}

/// (format, rows, k, batch)
fn shape_strategy() -> impl Strategy<Value = (TernaryFormat, usize, usize, usize)> {
    (
        format_strategy(),
        1usize..12,
        1usize..10,
        prop_oneof![3 => 1usize..10, 1 => 60usize..70],
    )
        .prop_map(|(f, rows, kb, batch)| {
            let k = kb * f.k_multiple();
            (f, rows, k, batch)
        })
}

fn case_strategy() -> impl Strategy<Value = (Case, Vec<i8>, usize)> {
    shape_strategy().prop_flat_map(|(f, rows, k, batch)| {
        let allow3 = f != TernaryFormat::Tq1_0;
        (
            codes_strategy(rows, k, allow3),
            prop::collection::vec(1e-4f32..10.0, 1..8),
            acts_strategy(batch * k),
            any::<bool>(),
        )
            .prop_map(move |(codes, scales, q, per_row)| {
                (
                    Case::build_with(f, rows, k, codes, &scales, per_row),
                    q,
                    batch,
                )
            })
    })
}

fn scalar() -> &'static Kernels {
    Kernels::for_isa(Isa::Scalar).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Level 1: exact super-block sums, every ISA vs the twin vs i64.
    #[test]
    fn row_sums_are_exact((case, q, batch) in case_strategy()) {
        let k = case.k;
        let nsb = k.div_ceil(256);
        let m = case.matrix();
        let n_act = batch.min(64);
        for r in 0..case.rows {
            let mut want = vec![0i32; n_act * nsb];
            for t in 0..n_act {
                for b in 0..nsb {
                    let mut s = 0i64;
                    for j in b * 256..((b + 1) * 256).min(k) {
                        s += ternary_value(case.codes[r * k + j]) * i64::from(q[t * k + j]);
                    }
                    want[t * nsb + b] = s as i32;
                }
            }
            for kern in Kernels::available() {
                let mut got = vec![0i32; n_act * nsb];
                kern.ternary_row_sums(case.format, m.row(r), &q, k, n_act, &mut got).unwrap();
                prop_assert_eq!(&got, &want, "{} {} row {} k {}", kern.isa(), case.format.name(), r, k);
            }
        }
    }

    /// Level 2: bit-exact products across ISAs, within the derived bound of f64.
    #[test]
    fn matmul_bit_exact_and_bounded((case, q, batch) in case_strategy(), q8k in any::<bool>()) {
        let k = case.k;
        let flavor = if q8k && k % 256 == 0 { ActQuant::Q8K } else { ActQuant::PerToken };
        let scales: Vec<f32> = match flavor {
            ActQuant::PerToken => (0..batch).map(|t| 127.0 / (0.5 + t as f32)).collect(),
            ActQuant::Q8K => (0..batch * k / 256).map(|i| -0.003 * (1 + i % 7) as f32).collect(),
        };
        let acts = QuantizedActs::from_parts(flavor, k, q.clone(), scales).unwrap();
        let m = case.matrix();
        let mut want = vec![0f32; batch * case.rows];
        scalar().ternary_matmul(&m, &acts, &mut want).unwrap();
        let nsb = k.div_ceil(256);
        let (mut exact, mut bound) = (vec![0f64; batch * case.rows], vec![0f64; batch * case.rows]);
        for t in 0..batch {
            for r in 0..case.rows {
                let (mut e, mut mag) = (0.0f64, 0.0f64);
                for j in 0..k {
                    let p = case.weight(r, j) * acts.value(t, j);
                    e += p;
                    mag += p.abs();
                }
                exact[t * case.rows + r] = e;
                // Sequential order: γ(nsb + 4). The lane-parallel fast path adds at most the
                // log2(16) = 4 levels of its final lane reduction: γ(nsb + 8) covers both.
                bound[t * case.rows + r] = gamma(nsb + 8) * mag + 1e-30;
            }
        }
        for (i, &g) in want.iter().enumerate() {
            prop_assert!((f64::from(g) - exact[i]).abs() <= bound[i],
                "scalar {} {:?}: got {} exact {} bound {}", case.format.name(), flavor, g, exact[i], bound[i]);
        }
        for kern in Kernels::available() {
            let mut got = vec![0f32; batch * case.rows];
            kern.ternary_matmul(&m, &acts, &mut got).unwrap();
            let bit_exact_class = case.format == TernaryFormat::I2S || flavor == ActQuant::Q8K || !kern.has_tok_kernels();
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                if bit_exact_class {
                    prop_assert_eq!(a.to_bits(), b.to_bits(), "{} {} {:?}: not bit-exact with the twin", kern.isa(), case.format.name(), flavor);
                } else {
                    prop_assert!((f64::from(a) - exact[i]).abs() <= bound[i],
                        "{} {} {:?}: got {} exact {} bound {}", kern.isa(), case.format.name(), flavor, a, exact[i], bound[i]);
                }
            }
        }
    }

    /// The per-token row kernels against their scalar twin (`reference::tok_row`): I2_S exact,
    /// TQ within the lane-reassociation bound.
    #[test]
    fn tok_row_kernels_match_twin((case, q, batch) in case_strategy()) {
        let k = case.k;
        let n_act = batch.min(64);
        let m = case.matrix();
        for r in 0..case.rows {
            let mut want = vec![0f32; n_act];
            ternmux_kernels::reference::tok_row(case.format, m.row(r), &q, k, n_act, &mut want);
            for kern in Kernels::available() {
                let mut got = vec![0f32; n_act];
                kern.ternary_row_tok(case.format, m.row(r), &q, k, n_act, &mut got).unwrap();
                for t in 0..n_act {
                    if case.format == TernaryFormat::I2S {
                        prop_assert_eq!(got[t].to_bits(), want[t].to_bits(), "{} i2_s row {} act {}", kern.isa(), r, t);
                    } else {
                        let mag: f64 = (0..k).map(|j| case.weight(r, j).abs() * f64::from(q[t * k + j]).abs()).sum();
                        let tol = 2.0 * gamma(k.div_ceil(256) + 8) * mag + 1e-30;
                        prop_assert!((f64::from(got[t]) - f64::from(want[t])).abs() <= tol,
                            "{} {} row {} act {}: {} vs twin {}", kern.isa(), case.format.name(), r, t, got[t], want[t]);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Level 3: quantize real activations, compare with the f64 product of the true values.
    #[test]
    fn matmul_close_to_float_product(
        (case, _q, batch) in case_strategy(),
        xs in prop::collection::vec(-50.0f32..50.0, 70 * 9 * 256),
        q8k in any::<bool>(),
    ) {
        let k = case.k;
        let flavor = if q8k && k % 256 == 0 { ActQuant::Q8K } else { ActQuant::PerToken };
        let x = &xs[..batch * k];
        let mut acts = QuantizedActs::new(flavor);
        acts.quantize(x, k).unwrap();
        let m = case.matrix();
        let mut got = vec![0f32; batch * case.rows];
        Kernels::get().ternary_matmul(&m, &acts, &mut got).unwrap();
        for t in 0..batch {
            for r in 0..case.rows {
                let (mut exact, mut qerr, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                for j in 0..k {
                    let w = case.weight(r, j);
                    exact += w * f64::from(x[t * k + j]);
                    // Q8_K also stores d = fl(1/iscale): one more relative rounding on |q| ≤ 127.
                    let step = match flavor {
                        ActQuant::PerToken => (0.5 + 127.0 * U) / f64::from(acts.scales()[t]),
                        ActQuant::Q8K => {
                            (0.5 + 255.0 * U) * (1.0 + U) * f64::from(acts.scales()[(t * k + j) / 256]).abs()
                        }
                    };
                    qerr += w.abs() * step;
                    mag += (w * acts.value(t, j)).abs();
                }
                let bound = qerr + gamma(k.div_ceil(256) + 8) * mag + 1e-30;
                let g = f64::from(got[t * case.rows + r]);
                prop_assert!((g - exact).abs() <= bound * (1.0 + 1e-9),
                    "{} {:?}: got {} exact {} bound {}", case.format.name(), flavor, g, exact, bound);
            }
        }
    }
}

/// Number of cases per property: `PROPTEST_CASES` (lower it under emulation), default 64.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Deterministic sweep of every batch size across the tile edge at K exactly one block, with
/// all-extreme activations: the accumulator-width worst case (|Σ| = 256 · 127).
#[test]
fn extremes_at_block_boundary_every_batch() {
    for f in TernaryFormat::ALL {
        for &k in &[f.k_multiple(), 256, 384, 512] {
            if k % f.k_multiple() != 0 {
                continue;
            }
            let codes: Vec<u8> = (0..2 * k).map(|j| if j < k { 2 } else { 0 }).collect(); // all +1, all −1
            let case = Case::build(f, 2, k, codes, &[1.0]);
            let m = case.matrix();
            for batch in 1..=66 {
                let q: Vec<i8> = (0..batch * k)
                    .map(|i| if (i / k) % 2 == 0 { 127 } else { -127 })
                    .collect();
                let acts =
                    QuantizedActs::from_parts(ActQuant::PerToken, k, q, vec![1.0; batch]).unwrap();
                let mut want = vec![0f32; 2 * batch];
                scalar().ternary_matmul(&m, &acts, &mut want).unwrap();
                for t in 0..batch {
                    let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
                    assert_eq!(
                        want[2 * t],
                        sign * 127.0 * k as f32,
                        "{} k{k} b{batch}",
                        f.name()
                    );
                    assert_eq!(want[2 * t + 1], -sign * 127.0 * k as f32);
                }
                for kern in Kernels::available() {
                    let mut got = vec![0f32; 2 * batch];
                    kern.ternary_matmul(&m, &acts, &mut got).unwrap();
                    assert_eq!(got, want, "{} {} k{k} batch{batch}", kern.isa(), f.name());
                }
            }
        }
    }
}

/// Corrupt 2-bit data (every byte value, so every code 3 position) gives the same result on every
/// ISA: random bytes straight into the packed region.
#[test]
fn arbitrary_bytes_agree_across_isas() {
    let k = 768;
    for f in [
        TernaryFormat::Tq2_0,
        TernaryFormat::Tq1_0,
        TernaryFormat::I2S,
    ] {
        let n = 5;
        let len = f.tensor_bytes(n, k).unwrap();
        let mut bytes: Vec<u8> = (0..len).map(|i| (i * 131 + i / 7) as u8).collect();
        if f != TernaryFormat::I2S {
            let bb = f.row_bytes(256);
            for blk in bytes.chunks_exact_mut(bb) {
                blk[bb - 2..].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
            }
        } else {
            bytes[n * k / 4..n * k / 4 + 4].copy_from_slice(&0.5f32.to_le_bytes());
        }
        let m = TernaryMatrix::new(f, &bytes, n, k).unwrap();
        let mut acts = QuantizedActs::new(ActQuant::Q8K);
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        acts.quantize(&x, k).unwrap();
        let mut want = vec![0f32; 3 * n];
        scalar().ternary_matmul(&m, &acts, &mut want).unwrap();
        for kern in Kernels::available() {
            let mut got = vec![0f32; 3 * n];
            kern.ternary_matmul(&m, &acts, &mut got).unwrap();
            assert_eq!(got, want, "{} {}", kern.isa(), f.name());
        }
    }
}

/// Each row's scalar sums must not depend on which rows run in the same call or on threads.
#[test]
fn results_independent_of_row_split() {
    let (k, n) = (512, 300);
    let codes: Vec<u8> = (0..n * k)
        .map(|i| ((i * 2654435761usize) >> 7) as u8 % 3)
        .collect();
    let case = Case::build(TernaryFormat::Tq2_0, n, k, codes, &[0.5, 2.0, 0.125]);
    let m = case.matrix();
    let mut acts = QuantizedActs::new(ActQuant::PerToken);
    let x: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
    acts.quantize(&x, k).unwrap();
    let mut all = vec![0f32; n];
    Kernels::get().ternary_matmul(&m, &acts, &mut all).unwrap();
    for r in [0, 17, 299] {
        let one = TernaryMatrix::new(
            TernaryFormat::Tq2_0,
            &case.bytes[r * m.format().row_bytes(k)..(r + 1) * m.format().row_bytes(k)],
            1,
            k,
        )
        .unwrap();
        let mut o = [0f32];
        Kernels::get().ternary_matmul(&one, &acts, &mut o).unwrap();
        assert_eq!(o[0].to_bits(), all[r].to_bits());
    }
}

/// Shape errors are typed, not panics.
#[test]
fn shape_errors_are_reported() {
    let bytes = vec![0u8; 66];
    assert!(TernaryMatrix::new(TernaryFormat::Tq2_0, &bytes, 1, 128).is_err());
    assert!(TernaryMatrix::new(TernaryFormat::Tq2_0, &bytes, 2, 256).is_err());
    let m = TernaryMatrix::new(TernaryFormat::Tq2_0, &bytes, 1, 256).unwrap();
    let mut acts = QuantizedActs::new(ActQuant::PerToken);
    acts.quantize(&[1.0; 512], 512).unwrap();
    let mut out = [0f32; 1];
    let e = Kernels::get()
        .ternary_matmul(&m, &acts, &mut out)
        .unwrap_err();
    assert!(e.to_string().contains("512"), "{e}");
    assert!(QuantizedActs::from_parts(ActQuant::PerToken, 2, vec![-128, 0], vec![1.0]).is_err());
    let mut q8 = QuantizedActs::new(ActQuant::Q8K);
    assert!(q8.quantize(&[0.0; 128], 128).is_err());
}

/// In CI, `TERNMUX_EXPECT_ISAS` lists ISAs that must be available (so a kernel is never silently
/// skipped) and `TERNMUX_EXPECT_NO_ISAS` ISAs that must not be (the no-dotprod QEMU run).
#[test]
fn expected_isas_are_tested() {
    let have: Vec<Isa> = Kernels::available().iter().map(|k| k.isa()).collect();
    eprintln!("ISAs under test: {have:?}");
    if let Ok(list) = std::env::var("TERNMUX_EXPECT_ISAS") {
        for name in list.split(',').filter(|s| !s.is_empty()) {
            let isa = Isa::parse(name).unwrap_or_else(|| panic!("unknown ISA {name}"));
            assert!(
                have.contains(&isa),
                "{isa} expected but not available: {have:?}"
            );
        }
    }
    if let Ok(list) = std::env::var("TERNMUX_EXPECT_NO_ISAS") {
        for name in list.split(',').filter(|s| !s.is_empty()) {
            let isa = Isa::parse(name).unwrap_or_else(|| panic!("unknown ISA {name}"));
            assert!(
                !have.contains(&isa),
                "{isa} must not be available here: {have:?}"
            );
        }
    }
}

/// The twin's trit decoding covers every byte (TQ1_0 can hold any byte value).
#[test]
fn trit_decode_is_total() {
    for b in 0..=255u8 {
        for n in 0..5 {
            assert!(reference::trit(b, n) <= 2);
        }
    }
}
