//! Kernel benchmarks: ternary GEMV/GEMM on real model shapes per format and ISA, float heads,
//! activation quantization, and a memory-bandwidth probe measured in the same run.
//!
//! Throughput is reported in bytes of weights read per second (criterion's "thrpt"), so a
//! memory-bound kernel can be compared with the `membw/read` probe directly.
//!
//! * `hot`: one matrix, reused (it stays in L2/L3 when it fits).
//! * `cold`: a ring of copies totalling 256 MiB (8× this machine's 32 MiB L3), one per
//!   iteration, so every weight byte comes from DRAM.
//!
//! Run: `cargo bench --bench kernels` (all), or filter, e.g. `cargo bench --bench kernels -- gemv/cold`.
//! `scripts/bench_table.py` turns criterion's results into the table in BENCHMARKS.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;
use ternmux_kernels::act::{ActQuant, QuantizedActs};
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::int8::{Int8Acts, Int8Matrix};
use ternmux_kernels::matmul::FloatMatrix;
use ternmux_kernels::pack::{pack_i2_s_row, pack_tq1_0, pack_tq2_0};
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};
use ternmux_kernels::{Isa, Kernels};

/// (K, N) = (row length, output rows): BitNet 2B-4T attention and FFN, an 8B-class FFN, the
/// bundled model.
const SHAPES: [(usize, usize); 5] = [
    (2560, 2560),
    (2560, 6912),
    (6912, 2560),
    (2048, 8192),
    (256, 256),
];
const COLD_BYTES: usize = 256 << 20;

/// Deterministic pseudo-random codes (xorshift), roughly 1/3 each of −1, 0, +1.
fn codes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 3) as u8
        })
        .collect()
}

/// A valid random ternary tensor (`n` rows of `k`) in `format`.
fn ternary_bytes(format: TernaryFormat, k: usize, n: usize) -> Vec<u8> {
    let c = codes(k * n, 0x9E37_79B9_7F4A_7C15 ^ (k * n) as u64);
    let mut out = vec![0u8; format.tensor_bytes(n, k).expect("size")];
    match format {
        TernaryFormat::I2S => {
            for r in 0..n {
                pack_i2_s_row(&c[r * k..(r + 1) * k], &mut out[r * k / 4..]);
            }
            let at = n * k / 4;
            out[at..at + 4].copy_from_slice(&0.02f32.to_le_bytes());
        }
        _ => {
            let bb = format.row_bytes(256);
            for (i, blk) in out.chunks_exact_mut(bb).enumerate() {
                let cb: [u8; 256] = c[i * 256..(i + 1) * 256].try_into().expect("block");
                let d = half::f16::from_f32(0.02);
                if format == TernaryFormat::Tq2_0 {
                    pack_tq2_0(&cb, d, blk);
                } else {
                    pack_tq1_0(&cb, d, blk);
                }
            }
        }
    }
    out
}

fn acts(k: usize, batch: usize, flavor: ActQuant) -> QuantizedActs {
    let x: Vec<f32> = (0..k * batch)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
        .collect();
    let mut a = QuantizedActs::new(flavor);
    a.quantize(&x, k).expect("quantize");
    a
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    g
}

/// Memory-bandwidth probe: sum a 256 MiB buffer of u64 with all threads (what a matmul can
/// at best stream) and with one.
fn membw(c: &mut Criterion) {
    let buf: Vec<u64> = (0..COLD_BYTES / 8).map(|i| i as u64).collect();
    let mut g = group(c, "membw");
    g.throughput(Throughput::Bytes(COLD_BYTES as u64));
    g.bench_function("read/all-threads", |b| {
        b.iter(|| {
            black_box(
                buf.par_chunks(1 << 16)
                    .map(|ch| ch.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                    .reduce(|| 0, u64::wrapping_add),
            )
        })
    });
    g.bench_function("read/1-thread", |b| {
        b.iter(|| black_box(buf.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
    });
    g.finish();
}

fn isas(big: bool) -> Vec<&'static Kernels> {
    // The scalar twin is the definition, not a contender: measure it on the small shape only.
    Kernels::available()
        .into_iter()
        .filter(|k| !big || k.isa() != Isa::Scalar)
        .collect()
}

fn gemv(c: &mut Criterion) {
    for residency in ["hot", "cold"] {
        let mut g = group(c, &format!("gemv/{residency}"));
        for &(k, n) in &SHAPES {
            if residency == "cold" && k * n < 1 << 20 {
                continue;
            }
            for format in TernaryFormat::ALL {
                let one = ternary_bytes(format, k, n);
                let copies = if residency == "cold" {
                    COLD_BYTES.div_ceil(one.len())
                } else {
                    1
                };
                let store: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
                let mats: Vec<TernaryMatrix<'_>> = store
                    .iter()
                    .map(|b| TernaryMatrix::new(format, b, n, k).expect("matrix"))
                    .collect();
                let a = acts(k, 1, ActQuant::PerToken);
                let mut out = vec![0f32; n];
                g.throughput(Throughput::Bytes(one.len() as u64));
                for kern in isas(k * n > 1 << 16) {
                    let id = BenchmarkId::new(
                        format!("{}/{}", format.name(), kern.isa()),
                        format!("{k}x{n}"),
                    );
                    let mut i = 0usize;
                    g.bench_function(id, |b| {
                        b.iter(|| {
                            i = (i + 1) % mats.len();
                            kern.ternary_matmul(&mats[i], &a, &mut out).expect("matmul");
                            black_box(&out);
                        })
                    });
                }
            }
        }
        g.finish();
    }
}

/// Batched products: weights are read once per batch, so batch 8 should cost far less than 8×.
fn gemm(c: &mut Criterion) {
    let (k, n) = (2560, 6912);
    let best = Kernels::detect();
    let mut g = group(c, "gemm/cold");
    for format in TernaryFormat::ALL {
        let one = ternary_bytes(format, k, n);
        let store: Vec<Vec<u8>> = (0..COLD_BYTES.div_ceil(one.len()))
            .map(|_| one.clone())
            .collect();
        let mats: Vec<TernaryMatrix<'_>> = store
            .iter()
            .map(|b| TernaryMatrix::new(format, b, n, k).expect("matrix"))
            .collect();
        g.throughput(Throughput::Bytes(one.len() as u64));
        for batch in [1usize, 8, 64] {
            for flavor in [ActQuant::PerToken, ActQuant::Q8K] {
                if flavor == ActQuant::Q8K && batch == 64 {
                    continue;
                }
                let a = acts(k, batch, flavor);
                let mut out = vec![0f32; n * batch];
                let id = BenchmarkId::new(
                    format!("{}/{}/{}", format.name(), best.isa(), flavor.name()),
                    format!("b{batch}"),
                );
                let mut i = 0usize;
                g.bench_function(id, |b| {
                    b.iter(|| {
                        i = (i + 1) % mats.len();
                        best.ternary_matmul(&mats[i], &a, &mut out).expect("matmul");
                        black_box(&out);
                    })
                });
            }
        }
    }
    g.finish();
}

/// One thread, weights in cache: compare with bitnet.cpp's published single-thread I2_S numbers
/// ([1,2048]×[2048,2048] in 0.058 ms on an EPYC 7V13).
fn gemv_one_thread(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let (k, n) = (2048, 2048);
    let mut g = group(c, "gemv/hot-1thread");
    for format in TernaryFormat::ALL {
        let bytes = ternary_bytes(format, k, n);
        let m = TernaryMatrix::new(format, &bytes, n, k).expect("matrix");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        for kern in isas(true) {
            for batch in [1usize, 8] {
                let a = acts(k, batch, ActQuant::PerToken);
                let mut out = vec![0f32; n * batch];
                let id = BenchmarkId::new(
                    format!("{}/{}", format.name(), kern.isa()),
                    format!("{k}x{n}/b{batch}"),
                );
                g.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| kern.ternary_matmul(&m, &a, &mut out).expect("matmul"))
                    })
                });
            }
        }
    }
    g.finish();
}

/// Output heads and embeddings: F16 / Q8_0 / Q6_K × f32 activations, 2B-4T's tied head shape,
/// and the F16 head requantized to int8 (batch 1 and 8).
fn heads(c: &mut Criterion) {
    let (k, n) = (2560, 32_000);
    let mut g = group(c, "head/cold");
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    for fmt in [
        FloatFormat::F16,
        FloatFormat::Q8_0,
        FloatFormat::Q6K,
        FloatFormat::Q4K,
    ] {
        let rb = fmt.row_bytes(k);
        let mut bytes: Vec<u8> = codes(rb * n, 7).iter().map(|&c| c * 37 + 3).collect();
        // Keep every f16 scale finite: overwrite scale fields with a sane value.
        let bb = fmt.block_bytes();
        let half = half::f16::from_f32(0.01).to_le_bytes();
        for blk in bytes.chunks_exact_mut(bb) {
            match fmt {
                FloatFormat::F16 => blk.copy_from_slice(&half),
                FloatFormat::Q8_0 => blk[..2].copy_from_slice(&half),
                FloatFormat::Q6K => blk[bb - 2..].copy_from_slice(&half),
                _ => {
                    blk[..2].copy_from_slice(&half);
                    blk[2..4].copy_from_slice(&half);
                }
            }
        }
        let m = FloatMatrix::new(fmt, &bytes, n, k).expect("matrix");
        let mut out = vec![0f32; n * 8];
        let kern = Kernels::detect();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(
            BenchmarkId::new(format!("{}/{}", fmt.name(), kern.isa()), format!("{k}x{n}")),
            |b| b.iter(|| kern.float_matmul(&m, &x, &mut out[..n]).expect("matmul")),
        );
        if fmt != FloatFormat::F16 {
            continue;
        }
        // The same head requantized to int8 (what the CPU backend computes by default), at
        // batch 1 and 8, and the F16 head at batch 8 for comparison.
        let x8: Vec<f32> = (0..8 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        g.bench_function(
            BenchmarkId::new(format!("f16-b8/{}", kern.isa()), format!("{k}x{n}")),
            |b| b.iter(|| kern.float_matmul(&m, &x8, &mut out).expect("matmul")),
        );
        let h = Int8Matrix::quantize(kern, &m).expect("int8");
        g.throughput(Throughput::Bytes(h.bytes() as u64));
        for batch in [1usize, 8] {
            let mut acts = Int8Acts::default();
            acts.quantize(&x8[..batch * k], k).expect("acts");
            let name = if batch == 1 { "int8" } else { "int8-b8" };
            g.bench_function(
                BenchmarkId::new(format!("{name}/{}", kern.isa()), format!("{k}x{n}")),
                |b| {
                    b.iter(|| {
                        kern.int8_matmul(&h.view(), &acts, &mut out[..batch * n])
                            .expect("int8 matmul")
                    })
                },
            );
        }
    }
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let k = 2560;
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut g = group(c, "act-quant");
    g.throughput(Throughput::Elements(k as u64));
    for flavor in [ActQuant::PerToken, ActQuant::Q8K] {
        let mut a = QuantizedActs::new(flavor);
        g.bench_function(flavor.name(), |b| {
            b.iter(|| a.quantize(black_box(&x), k).expect("quantize"))
        });
    }
    g.finish();
}

criterion_group!(benches, membw, gemv, gemm, gemv_one_thread, heads, quantize);
criterion_main!(benches);
