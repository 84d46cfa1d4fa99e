//! `ternmux bench-mux`: the multiplexer's three measurements in one run —
//! (a) page-in bandwidth by unit size against the device's pinned host→device peak,
//! (b) streaming a model several times larger than the budget against the PCIe bound,
//! (c) 12 models under Zipf-distributed requests: layer-level LRU against whole-model LRU.

use crate::{Failure, say as w};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ternmux::backend::opencl::{CommandTimes, Timeline};
use ternmux::backend::{Device, Placement};
use ternmux::kernels::ternary::TernaryFormat;
use ternmux::model::GenerateOptions;
use ternmux::mux::{Mux, MuxOptions, PageIn, Policy, UnitId};
use ternmux::synth::{Shape, SynthSpec, write_synthetic};

/// Options of `ternmux bench-mux`.
#[derive(clap::Args)]
pub struct BenchMuxArgs {
    /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
    #[arg(short = 'd', long = "device", default_value = "auto")]
    device: Device,
    /// Largest unit of the page-in sweep, in MiB (the sweep starts near 64 KiB).
    #[arg(long = "max-unit-mib", default_value_t = 256)]
    max_unit_mib: usize,
    /// Repetitions of each page-in (the median is reported).
    #[arg(long = "reps", default_value_t = 7)]
    reps: usize,
    /// Tokens decoded per streaming measurement.
    #[arg(long = "stream-tokens", default_value_t = 16)]
    stream_tokens: usize,
    /// Requests in the Zipf mix.
    #[arg(long = "requests", default_value_t = 240)]
    requests: usize,
    /// Run only these parts (a, b, c; default all).
    #[arg(long = "parts", default_value = "abc")]
    parts: String,
    /// Directory for the synthetic models (default: a temporary one, removed after).
    #[arg(long = "dir")]
    dir: Option<PathBuf>,
}

fn synth(dir: &Path, name: &str, shape: Shape, seed: u64) -> Result<PathBuf, Failure> {
    let p = dir.join(format!("{name}.gguf"));
    if !p.exists() {
        let spec = SynthSpec {
            arch: "bitnet-b1.58".into(),
            shape,
            format: TernaryFormat::Tq2_0,
            seed,
        };
        write_synthetic(&spec, &p)?;
    }
    Ok(p)
}

fn shape(
    n_embd: usize,
    n_ff: usize,
    n_layer: usize,
    n_head_kv_div: usize,
    n_vocab: usize,
) -> Shape {
    let n_head = (n_embd / 64).max(1);
    Shape {
        n_embd,
        n_ff,
        n_layer,
        n_head,
        n_head_kv: (n_head / n_head_kv_div).max(1),
        n_vocab,
        n_ctx: 256,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The peak a page-in is compared with: pinned host→device on a device, memcpy on the host.
fn peak_gb_s(placement: &Placement, bytes: usize, reps: usize) -> Result<(String, f64), Failure> {
    match placement {
        Placement::OpenCl(dev) => {
            let all = ternmux::backend::opencl::bench::transfer_bandwidth(dev, bytes, reps)?;
            let pinned = all
                .iter()
                .find(|b| b.what.contains("pinned"))
                .map_or(0.0, |b| b.gb_s);
            Ok(("pinned h2d".into(), pinned))
        }
        Placement::Cpu => {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) {
                let t = Instant::now();
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(("memcpy".into(), bytes as f64 / best / 1e9))
        }
    }
}

/// Runs the benchmark.
pub fn bench_mux(a: BenchMuxArgs, out: &mut impl Write) -> Result<(), Failure> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("ternmux-bench-mux-{}", std::process::id()));
            tmp
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| ternmux::Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    let r = run(&a, &dir, out);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn run(a: &BenchMuxArgs, dir: &Path, out: &mut impl Write) -> Result<(), Failure> {
    let (placement, note) = a.device.resolve();
    w(out, format!("device: {}", placement.describe()))?;
    if let Some(n) = note {
        w(out, format!("note: {n}"))?;
    }
    // Page-in paths: (how, with the pinned host cache).
    let modes: Vec<(PageIn, bool)> = match &placement {
        Placement::OpenCl(_) => vec![
            (PageIn::Direct, false),
            (PageIn::Staged, false),
            (PageIn::Staged, true),
        ],
        Placement::Cpu => vec![(PageIn::Auto, false)],
    };
    if a.parts.contains('a') {
        page_in_sweep(a, dir, &placement, &modes, out)?;
    }
    if a.parts.contains('b') {
        let cached: &[bool] = match &placement {
            Placement::OpenCl(_) => &[false, true],
            Placement::Cpu => &[false],
        };
        streaming(a, dir, &placement, cached, out)?;
    }
    if a.parts.contains('c') {
        zipf(a, dir, out)?;
    }
    Ok(())
}

fn page_in_sweep(
    a: &BenchMuxArgs,
    dir: &Path,
    placement: &Placement,
    modes: &[(PageIn, bool)],
    out: &mut impl Write,
) -> Result<(), Failure> {
    w(out, "\n## (a) page-in bandwidth by unit size (one block, steady state: the evicted unit's storage is reused)".into())?;
    w(
        out,
        format!(
            "{:>10} {:>8} {:>12} {:>12} {:>10} {:>17}",
            "unit", "path", "page-in GB/s", "peak GB/s", "of peak", "host fill (mean)"
        ),
    )?;
    let sizes = [
        (256, 256, 4),
        (512, 512, 1),
        (1024, 1024, 1),
        (2048, 2048, 1),
        (4096, 4096, 1),
        (4096, 16384, 1),
        (8192, 16384, 1),
        (8192, 24576, 1),
    ];
    for (i, &(e, f, kvd)) in sizes.iter().enumerate() {
        let layer_bytes = (4 * e * e + 3 * e * f) / 4;
        if layer_bytes > a.max_unit_mib << 20 {
            break;
        }
        let path = synth(
            dir,
            &format!("unit{i}"),
            shape(e, f, 1, kvd, 512),
            11 + i as u64,
        )?;
        for &(mode, cached) in modes {
            // The same file twice: paging one in evicts the other and reuses its storage.
            let probe = Mux::with_options(
                a.device,
                MuxOptions {
                    budget: usize::MAX,
                    page_in: mode,
                    ..MuxOptions::default()
                },
            )?;
            probe.register("x", &path)?;
            let unit = probe
                .stats()
                .model("x")
                .and_then(|m| m.units.first().map(|u| u.1.bytes))
                .unwrap_or(0);
            drop(probe);
            // With the host cache: room for both units' copies, so every measured page-in
            // after the warm-up is a hit.
            let mux = Mux::with_options(
                a.device,
                MuxOptions {
                    budget: unit,
                    page_in: mode,
                    host_cache: if cached { 2 * unit } else { 0 },
                    ..MuxOptions::default()
                },
            )?;
            mux.register("a", &path)?;
            mux.register("b", &path)?;
            // Warm: page cache, allocator, first-touch of the device buffer.
            mux.page_in("a", UnitId::Block(0))?;
            mux.page_in("b", UnitId::Block(0))?;
            mux.quiesce()?;
            let mut secs = Vec::new();
            // The host's share of each page-in: the fill (copy into the staging ring or the
            // driver's own staging, queueing, the unit's views), before the wait for the copy.
            let fill_total = |m: &Mux| {
                let s = m.stats();
                ["a", "b"]
                    .iter()
                    .filter_map(|n| s.model(n).map(|x| (x.page_in_total, x.misses)))
                    .fold((Duration::ZERO, 0), |(t, n), (d, k)| (t + d, n + k))
            };
            let (fill0, n0) = fill_total(&mux);
            for r in 0..a.reps.max(1) {
                let name = if r % 2 == 0 { "a" } else { "b" };
                let t = Instant::now();
                mux.page_in(name, UnitId::Block(0))?;
                mux.quiesce()?;
                secs.push(t.elapsed().as_secs_f64());
            }
            let (fill1, n1) = fill_total(&mux);
            let fill_ms = (fill1 - fill0).as_secs_f64() * 1e3 / (n1 - n0).max(1) as f64;
            let mean_ms = secs.iter().sum::<f64>() * 1e3 / secs.len().max(1) as f64;
            let gb_s = unit as f64 / median(secs) / 1e9;
            let (peak_what, peak) = peak_gb_s(placement, unit, a.reps)?;
            w(
                out,
                format!(
                    "{:>7.2} MiB {:>8} {:>12.2} {:>12.2} {:>9.0}% {:>14.3} ms   (peak: {peak_what}; mean page-in {mean_ms:.3} ms)",
                    unit as f64 / (1u64 << 20) as f64,
                    if cached {
                        "cached".into()
                    } else {
                        format!("{mode:?}").to_lowercase()
                    },
                    gb_s,
                    peak,
                    100.0 * gb_s / peak.max(1e-9),
                    fill_ms,
                ),
            )?;
        }
    }
    Ok(())
}

fn streaming(
    a: &BenchMuxArgs,
    dir: &Path,
    placement: &Placement,
    cached: &[bool],
    out: &mut impl Write,
) -> Result<(), Failure> {
    w(
        out,
        "\n## (b) streaming a model larger than the budget (decode, batch 1)".into(),
    )?;
    // 0.7B-class blocks (BitNet b1.58 large: 1536 wide, 4096 FFN, 24 blocks), small vocabulary
    // so the head is not the largest unit.
    let path = synth(dir, "stream", shape(1536, 4096, 24, 1, 4096), 5)?;
    let opts = GenerateOptions {
        max_tokens: a.stream_tokens,
        n_ctx: 256,
        ..GenerateOptions::default()
    };
    let mux = Mux::new(a.device, usize::MAX)?;
    mux.register("m", &path)?;
    // With TERNMUX_CL_PROFILE=1: where the device's time goes (kernels, copies, both, idle).
    let profiled = match placement {
        Placement::OpenCl(d) if d.profiling() => Some(d),
        _ => None,
    };
    let s = mux.stats();
    let m = s.model("m").cloned().unwrap_or_default();
    let total = m.total_bytes;
    let largest = m.units.iter().map(|u| u.1.bytes).max().unwrap_or(0);
    // Resident baseline.
    mux.generate("m", "hello", &opts, |_| true)?;
    let host0 = HostMark::take(&mux, placement);
    let g = mux.generate("m", "hello", &opts, |_| true)?;
    let resident_host = HostMark::take(&mux, placement)
        .since(&host0)
        .line(&g, 1 + g.tokens.len().saturating_sub(1));
    let base = g.timings.decode_tok_s();
    let (peak_what, peak) = peak_gb_s(placement, largest, a.reps)?;
    w(
        out,
        format!(
            "model {:.1} MiB in {} units (largest {:.2} MiB); resident decode {base:.1} tok/s; \
             peak {peak_what} {peak:.2} GB/s at the unit size; decode tok/s below: the median \
             of 3 generations",
            total as f64 / (1u64 << 20) as f64,
            m.units.len(),
            largest as f64 / (1u64 << 20) as f64
        ),
    )?;
    w(out, format!("resident {}", resident_host.trim_start()))?;
    w(
        out,
        format!(
            "{:>8} {:>11} {:>13} {:>14} {:>12} {:>9}  page-ins",
            "model÷budget", "budget MiB", "MiB/token", "bound tok/s", "decode tok/s", "of bound"
        ),
    )?;
    for (&with_cache, ratio) in cached.iter().flat_map(|c| [2usize, 4, 10].map(|r| (c, r))) {
        // With the host cache: room for the whole model's copies.
        mux.set_host_cache(if with_cache { total } else { 0 })?;
        let budget = (total / ratio).max(2 * largest);
        mux.set_budget(budget)?;
        mux.generate("m", "hello", &opts, |_| true)?; // warm
        // The median of three generations' decode rates (one is at the mercy of host jitter);
        // bytes and the device timeline are from the last.
        let mut rates = Vec::new();
        for _ in 0..2 {
            rates.push(
                mux.generate("m", "hello", &opts, |_| true)?
                    .timings
                    .decode_tok_s(),
            );
        }
        let host0 = HostMark::take(&mux, placement);
        if let Some(d) = profiled {
            d.take_commands()?;
        }
        let g = mux.generate("m", "hello", &opts, |_| true)?;
        let host = HostMark::take(&mux, placement).since(&host0);
        let timeline = match profiled {
            Some(d) => {
                let commands = d.take_commands()?;
                let csv = dir.join(format!(
                    "stream-{ratio}x-{}.csv",
                    if with_cache { "cache" } else { "mapping" }
                ));
                write_commands(&csv, &commands)?;
                Some(Timeline::from_commands(&commands))
            }
            None => None,
        };
        let passes = 1 + g.tokens.len().saturating_sub(1);
        let per_pass = host.bytes_in as f64 / passes.max(1) as f64;
        let bound = peak * 1e9 / per_pass.max(1.0);
        rates.push(g.timings.decode_tok_s());
        let got = median(rates);
        w(
            out,
            format!(
                "{:>12.1} {:>11.1} {:>13.2} {:>14.1} {:>12.1} {:>8.0}%  {}",
                total as f64 / budget as f64,
                budget as f64 / (1u64 << 20) as f64,
                per_pass / (1u64 << 20) as f64,
                bound,
                got,
                100.0 * got / bound.max(1e-9),
                if with_cache {
                    "from the host cache"
                } else {
                    "from the mapping"
                }
            ),
        )?;
        // Where the host's time per pass went (the last generation, prompt included).
        w(out, host.line(&g, passes))?;
        if let Some(t) = timeline {
            // The whole generation (prompt included), per pass.
            let ms = |s: f64| 1e3 * s / passes.max(1) as f64;
            w(
                out,
                format!(
                    "{:>12} device per pass: {:.3} ms span, kernels {:.3} ms, copies {:.3} ms, \
                     both at once {:.3} ms, idle {:.3} ms",
                    "",
                    ms(t.span_s),
                    ms(t.kernels_s),
                    ms(t.copies_s),
                    ms(t.both_s),
                    ms(t.idle_s())
                ),
            )?;
        }
    }
    Ok(())
}

/// The host's running totals at one moment: kernel queueing (OpenCL) and model `m`'s
/// multiplexer calls, with the bytes they paged in.
struct HostMark {
    bytes_in: u64,
    queued: Duration,
    launches: u64,
    arg_sets: u64,
    acquire: Duration,
    page_in: Duration,
    release: Duration,
}

impl HostMark {
    fn take(mux: &Mux, placement: &Placement) -> HostMark {
        let m = mux.stats().model("m").cloned().unwrap_or_default();
        let (queued, launches, arg_sets) = match placement {
            Placement::OpenCl(d) => (d.queue_time(), d.launches(), d.arg_sets()),
            Placement::Cpu => (Duration::ZERO, 0, 0),
        };
        HostMark {
            bytes_in: m.bytes_in,
            queued,
            launches,
            arg_sets,
            acquire: m.acquire_total,
            page_in: m.page_in_total,
            release: m.release_total,
        }
    }

    /// What happened between `earlier` and this mark.
    fn since(&self, earlier: &HostMark) -> HostMark {
        HostMark {
            bytes_in: self.bytes_in - earlier.bytes_in,
            queued: self.queued.saturating_sub(earlier.queued),
            launches: self.launches - earlier.launches,
            arg_sets: self.arg_sets - earlier.arg_sets,
            acquire: self.acquire.saturating_sub(earlier.acquire),
            page_in: self.page_in.saturating_sub(earlier.page_in),
            release: self.release.saturating_sub(earlier.release),
        }
    }

    /// Per pass of generation `g` (`passes` of them, the prompt's included).
    fn line(&self, g: &ternmux::model::Generation, passes: usize) -> String {
        let n = passes.max(1) as f64;
        let ms = |d: Duration| 1e3 * d.as_secs_f64() / n;
        format!(
            "{:>12} host per pass: {:.3} ms wall, queueing kernels {:.3} ms ({:.0} launches, {:.0} \
             arguments set), asking for units {:.3} ms (page-ins {:.3} ms), giving them back \
             {:.3} ms",
            "",
            ms(g.timings.prefill + g.timings.decode),
            ms(self.queued),
            self.launches as f64 / n,
            self.arg_sets as f64 / n,
            ms(self.acquire),
            ms(self.page_in),
            ms(self.release),
        )
    }
}

/// Writes profiled commands as CSV (microseconds from the first one queued).
fn write_commands(path: &Path, commands: &[CommandTimes]) -> Result<(), Failure> {
    let t0 = commands.iter().map(|c| c.queued).min().unwrap_or(0);
    let us = |t: u64| t.saturating_sub(t0) as f64 * 1e-3;
    let mut text = String::from("name,queued_us,submit_us,start_us,end_us\n");
    for c in commands {
        text.push_str(&format!(
            "{},{:.1},{:.1},{:.1},{:.1}\n",
            c.name,
            us(c.queued),
            us(c.submit),
            us(c.start),
            us(c.end)
        ));
    }
    std::fs::write(path, text).map_err(|e| Failure {
        error: ternmux::Error::Io {
            path: path.into(),
            source: e,
        },
        hint: None,
    })
}

/// Zipf-distributed model choice (s = 1.1) from a fixed-seed generator.
fn zipf_sequence(n_models: usize, requests: usize, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=n_models).map(|r| 1.0 / (r as f64).powf(1.1)).collect();
    let sum: f64 = weights.iter().sum();
    let mut state = seed;
    (0..requests)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64 * sum;
            let mut acc = 0.0;
            weights
                .iter()
                .position(|w| {
                    acc += w;
                    u < acc
                })
                .unwrap_or(n_models - 1)
        })
        .collect()
}

fn zipf(a: &BenchMuxArgs, dir: &Path, out: &mut impl Write) -> Result<(), Failure> {
    let n = 12;
    w(
        out,
        format!(
            "\n## (c) {n} models, {} Zipf(1.1) requests of 4 tokens: layer-level LRU vs whole-model LRU",
            a.requests
        ),
    )?;
    let mut paths = Vec::new();
    for i in 0..n {
        // Sizes vary 3:1 across the models.
        let layers = 2 + i % 5;
        paths.push(synth(
            dir,
            &format!("zipf{i}"),
            shape(512, 1024, layers, 2, 1000),
            100 + i as u64,
        )?);
    }
    let seq = zipf_sequence(n, a.requests, 42);
    let opts = GenerateOptions {
        max_tokens: 4,
        n_ctx: 64,
        ..GenerateOptions::default()
    };
    w(
        out,
        format!(
            "{:>8} {:>10} | {:>9} {:>13} {:>8} | {:>9} {:>13} {:>8}",
            "budget", "MiB", "layer hit", "MiB/token", "s", "whole hit", "MiB/token", "s"
        ),
    )?;
    let mut total = 0;
    for pct in [5usize, 10, 20, 35, 50, 75, 100] {
        let mut row = Vec::new();
        for policy in [Policy::LayerLru, Policy::WholeModelLru] {
            let mux = Mux::with_options(
                a.device,
                MuxOptions {
                    budget: usize::MAX,
                    policy,
                    ..MuxOptions::default()
                },
            )?;
            for (i, p) in paths.iter().enumerate() {
                mux.register(&format!("z{i}"), p)?;
            }
            total = mux
                .stats()
                .models
                .iter()
                .map(|m| m.total_bytes)
                .sum::<usize>();
            mux.set_budget(total * pct / 100)?;
            let t = Instant::now();
            let mut tokens = 0;
            for &m in &seq {
                tokens += mux
                    .generate(&format!("z{m}"), "a", &opts, |_| true)?
                    .tokens
                    .len();
            }
            let secs = t.elapsed().as_secs_f64();
            let s = mux.stats();
            let hit = s.hits() as f64 / (s.hits() + s.misses()).max(1) as f64;
            row.push((
                hit,
                s.bytes_in() as f64 / tokens.max(1) as f64 / (1u64 << 20) as f64,
                secs,
            ));
        }
        w(
            out,
            format!(
                "{:>7}% {:>10.2} | {:>8.1}% {:>13.3} {:>8.2} | {:>8.1}% {:>13.3} {:>8.2}",
                pct,
                (total * pct / 100) as f64 / (1u64 << 20) as f64,
                100.0 * row[0].0,
                row[0].1,
                row[0].2,
                100.0 * row[1].0,
                row[1].1,
                row[1].2
            ),
        )?;
    }
    Ok(())
}
