//! `ternmux demo`: three models under one small budget, queried in turn, with the trace of
//! every page-in and eviction, the budget bar after each answer, and a summary table.

use crate::{Failure, io_failure, say as w};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use ternmux::backend::Device;
use ternmux::kernels::ternary::TernaryFormat;
use ternmux::model::GenerateOptions;
use ternmux::mux::{Mux, MuxEvent, MuxOptions, parse_bytes};
use ternmux::synth::{Shape, SynthSpec, write_synthetic};

/// Options of `ternmux demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Weight budget (default: 3MiB for the bundled trio, which holds two of the three; 10MiB
    /// with --synthetic).
    #[arg(short = 'b', long = "budget")]
    budget: Option<String>,
    /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
    #[arg(short = 'd', long = "device", default_value = "auto")]
    device: Device,
    /// Use synthetic models of about 4, 8 and 12 MB (random weights: the text is noise) instead
    /// of the bundled model's three encodings; the 12 MB one is larger than the budget and
    /// streams.
    #[arg(long)]
    synthetic: bool,
    /// Tokens per answer.
    #[arg(short = 'n', long = "tokens", default_value_t = 32)]
    tokens: usize,
    /// Times the three models are queried in turn.
    #[arg(short = 'r', long = "rounds", default_value_t = 2)]
    rounds: usize,
    /// Print only the summary of each answer's trace, not every event.
    #[arg(long)]
    brief: bool,
}

fn bundled(name: &str) -> PathBuf {
    crate::shipped(&Path::new("models").join(name))
}

fn mib(b: usize) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The three models: (name, path, what, prompt).
fn models(dir: &Path, synthetic: bool) -> Result<Vec<(String, PathBuf, String, String)>, Failure> {
    let mut out = Vec::new();
    if synthetic {
        for (name, n_layer, seed) in [("alpha", 3, 1), ("beta", 8, 2), ("gamma", 13, 3)] {
            let p = dir.join(format!("{name}.gguf"));
            let spec = SynthSpec {
                arch: "bitnet-b1.58".into(),
                shape: Shape {
                    n_embd: 512,
                    n_ff: 1536,
                    n_layer,
                    n_head: 8,
                    n_head_kv: 8,
                    n_vocab: 1000,
                    n_ctx: 256,
                },
                format: TernaryFormat::Tq2_0,
                seed,
            };
            write_synthetic(&spec, &p)?;
            out.push((
                name.to_string(),
                p,
                format!("synthetic bitnet-b1.58, {n_layer} blocks, TQ2_0"),
                "hello".to_string(),
            ));
        }
    } else {
        let tq2 = bundled("bitllama2c-stories3M-TQ2_0.gguf");
        let tq1 = bundled("bitllama2c-stories3M-TQ1_0.gguf");
        let i2s = dir.join("bitllama2c-stories3M-I2_S.gguf");
        ternmux::convert::convert_file(&tq2, &i2s, TernaryFormat::I2S)?;
        out.push((
            "alpha".into(),
            tq2,
            "stories3M TQ2_0 (bundled)".into(),
            "Once upon a time".into(),
        ));
        out.push((
            "beta".into(),
            tq1,
            "stories3M TQ1_0 (bundled)".into(),
            "The little dog".into(),
        ));
        out.push((
            "gamma".into(),
            i2s,
            "stories3M I2_S (converted now)".into(),
            "Lily and Ben".into(),
        ));
    }
    Ok(out)
}

/// Runs the demo.
pub fn demo(a: DemoArgs, out: &mut impl Write) -> Result<(), Failure> {
    let dir = std::env::temp_dir().join(format!("ternmux-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| ternmux::Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    let result = run(a, &dir, out);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(a: DemoArgs, dir: &Path, out: &mut impl Write) -> Result<(), Failure> {
    let budget_text = a
        .budget
        .clone()
        .unwrap_or_else(|| if a.synthetic { "10MiB" } else { "3MiB" }.into());
    let budget = parse_bytes(&budget_text)?;
    let mux = Mux::with_options(
        a.device,
        MuxOptions {
            budget,
            ..MuxOptions::default()
        },
    )?;
    w(out, format!("device: {}", mux.placement().describe()))?;
    if let Some(n) = mux.device_note() {
        w(out, format!("note: {n}"))?;
    }
    w(out, format!("store: {}", mux.describe()))?;
    w(
        out,
        format!("budget: {budget_text} ({budget} bytes) for weights\n"),
    )?;
    let list = models(dir, a.synthetic)?;
    for (name, path, what, _) in &list {
        mux.register(name, path)?;
        let s = mux.stats();
        let m = s
            .model(name)
            .map(|m| (m.total_bytes, m.units.len()))
            .unwrap_or((0, 0));
        w(
            out,
            format!(
                "registered {name:<6} {what:<36} {:>6.2} MiB in {} units{}",
                mib(m.0),
                m.1,
                if m.0 > budget {
                    "  (larger than the budget: streams)"
                } else {
                    ""
                }
            ),
        )?;
    }
    w(out, format!("{}\n", mux.budget_bar(48)))?;
    let events = Arc::new(Mutex::new(Vec::<MuxEvent>::new()));
    {
        let events = events.clone();
        mux.set_event_sink(Some(Arc::new(move |e: &MuxEvent| {
            if let Ok(mut v) = events.lock() {
                v.push(e.clone());
            }
        })));
    }
    let opts = GenerateOptions {
        max_tokens: a.tokens,
        ..GenerateOptions::default()
    };
    for round in 0..a.rounds {
        for (name, _, _, prompt) in &list {
            w(out, format!("── round {} · {name}: {prompt:?}", round + 1))?;
            write!(out, "{prompt}").map_err(io_failure)?;
            out.flush().map_err(io_failure)?;
            let start = Instant::now();
            let mut failed = None;
            let g = mux.generate(name, prompt, &opts, |piece| {
                if let Err(e) = write!(out, "{piece}").and_then(|_| out.flush()) {
                    failed = Some(e);
                    return false;
                }
                true
            })?;
            if let Some(e) = failed {
                return Err(io_failure(e));
            }
            let wall = start.elapsed();
            w(out, String::new())?;
            let evs =
                std::mem::take(&mut *events.lock().map_err(|_| {
                    Failure::from(ternmux::Error::Mux("event log poisoned".into()))
                })?);
            let (mut ins, mut in_bytes, mut in_us, mut outs, mut hits) = (0, 0usize, 0u64, 0, 0);
            for e in &evs {
                match e {
                    MuxEvent::PageIn { bytes, micros, .. } => {
                        ins += 1;
                        in_bytes += bytes;
                        in_us += micros;
                    }
                    MuxEvent::Evict { .. } => outs += 1,
                    MuxEvent::Hit { .. } => hits += 1,
                }
                if !a.brief && !matches!(e, MuxEvent::Hit { .. }) {
                    w(out, format!("  {e}"))?;
                }
            }
            w(
                out,
                format!(
                    "  {} tokens in {:.1} ms ({:.0} tok/s decode) · {hits} hits, {ins} page-ins \
                     ({:.2} MiB in {:.2} ms), {outs} evictions",
                    g.tokens.len(),
                    wall.as_secs_f64() * 1e3,
                    g.timings.decode_tok_s(),
                    mib(in_bytes),
                    in_us as f64 / 1e3
                ),
            )?;
            w(out, format!("  {}\n", mux.budget_bar(48)))?;
        }
    }
    let s = mux.stats();
    w(
        out,
        format!(
            "{:<7} {:>6} {:>7} {:>9} {:>9} {:>9} {:>10} {:>12}",
            "model", "hits", "misses", "evictions", "MiB in", "hit rate", "resident", "p50 page-in"
        ),
    )?;
    for m in &s.models {
        w(
            out,
            format!(
                "{:<7} {:>6} {:>7} {:>9} {:>9.2} {:>8.1}% {:>6.2} MiB {:>9} µs",
                m.name,
                m.hits,
                m.misses,
                m.evictions,
                m.bytes_in as f64 / (1u64 << 20) as f64,
                100.0 * m.hit_rate(),
                mib(m.resident_bytes),
                m.page_in_time.quantile_us(0.5)
            ),
        )?;
    }
    w(
        out,
        format!(
            "peak {:.2} MiB of the {:.2} MiB budget (never above it); KV caches and scratch \
             {:.2} MiB now, under their own limit",
            mib(s.peak),
            mib(s.budget),
            mib(s.runtime_used)
        ),
    )
}
