//! `ternmux bench concurrency`: closed-loop load at each concurrency level (N clients, each
//! sending its next query as soon as the last one ends), against the in-process engine or a
//! running server. Reports total throughput, time to first token, decode speed after it and
//! per-query speed; writes a summary CSV, a per-query CSV and a PNG chart.

use crate::plot::concurrency_chart;
use crate::serve::{EngineArgs, bundled, parse_model};
use crate::{Failure, io_failure, say};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ternmux::backend::Placement;
use ternmux::backend::opencl::Timeline;
use ternmux::engine::{Engine, Event, Prompt, Request};
use ternmux::sampling::SamplingParams;
use ternmux::server::client;

#[derive(clap::Args)]
pub struct ConcArgs {
    /// Model as NAME=PATH (repeatable; default: the bundled model). With --url, only the NAME is
    /// used (default: the server's first model).
    #[arg(short = 'm', long = "model", value_parser = parse_model)]
    model: Vec<(String, PathBuf)>,
    /// Measure a running server (e.g. http://127.0.0.1:8080) instead of the in-process engine.
    #[arg(long = "url")]
    url: Option<String>,
    /// Multi-model mode: register N copies of the (first) model file as separate models under
    /// one budget and spread the load over them (in-process only).
    #[arg(long = "models", default_value_t = 1)]
    copies: usize,
    /// Queries per level (default: 4 × the level, at least 16).
    #[arg(long = "queries")]
    queries: Option<usize>,
    /// Concurrency levels.
    #[arg(long = "concurrency-levels", num_args = 1.., default_values_t = [1usize, 2, 4, 8, 16, 32, 64, 128])]
    levels: Vec<usize>,
    /// Tokens generated per query (end-of-generation tokens are ignored, so every query is this
    /// long).
    #[arg(long = "max-output-tokens", default_value_t = 64)]
    max_out: usize,
    /// One prompt per line (default: the 128 prompts shipped in prompts/bench_prompts.txt).
    #[arg(long = "prompts-file")]
    prompts: Option<PathBuf>,
    /// Where the CSV files and the chart go.
    #[arg(long = "out-dir", default_value = "bench-out")]
    out_dir: PathBuf,
    /// Seconds between progress lines.
    #[arg(long = "progress-secs", default_value_t = 5)]
    progress: u64,
    #[command(flatten)]
    engine: EngineArgs,
}

/// One query's measurements.
#[derive(Clone, Debug)]
struct Query {
    level: usize,
    index: usize,
    model: String,
    prompt_tokens: usize,
    output_tokens: usize,
    ttft: f64,
    total: f64,
}

impl Query {
    fn decode_tok_s(&self) -> Option<f64> {
        (self.output_tokens >= 2 && self.total > self.ttft)
            .then(|| (self.output_tokens - 1) as f64 / (self.total - self.ttft))
    }
    fn query_tok_s(&self) -> f64 {
        self.output_tokens as f64 / self.total.max(1e-9)
    }
}

/// One level's summary.
struct Level {
    conc: usize,
    queries: usize,
    wall: f64,
    tokens: usize,
    throughput: f64,
    avg_ttft: f64,
    p50_ttft: f64,
    p99_ttft: f64,
    avg_decode: f64,
    avg_query: f64,
}

enum Target {
    Local(Arc<Engine>),
    Remote(String),
}

fn default_prompts() -> PathBuf {
    crate::shipped(Path::new("prompts/bench_prompts.txt"))
}

/// Runs one query to the end; `busy` counts refusals (retried after a short wait).
fn run_query(
    target: &Target,
    model: &str,
    prompt: &str,
    max_out: usize,
    busy: &AtomicUsize,
) -> ternmux::Result<(usize, usize, f64, f64)> {
    let start = Instant::now();
    loop {
        match target {
            Target::Local(engine) => {
                let req = Request {
                    prompt: Prompt::Text {
                        text: prompt.to_string(),
                        add_special: true,
                        parse_special: false,
                    },
                    max_tokens: max_out,
                    sampling: SamplingParams {
                        temperature: 0.0,
                        ..SamplingParams::default()
                    },
                    stop: Vec::new(),
                    ignore_eos: true,
                };
                let stream = match engine.submit(model, req) {
                    Ok(s) => s,
                    Err(ternmux::Error::Busy(_)) => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let mut ttft = None;
                let mut n = 0;
                for ev in stream {
                    match ev {
                        Event::Token { .. } => {
                            n += 1;
                            ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
                        }
                        Event::Done(f) => {
                            let total = start.elapsed().as_secs_f64();
                            return Ok((f.prompt_tokens, n, ttft.unwrap_or(total), total));
                        }
                        Event::Failed(e) => return Err(e),
                    }
                }
                return Err(ternmux::Error::Engine(
                    "stream ended without an answer".into(),
                ));
            }
            Target::Remote(url) => {
                let body = json!({
                    "model": model, "prompt": prompt, "max_tokens": max_out,
                    "temperature": 0, "stream": true, "ignore_eos": true,
                })
                .to_string();
                let mut ttft = None;
                let mut usage = None;
                let resp = client::post_events(url, "/v1/completions", body.as_bytes(), |d| {
                    if d == "[DONE]" {
                        return false;
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(d) {
                        if ttft.is_none() && v["choices"][0]["text"].as_str().is_some() {
                            ttft = Some(start.elapsed().as_secs_f64());
                        }
                        if let Some(u) = v.get("usage") {
                            usage = Some((
                                u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                                u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                            ));
                        }
                    }
                    true
                })?;
                if resp.status == 429 || resp.status == 503 {
                    busy.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                if resp.status != 200 {
                    return Err(ternmux::Error::Engine(format!(
                        "server answered {}: {}",
                        resp.status,
                        resp.text()
                    )));
                }
                let total = start.elapsed().as_secs_f64();
                let (p, n) = usage.ok_or_else(|| {
                    ternmux::Error::Engine("the stream ended without usage".into())
                })?;
                return Ok((p, n, ttft.unwrap_or(total), total));
            }
        }
    }
}

/// Counters of an in-process engine, summed over its models (times in ns); a level's figures
/// are the difference of two readings ([`StepCounters::since`]).
#[derive(Clone, Copy, Default)]
struct StepCounters {
    steps: u64,
    rows: u64,
    tokens: u64,
    forward_ns: u64,
    sample_ns: u64,
    gate_wait_ns: u64,
    /// The multiplexer's page-ins, bytes paged in and time paging in.
    page_ins: u64,
    bytes_in: u64,
    page_in_ns: u64,
    /// The multiplexer's time handing units out (page-ins included) and taking them back.
    acquire_ns: u64,
    release_ns: u64,
    /// On OpenCL: kernels launched, host time queueing them, kernel arguments set (those the
    /// argument cache did not hold), fences queued and shared.
    launches: u64,
    queue_ns: u64,
    arg_sets: u64,
    fences_made: u64,
    fences_shared: u64,
}

impl StepCounters {
    /// What changed from `before` to `self`.
    fn since(&self, before: &StepCounters) -> StepCounters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        StepCounters {
            steps: d(self.steps, before.steps),
            rows: d(self.rows, before.rows),
            tokens: d(self.tokens, before.tokens),
            forward_ns: d(self.forward_ns, before.forward_ns),
            sample_ns: d(self.sample_ns, before.sample_ns),
            gate_wait_ns: d(self.gate_wait_ns, before.gate_wait_ns),
            page_ins: d(self.page_ins, before.page_ins),
            bytes_in: d(self.bytes_in, before.bytes_in),
            page_in_ns: d(self.page_in_ns, before.page_in_ns),
            acquire_ns: d(self.acquire_ns, before.acquire_ns),
            release_ns: d(self.release_ns, before.release_ns),
            launches: d(self.launches, before.launches),
            queue_ns: d(self.queue_ns, before.queue_ns),
            arg_sets: d(self.arg_sets, before.arg_sets),
            fences_made: d(self.fences_made, before.fences_made),
            fences_shared: d(self.fences_shared, before.fences_shared),
        }
    }
}

/// The in-process engine's [`StepCounters`] now (none against a server).
fn step_counters(target: &Target, models: &[String]) -> Option<StepCounters> {
    let Target::Local(engine) = target else {
        return None;
    };
    let mut out = StepCounters::default();
    for m in models {
        let c = engine.metrics(m).ok()?;
        let get = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        out.steps += get(&c.steps);
        out.rows += get(&c.step_rows);
        out.forward_ns += get(&c.forward_ns);
        out.sample_ns += get(&c.sample_ns);
        out.gate_wait_ns += get(&c.gate_wait_ns);
        out.tokens += get(&c.generated_tokens);
    }
    if let Placement::OpenCl(d) = engine.mux().placement() {
        out.launches = d.launches();
        out.queue_ns = d.queue_time().as_nanos() as u64;
        out.arg_sets = d.arg_sets();
        (out.fences_made, out.fences_shared) = d.fences();
    }
    let mux = engine.mux().stats();
    out.page_ins = mux.misses();
    out.bytes_in = mux.bytes_in();
    for m in &mux.models {
        out.page_in_ns += m.page_in_total.as_nanos() as u64;
        out.acquire_ns += m.acquire_total.as_nanos() as u64;
        out.release_ns += m.release_total.as_nanos() as u64;
    }
    Some(out)
}

/// With `TERNMUX_CL_PROFILE=1` on an in-process OpenCL engine: how the device spent the
/// level (kernels, page-in copies, idle), from the commands recorded since the last call.
fn device_timeline(target: &Target, wall: f64) -> Option<String> {
    let Target::Local(engine) = target else {
        return None;
    };
    let Placement::OpenCl(d) = engine.mux().placement() else {
        return None;
    };
    if !d.profiling() {
        return None;
    }
    let commands = match d.take_commands() {
        Ok(c) => c,
        Err(e) => return Some(format!("device timeline unavailable: {e}")),
    };
    let t = Timeline::from_commands(&commands);
    let kernels = commands.iter().filter(|c| c.is_kernel()).count();
    Some(format!(
        "device (profiled): {kernels} kernels; over the {wall:.2} s level kernels ran {:.2} s \
         ({:.0}%; their own times add up to {:.2} s), page-in copies {:.2} s, both at once {:.2} s, idle {:.2} s of a {:.2} s span",
        t.kernels_s,
        100.0 * t.kernels_s / wall.max(1e-9),
        t.kernels_sum_s,
        t.copies_s,
        t.both_s,
        t.idle_s(),
        t.span_s
    ))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Runs every level and writes the reports.
pub fn bench_concurrency(a: ConcArgs, out: &mut impl Write) -> Result<(), Failure> {
    let prompts_path = a.prompts.clone().unwrap_or_else(default_prompts);
    let text = std::fs::read_to_string(&prompts_path).map_err(|e| ternmux::Error::Io {
        path: prompts_path.clone(),
        source: e,
    })?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if prompts.is_empty() {
        return Err(ternmux::Error::Request(format!(
            "{} holds no prompts",
            prompts_path.display()
        ))
        .into());
    }
    let mut levels = a.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    levels.retain(|&l| l > 0);
    let top = levels.last().copied().unwrap_or(1);
    let (target, models, what) = match &a.url {
        Some(url) => {
            let models: Vec<String> = if a.model.is_empty() {
                let r = client::request(url, "GET", "/v1/models", None)?;
                let v: Value = serde_json::from_slice(&r.body)
                    .map_err(|e| ternmux::Error::Engine(format!("{url}/v1/models: {e}")))?;
                v["data"]
                    .as_array()
                    .and_then(|d| d.first())
                    .and_then(|m| m["id"].as_str())
                    .map(|s| vec![s.to_string()])
                    .ok_or_else(|| ternmux::Error::Engine(format!("{url} serves no model")))?
            } else {
                a.model.iter().map(|(n, _)| n.clone()).collect()
            };
            (Target::Remote(url.clone()), models, format!("server {url}"))
        }
        None => {
            let first = a
                .model
                .first()
                .cloned()
                .unwrap_or_else(|| ("stories".into(), bundled()));
            let registered: Vec<(String, PathBuf)> = if a.copies > 1 {
                (0..a.copies)
                    .map(|i| (format!("{}-{i}", first.0), first.1.clone()))
                    .collect()
            } else if a.model.is_empty() {
                vec![first]
            } else {
                a.model.clone()
            };
            let mux = a.engine.mux(&registered)?;
            let mut opts = a.engine.options();
            // Every client of the largest level decodes in the same batch unless told otherwise.
            if a.engine.max_seqs_given().is_none() {
                opts.max_seqs = top.min(128);
            }
            let engine = Engine::new(mux, opts.clone())?;
            let what = format!(
                "in-process engine on {}, {} model(s), budget {}, {} sequences per model",
                engine.mux().describe(),
                registered.len(),
                engine.mux().budget_bar(30),
                opts.max_seqs
            );
            let names = registered.into_iter().map(|(n, _)| n).collect();
            (Target::Local(Arc::new(engine)), names, what)
        }
    };
    say(out, format!("# ternmux bench concurrency: {what}"))?;
    say(
        out,
        format!(
            "# {} prompts from {}, {} output tokens per query, levels {:?}",
            prompts.len(),
            prompts_path.display(),
            a.max_out,
            levels
        ),
    )?;
    // Warm-up: one query per model (page-ins, kernel builds) outside the measurements.
    let busy = AtomicUsize::new(0);
    for m in &models {
        run_query(&target, m, &prompts[0], 4.min(a.max_out), &busy)?;
    }
    std::fs::create_dir_all(&a.out_dir).map_err(|e| ternmux::Error::Io {
        path: a.out_dir.clone(),
        source: e,
    })?;
    let mut all: Vec<Query> = Vec::new();
    let mut summary: Vec<Level> = Vec::new();
    for &conc in &levels {
        let n = a.queries.unwrap_or((4 * conc).max(16));
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let tokens = AtomicUsize::new(0);
        let results: Mutex<Vec<Query>> = Mutex::new(Vec::with_capacity(n));
        let failure: Mutex<Option<ternmux::Error>> = Mutex::new(None);
        let before = step_counters(&target, &models);
        let start = Instant::now();
        let finished = std::sync::atomic::AtomicBool::new(false);
        let wall = std::thread::scope(|s| {
            let progress = s.spawn(|| {
                let mut last = Instant::now();
                while !finished.load(Ordering::Relaxed) {
                    // Woken early (unpark) when the level ends.
                    std::thread::park_timeout(Duration::from_millis(100));
                    if last.elapsed() >= Duration::from_secs(a.progress.max(1)) {
                        last = Instant::now();
                        let t = start.elapsed().as_secs_f64();
                        let k = tokens.load(Ordering::Relaxed);
                        eprintln!(
                            "  conc {conc}: {}/{n} queries, {k} tokens, {:.0} tok/s, {t:.0} s",
                            done.load(Ordering::Relaxed),
                            k as f64 / t.max(1e-9)
                        );
                    }
                }
            });
            let workers: Vec<_> = (0..conc)
                .map(|_| {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                                return;
                            }
                            let model = &models[i % models.len()];
                            let prompt = &prompts[i % prompts.len()];
                            match run_query(&target, model, prompt, a.max_out, &busy) {
                                Ok((p, k, ttft, total)) => {
                                    tokens.fetch_add(k, Ordering::Relaxed);
                                    done.fetch_add(1, Ordering::Relaxed);
                                    if let Ok(mut r) = results.lock() {
                                        r.push(Query {
                                            level: conc,
                                            index: i,
                                            model: model.clone(),
                                            prompt_tokens: p,
                                            output_tokens: k,
                                            ttft,
                                            total,
                                        });
                                    }
                                }
                                Err(e) => {
                                    if let Ok(mut f) = failure.lock() {
                                        f.get_or_insert(e);
                                    }
                                    return;
                                }
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
            // The level's wall time ends with its last query, not with the progress thread's
            // next wake-up (it sleeps in 100 ms steps).
            let wall = start.elapsed().as_secs_f64();
            finished.store(true, Ordering::Relaxed);
            progress.thread().unpark();
            wall
        });
        let after = step_counters(&target, &models);
        if let (Some(b), Some(a)) = (before, after) {
            let c = a.since(&b);
            let steps = c.steps.max(1) as f64;
            let per_step_ms = |ns: u64| ns as f64 / steps / 1e6;
            eprintln!(
                "  conc {conc}: {} batched steps, {:.1} rows/step, {:.1} tokens/step, {:.2} ms \
                 forward (of which {:.2} ms waiting on page-ins) + {:.2} ms sampling/streaming \
                 per step, {:.2} passes running at once on average; {:.2} s waiting at the gate, \
                 {} page-ins, {:.2} GB paged in",
                c.steps,
                c.rows as f64 / steps,
                c.tokens as f64 / steps,
                per_step_ms(c.forward_ns),
                per_step_ms(c.page_in_ns),
                per_step_ms(c.sample_ns),
                c.forward_ns as f64 / 1e9 / wall.max(1e-9),
                c.gate_wait_ns as f64 / 1e9,
                c.page_ins,
                c.bytes_in as f64 / 1e9
            );
            eprintln!(
                "  conc {conc}: {:.2} ms asking the multiplexer for units (page-ins included) and \
                 {:.2} ms giving them back (each use's fence) per step",
                per_step_ms(c.acquire_ns),
                per_step_ms(c.release_ns)
            );
            if c.launches > 0 {
                eprintln!(
                    "  conc {conc}: {:.0} kernel launches per step, {:.2} ms of host time \
                     queueing them per step ({:.1} µs a launch, {:.1} arguments set a launch); \
                     {:.1} fences queued and {:.1} shared per step",
                    c.launches as f64 / steps,
                    per_step_ms(c.queue_ns),
                    c.queue_ns as f64 / c.launches as f64 / 1e3,
                    c.arg_sets as f64 / c.launches as f64,
                    c.fences_made as f64 / steps,
                    c.fences_shared as f64 / steps
                );
            }
            if let Some(line) = device_timeline(&target, wall) {
                eprintln!("  conc {conc}: {line}");
            }
        }
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e.into());
        }
        let mut qs = results.into_inner().unwrap_or_default();
        qs.sort_by_key(|q| q.index);
        let mut ttfts: Vec<f64> = qs.iter().map(|q| q.ttft).collect();
        ttfts.sort_by(f64::total_cmp);
        let toks: usize = qs.iter().map(|q| q.output_tokens).sum();
        let lv = Level {
            conc,
            queries: qs.len(),
            wall,
            tokens: toks,
            throughput: toks as f64 / wall,
            avg_ttft: mean(ttfts.iter().copied()),
            p50_ttft: quantile(&ttfts, 0.5),
            p99_ttft: quantile(&ttfts, 0.99),
            avg_decode: mean(qs.iter().filter_map(Query::decode_tok_s)),
            avg_query: mean(qs.iter().map(Query::query_tok_s)),
        };
        eprintln!(
            "  conc {conc}: done, {} queries in {wall:.1} s, {:.1} tok/s",
            lv.queries, lv.throughput
        );
        summary.push(lv);
        all.extend(qs);
    }
    // Reports.
    let mut csv = String::from(
        "concurrency,queries,wall_s,output_tokens,throughput_tok_s,avg_ttft_s,p50_ttft_s,p99_ttft_s,avg_decode_tok_s,avg_query_tok_s\n",
    );
    for l in &summary {
        csv.push_str(&format!(
            "{},{},{:.3},{},{:.2},{:.4},{:.4},{:.4},{:.2},{:.2}\n",
            l.conc,
            l.queries,
            l.wall,
            l.tokens,
            l.throughput,
            l.avg_ttft,
            l.p50_ttft,
            l.p99_ttft,
            l.avg_decode,
            l.avg_query
        ));
    }
    let mut per = String::from(
        "concurrency,query,model,prompt_tokens,output_tokens,ttft_s,total_s,decode_tok_s,query_tok_s\n",
    );
    for q in &all {
        per.push_str(&format!(
            "{},{},{},{},{},{:.4},{:.4},{:.2},{:.2}\n",
            q.level,
            q.index,
            q.model,
            q.prompt_tokens,
            q.output_tokens,
            q.ttft,
            q.total,
            q.decode_tok_s().unwrap_or(0.0),
            q.query_tok_s()
        ));
    }
    let write = |name: &str, data: &str| -> Result<PathBuf, Failure> {
        let p = a.out_dir.join(name);
        std::fs::write(&p, data).map_err(|e| ternmux::Error::Io {
            path: p.clone(),
            source: e,
        })?;
        Ok(p)
    };
    let summary_path = write("summary.csv", &csv)?;
    let queries_path = write("queries.csv", &per)?;
    let png = a.out_dir.join("concurrency.png");
    let title = format!(
        "ternmux: {} ({} tokens/query)",
        models.join(", "),
        a.max_out
    );
    let title: String = title.chars().take(52).collect();
    concurrency_chart(
        &png,
        &title,
        &summary.iter().map(|l| l.conc).collect::<Vec<_>>(),
        &summary.iter().map(|l| l.throughput).collect::<Vec<_>>(),
        &summary.iter().map(|l| l.avg_query).collect::<Vec<_>>(),
    )
    .map_err(|e| ternmux::Error::Io {
        path: png.clone(),
        source: e,
    })?;
    writeln!(out).map_err(io_failure)?;
    say(
        out,
        format!(
            "{:>4} | {:>17} | {:>11} | {:>17} | {:>16} | {:>11} | {:>11}",
            "conc",
            "throughput(tok/s)",
            "avg_ttft(s)",
            "avg_decode(tok/s)",
            "avg_query(tok/s)",
            "p50_ttft(s)",
            "p99_ttft(s)"
        ),
    )?;
    for l in &summary {
        say(
            out,
            format!(
                "{:>4} | {:>17.1} | {:>11.3} | {:>17.1} | {:>16.1} | {:>11.3} | {:>11.3}",
                l.conc, l.throughput, l.avg_ttft, l.avg_decode, l.avg_query, l.p50_ttft, l.p99_ttft
            ),
        )?;
    }
    if let (Some(first), Some(last)) = (summary.first(), summary.last()) {
        say(
            out,
            format!(
                "\nthroughput at {} = {:.2}x throughput at {}; busy answers retried: {}",
                last.conc,
                last.throughput / first.throughput.max(1e-9),
                first.conc,
                busy.load(Ordering::Relaxed)
            ),
        )?;
    }
    say(
        out,
        format!(
            "wrote {}, {}, {}",
            summary_path.display(),
            queries_path.display(),
            png.display()
        ),
    )
}
