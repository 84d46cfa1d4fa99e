//! The multiplexer: several models live under one fixed byte budget for their weights.
//!
//! [`Mux::register`] maps a GGUF file (zero copy: no weight is read, no device memory is used).
//! Generation on any registered model pages its units in on use — one transformer block, or
//! the output head, per unit, each one allocation — and when a page-in would pass the budget
//! the least recently used unpinned units of *any* model are evicted first. A unit in use by a
//! forward pass is pinned and cannot be evicted; [`Mux::pin`] keeps a whole model resident.
//! A model larger than the whole budget streams: it cycles through its own slots (two units,
//! one computing while the next is copied on the device's copy queue) instead of flushing other
//! models' hot layers.
//!
//! **What the budget covers**: every byte the mux allocates for weights (units, with their
//! alignment padding), counted exactly as allocated — OpenCL has no free-memory query, so the
//! mux never asks. KV caches and activation scratch sit under their own limit
//! ([`MuxOptions::runtime_limit`]), charged when a sequence's cache and buffers are made and
//! refused past it. Token embeddings are gathered from the mapping on the host (a few rows per
//! token), so an untied embedding table takes no device memory at all.
//!
//! On the CPU backend the same table governs host copies of the units (a page-in copies a
//! block out of the mapping), so one program runs, and is tested, the same way everywhere.
//!
//! ```
//! use ternmux::backend::Device;
//! use ternmux::model::GenerateOptions;
//! use ternmux::mux::Mux;
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
//! let mux = Mux::new(Device::Cpu, 4 << 20)?; // 4 MiB for weights
//! mux.register("tq2", format!("{dir}/bitllama2c-stories3M-TQ2_0.gguf"))?;
//! mux.register("tq1", format!("{dir}/bitllama2c-stories3M-TQ1_0.gguf"))?;
//! let opts = GenerateOptions { max_tokens: 8, ..GenerateOptions::default() };
//! let a = mux.generate("tq2", "Once upon a time", &opts, |_| true)?;
//! let b = mux.generate("tq1", "Once upon a time", &opts, |_| true)?;
//! assert_eq!(a.text, b.text);
//! let stats = mux.stats();
//! assert!(stats.peak <= stats.budget);
//! println!("{}", mux.budget_bar(40));
//! # Ok::<(), ternmux::Error>(())
//! ```

pub(crate) mod core;
pub mod host_cache;
pub mod meter;
mod stats;
pub(crate) mod store;
pub mod units;

pub use self::core::{MuxEvent, Policy, Sink};
pub use host_cache::HostCacheStats;
pub use stats::{Histogram, ModelStats, MuxStats, UnitStats};
pub use store::PageIn;
pub use units::UnitId;

use self::core::{Core, ModelId};
use crate::backend::{Device, Placement};
use crate::error::{Error, Result};
use crate::model::{GenerateOptions, Generation, Model};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// How a [`Mux`] is set up.
#[derive(Clone, Debug)]
pub struct MuxOptions {
    /// Bytes of weights the mux may hold at once.
    pub budget: usize,
    /// Bytes of KV caches plus activation scratch the mux's models may hold at once.
    pub runtime_limit: usize,
    /// How device page-ins copy from the mapping.
    pub page_in: PageIn,
    /// Bytes of pinned host memory that keep copies of units paged in through staging, so a
    /// unit paged in again is one DMA at the PCIe peak (see [`host_cache`]); 0 (the default)
    /// turns the cache off. Page-locked memory is taken from the host as units are first paged
    /// in, up to this many bytes; it is not part of [`Self::budget`]. Ignored where page-ins
    /// are not staged (the CPU backend, devices that share the host's memory).
    pub host_cache: usize,
    /// How victims are chosen.
    pub policy: Policy,
}

impl Default for MuxOptions {
    fn default() -> Self {
        MuxOptions {
            budget: 512 << 20,
            runtime_limit: usize::MAX,
            page_in: PageIn::Auto,
            host_cache: 0,
            policy: Policy::LayerLru,
        }
    }
}

/// A model's membership in a residency table. Dropping the model drops its units.
pub(crate) struct Binding {
    pub core: Arc<Core>,
    pub id: ModelId,
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.core.remove_model(self.id);
    }
}

/// Several models under one weight budget. See the [module docs](self).
pub struct Mux {
    core: Arc<Core>,
    placement: Placement,
    note: Option<String>,
    models: RwLock<Vec<(String, Arc<Model>)>>,
}

/// Keeps every unit of a model resident until dropped ([`Mux::pin`]).
pub struct ModelPin {
    model: Arc<Model>,
    held: Vec<UnitId>,
}

impl Drop for ModelPin {
    fn drop(&mut self) {
        if let Some(b) = self.model.binding() {
            for &u in &self.held {
                b.core.unhold(b.id, u);
            }
        }
    }
}

impl Mux {
    /// A mux on `device` holding at most `budget` bytes of weights.
    pub fn new(device: Device, budget: usize) -> Result<Mux> {
        Mux::with_options(
            device,
            MuxOptions {
                budget,
                ..MuxOptions::default()
            },
        )
    }

    /// A mux on `device` with every option. When OpenCL cannot be used the mux runs on the CPU
    /// and [`Mux::device_note`] says why.
    pub fn with_options(device: Device, opts: MuxOptions) -> Result<Mux> {
        let (placement, note) = device.resolve();
        let dev = match &placement {
            Placement::Cpu => None,
            Placement::OpenCl(d) => Some(d.clone()),
        };
        let store = store::Store::new(dev, opts.page_in, opts.host_cache)?;
        let core = Arc::new(Core::new(store, opts.budget, true, opts.runtime_limit));
        core.set_policy(opts.policy)?;
        Ok(Mux {
            core,
            placement,
            note,
            models: RwLock::new(Vec::new()),
        })
    }

    /// Where the mux's models run.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Why the mux is not on the device it was asked for, if so.
    pub fn device_note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The device and page-in path, in words.
    pub fn describe(&self) -> String {
        self.core.store.describe()
    }

    /// Maps the GGUF at `path` as model `name` (metadata and validation only: no weight is
    /// read and no budget is used until it generates). Returns the model, e.g. for its tokenizer.
    pub fn register(&self, name: &str, path: impl AsRef<Path>) -> Result<Arc<Model>> {
        if self.get(name).is_ok() {
            return Err(Error::Mux(format!(
                "a model named {name:?} is registered already"
            )));
        }
        let mut model = Model::open(path)?;
        let (id, _) = self.core.add_model(name, &model)?;
        model.bind(
            self.placement.clone(),
            Binding {
                core: self.core.clone(),
                id,
            },
        );
        let model = Arc::new(model);
        self.models
            .write()
            .map_err(|_| Error::Mux("model list poisoned".into()))?
            .push((name.to_string(), model.clone()));
        Ok(model)
    }

    /// Forgets model `name`; its units are freed once no generation holds the model.
    pub fn unregister(&self, name: &str) -> Result<()> {
        let mut models = self
            .models
            .write()
            .map_err(|_| Error::Mux("model list poisoned".into()))?;
        let before = models.len();
        models.retain(|(n, _)| n != name);
        if models.len() == before {
            return Err(self.unknown(name, &models));
        }
        Ok(())
    }

    fn unknown(&self, name: &str, models: &[(String, Arc<Model>)]) -> Error {
        Error::Mux(format!(
            "no model named {name:?} (registered: {})",
            models
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// The model registered as `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Model>> {
        let models = self
            .models
            .read()
            .map_err(|_| Error::Mux("model list poisoned".into()))?;
        models
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| self.unknown(name, &models))
    }

    /// Registered names, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// Generates from model `name` (see [`Model::generate`]); its units are paged in as the
    /// forward passes reach them.
    pub fn generate(
        &self,
        name: &str,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.get(name)?.generate(prompt, opts, on_text)
    }

    /// Pages every unit of `name` in and keeps them resident until the pin is dropped.
    pub fn pin(&self, name: &str) -> Result<ModelPin> {
        let (model, id) = self.bound(name)?;
        let mut pin = ModelPin {
            model: model.clone(),
            held: Vec::new(),
        };
        for u in self.core.units_of(id)? {
            self.core.hold(&model, id, u)?;
            pin.held.push(u);
        }
        Ok(pin)
    }

    /// Pages unit `unit` of `name` in now, if it is not resident (e.g. to warm a model before
    /// traffic, or to measure page-in speed with [`Mux::quiesce`]).
    pub fn page_in(&self, name: &str, unit: UnitId) -> Result<()> {
        drop(self.get(name)?.acquire(unit)?);
        Ok(())
    }

    /// The units of model `name`, blocks then the head.
    pub fn units(&self, name: &str) -> Result<Vec<UnitId>> {
        let (_, id) = self.bound(name)?;
        self.core.units_of(id)
    }

    /// Model `name` with its id in this mux's table.
    fn bound(&self, name: &str) -> Result<(Arc<Model>, ModelId)> {
        let model = self.get(name)?;
        let id = model
            .binding()
            .map(|b| b.id)
            .ok_or_else(|| Error::Mux(format!("model {name:?} is not bound to this mux")))?;
        Ok((model, id))
    }

    /// The weight budget in bytes.
    pub fn budget(&self) -> usize {
        self.core.budget()
    }

    /// Changes the weight budget; shrinking evicts least recently used units at once.
    pub fn set_budget(&self, bytes: usize) -> Result<()> {
        self.core.set_budget(bytes)
    }

    /// Changes the pinned host cache's budget ([`MuxOptions::host_cache`]); shrinking drops
    /// least recently used copies at once. Ignored where page-ins are not staged (the CPU
    /// backend, devices that share the host's memory): [`MuxStats::host_cache`] stays 0.
    pub fn set_host_cache(&self, bytes: usize) -> Result<()> {
        self.core.store.set_host_cache(bytes)
    }

    /// Changes the limit on KV caches and activation scratch.
    pub fn set_runtime_limit(&self, bytes: usize) {
        self.core.runtime.set_limit(bytes);
    }

    /// Every counter, per model and per unit.
    pub fn stats(&self) -> MuxStats {
        self.core.stats()
    }

    /// Calls `sink` with every page-in, eviction and hit from now on (`None` stops). The same
    /// page-ins and evictions also go to `tracing` (target `ternmux::mux`, level debug).
    pub fn set_event_sink(&self, sink: Option<Sink>) {
        self.core.set_sink(sink);
    }

    /// Waits for page-ins and kernels in flight (benchmarks).
    pub fn quiesce(&self) -> Result<std::time::Duration> {
        self.core.quiesce()
    }

    /// A one-line picture of the budget: one letter per model (its name's first letter) for
    /// each share of resident bytes, `·` for free, then the numbers.
    pub fn budget_bar(&self, width: usize) -> String {
        let (per, used, budget) = self.core.residency();
        let width = width.max(8);
        let mut bar = String::new();
        let mut cells = 0usize;
        let scale = |b: usize| ((b as f64 / budget.max(1) as f64) * width as f64).round() as usize;
        for (name, b) in &per {
            let n = scale(*b).min(width - cells);
            let c = name.chars().next().unwrap_or('?');
            bar.extend(std::iter::repeat_n(c, n));
            cells += n;
        }
        bar.extend(std::iter::repeat_n('·', width - cells));
        format!(
            "[{bar}] {:.2}/{:.2} MiB",
            used as f64 / (1u64 << 20) as f64,
            budget as f64 / (1u64 << 20) as f64
        )
    }
}

/// Parses a byte size: `10MiB`, `512KiB`, `1.5GiB`, `10MB` (powers of 1000), `4096`.
///
/// ```
/// use ternmux::mux::parse_bytes;
/// assert_eq!(parse_bytes("10MiB")?, 10 << 20);
/// assert_eq!(parse_bytes("2kB")?, 2000);
/// assert!(parse_bytes("ten").is_err());
/// # Ok::<(), ternmux::Error>(())
/// ```
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => f64::NAN,
    };
    match num.parse::<f64>() {
        Ok(n) if n >= 0.0 && mult.is_finite() => Ok((n * mult) as usize),
        _ => Err(Error::Mux(format!(
            "{s:?} is not a byte size (write e.g. 512MiB, 10MB or 4096)"
        ))),
    }
}
