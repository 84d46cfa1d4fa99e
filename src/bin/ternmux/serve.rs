//! `ternmux serve`: the OpenAI-compatible server over models registered in one mux.

use crate::{Failure, say};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ternmux::backend::Device;
use ternmux::engine::{Engine, EngineOptions};
use ternmux::mux::{Mux, MuxOptions, parse_bytes};
use ternmux::server::{Server, ServerOptions};

/// Engine limits shared by `serve` and `bench concurrency`.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Weight budget of the device memory the models share (e.g. 512MiB, 2GiB; `Nx` = N times
    /// the first model's weights).
    #[arg(short = 'b', long = "budget", default_value = "512MiB")]
    pub budget: String,
    /// Where to run: auto (best OpenCL GPU, else CPU), cpu, opencl, opencl:N.
    #[arg(short = 'd', long = "device", default_value = "auto")]
    pub device: Device,
    /// Pinned host memory that keeps copies of paged-in units, so a unit paged in again is one
    /// DMA (e.g. 2GiB; `Nx` = N times the first model's weights; 0: off). Devices with their
    /// own memory only.
    #[arg(long = "host-cache", default_value = "0")]
    pub host_cache: String,
    /// Sequences decoded together per model (KV-cache slots; default 16, and in `bench
    /// concurrency` the largest level, at most 128).
    #[arg(long = "max-seqs")]
    pub max_seqs: Option<usize>,
    /// Requests waiting per model before the server answers busy (429).
    #[arg(long = "queue", default_value_t = 256)]
    pub queue: usize,
    /// Positions per sequence (0: the model's training context, at most 2048).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx: usize,
    /// Most prompt tokens per batched step (newcomers' prompts are fed in chunks of this).
    #[arg(long = "prefill-chunk", default_value_t = 64)]
    pub prefill_chunk: usize,
    /// CPU worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// When the models' weights do not fit the budget together: how long (ms) a model runs
    /// before it steps aside for a waiting one. Longer pays fewer page-ins per token; shorter
    /// lets a waiting model start sooner.
    #[arg(long = "slice-ms", default_value_t = 1000)]
    pub slice_ms: u64,
    /// When the models' weights do not fit the budget together: how long (ms) a model whose
    /// requests have all ended keeps its place, waiting for the next one, before it steps
    /// aside (0: at once).
    #[arg(long = "linger-ms", default_value_t = 50)]
    pub linger_ms: u64,
}

impl EngineArgs {
    /// The engine's options.
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            max_seqs: self.max_seqs.unwrap_or(16),
            queue: self.queue,
            n_ctx: self.ctx,
            prefill_chunk: self.prefill_chunk,
            slice: std::time::Duration::from_millis(self.slice_ms.max(1)),
            linger: std::time::Duration::from_millis(self.linger_ms),
            ..EngineOptions::default()
        }
    }

    /// `--max-seqs` when given.
    pub fn max_seqs_given(&self) -> Option<usize> {
        self.max_seqs
    }

    /// A mux on the device with `models` registered, under the budget (`Nx` resolved against
    /// the first model's weight bytes).
    pub fn mux(&self, models: &[(String, PathBuf)]) -> Result<Mux, Failure> {
        if let Some(n) = self.threads {
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        let times = |s: &str| s.strip_suffix('x').and_then(|n| n.parse::<f64>().ok());
        let bytes = |s: &str| -> Result<usize, Failure> {
            Ok(if times(s).is_some() {
                usize::MAX
            } else {
                parse_bytes(s)?
            })
        };
        let mux = Mux::with_options(
            self.device,
            MuxOptions {
                budget: bytes(&self.budget)?,
                host_cache: bytes(&self.host_cache)?,
                ..MuxOptions::default()
            },
        )?;
        for (name, path) in models {
            mux.register(name, path)?;
        }
        // `Nx` sizes: N times the first model's weight bytes, known once it is registered.
        let first = models
            .first()
            .and_then(|(name, _)| mux.stats().model(name).map(|m| m.total_bytes))
            .unwrap_or(0);
        let of_first = |n: f64| (first as f64 * n).ceil() as usize;
        if let Some(n) = times(&self.budget) {
            mux.set_budget(of_first(n))?;
        }
        if let Some(n) = times(&self.host_cache) {
            mux.set_host_cache(of_first(n))?;
        }
        Ok(mux)
    }
}

/// The bundled model, found from the working directory or the source tree.
pub fn bundled() -> PathBuf {
    let name = "bitllama2c-stories3M-TQ2_0.gguf";
    let local = Path::new("models").join(name);
    if local.exists() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    }
}

/// `NAME=PATH` (or a bare path, named after its file stem).
pub fn parse_model(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        Some(_) => Err(format!("{s:?}: expected NAME=PATH")),
        None => {
            let p = PathBuf::from(s);
            let name = p
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{s:?} names no file"))?;
            Ok((name, p))
        }
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A model to serve, as NAME=PATH (repeatable; default: the bundled model as `stories`).
    #[arg(short = 'm', long = "model", value_parser = parse_model)]
    model: Vec<(String, PathBuf)>,
    /// Address to bind (loopback unless told otherwise).
    #[arg(long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed).
    #[arg(short = 'p', long = "port", default_value_t = 8080)]
    port: u16,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs the server until the process is stopped.
pub fn serve(a: ServeArgs, out: &mut impl Write) -> Result<(), Failure> {
    let models = if a.model.is_empty() {
        vec![("stories".to_string(), bundled())]
    } else {
        a.model.clone()
    };
    let mux = a.engine.mux(&models)?;
    say(out, format!("device: {}", mux.describe()))?;
    if let Some(n) = mux.device_note() {
        say(out, format!("note: {n}"))?;
    }
    let engine = Arc::new(Engine::new(mux, a.engine.options())?);
    for name in engine.models() {
        let m = engine.model(&name)?;
        say(
            out,
            format!(
                "model {name}: {} layers, {} positions per sequence, {} sequences at once",
                m.config.n_layer,
                engine.context_size(&name)?,
                a.engine.options().max_seqs
            ),
        )?;
    }
    say(out, format!("budget: {}", engine.mux().budget_bar(40)))?;
    let addr = format!("{}:{}", a.host, a.port);
    let server = Server::bind(engine, &addr, ServerOptions::default())?;
    if !server.local_addr().ip().is_loopback() {
        say(
            out,
            format!(
                "warning: listening on {} — reachable from other machines, with no authentication",
                server.local_addr()
            ),
        )?;
    }
    say(
        out,
        format!(
            "listening on http://{} (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics)",
            server.local_addr()
        ),
    )?;
    server.run();
    Ok(())
}
