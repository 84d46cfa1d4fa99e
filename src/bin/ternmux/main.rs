//! The `ternmux` command-line tool.
//!
//! Errors print once, behind a `ternmux: ` prefix, with a hint after a blank line where one
//! helps; the exit code is 2 on error and 0 on success. A closed pipe (`ternmux inspect f | head`)
//! ends the program quietly with exit code 0.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use ternmux::gguf::{GgufFile, Report};
use ternmux::kernels::ternary::TernaryFormat;

#[derive(Parser)]
#[command(
    name = "ternmux",
    version,
    about = "Run 1.58-bit ternary language models fast on CPUs and GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

mod bench_conc;
mod bench_model;
mod bench_mux;
mod demo;
mod plot;
mod serve;

#[derive(Subcommand)]
enum Command {
    /// Three models under one small weight budget, queried in turn: each answer with the trace
    /// of its page-ins and evictions and the budget bar, then a summary table.
    Demo(demo::DemoArgs),
    /// Measure the multiplexer: page-in bandwidth by unit size against the pinned peak,
    /// streaming a model larger than the budget against the PCIe bound, and 12 models under
    /// Zipf-distributed requests with layer-level vs whole-model LRU.
    BenchMux(bench_mux::BenchMuxArgs),
    /// Generate text from a prompt, streaming it as it is produced; ends with a timing line.
    Run(RunArgs),
    /// Print a GGUF file's architecture, metadata, tensor table and totals per type.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
    },
    /// Chat with a model interactively, in its chat format (one message per line; Ctrl-D ends).
    Chat {
        /// The GGUF model.
        #[arg(short = 'm', long = "model")]
        model: PathBuf,
        /// A system message.
        #[arg(short = 's', long = "system")]
        system: Option<String>,
        /// Most tokens per reply.
        #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
        n_predict: usize,
        /// Temperature (0 = greedy).
        #[arg(long = "temp", default_value_t = 0.7)]
        temp: f32,
        /// Random seed.
        #[arg(long = "seed", default_value_t = 0x5EED)]
        seed: u64,
        /// Worker threads (default: all cores).
        #[arg(short = 't', long = "threads")]
        threads: Option<usize>,
        /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
        #[arg(short = 'd', long = "device", default_value = "auto")]
        device: ternmux::backend::Device,
    },
    /// List the OpenCL devices (the N of `--device opencl:N`), or say why there are none.
    Devices,
    /// Measure an OpenCL device in one run: copy and host→device bandwidth, the ternary
    /// matmul kernels on BitNet 2B-4T, 8B- and 70B-class shapes, then (with -m) a model end to end.
    BenchDevice {
        /// The OpenCL device (opencl or opencl:N).
        #[arg(short = 'd', long = "device", default_value = "opencl")]
        device: ternmux::backend::Device,
        /// Transfer size for the bandwidth probes, MiB.
        #[arg(long = "copy-mib", default_value_t = 1024)]
        copy_mib: usize,
        /// Launches per kernel timing.
        #[arg(long = "launches", default_value_t = 100)]
        launches: usize,
        /// Batch sizes of the ternary matmul table.
        #[arg(long = "batches", num_args = 1.., default_values_t = [1usize, 8, 32, 64])]
        batches: Vec<usize>,
        /// Only the transfers and the ternary matmul table (no launch, queue and page-in
        /// probes).
        #[arg(long = "kernels-only")]
        kernels_only: bool,
        /// A model to run end to end after the kernels (prefill and decode at batch 1).
        #[arg(short = 'm', long = "model")]
        model: Option<PathBuf>,
        /// Prompt tokens for the end-to-end run.
        #[arg(short = 'p', long = "prompt-tokens", default_value_t = 128)]
        prompt_tokens: usize,
        /// Decoded tokens for the end-to-end run.
        #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
        gen_tokens: usize,
    },
    /// Measure prefill and decode speed on a model (like llama-bench): a random prompt of
    /// `--prompt-tokens`, then `--gen-tokens` decoded one at a time. `bench concurrency`
    /// measures many requests at once.
    Bench(Box<BenchCmd>),
    /// Serve models over an OpenAI-compatible HTTP API (completions, chat, SSE streaming,
    /// /v1/models, /health, Prometheus /metrics), with continuous batching.
    Serve(serve::ServeArgs),
    /// Write a synthetic model: random ternary weights at a real shape, with a working tokenizer.
    Synth {
        /// Output GGUF file.
        output: PathBuf,
        /// Architecture: bitnet, bitnet-b1.58 or llama.
        #[arg(long, default_value = "bitnet-b1.58")]
        arch: String,
        /// Shape preset: 2b, 0.7b, 3b, 8b, tiny.
        #[arg(long, default_value = "2b")]
        shape: String,
        /// Ternary format of the linear layers.
        #[arg(long, value_enum, default_value = "tq2_0")]
        format: Target,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Rewrite the ternary tensors of a GGUF file in another ternary format (others are copied).
    Convert {
        /// Input GGUF file.
        input: PathBuf,
        /// Output GGUF file.
        output: PathBuf,
        /// Target ternary format.
        #[arg(long, value_enum)]
        to: Target,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The GGUF model.
    #[arg(
        short = 'm',
        long = "model",
        default_value = "models/bitllama2c-stories3M-TQ2_0.gguf"
    )]
    model: PathBuf,
    /// The prompt (empty: start from BOS alone).
    #[arg(short = 'p', long = "prompt", default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.0)]
    temp: f32,
    /// Top-k (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long = "seed", default_value_t = 0x5EED)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Context size (0: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx: usize,
    /// Stop at this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// How the CPU computes the output head: int8 (a float head requantized per row on first
    /// use: half an F16 head's bytes per token) or file (the file's own type and arithmetic).
    #[arg(long = "head", default_value = "int8")]
    head: ternmux::model::HeadMode,
    /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
    #[arg(short = 'd', long = "device", default_value = "auto")]
    device: ternmux::backend::Device,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    which: Option<BenchWhich>,
    #[command(flatten)]
    single: BenchArgs,
}

#[derive(Subcommand)]
enum BenchWhich {
    /// Throughput, time to first token and per-query speed at concurrency 1…128, in process
    /// or against a server URL; writes summary and per-query CSVs and a PNG chart.
    Concurrency(bench_conc::ConcArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The GGUF model.
    #[arg(
        short = 'm',
        long = "model",
        default_value = "models/bitllama2c-stories3M-TQ2_0.gguf"
    )]
    model: PathBuf,
    /// Prompt length in tokens (processed as one batch).
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode after the prompt.
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 32)]
    gen_tokens: usize,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Repetitions (the best of each is reported).
    #[arg(short = 'r', long = "reps", default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// How the CPU computes the output head: int8 (a float head requantized per row on first
    /// use: half an F16 head's bytes per token) or file (the file's own type and arithmetic).
    #[arg(long = "head", default_value = "int8")]
    head: ternmux::model::HeadMode,
    /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
    #[arg(short = 'd', long = "device", default_value = "auto")]
    device: ternmux::backend::Device,
    /// Write the prompt's token ids and the logits after it to this file (u32 count, u32 ids,
    /// u32 vocab, f32 logits; little-endian), for comparison with another engine.
    #[arg(long = "logits-out")]
    logits_out: Option<PathBuf>,
    /// Also decode this many sequences at once (one token each per pass, as the engine batches
    /// them) and report the total tok/s and, when profiling, the kernels of one pass.
    #[arg(short = 'b', long = "batch", default_value_t = 1)]
    batch: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    #[value(name = "tq2_0")]
    Tq2_0,
    #[value(name = "tq1_0")]
    Tq1_0,
    #[value(name = "i2_s")]
    I2S,
}

impl From<Target> for TernaryFormat {
    fn from(t: Target) -> TernaryFormat {
        match t {
            Target::Tq2_0 => TernaryFormat::Tq2_0,
            Target::Tq1_0 => TernaryFormat::Tq1_0,
            Target::I2S => TernaryFormat::I2S,
        }
    }
}

/// A failure with an optional hint for the person at the terminal.
struct Failure {
    error: ternmux::Error,
    hint: Option<&'static str>,
}

impl From<ternmux::Error> for Failure {
    fn from(error: ternmux::Error) -> Self {
        let hint = match &error {
            ternmux::Error::Io { .. } => Some("check the path and its permissions"),
            ternmux::Error::Gguf(m) if m.contains("bad magic") => Some(
                "the file is not a GGUF model; convert it with llama.cpp's or bitnet.cpp's converter",
            ),
            ternmux::Error::Quant(m) if m.contains("i2_s") => Some(
                "i2_s stores one scale per tensor; convert to tq2_0 or tq1_0 instead, which keep per-block scales",
            ),
            _ => None,
        };
        Failure { error, hint }
    }
}

fn run_model(a: RunArgs, out: &mut impl Write) -> Result<(), Failure> {
    use ternmux::model::GenerateOptions;
    use ternmux::sampling::SamplingParams;
    set_threads(a.threads)?;
    let mut model = open_model(&a.model, a.device)?;
    model.set_head_mode(a.head);
    let opts = GenerateOptions {
        max_tokens: a.n_predict,
        sampling: SamplingParams {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
        n_ctx: a.ctx,
        stop: a.stop,
        ..GenerateOptions::default()
    };
    write!(out, "{}", a.prompt).map_err(io_failure)?;
    out.flush().map_err(io_failure)?;
    let mut io_err = None;
    let g = model.generate(&a.prompt, &opts, |piece| {
        let r = out.write_all(piece.as_bytes()).and_then(|()| out.flush());
        match r {
            Ok(()) => true,
            Err(e) => {
                io_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = io_err {
        return Err(io_failure(e));
    }
    writeln!(out).map_err(io_failure)?;
    let t = &g.timings;
    eprintln!(
        "ternmux: {} ({}, {} threads, kernels {}): load {:.1} ms · prompt {} tok in {:.1} ms ({:.1} tok/s) · \
         generated {} tok, decode {:.1} tok/s · stop: {:?}",
        a.model.display(),
        model.config.arch_name,
        rayon::current_num_threads(),
        ternmux::kernels::Kernels::get().isa(),
        t.load.as_secs_f64() * 1e3,
        t.prompt_tokens,
        t.prefill.as_secs_f64() * 1e3,
        t.prefill_tok_s(),
        g.tokens.len(),
        t.decode_tok_s(),
        g.stop
    );
    Ok(())
}

/// Opens a model with a progress bar on stderr (hidden when stderr is not a terminal), places
/// it on `device` and says on stderr where it runs (and why, when not where asked).
fn open_model(
    path: &std::path::Path,
    device: ternmux::backend::Device,
) -> Result<ternmux::model::Model, Failure> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(3), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} opening {prefix} [{bar:20}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    bar.set_prefix(format!("{} ({:.1} MB)", path.display(), size as f64 / 1e6));
    let model = ternmux::model::Model::open_with_progress(path, |stage| {
        bar.set_message(stage.describe());
        bar.inc(1);
    });
    let mut model = model?;
    bar.set_message("placing on the device");
    let placed = model.place(device);
    bar.finish_and_clear();
    placed?;
    if let Some(note) = model.device_note() {
        eprintln!("ternmux: {note}");
    }
    eprintln!("ternmux: device {}", model.placement().describe());
    Ok(model)
}

fn set_threads(threads: Option<usize>) -> Result<(), Failure> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| Failure {
                error: ternmux::Error::Quant(format!("thread pool: {e}")),
                hint: None,
            })?;
    }
    Ok(())
}

/// What `bench-device` measures.
struct DeviceProbes {
    /// Transfer size of the bandwidth probes, MiB.
    copy_mib: usize,
    /// Launches per kernel timing.
    launches: usize,
    /// Batch sizes of the ternary matmul table.
    batches: Vec<usize>,
    /// Only the transfers and the ternary matmul table.
    kernels_only: bool,
}

fn bench_device(
    device: ternmux::backend::Device,
    probes: &DeviceProbes,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let (copy_mib, launches) = (probes.copy_mib, probes.launches);
    use ternmux::backend::Placement;
    use ternmux::backend::opencl::bench;
    let (placement, note) = device.resolve();
    let Placement::OpenCl(dev) = placement else {
        return Err(ternmux::Error::Device(
            note.unwrap_or_else(|| "bench-device needs an OpenCL device".into()),
        )
        .into());
    };
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io_failure);
    w(
        out,
        format!(
            "device: {} (kernels built in {:.2} s{}{})",
            dev.info(),
            dev.build_time().as_secs_f64(),
            if dev.dp4a() { "; dp4a" } else { "" },
            if dev.mma() { "; int8 tensor cores" } else { "" }
        ),
    )?;
    for why in dev.build_fallbacks() {
        w(out, format!("kernel build fell back: {why}"))?;
    }
    w(out, "\n## transfers".into())?;
    let bw = bench::transfer_bandwidth(&dev, copy_mib << 20, 5)?;
    for b in &bw {
        w(
            out,
            format!(
                "{:<46} {:>6} MiB {:>9.1} GB/s",
                b.what,
                b.bytes >> 20,
                b.gb_s
            ),
        )?;
    }
    let copy_bw = bw[0].gb_s;
    if !probes.kernels_only {
        launch_probes(&dev, out)?;
    }
    ternary_table(&dev, &probes.batches, launches, copy_bw, out)
}

/// `bench-device`'s launch, queue and page-in probes.
fn launch_probes(
    dev: &ternmux::backend::opencl::ClDevice,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use ternmux::backend::opencl::bench;
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io_failure);
    for (what, n, norm) in [
        ("a tiny kernel (copy of 64 floats)", 64, false),
        ("norm_quant of one 2560-float row", 2560, true),
    ] {
        let c = bench::launch_overhead(dev, n, norm, 1000)?;
        let device = c
            .device_s
            .map(|d| format!(", {:.1} µs device time", d * 1e6))
            .unwrap_or_default();
        w(
            out,
            format!(
                "launch of {what}: {:.1} µs to queue, {:.1} µs each back to back{device}",
                c.queue_s * 1e6,
                c.wall_s * 1e6
            ),
        )?;
    }
    if dev.lanes() >= 2 {
        let probes = bench::queue_overlap_probes(dev, 6912, 2560, 400)?;
        for (what, o) in [
            "TQ2_0 GEMV 6912 × 2560",
            "norm_quant of one row",
            "norm_quant of one 2^20-float row (one work-group)",
        ]
        .iter()
        .zip(probes)
        {
            w(
                out,
                format!(
                    "two compute queues, {what}: µs per launch {:.1} on one queue ({:.1} to \
                     queue), {:.1} on two from one thread, {:.1} on two from two threads",
                    o.one_queue_s * 1e6,
                    o.queue_s * 1e6,
                    o.two_queues_s * 1e6,
                    o.two_threads_s * 1e6
                ),
            )?;
        }
    }
    let [plain, viewed, behind, crowded] = bench::launch_cost_variants(dev, 6912, 2560, 100)?;
    w(
        out,
        format!(
            "host µs to queue a TQ2_0 GEMV 6912 × 2560: {plain:.1} (weights in buffers of their \
             own), {viewed:.1} (sub-buffer views), {behind:.1} (queued behind a busy device), \
             {crowded:.1} (4096 more buffers alive)"
        ),
    )?;
    let [one, twelve, scalars, nulls, same] = bench::launch_arg_costs(dev, 2000)?;
    w(
        out,
        format!(
            "host µs to queue a do-nothing kernel: {one:.2} with one buffer argument, \
             {twelve:.2} with twelve, {same:.2} with one buffer in twelve slots, {scalars:.2} \
             with one buffer and twelve ints, {nulls:.2} with twelve of which eleven are the \
             dummy buffer (NULL unless TERNMUX_CL_NULL_ARGS=0)"
        ),
    )?;
    match bench::svm_arg_costs(dev, 2000)? {
        None => w(
            out,
            "shared virtual memory: none (no SVM argument probe)".to_string(),
        )?,
        Some(c) => {
            let pair = |p: Option<(f64, f64)>| {
                p.map_or("n/a".to_string(), |(q, wall)| {
                    format!("{q:.2} queued, {wall:.2} wall")
                })
            };
            w(
                out,
                format!(
                    "host µs to queue a do-nothing kernel with twelve buffers: {:.2} as memory \
                     objects, {:.2} as SVM addresses, {:.2} as SVM addresses re-set each launch; \
                     µs per 4-token few-token Q/K/V launch: {} (memory objects), {} (SVM)",
                    c.mem12_us,
                    c.svm12_us,
                    c.svm12_reset_us,
                    pair(c.few_mem),
                    pair(c.few_svm)
                ),
            )?;
        }
    }
    let p = bench::page_in_costs(dev, 101)?;
    w(
        out,
        format!(
            "page-in pieces: a 4 KiB pinned copy on the copy queue waited for {:.1} µs ({:.1} \
             µs after a fresh compute-queue marker); 8 MiB {:.1} µs ({:.1} µs after a marker, \
             {:.1} µs just after all cores rewrote its source, {:.1} µs after they rewrote it \
             with streaming stores, {:.1} µs with 12 views of its destination made in flight); \
             a sub-buffer view {:.1} µs (medians)",
            p.copy_round_trip_s * 1e6,
            p.copy_after_fence_s * 1e6,
            p.big_copy_s * 1e6,
            p.big_copy_after_fence_s * 1e6,
            p.big_copy_refilled_s * 1e6,
            p.big_copy_streamed_s * 1e6,
            p.big_copy_viewed_s * 1e6,
            p.sub_buffer_s * 1e6
        ),
    )?;
    Ok(())
}

/// `bench-device`'s ternary matmul table: every format on the 2B-4T, 8B- and 70B-class shapes at
/// `batches`, weights cold.
fn ternary_table(
    dev: &ternmux::backend::opencl::ClDevice,
    batches: &[usize],
    launches: usize,
    copy_bw: f64,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use ternmux::backend::opencl::bench;
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io_failure);
    w(
        out,
        "\n## ternary matmul, weights cold (GB/s of weights; % of the copy bandwidth)".into(),
    )?;
    if !dev.profiling() {
        w(
            out,
            format!(
                "(µs per launch queued back to back; set {}=1 for device time per kernel too)",
                ternmux::backend::opencl::PROFILE_ENV
            ),
        )?;
    }
    w(
        out,
        format!(
            "{:<7} {:>6} x {:<6} {:>5} {:>10} {:>9} {:>7} {:>10} {:>9} {:>7}",
            "format",
            "rows",
            "cols",
            "batch",
            "µs",
            "GB/s",
            "% copy",
            "device µs",
            "GB/s",
            "% copy"
        ),
    )?;
    let shapes = [
        ("2B-4T q/o", 2560, 2560),
        ("2B-4T gate/up", 6912, 2560),
        ("2B-4T down", 2560, 6912),
        ("8B q/o", 4096, 4096),
        ("8B gate/up", 14336, 4096),
        ("8B down", 4096, 14336),
        ("70B gate/up", 28672, 8192),
        ("70B down", 8192, 28672),
    ];
    for fmt in ternmux::kernels::ternary::TernaryFormat::ALL {
        for (name, rows, cols) in shapes {
            for t in bench::ternary_kernels(dev, fmt, rows, cols, batches, launches)? {
                let device = match (t.device_seconds, t.device_gb_s()) {
                    (Some(s), Some(g)) => {
                        format!("{:>10.1} {:>9.1} {:>6.0}%", s * 1e6, g, 100.0 * g / copy_bw)
                    }
                    _ => format!("{:>10} {:>9} {:>7}", "-", "-", "-"),
                };
                w(
                    out,
                    format!(
                        "{:<7} {:>6} x {:<6} {:>5} {:>10.1} {:>9.1} {:>6.0}% {device}  {name}",
                        fmt.name(),
                        t.rows,
                        t.cols,
                        t.batch,
                        t.seconds * 1e6,
                        t.gb_s,
                        100.0 * t.gb_s / copy_bw
                    ),
                )?;
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn chat(
    model: PathBuf,
    system: Option<String>,
    n: usize,
    temp: f32,
    seed: u64,
    threads: Option<usize>,
    device: ternmux::backend::Device,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use std::io::BufRead;
    set_threads(threads)?;
    let model = open_model(&model, device)?;
    let mut opts = ternmux::model::GenerateOptions {
        max_tokens: n,
        ..Default::default()
    };
    opts.sampling.temperature = temp;
    opts.sampling.seed = seed;
    let mut chat = ternmux::chat::Chat::new(&model, opts)?;
    if let Some(s) = system {
        chat.system(&s);
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    eprintln!(
        "ternmux: chatting with {} ({} format); one message per line, Ctrl-D to end",
        model.config.arch_name,
        match chat.format() {
            ternmux::chat::ChatFormat::Bitnet => "BitNet 2B-4T",
            ternmux::chat::ChatFormat::Template(_) => "GGUF template",
            ternmux::chat::ChatFormat::Plain => "plain",
        }
    );
    let stdin = std::io::stdin();
    loop {
        if interactive {
            write!(out, "> ").map_err(io_failure)?;
            out.flush().map_err(io_failure)?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(io_failure)? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let t = std::time::Instant::now();
        let reply = chat.say(line, |p| {
            out.write_all(p.as_bytes())
                .and_then(|()| out.flush())
                .is_ok()
        })?;
        writeln!(out).map_err(io_failure)?;
        eprintln!(
            "[{} new prompt tokens, {} generated, {:.1?}, stop: {:?}]",
            reply.new_prompt_tokens,
            reply.tokens,
            t.elapsed(),
            reply.stop
        );
    }
    Ok(())
}

fn run(cli: Cli, out: &mut impl Write) -> Result<(), Failure> {
    match cli.command {
        Command::Chat {
            model,
            system,
            n_predict,
            temp,
            seed,
            threads,
            device,
        } => chat(model, system, n_predict, temp, seed, threads, device, out)?,
        Command::BenchDevice {
            device,
            copy_mib,
            launches,
            batches,
            kernels_only,
            model,
            prompt_tokens,
            gen_tokens,
        } => {
            let probes = DeviceProbes {
                copy_mib,
                launches,
                batches,
                kernels_only,
            };
            bench_device(device, &probes, out)?;
            if let Some(m) = model {
                writeln!(out, "\n## end to end, batch 1").map_err(io_failure)?;
                let a = BenchArgs {
                    model: m,
                    prompt_tokens,
                    gen_tokens,
                    threads: None,
                    reps: 3,
                    json: false,
                    device,
                    logits_out: None,
                    batch: 1,
                    head: ternmux::model::HeadMode::default(),
                };
                bench_model::bench_model(a, out)?;
            }
        }
        Command::Devices => match ternmux::backend::opencl::list_devices() {
            Ok(devs) => {
                for d in devs {
                    writeln!(out, "opencl:{}  {d}  OpenCL {}", d.index, d.version.trim())
                        .map_err(io_failure)?;
                    writeln!(out, "  extensions: {}", d.extensions.trim()).map_err(io_failure)?;
                }
            }
            Err(why) => writeln!(out, "{why}").map_err(io_failure)?,
        },
        Command::Bench(b) => match *b {
            BenchCmd {
                which: Some(BenchWhich::Concurrency(c)),
                ..
            } => bench_conc::bench_concurrency(c, out)?,
            BenchCmd { single, .. } => bench_model::bench_model(single, out)?,
        },
        Command::Serve(a) => serve::serve(a, out)?,
        Command::Demo(a) => demo::demo(a, out)?,
        Command::BenchMux(a) => bench_mux::bench_mux(a, out)?,
        Command::Run(a) => run_model(a, out)?,
        Command::Inspect { file } => {
            let g = GgufFile::open(&file)?;
            write!(out, "{}", Report::new(&g, file.display().to_string())).map_err(io_failure)?;
        }
        Command::Synth {
            output,
            arch,
            shape,
            format,
            seed,
        } => {
            let shape = ternmux::synth::Shape::preset(&shape).ok_or_else(|| Failure {
                error: ternmux::Error::Gguf(format!("unknown shape preset {shape:?}")),
                hint: Some("use one of: 2b, 0.7b, 3b, 8b, tiny"),
            })?;
            let spec = ternmux::synth::SynthSpec {
                arch,
                shape,
                format: format.into(),
                seed,
            };
            let start = std::time::Instant::now();
            let bytes = ternmux::synth::write_synthetic(&spec, &output)?;
            writeln!(
                out,
                "wrote {} ({} bytes, {} {}) in {:.1?}",
                output.display(),
                bytes,
                spec.arch,
                spec.format.name(),
                start.elapsed()
            )
            .map_err(io_failure)?;
        }
        Command::Convert { input, output, to } => {
            let to = TernaryFormat::from(to);
            let start = std::time::Instant::now();
            let r = ternmux::convert::convert_file(&input, &output, to)?;
            writeln!(
                out,
                "converted {} ternary tensors to {}, copied {} tensors unchanged; wrote {} bytes to {} in {:.2?}",
                r.converted,
                to.name(),
                r.copied,
                r.bytes_written,
                output.display(),
                start.elapsed()
            )
            .map_err(io_failure)?;
        }
    }
    Ok(())
}

/// A file shipped with the project (`rel` from the repository root): from the working
/// directory when it is there, else from the source tree the binary was built from.
fn shipped(rel: &std::path::Path) -> PathBuf {
    if rel.exists() {
        rel.to_path_buf()
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// Writes one line and flushes it (progress stays visible through a pipe).
fn say(out: &mut dyn Write, s: String) -> Result<(), Failure> {
    writeln!(out, "{s}").map_err(io_failure)?;
    out.flush().map_err(io_failure)
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure {
        error: ternmux::Error::Io {
            path: "<stdout>".into(),
            source: e,
        },
        hint: None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(cli, &mut out).and_then(|()| out.flush().map_err(io_failure));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure {
            error: ternmux::Error::Io { source, .. },
            ..
        }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ternmux: {}", f.error);
            let top = f.error.to_string();
            let mut src = std::error::Error::source(&f.error);
            while let Some(s) = src {
                let text = s.to_string();
                if !top.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                src = s.source();
            }
            if let Some(h) = f.hint {
                eprintln!("\nhint: {h}");
            }
            ExitCode::from(2)
        }
    }
}
