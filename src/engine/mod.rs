//! Many requests across several models at once, over a [`Mux`].
//!
//! Each model has a bounded request queue and one worker thread that runs **continuous
//! batching**: between decode steps, waiting requests join the running batch (up to
//! [`EngineOptions::max_seqs`] sequences, one KV-cache slot each); every step is one
//! [`Model::forward_batch`] pass holding one token of each decoding sequence plus a chunk of at
//! most [`EngineOptions::prefill_chunk`] prompt tokens of newcomers, so a long prompt never stalls
//! the others for more than one chunk, and the weights are read once per step for the whole
//! batch. Tokens stream to each request's [`Stream`] as they are sampled. Dropping a stream
//! cancels the request: its slot (and the KV memory in it) goes to the next request at the next
//! step. A full queue refuses at once ([`Error::Busy`]) instead of growing memory. Models have
//! their own workers, so a request for a resident model never waits behind another model's
//! page-in (only the device itself is shared). When the models with requests do not fit in the
//! weight budget together, they take turns in slices ([`EngineOptions::slice`]) instead of
//! evicting each other's layers at every step; a model with few sequences left gives its turn
//! early to a waiting model with at least twice as many.
//!
//! ```
//! use ternmux::backend::Device;
//! use ternmux::engine::{Engine, EngineOptions, Event, Request};
//! use ternmux::mux::Mux;
//! let mux = Mux::new(Device::Cpu, 64 << 20)?;
//! mux.register("stories", concat!(env!("CARGO_MANIFEST_DIR"), "/models/bitllama2c-stories3M-TQ2_0.gguf"))?;
//! let engine = Engine::new(mux, EngineOptions::default())?;
//! // Two requests run in one batch; each stream yields its own tokens.
//! let a = engine.submit("stories", Request::text("Once upon a time", 8))?;
//! let b = engine.submit("stories", Request::text("The dog", 8))?;
//! for stream in [a, b] {
//!     let done = stream.collect_text()?;
//!     assert_eq!(done.completion_tokens, 8);
//!     println!("{}", done.text);
//! }
//! # Ok::<(), ternmux::Error>(())
//! ```

mod gate;
pub mod metrics;
mod worker;

use crate::error::{Error, Result};
use crate::model::{KvType, Model, StopReason};
use crate::mux::Mux;
use crate::sampling::SamplingParams;
use metrics::{ModelMetrics, Outcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Limits of the engine, per model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences decoded together (KV-cache slots). Capped by the backend's largest pass.
    pub max_seqs: usize,
    /// Requests waiting for a slot; one more is refused with [`Error::Busy`].
    pub queue: usize,
    /// Positions per sequence, prompt and output together (0: the model's training context, at
    /// most 2048).
    pub n_ctx: usize,
    /// Most prompt tokens one step takes (newcomers' prompts are fed in chunks of this size).
    pub prefill_chunk: usize,
    /// KV cache precision.
    pub kv_type: KvType,
    /// When models with requests do not fit in the weight budget together, how long one runs
    /// before stepping aside for a waiting one (see the gate in the module docs). Default 1 s:
    /// with four 2B models under a budget for two on the H100, 1 s gave 1.17–1.34× the throughput
    /// of 300 ms at concurrency 4–64 with average TTFT still under 0.5 s; 2 s gained no more and
    /// doubled the worst TTFT. After a quarter of it, a model also steps aside for a waiting
    /// model with at least twice its queued and running sequences.
    pub slice: Duration,
    /// How long a model whose batch has just emptied keeps its place at the gate, waiting for
    /// its next request, before it steps aside for a waiting model. A client that sends its
    /// next request as soon as the last one ends (an agent, a benchmark's closed loop) then
    /// keeps its model's weights on the device for the whole slice, instead of paying a model
    /// swap per request. Costs a waiting model at most this long when the running one has
    /// truly gone idle. Default 50 ms.
    pub linger: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_seqs: 16,
            queue: 256,
            n_ctx: 0,
            prefill_chunk: 64,
            kv_type: KvType::F16,
            slice: Duration::from_millis(1000),
            linger: Duration::from_millis(50),
        }
    }
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text, tokenized by the model's tokenizer.
    Text {
        /// The text.
        text: String,
        /// Add BOS/EOS as the vocabulary asks.
        add_special: bool,
        /// Match control tokens written in the text (chat templates).
        parse_special: bool,
    },
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// How to choose each token.
    pub sampling: SamplingParams,
    /// Stop at the first of these strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks that need fixed lengths).
    pub ignore_eos: bool,
}

impl Request {
    /// A greedy request for `max_tokens` tokens after `text` (BOS added as the vocabulary asks).
    pub fn text(text: &str, max_tokens: usize) -> Request {
        Request {
            prompt: Prompt::Text {
                text: text.to_string(),
                add_special: true,
                parse_special: false,
            },
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// How a finished request went.
#[derive(Clone, Debug)]
pub struct Finish {
    /// Why it ended.
    pub reason: StopReason,
    /// Text held back until the end (an incomplete character; nothing after a stop string).
    pub tail: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (an end-of-generation token included).
    pub completion_tokens: usize,
    /// Submission to first token.
    pub ttft: Duration,
    /// Submission to the end.
    pub total: Duration,
}

impl Finish {
    /// Tokens per second after the first (0 with fewer than two tokens).
    pub fn decode_tok_s(&self) -> f64 {
        let after = self.total.saturating_sub(self.ttft).as_secs_f64();
        if self.completion_tokens < 2 || after <= 0.0 {
            0.0
        } else {
            (self.completion_tokens - 1) as f64 / after
        }
    }
}

/// What a [`Stream`] yields.
#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it released (possibly empty).
    Token {
        /// Token id.
        id: u32,
        /// Released text.
        text: String,
    },
    /// The request ended; nothing follows.
    Done(Finish),
    /// The request failed; nothing follows.
    Failed(Error),
}

/// What [`Stream::recv_timeout`] got.
#[derive(Debug)]
pub enum Waited {
    /// An event.
    Event(Event),
    /// Nothing within the timeout; the request goes on.
    TimedOut,
    /// The stream has ended (after its last event).
    Ended,
}

/// A whole generation, collected.
#[derive(Clone, Debug)]
pub struct Collected {
    /// All released text (the tail included).
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub reason: StopReason,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Submission to first token.
    pub ttft: Duration,
    /// Submission to the end.
    pub total: Duration,
}

/// The events of one request, as they happen. Dropping it cancels the request.
pub struct Stream {
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
}

impl Stream {
    /// The next event, waiting for it; `None` after the last.
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }
    /// The next event if one arrives within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Waited {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Waited::Event(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Waited::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => Waited::Ended,
        }
    }
    /// Prompt tokens of the request (known at submission).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
    /// Cancels the request (as dropping the stream does).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    /// Waits for the whole generation.
    pub fn collect_text(self) -> Result<Collected> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(ev) = self.recv() {
            match ev {
                Event::Token { id, text: t } => {
                    tokens.push(id);
                    text.push_str(&t);
                }
                Event::Done(f) => {
                    text.push_str(&f.tail);
                    return Ok(Collected {
                        text,
                        tokens,
                        reason: f.reason,
                        completion_tokens: f.completion_tokens,
                        prompt_tokens: f.prompt_tokens,
                        ttft: f.ttft,
                        total: f.total,
                    });
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Engine(
            "the worker stopped before the request finished".into(),
        ))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Iterator for Stream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

/// A request accepted into a model's queue.
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

/// One model's queue and worker.
struct Worker {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<ModelMetrics>,
    model: Arc<Model>,
    n_ctx: usize,
}

/// Continuous batching over the models of a [`Mux`] (see the module docs).
pub struct Engine {
    mux: Arc<Mux>,
    gate: Arc<gate::Gate>,
    opts: EngineOptions,
    workers: Mutex<Vec<(String, Worker)>>,
    /// Workers started so far: each takes the next OpenCL compute queue (`ClDevice::bind_lane`).
    started: std::sync::atomic::AtomicUsize,
}

impl Engine {
    /// An engine over every model registered in `mux` (more can be added with
    /// [`Engine::register`]). Each model's worker starts now and holds its KV cache
    /// (`max_seqs × n_ctx` positions, charged to the mux's runtime limit).
    pub fn new(mux: Mux, opts: EngineOptions) -> Result<Engine> {
        if opts.max_seqs == 0 || opts.queue == 0 || opts.prefill_chunk == 0 {
            return Err(Error::Request(format!(
                "engine limits must be positive (max_seqs {}, queue {}, prefill_chunk {})",
                opts.max_seqs, opts.queue, opts.prefill_chunk
            )));
        }
        let engine = Engine {
            mux: Arc::new(mux),
            gate: Arc::new(gate::Gate::new(opts.slice)),
            opts,
            workers: Mutex::new(Vec::new()),
            started: std::sync::atomic::AtomicUsize::new(0),
        };
        for name in engine.mux.names() {
            engine.start(&name)?;
        }
        Ok(engine)
    }

    /// Registers a model in the mux and starts its worker.
    pub fn register(&self, name: &str, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.mux.register(name, path)?;
        self.start(name)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(String, Worker)>>> {
        self.workers
            .lock()
            .map_err(|_| Error::Engine("worker table poisoned".into()))
    }

    fn start(&self, name: &str) -> Result<()> {
        let model = self.mux.get(name)?;
        let n_ctx = if self.opts.n_ctx == 0 {
            model.config.n_ctx_train.clamp(1, 2048)
        } else {
            self.opts.n_ctx
        };
        let (tx, rx) = mpsc::sync_channel(self.opts.queue);
        let metrics = Arc::new(ModelMetrics::default());
        // The cache is made here so a refused allocation is an error of `new`/`register`.
        let cache = crate::model::KvCache::with_slots(
            &model,
            n_ctx,
            self.opts.max_seqs,
            self.opts.kv_type,
        )?;
        let max_rows = model.max_batch_rows(&cache);
        if self.opts.max_seqs > max_rows {
            return Err(Error::Request(format!(
                "max_seqs {} exceeds the {max_rows} rows one pass of {name} takes on this device",
                self.opts.max_seqs
            )));
        }
        let weight_bytes = self.mux.stats().model(name).map_or(0, |m| m.total_bytes);
        self.gate.register(name, metrics.clone());
        let ctx = worker::Context {
            name: name.to_string(),
            weight_bytes,
            mux: self.mux.clone(),
            gate: self.gate.clone(),
            model: model.clone(),
            cache,
            jobs: rx,
            metrics: metrics.clone(),
            prefill_chunk: self.opts.prefill_chunk.min(max_rows),
            max_rows,
            linger: self.opts.linger,
            lane: self
                .started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let thread = std::thread::Builder::new()
            .name(format!("ternmux-{name}"))
            .spawn(move || worker::run(ctx))
            .map_err(|e| Error::Engine(format!("cannot start the worker of {name}: {e}")))?;
        let mut workers = self.lock()?;
        workers.retain(|(n, _)| n != name);
        workers.push((
            name.to_string(),
            Worker {
                tx: Some(tx),
                thread: Some(thread),
                metrics,
                model,
                n_ctx,
            },
        ));
        Ok(())
    }

    /// The mux under the engine (stats, budget).
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// Model names, in registration order.
    pub fn models(&self) -> Vec<String> {
        self.lock()
            .map(|w| w.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// Models with requests waiting for room on the device (at the gate), first in line first:
    /// they do not fit next to the models running now.
    pub fn waiting_at_gate(&self) -> Vec<String> {
        self.gate.waiting()
    }

    /// The engine's limits.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Positions per sequence of model `name`.
    pub fn context_size(&self, name: &str) -> Result<usize> {
        self.with_worker(name, |w| Ok(w.n_ctx))
    }

    /// The model `name`.
    pub fn model(&self, name: &str) -> Result<Arc<Model>> {
        self.with_worker(name, |w| Ok(w.model.clone()))
    }

    fn with_worker<T>(&self, name: &str, f: impl FnOnce(&Worker) -> Result<T>) -> Result<T> {
        let workers = self.lock()?;
        let w = workers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w)
            .ok_or_else(|| {
                Error::Mux(format!(
                    "no model named {name:?} (models: {})",
                    workers
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        f(w)
    }

    /// Queues `req` for model `name` and returns its event stream. Fails at once with
    /// [`Error::Busy`] when the model's queue is full, [`Error::Context`] when the prompt
    /// leaves no room in a sequence's context, [`Error::Request`] for an invalid request and
    /// [`Error::Mux`] for an unknown model.
    pub fn submit(&self, name: &str, req: Request) -> Result<Stream> {
        let submitted = Instant::now();
        let (tx, model, n_ctx, metrics) = self.with_worker(name, |w| {
            let tx =
                w.tx.clone()
                    .ok_or_else(|| Error::Engine("the engine is shutting down".into()))?;
            Ok((tx, w.model.clone(), w.n_ctx, w.metrics.clone()))
        })?;
        if req.max_tokens == 0 {
            return Err(Error::Request("max_tokens must be at least 1".into()));
        }
        check_sampling(&req.sampling)?;
        let prompt = match req.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text {
                text,
                add_special,
                parse_special,
            } => model.tokenizer.encode(&text, add_special, parse_special),
        };
        if prompt.is_empty() {
            return Err(Error::Request(
                "the prompt is empty and the vocabulary adds no BOS token".into(),
            ));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= model.config.n_vocab) {
            return Err(Error::Request(format!(
                "token id {t} is outside the vocabulary of {}",
                model.config.n_vocab
            )));
        }
        // The prompt and at least one generated token must fit.
        if prompt.len() >= n_ctx {
            return Err(Error::Context {
                needed: prompt.len() + 1,
                limit: n_ctx,
            });
        }
        let (etx, erx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let prompt_tokens = prompt.len();
        let job = Job {
            prompt,
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            events: etx,
            cancel: cancel.clone(),
            submitted,
        };
        metrics.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(Stream {
                rx: erx,
                cancel,
                prompt_tokens,
            }),
            Err(TrySendError::Full(_)) => {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
                metrics.outcome(Outcome::Rejected);
                Err(Error::Busy(format!(
                    "{name}: {} requests are waiting already; retry later",
                    self.opts.queue
                )))
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
                Err(Error::Engine(format!("the worker of {name} has stopped")))
            }
        }
    }

    /// The counters of model `name`.
    pub fn metrics(&self, name: &str) -> Result<Arc<ModelMetrics>> {
        self.with_worker(name, |w| Ok(w.metrics.clone()))
    }

    /// Prometheus text of every model's counters and the mux's.
    pub fn prometheus(&self) -> String {
        let snapshot: Vec<(String, Arc<ModelMetrics>)> = self
            .lock()
            .map(|w| {
                w.iter()
                    .map(|(n, w)| (n.clone(), w.metrics.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<(&str, &ModelMetrics)> =
            snapshot.iter().map(|(n, m)| (n.as_str(), &**m)).collect();
        metrics::render(&refs, &self.mux.stats())
    }

    /// Requests waiting plus sequences running, over all models.
    pub fn load(&self) -> u64 {
        self.lock()
            .map(|w| {
                w.iter()
                    .map(|(_, w)| {
                        w.metrics.queued.load(Ordering::Relaxed)
                            + w.metrics.running.load(Ordering::Relaxed)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the queues ends each worker once its running sequences finish.
        let mut threads = Vec::new();
        if let Ok(mut workers) = self.workers.lock() {
            for (_, w) in workers.iter_mut() {
                w.tx = None;
                threads.extend(w.thread.take());
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

fn check_sampling(s: &SamplingParams) -> Result<()> {
    let bad = |what: &str, v: f32| {
        Err(Error::Request(format!(
            "{what} must be a finite number in range, got {v}"
        )))
    };
    if !s.temperature.is_finite() || s.temperature < 0.0 {
        return bad("temperature", s.temperature);
    }
    if !(s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
        return bad("top_p", s.top_p);
    }
    if !(s.min_p.is_finite() && (0.0..=1.0).contains(&s.min_p)) {
        return bad("min_p", s.min_p);
    }
    if !(s.repeat_penalty.is_finite() && s.repeat_penalty > 0.0) {
        return bad("repeat_penalty", s.repeat_penalty);
    }
    if !s.frequency_penalty.is_finite() {
        return bad("frequency_penalty", s.frequency_penalty);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Device;

    fn bundled() -> &'static str {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/bitllama2c-stories3M-TQ2_0.gguf"
        )
    }

    #[test]
    fn full_queue_is_busy_and_bad_requests_are_refused() {
        let mux = Mux::new(Device::Cpu, 64 << 20).unwrap();
        mux.register("m", bundled()).unwrap();
        let opts = EngineOptions {
            max_seqs: 1,
            queue: 1,
            ..EngineOptions::default()
        };
        let engine = Engine::new(mux, opts).unwrap();
        assert!(matches!(
            engine.submit("m", Request::text("x", 0)),
            Err(Error::Request(_))
        ));
        assert!(matches!(
            engine.submit("nope", Request::text("x", 1)),
            Err(Error::Mux(_))
        ));
        let long = "word ".repeat(4000);
        assert!(matches!(
            engine.submit("m", Request::text(&long, 1)),
            Err(Error::Context { .. })
        ));
        // Keep submitting long generations: with one slot and one queue place, one is refused.
        let mut streams = Vec::new();
        let mut busy = false;
        for _ in 0..8 {
            match engine.submit("m", Request::text("Once", 200)) {
                Ok(s) => streams.push(s),
                Err(Error::Busy(_)) => {
                    busy = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(busy, "a queue of one never answered busy");
        assert!(engine.metrics("m").unwrap().outcomes(Outcome::Rejected) >= 1);
    }
}
