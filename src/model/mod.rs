//! Models: configuration from metadata, validated weights, the forward pass, and generation.
//!
//! ```
//! use ternmux::model::{GenerateOptions, Model};
//! let model = Model::open(concat!(env!("CARGO_MANIFEST_DIR"), "/models/bitllama2c-stories3M-TQ2_0.gguf"))?;
//! let opts = GenerateOptions { max_tokens: 12, ..GenerateOptions::default() };
//! // Tokens arrive as they are produced; return `false` from the callback to stop early.
//! let out = model.generate("Once upon a time", &opts, |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! println!("\n{:.1} tok/s decode", out.timings.decode_tok_s());
//! assert_eq!(out.tokens.len(), 12);
//! # Ok::<(), ternmux::Error>(())
//! ```

mod config;
mod forward;
mod head;
pub mod ops;
mod split;
mod text_out;
mod weights;

pub use config::{Arch, Config, FfnAct};
pub use forward::{KvCache, KvType, Logits, SeqChunk};
pub use head::HeadMode;
pub use text_out::TextOut;
pub use weights::{Layer, Linear, TensorRef, Weights};

use crate::backend::cpu::HostUnit;
use crate::backend::{Device, Placement, Resident};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::mux::core::{Core, UnitGuard};
use crate::mux::store::{PageIn, Store};
use crate::mux::units::UnitId;
use crate::mux::{Binding, meter::Meter};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A loaded model: the mapped file, its configuration, validated weights and tokenizer.
pub struct Model {
    pub(crate) file: GgufFile,
    /// Hyper-parameters.
    pub config: Config,
    pub(crate) weights: Weights,
    /// The tokenizer built from the file's metadata.
    pub tokenizer: Tokenizer,
    load_time: Duration,
    pub(crate) placement: Placement,
    /// The residency table holding the model's units, when they are not read from the mapping.
    binding: Option<Binding>,
    device_note: Option<String>,
    head_mode: HeadMode,
    head: head::HeadCache,
}

impl Model {
    /// Maps a GGUF file and prepares it for inference on the CPU (metadata and validation only:
    /// no tensor data is read or copied). [`Model::open_on`] chooses a device.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Model::open_with_progress(path, |_| {})
    }

    /// As [`Model::open`], then places the model on `device` ([`Device::resolve`]): on an
    /// OpenCL device its weights are copied to device memory. When OpenCL cannot be used the
    /// model runs on the CPU and [`Model::device_note`] says why.
    ///
    /// ```
    /// use ternmux::backend::Device;
    /// use ternmux::model::Model;
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/bitllama2c-stories3M-TQ2_0.gguf");
    /// let model = Model::open_on(path, Device::Cpu)?;
    /// assert!(model.placement().describe().starts_with("cpu"));
    /// # Ok::<(), ternmux::Error>(())
    /// ```
    pub fn open_on(path: impl AsRef<Path>, device: Device) -> Result<Model> {
        let mut m = Model::open(path)?;
        m.place(device)?;
        Ok(m)
    }

    /// Moves the model to `device` (see [`Model::open_on`]). Existing KV caches belong to the
    /// old placement: make new ones.
    pub fn place(&mut self, device: Device) -> Result<()> {
        let (placement, note) = device.resolve();
        self.place_on(placement)?;
        self.device_note = note;
        Ok(())
    }

    /// Moves the model to an already resolved placement. On an OpenCL device every unit is
    /// copied to device memory now, under a private table with no budget (use a
    /// [`crate::mux::Mux`] to share a budget between models).
    pub fn place_on(&mut self, placement: Placement) -> Result<()> {
        self.binding = None;
        self.placement = Placement::Cpu;
        self.device_note = None;
        if let Placement::OpenCl(dev) = &placement {
            let store = Store::new(Some(dev.clone()), PageIn::Auto, 0)?;
            let core = Arc::new(Core::new(store, usize::MAX, false, usize::MAX));
            let (id, _) = core.add_model("model", self)?;
            self.binding = Some(Binding { core, id });
            self.placement = placement;
            let units = self
                .binding
                .as_ref()
                .map(|b| b.core.units_of(b.id))
                .transpose()?;
            for u in units.unwrap_or_default() {
                drop(self.acquire(u)?);
            }
        }
        Ok(())
    }

    /// Joins a mux's table (see [`crate::mux::Mux::register`]).
    pub(crate) fn bind(&mut self, placement: Placement, binding: Binding) {
        self.placement = placement;
        self.binding = Some(binding);
    }

    pub(crate) fn binding(&self) -> Option<&Binding> {
        self.binding.as_ref()
    }

    /// The meter KV caches and scratch of this model are charged to, if any.
    pub(crate) fn runtime_meter(&self) -> Option<&Arc<Meter>> {
        self.binding.as_ref().map(|b| &b.core.runtime)
    }

    /// Pins a unit for a forward pass, paging it in when the model lives in a table.
    pub(crate) fn acquire(&self, unit: UnitId) -> Result<UnitGuard> {
        match &self.binding {
            None => Ok(UnitGuard::unmanaged(Resident::Host(HostUnit::mapped(unit)))),
            Some(b) => b.core.acquire(self, b.id, unit),
        }
    }

    /// Pins a unit only if it is resident already.
    pub(crate) fn peek(&self, unit: UnitId) -> Result<Option<UnitGuard>> {
        match &self.binding {
            None => Ok(None),
            Some(b) => b.core.peek(b.id, unit),
        }
    }

    /// Pins a unit if that cannot wait: a model outside any table always, one in a table only
    /// if the unit is resident already (no page-in, no waiting for room).
    pub(crate) fn pin_if_resident(&self, unit: UnitId) -> Result<Option<UnitGuard>> {
        match &self.binding {
            None => self.acquire(unit).map(Some),
            Some(b) => b.core.peek(b.id, unit),
        }
    }

    /// How the CPU backend computes the output head ([`HeadMode`]; default int8).
    pub fn head_mode(&self) -> HeadMode {
        self.head_mode
    }

    /// Chooses how the CPU backend computes the output head. An int8 head already made is
    /// kept for a later switch back.
    ///
    /// ```
    /// use ternmux::model::{HeadMode, Model};
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/bitllama2c-stories3M-TQ2_0.gguf");
    /// let mut model = Model::open(path)?;
    /// model.set_head_mode(HeadMode::File);
    /// assert_eq!(model.head_description(), "F32 as stored");
    /// # Ok::<(), ternmux::Error>(())
    /// ```
    pub fn set_head_mode(&mut self, mode: HeadMode) {
        self.head_mode = mode;
    }

    /// One line saying how the head is computed now, e.g. `int8 (328.4 MB, made in 212 ms)`
    /// or `F16 as stored`.
    pub fn head_description(&self) -> String {
        self.head.describe(self.head_mode, &self.weights.output)
    }

    /// Whether the CPU backend computes this model's head in int8 (mode and head type).
    pub(crate) fn int8_head_applies(&self) -> bool {
        self.head_mode == HeadMode::Int8 && head::int8_applies(&self.weights.output)
    }

    /// The int8 head for the CPU backend (made on first call), when the mode and the head's
    /// type allow one.
    pub(crate) fn int8_head(&self) -> Option<&head::Int8Head> {
        match self.head_mode {
            HeadMode::Int8 => self.head.get(&self.file, &self.weights.output),
            HeadMode::File => None,
        }
    }

    /// Where the model runs.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Why the model is not where it was asked to be (e.g. OpenCL missing), if so.
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    /// As [`Model::open`], reporting each stage as it starts (for a progress display).
    pub fn open_with_progress(
        path: impl AsRef<Path>,
        mut stage: impl FnMut(LoadStage),
    ) -> Result<Model> {
        let start = Instant::now();
        stage(LoadStage::Mapping);
        let file = GgufFile::open(path)?;
        let mut m = Model::prepare(file, &mut stage)?;
        m.load_time = start.elapsed();
        Ok(m)
    }

    /// Prepares an already opened file.
    pub fn from_file(file: GgufFile) -> Result<Model> {
        Model::prepare(file, &mut |_| {})
    }

    fn prepare(file: GgufFile, stage: &mut impl FnMut(LoadStage)) -> Result<Model> {
        let start = Instant::now();
        stage(LoadStage::Validating);
        let config = Config::from_gguf(&file)?;
        let weights = Weights::load(&file, &config)?;
        stage(LoadStage::Tokenizer);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.len() > config.n_vocab {
            return Err(Error::Gguf(format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.len(),
                config.n_vocab
            )));
        }
        Ok(Model {
            file,
            config,
            weights,
            tokenizer,
            load_time: start.elapsed(),
            placement: Placement::Cpu,
            binding: None,
            device_note: None,
            head_mode: HeadMode::default(),
            head: head::HeadCache::default(),
        })
    }

    /// The mapped file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
    /// The validated weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
    /// Time spent opening and validating.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Starts generating from `prompt`: tokenizes it, runs the prompt as one batch (prefill) and
    /// returns an iterator over the generated tokens.
    pub fn stream(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream<'_>> {
        let tokens = self
            .tokenizer
            .encode(prompt, opts.add_special, opts.parse_special);
        self.stream_tokens(&tokens, opts)
    }

    /// As [`Model::stream`], from token ids.
    pub fn stream_tokens(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<TokenStream<'_>> {
        if prompt.is_empty() {
            return Err(Error::Tokenizer(
                "the prompt is empty and the vocabulary adds no BOS token".into(),
            ));
        }
        let n_ctx = if opts.n_ctx == 0 {
            self.config.n_ctx_train.min(4096)
        } else {
            opts.n_ctx
        };
        if prompt.len() > n_ctx {
            return Err(Error::Context {
                needed: prompt.len(),
                limit: n_ctx,
            });
        }
        let mut cache = KvCache::new(self, n_ctx, opts.kv_type)?;
        let start = Instant::now();
        let logits = self.forward(&mut cache, prompt, Logits::Last)?;
        let prefill = start.elapsed();
        let device_pick = opts.sampling.is_plain_greedy() && self.picks_on_device(&cache);
        Ok(TokenStream {
            model: self,
            cache,
            device_pick,
            ahead: 0,
            ignore_eog: opts.ignore_eog,
            sampler: Sampler::new(opts.sampling.clone()),
            history: prompt.to_vec(),
            text: TextOut::new(&self.tokenizer, prompt, opts.stop.clone()),
            logits: Some(logits),
            produced: Vec::new(),
            max_tokens: opts.max_tokens,
            finished: None,
            timings: Timings {
                load: self.load_time,
                prompt_tokens: prompt.len(),
                prefill,
                decode_tokens: 0,
                decode: Duration::ZERO,
            },
        })
    }

    /// Generates text for `prompt`, calling `on_text` with each piece as soon as it is known
    /// (return `false` to stop). Returns the whole generation with its timings.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut stream = self.stream(prompt, opts)?;
        let mut text = String::new();
        while let Some(piece) = stream.next() {
            let piece = piece?;
            text.push_str(&piece.text);
            if !on_text(&piece.text) {
                stream.finished = Some(StopReason::Cancelled);
                break;
            }
        }
        let tail = stream.flush();
        if !tail.is_empty() {
            on_text(&tail);
            text.push_str(&tail);
        }
        Ok(Generation {
            text,
            tokens: stream.produced.clone(),
            stop: stream.finished.unwrap_or(StopReason::MaxTokens),
            timings: stream.timings.clone(),
        })
    }
}

/// The stages of [`Model::open_with_progress`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadStage {
    /// Mapping the file and parsing its header, metadata and tensor table.
    Mapping,
    /// Reading the configuration and checking every tensor the graph needs.
    Validating,
    /// Building the tokenizer from the vocabulary.
    Tokenizer,
}

impl LoadStage {
    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            LoadStage::Mapping => "mapping file",
            LoadStage::Validating => "checking tensors",
            LoadStage::Tokenizer => "building tokenizer",
        }
    }
}

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to choose each token.
    pub sampling: SamplingParams,
    /// Context size in positions (0: the model's training context, at most 4096).
    pub n_ctx: usize,
    /// KV cache precision.
    pub kv_type: KvType,
    /// Stop when any of these strings is produced (it is not included in the output).
    pub stop: Vec<String>,
    /// Add BOS/EOS as the vocabulary asks.
    pub add_special: bool,
    /// Match control tokens written in the prompt (chat templates).
    pub parse_special: bool,
    /// Keep generating past end-of-generation tokens (llama.cpp's `--ignore-eos`; benchmarks
    /// that must produce a fixed number of tokens).
    pub ignore_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            n_ctx: 0,
            kv_type: KvType::F16,
            stop: Vec::new(),
            add_special: true,
            parse_special: false,
            ignore_eog: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` reached.
    MaxTokens,
    /// An end-of-generation token.
    EndOfGeneration,
    /// A stop string.
    StopString,
    /// The context is full.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

/// Where time went.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Opening and validating the model.
    pub load: Duration,
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Time for the prompt (one batched pass).
    pub prefill: Duration,
    /// Tokens generated after the first.
    pub decode_tokens: usize,
    /// Time generating them.
    pub decode: Duration,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second (each needs one forward pass).
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The text produced.
    pub text: String,
    /// The token ids produced.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Timings.
    pub timings: Timings,
}

/// One generated token and the text it completed (possibly empty while a UTF-8 character or a
/// possible stop string is incomplete).
#[derive(Clone, Debug)]
pub struct Piece {
    /// Token id.
    pub id: u32,
    /// Text released by this token.
    pub text: String,
}

/// Generated tokens, one forward pass per item.
pub struct TokenStream<'m> {
    model: &'m Model,
    cache: KvCache,
    /// Greedy decoding whose tokens are chosen on the device (OpenCL): the pass for the next
    /// token is queued before this one's token is read back, so the device never waits for
    /// the host between tokens.
    device_pick: bool,
    /// Passes queued on the device whose tokens have not been taken.
    ahead: usize,
    ignore_eog: bool,
    sampler: Sampler,
    history: Vec<u32>,
    text: TextOut<'m>,
    logits: Option<Vec<f32>>,
    produced: Vec<u32>,
    max_tokens: usize,
    finished: Option<StopReason>,
    timings: Timings,
}

impl TokenStream<'_> {
    /// Timings so far.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }
    /// Why the stream ended, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.finished
    }
    /// Text held back (an incomplete UTF-8 character or a possible stop-string prefix), released
    /// at the end.
    pub fn flush(&mut self) -> String {
        self.text.flush()
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished.is_some() || self.produced.len() >= self.max_tokens {
            self.finished.get_or_insert(StopReason::MaxTokens);
            return None;
        }
        let id = match self.logits.take() {
            Some(l) => self.sampler.sample(&l, &self.history),
            None if self.ahead > 0 => match self.take_ahead() {
                Ok(id) => id,
                Err(e) => {
                    self.finished = Some(StopReason::Cancelled);
                    return Some(Err(e));
                }
            },
            None => {
                if self.cache.len() >= self.cache.capacity() {
                    self.finished = Some(StopReason::ContextFull);
                    return None;
                }
                let start = Instant::now();
                let last = *self.history.last()?;
                let r = self.model.forward(&mut self.cache, &[last], Logits::Last);
                self.timings.decode += start.elapsed();
                self.timings.decode_tokens += 1;
                match r {
                    Ok(l) => self.sampler.sample(&l, &self.history),
                    Err(e) => {
                        self.finished = Some(StopReason::Cancelled);
                        return Some(Err(e));
                    }
                }
            }
        };
        self.history.push(id);
        self.produced.push(id);
        if !self.ignore_eog && self.model.tokenizer.is_eog(id) {
            self.finished = Some(StopReason::EndOfGeneration);
            return None;
        }
        let text = self.text.push(id);
        if self.text.stopped() {
            self.finished = Some(StopReason::StopString);
        } else if self.device_pick && self.ahead == 0 && self.may_follow(self.produced.len()) {
            // The first token came from the prompt's logits on the host; the pass it feeds
            // chooses the next one on the device.
            let start = Instant::now();
            let r = self.model.queue_pick(&mut self.cache, Some(id));
            self.timings.decode += start.elapsed();
            if let Err(e) = r {
                self.finished = Some(StopReason::Cancelled);
                return Some(Err(e));
            }
            self.ahead = 1;
        }
        Some(Ok(Piece { id, text }))
    }
}

impl TokenStream<'_> {
    /// Whether a token may follow the `produced`-th (room under `max_tokens` and in the
    /// context), so the pass that makes it is worth queueing.
    fn may_follow(&self, produced: usize) -> bool {
        produced < self.max_tokens && self.cache.len() < self.cache.capacity()
    }

    /// The next token chosen on the device. First queues the pass that follows it (fed from
    /// the device), so the device has work while the host waits; that pass is wasted only when
    /// this token ends the generation.
    fn take_ahead(&mut self) -> Result<u32> {
        let start = Instant::now();
        // The token taken now is the produced.len() + 1-th; the queued pass makes the next.
        if self.may_follow(self.produced.len() + 1) {
            self.model.queue_pick(&mut self.cache, None)?;
            self.ahead += 1;
        }
        let r = self.model.take_pick(&mut self.cache);
        self.ahead -= 1;
        self.timings.decode += start.elapsed();
        self.timings.decode_tokens += 1;
        r
    }
}
