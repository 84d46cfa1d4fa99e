//! The forward pass, written once over [`Backend`]: batched prefill and decode over a KV cache,
//! for every architecture. A prompt of T tokens goes through every linear layer as one GEMM, so
//! weights are read once per layer for the whole prompt (a backend may split long prompts into
//! passes of [`Backend::max_tokens_per_pass`] tokens).

use super::{Model, split};
use crate::backend::cpu::{CpuExec, CpuKv};
use crate::backend::opencl::{ClExec, ClKv};
use crate::backend::{Backend, LayerMat, Mat, Norm, Placement, RowPlace};
use crate::error::{Error, Result};
use crate::mux::core::UnitGuard;
use crate::mux::meter::Reservation;
use crate::mux::units::UnitId;
use rayon::prelude::*;

/// Storage type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// Half precision (llama.cpp's default): half the memory.
    #[default]
    F16,
    /// Single precision (CPU backend only).
    F32,
}

enum KvStorage {
    Cpu(CpuKv),
    OpenCl(Box<ClKv>),
}

/// Keys and values of every layer for up to `n_ctx` positions of each of `slots` sequences,
/// held by the model's backend (host memory on the CPU, device memory on OpenCL). A cache made
/// by [`KvCache::new`] has one slot, used by [`Model::forward`]; the engine's caches have one
/// slot per running sequence, filled together by [`Model::forward_batch`].
pub struct KvCache {
    store: KvStorage,
    n_ctx: usize,
    lens: Vec<usize>,
    /// Whether the last pass on this cache chose its token on the device
    /// ([`Model::queue_pick`]), so the next may take it from there.
    picked_last: bool,
    _charge: Option<Reservation>,
}

impl KvCache {
    /// A cache for one sequence of `n_ctx` positions on the model's backend.
    pub fn new(model: &Model, n_ctx: usize, ty: KvType) -> Result<KvCache> {
        KvCache::with_slots(model, n_ctx, 1, ty)
    }

    /// A cache for `slots` sequences of `n_ctx` positions each (continuous batching).
    pub fn with_slots(model: &Model, n_ctx: usize, slots: usize, ty: KvType) -> Result<KvCache> {
        if slots == 0 || n_ctx == 0 {
            return Err(Error::Request(format!(
                "a KV cache needs at least one slot and one position (asked {slots} × {n_ctx})"
            )));
        }
        let meter = model.runtime_meter();
        let (store, charge) = match &model.placement {
            Placement::Cpu => {
                let bytes = CpuKv::planned_bytes(model, n_ctx, slots, ty);
                let charge = meter.map(|m| m.reserve(bytes)).transpose()?;
                (KvStorage::Cpu(CpuKv::new(model, n_ctx, slots, ty)), charge)
            }
            Placement::OpenCl(dev) => (
                KvStorage::OpenCl(Box::new(ClKv::new(dev, model, n_ctx, slots, ty, meter)?)),
                None,
            ),
        };
        Ok(KvCache {
            store,
            n_ctx,
            lens: vec![0; slots],
            picked_last: false,
            _charge: charge,
        })
    }
    /// Positions filled so far in slot 0 (the only slot of a [`KvCache::new`] cache).
    pub fn len(&self) -> usize {
        self.lens[0]
    }
    /// Whether slot 0 holds nothing.
    pub fn is_empty(&self) -> bool {
        self.lens[0] == 0
    }
    /// Capacity in positions of each slot.
    pub fn capacity(&self) -> usize {
        self.n_ctx
    }
    /// Number of sequence slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }
    /// Positions filled in `slot` (0 for a slot out of range).
    pub fn slot_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }
    /// Forgets slot `slot` (its memory is kept for the next sequence).
    pub fn reset_slot(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
        }
    }
    /// Forgets every slot (the memory is kept).
    pub fn clear(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
    }
    /// Keeps only the first `len` positions of slot 0 (reuse of a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.lens[0] = self.lens[0].min(len);
    }
    /// Bytes held (host or device).
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStorage::Cpu(c) => c.bytes(),
            KvStorage::OpenCl(c) => c.bytes(),
        }
    }
}

/// The next tokens of one sequence in a batched pass ([`Model::forward_batch`]).
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// The sequence's cache slot; its tokens go at positions `slot_len(slot)..`.
    pub slot: usize,
    /// Tokens to append (a prompt chunk, or the one token sampled last).
    pub tokens: &'a [u32],
    /// Whether to return the logits of the chunk's last token.
    pub logits: bool,
    /// With `logits`: only its greedy token is wanted (largest logit, lowest id on ties), which
    /// a device chooses where the logits are and sends back alone
    /// ([`Model::forward_batch_picks`]).
    pub pick: bool,
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring, tests).
    All,
}

impl Model {
    /// Runs `tokens` (positions `cache.len()..` of slot 0) through the model on its backend,
    /// appending to the cache, and returns logits (`n_vocab` per returned token).
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Request("forward: no tokens".into()));
        }
        let pos0 = cache.lens[0];
        self.check_tokens(cache, pos0, tokens)?;
        let places: Vec<RowPlace> = (pos0..pos0 + tokens.len())
            .map(|p| RowPlace {
                slot: 0,
                pos: p as u32,
            })
            .collect();
        let job = Job {
            tokens,
            places: &places,
            out: Out::PerPass(which),
        };
        let mut logits = Vec::new();
        self.execute(cache, &job, &mut logits, &mut Vec::new())?;
        cache.lens[0] = pos0 + tokens.len();
        Ok(logits)
    }

    /// Runs one pass over chunks of several sequences at once (continuous batching): every
    /// linear layer sees all rows as one GEMM, so the weights are read once for the batch.
    /// Returns `n_vocab` logits per chunk with `logits: true`, in order. The slots must be
    /// distinct and the rows at most [`Model::max_batch_rows`].
    pub fn forward_batch(&self, cache: &mut KvCache, seqs: &[SeqChunk<'_>]) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_batch_into(cache, seqs, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::forward_batch`] into `logits` (cleared first), whose memory is reused: a server
    /// stepping a batch keeps one vector, instead of allocating (and the OS zeroing) the
    /// batch's logits every step — 65 MB for 128 rows of a 128k vocabulary.
    pub fn forward_batch_into(
        &self,
        cache: &mut KvCache,
        seqs: &[SeqChunk<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if seqs.iter().any(|s| s.logits && s.pick) {
            return Err(Error::Request(
                "forward_batch_into: a chunk asks for its greedy token only; use \
                 forward_batch_picks"
                    .into(),
            ));
        }
        self.forward_batch_picks(cache, seqs, logits, &mut Vec::new())
    }

    /// [`Model::forward_batch_into`] where chunks may ask for their greedy token only (`pick`):
    /// `logits` gets the logits of the chunks with `logits` and not `pick`, in order, and
    /// `picks` (cleared first) the greedy tokens of those with both, in order. On a device
    /// the tokens are chosen there, so a step of many greedy sequences reads back a few bytes
    /// per sequence instead of its whole vocabulary's logits.
    pub fn forward_batch_picks(
        &self,
        cache: &mut KvCache,
        seqs: &[SeqChunk<'_>],
        logits: &mut Vec<f32>,
        picks: &mut Vec<u32>,
    ) -> Result<()> {
        logits.clear();
        picks.clear();
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Err(Error::Request("forward_batch: no tokens".into()));
        }
        let limit = self.max_batch_rows(cache);
        if total > limit {
            return Err(Error::Request(format!(
                "forward_batch: {total} rows but one pass takes at most {limit}"
            )));
        }
        let mut seen = vec![false; cache.slots()];
        for s in seqs {
            match seen.get_mut(s.slot) {
                None => {
                    return Err(Error::Request(format!(
                        "forward_batch: slot {} of a cache with {} slots",
                        s.slot,
                        cache.slots()
                    )));
                }
                Some(true) => {
                    return Err(Error::Request(format!(
                        "forward_batch: slot {} appears twice in one pass",
                        s.slot
                    )));
                }
                Some(x) => *x = true,
            }
            if s.tokens.is_empty() {
                return Err(Error::Request(format!(
                    "forward_batch: slot {} has no tokens",
                    s.slot
                )));
            }
            self.check_tokens(cache, cache.lens[s.slot], s.tokens)?;
        }
        let parts = match &cache.store {
            KvStorage::Cpu(_) => self.split_plan(seqs),
            KvStorage::OpenCl(_) => None,
        };
        // A split pass runs its parts on pool threads, which must never wait for a page-in:
        // every unit is pinned first, or the batch is not split.
        let pins = match parts {
            Some(_) => self.pin_all_resident()?,
            None => None,
        };
        match (parts, pins, &mut cache.store) {
            (Some(parts), Some(_pins), KvStorage::Cpu(kv)) => {
                cache.picked_last = false;
                self.forward_parts(kv, &cache.lens, seqs, &parts, logits, picks)?;
            }
            _ => {
                let rows = BatchRows::of(&cache.lens, seqs);
                self.execute(cache, &rows.job(), logits, picks)?;
            }
        }
        for s in seqs {
            cache.lens[s.slot] += s.tokens.len();
        }
        Ok(())
    }

    /// The most rows one [`Model::forward_batch`] pass takes with `cache` (the OpenCL backend
    /// sizes its attention scratch per pass).
    pub fn max_batch_rows(&self, cache: &KvCache) -> usize {
        match &cache.store {
            KvStorage::Cpu(kv) => CpuExec::new(self).max_tokens_per_pass(kv),
            KvStorage::OpenCl(kv) => kv.max_pass(),
        }
    }

    fn check_tokens(&self, cache: &KvCache, pos0: usize, tokens: &[u32]) -> Result<()> {
        if pos0 + tokens.len() > cache.n_ctx {
            return Err(Error::Context {
                needed: pos0 + tokens.len(),
                limit: cache.n_ctx,
            });
        }
        let n_vocab = self.config.n_vocab;
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::Request(format!(
                "token id {tok} is outside the vocabulary of {n_vocab}"
            )));
        }
        Ok(())
    }

    /// Runs `job` on the backend that owns `cache`'s storage.
    fn execute(
        &self,
        cache: &mut KvCache,
        job: &Job<'_>,
        logits: &mut Vec<f32>,
        picks: &mut Vec<u32>,
    ) -> Result<()> {
        cache.picked_last = false;
        match &mut cache.store {
            // Not inside the rayon pool: a pass can block (a mux page-in waiting for room, the
            // head's first build), and a pool thread waiting in a join may steal another
            // thread's whole pass and block under it — a deadlock (seen in CI's mux stress test
            // when passes ran in `rayon::scope`).
            KvStorage::Cpu(kv) => run(&CpuExec::new(self), self, kv, job, logits, picks),
            KvStorage::OpenCl(kv) => {
                let Placement::OpenCl(dev) = &self.placement else {
                    return Err(Error::Device(
                        "a device KV cache used with a model on the CPU: make a new cache".into(),
                    ));
                };
                run(&ClExec::new(dev, self, kv), self, kv, job, logits, picks)
            }
        }
    }
}

/// A batch's rows in pass order: rows whose logits are wanted go last, so the head runs over
/// one contiguous tail: those read back first, those only picked after them.
struct BatchRows {
    tokens: Vec<u32>,
    places: Vec<RowPlace>,
    n_out: usize,
    n_pick: usize,
}

impl BatchRows {
    /// The rows of `seqs`, each sequence's from its slot's length in `lens` on.
    fn of(lens: &[usize], seqs: &[SeqChunk<'_>]) -> BatchRows {
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut places = Vec::with_capacity(total);
        let (mut tail, mut picked) = (Vec::new(), Vec::new());
        for s in seqs {
            let pos0 = lens.get(s.slot).copied().unwrap_or(0);
            for (i, &t) in s.tokens.iter().enumerate() {
                let place = RowPlace {
                    slot: s.slot as u32,
                    pos: (pos0 + i) as u32,
                };
                if s.logits && i + 1 == s.tokens.len() {
                    if s.pick {
                        picked.push((t, place));
                    } else {
                        tail.push((t, place));
                    }
                } else {
                    tokens.push(t);
                    places.push(place);
                }
            }
        }
        let (n_pick, n_out) = (picked.len(), tail.len() + picked.len());
        for (t, p) in tail.into_iter().chain(picked) {
            tokens.push(t);
            places.push(p);
        }
        BatchRows {
            tokens,
            places,
            n_out,
            n_pick,
        }
    }

    /// The job of one pass over these rows.
    fn job(&self) -> Job<'_> {
        Job {
            tokens: &self.tokens,
            places: &self.places,
            out: Out::Tail {
                n_out: self.n_out,
                n_pick: self.n_pick,
            },
        }
    }
}

impl Model {
    /// How to split a batch on the CPU by sequence ([`split`]), or `None` to split each
    /// product's rows instead.
    fn split_plan(&self, seqs: &[SeqChunk<'_>]) -> Option<Vec<Vec<usize>>> {
        if !split::enabled() {
            return None;
        }
        let w = &self.weights;
        let largest_block = w.layers.iter().map(|l| l.matrix_bytes()).max();
        if largest_block.unwrap_or(0).max(w.output.range.len()) > split::SPLIT_MAX_UNIT_BYTES {
            return None;
        }
        let rows: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        split::plan(&rows, rayon::current_num_threads())
    }

    /// Pins every unit of the model when all are resident; `None`, pinning nothing, when one
    /// is not.
    fn pin_all_resident(&self) -> Result<Option<Vec<UnitGuard>>> {
        let units = (0..self.weights.layers.len())
            .map(UnitId::Block)
            .chain([UnitId::Head]);
        let mut pins = Vec::with_capacity(self.weights.layers.len() + 1);
        for u in units {
            match self.pin_if_resident(u)? {
                Some(g) => pins.push(g),
                None => return Ok(None),
            }
        }
        Ok(Some(pins))
    }

    /// A batch split by sequence into `parts` (indices into `seqs`): each part's slots are lent
    /// to it and it runs as one pass on a pool thread with its products kept there; the
    /// logits and picks come back in `seqs`' order, as one pass gives them.
    fn forward_parts(
        &self,
        kv: &mut CpuKv,
        lens: &[usize],
        seqs: &[SeqChunk<'_>],
        parts: &[Vec<usize>],
        logits: &mut Vec<f32>,
        picks: &mut Vec<u32>,
    ) -> Result<()> {
        let end = seqs
            .iter()
            .map(|s| lens.get(s.slot).copied().unwrap_or(0) + s.tokens.len())
            .max()
            .unwrap_or(0);
        #[cfg(test)]
        split::SPLIT_PASSES.with(|c| c.set(c.get() + 1));
        let mut kvs = Vec::with_capacity(parts.len());
        for p in parts {
            let slots: Vec<usize> = p.iter().map(|&i| seqs[i].slot).collect();
            match kv.lend(self, &slots, end) {
                Ok(part) => kvs.push(part),
                Err(e) => {
                    kvs.into_iter().for_each(|part| kv.take_back(part));
                    return Err(e);
                }
            }
        }
        let outs: Vec<Result<(Vec<f32>, Vec<u32>)>> = kvs
            .par_iter_mut()
            .zip(parts.par_iter())
            .map(|(part_kv, idx)| {
                ternmux_kernels::serial::serial(|| {
                    let chunks: Vec<SeqChunk<'_>> = idx.iter().map(|&i| seqs[i]).collect();
                    let rows = BatchRows::of(lens, &chunks);
                    let (mut l, mut p) = (Vec::new(), Vec::new());
                    run(
                        &CpuExec::new(self),
                        self,
                        part_kv,
                        &rows.job(),
                        &mut l,
                        &mut p,
                    )?;
                    Ok((l, p))
                })
            })
            .collect();
        kvs.into_iter().for_each(|part| kv.take_back(part));
        let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
        let mut part_of = vec![0; seqs.len()];
        for (pi, p) in parts.iter().enumerate() {
            p.iter().for_each(|&i| part_of[i] = pi);
        }
        let n_vocab = self.config.n_vocab;
        let mut next = vec![(0, 0); parts.len()];
        let short = || Error::Engine("a part of a split pass returned too few logits".into());
        for (i, s) in seqs.iter().enumerate().filter(|(_, s)| s.logits) {
            let ((l, p), at) = (&outs[part_of[i]], &mut next[part_of[i]]);
            if s.pick {
                picks.push(*p.get(at.1).ok_or_else(short)?);
                at.1 += 1;
            } else {
                let row = l.get(at.0 * n_vocab..(at.0 + 1) * n_vocab);
                logits.extend_from_slice(row.ok_or_else(short)?);
                at.0 += 1;
            }
        }
        Ok(())
    }
}

/// Whether greedy decoding chooses tokens on the device where it can
/// (`TERNMUX_DEVICE_PICK=0` chooses on the host after reading the logits, to compare).
fn device_pick_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_DEVICE_PICK").is_none_or(|v| v != "0"))
}

impl Model {
    /// Whether greedy decoding of `cache`'s slot 0 may choose its tokens on the device
    /// ([`Model::queue_pick`]): an OpenCL cache (the CPU reads logits where they are).
    pub(crate) fn picks_on_device(&self, cache: &KvCache) -> bool {
        device_pick_enabled()
            && matches!(
                (&cache.store, &self.placement),
                (KvStorage::OpenCl(_), Placement::OpenCl(_))
            )
    }

    /// Queues one decoding pass of slot 0 and the greedy choice of its next token on the
    /// device, and returns without waiting: the host can queue the following pass (`token`
    /// `None`: the one this pass chooses, taken from the device) while this one runs, and
    /// collects the tokens in order with [`Model::take_pick`]. `Some(token)` feeds a token from
    /// the host (the first after a prompt).
    pub(crate) fn queue_pick(&self, cache: &mut KvCache, token: Option<u32>) -> Result<()> {
        let pos = cache.lens[0];
        let host;
        let feed = match token {
            Some(t) => {
                host = [t];
                self.check_tokens(cache, pos, &host)?;
                Feed::Host(&host)
            }
            None if cache.picked_last => {
                if pos + 1 > cache.n_ctx {
                    return Err(Error::Context {
                        needed: pos + 1,
                        limit: cache.n_ctx,
                    });
                }
                Feed::Picked
            }
            None => {
                return Err(Error::Request(
                    "queue_pick: no token was chosen on the device by the previous pass".into(),
                ));
            }
        };
        let places = [RowPlace {
            slot: 0,
            pos: pos as u32,
        }];
        let (KvStorage::OpenCl(kv), Placement::OpenCl(dev)) = (&mut cache.store, &self.placement)
        else {
            return Err(Error::Device(
                "queue_pick: tokens are chosen on the device only on OpenCL".into(),
            ));
        };
        pass(
            &ClExec::new(dev, self, kv),
            self,
            kv,
            feed,
            &places,
            Sink::Pick,
        )?;
        cache.lens[0] = pos + 1;
        cache.picked_last = true;
        Ok(())
    }

    /// The token of the oldest pass queued by [`Model::queue_pick`] whose token has not been
    /// taken: waits until the device has chosen it.
    pub(crate) fn take_pick(&self, cache: &mut KvCache) -> Result<u32> {
        match (&mut cache.store, &self.placement) {
            (KvStorage::OpenCl(kv), Placement::OpenCl(dev)) => kv.take_pick(dev),
            _ => Err(Error::Device(
                "take_pick: tokens are chosen on the device only on OpenCL".into(),
            )),
        }
    }
}

/// Where a pass's tokens come from.
#[derive(Clone, Copy)]
enum Feed<'a> {
    /// Token ids from the host.
    Host(&'a [u32]),
    /// The one token the previous pass chose on the device.
    Picked,
}

/// What a pass does with its last rows' logits.
enum Sink<'l> {
    /// Of the last `n_out` rows, appends the logits of all but the last `n_pick` to `logits`
    /// (reading them from the device) and the greedy tokens of those `n_pick` to `picks`.
    Logits {
        n_out: usize,
        logits: &'l mut Vec<f32>,
        n_pick: usize,
        picks: &'l mut Vec<u32>,
    },
    /// Chooses the greedy token of the one row on the device ([`Backend::pick_greedy`]).
    Pick,
}

/// Rows to run, with their places, and which logits to return.
struct Job<'a> {
    tokens: &'a [u32],
    places: &'a [RowPlace],
    out: Out,
}

/// Which rows' logits a job returns.
enum Out {
    /// One sequence, split into passes the backend accepts: the last row of the last pass, or
    /// every row.
    PerPass(Logits),
    /// One pass (a batch): its last `n_out` rows, of which the last `n_pick` only need their
    /// greedy tokens.
    Tail { n_out: usize, n_pick: usize },
}

/// Runs a job as passes the backend accepts and appends their logits to `logits`.
fn run<B: Backend>(
    be: &B,
    model: &Model,
    kv: &mut B::Kv,
    job: &Job<'_>,
    logits: &mut Vec<f32>,
    picks: &mut Vec<u32>,
) -> Result<()> {
    match job.out {
        Out::Tail { n_out, n_pick } => pass(
            be,
            model,
            kv,
            Feed::Host(job.tokens),
            job.places,
            Sink::Logits {
                n_out,
                logits,
                n_pick,
                picks,
            },
        )?,
        Out::PerPass(which) => {
            let step = be.max_tokens_per_pass(kv).max(1);
            let n_chunks = job.tokens.len().div_ceil(step);
            let chunks = job.tokens.chunks(step).zip(job.places.chunks(step));
            for (i, (chunk, at)) in chunks.enumerate() {
                let n_out = match which {
                    Logits::All => chunk.len(),
                    Logits::Last if i + 1 == n_chunks => 1,
                    Logits::Last => 0,
                };
                let sink = Sink::Logits {
                    n_out,
                    logits: &mut *logits,
                    n_pick: 0,
                    picks: &mut *picks,
                };
                pass(be, model, kv, Feed::Host(chunk), at, sink)?;
            }
        }
    }
    Ok(())
}

/// A pass's activation buffers (rows of `t_n` tokens).
struct Acts<B: Backend> {
    /// The residual stream.
    x: B::Buf,
    /// The normed input of the next projection.
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Rotated queries.
    qr: B::Buf,
    /// Attention output.
    att: B::Buf,
    /// Gate, then the activated product that goes down.
    g: B::Buf,
    u: B::Buf,
}

/// Block `li`'s ops over the pass's `t_n` rows: attention and FFN with their residual adds.
/// Where the backend's projections norm their own input ([`Backend::norms_in_projections`],
/// the same for every block of a pass), the QKV and gate/up projections take the residual
/// stream `a.x` and their norms; otherwise block 0 norms `a.x` itself and later blocks find
/// their normed input in `a.h`, which the previous block's down projection made
/// (`Norm::Next`). The last block leaves only `a.x`.
#[allow(clippy::too_many_arguments)]
fn block<B: Backend>(
    be: &B,
    model: &Model,
    kv: &mut B::Kv,
    li: usize,
    blk: &B::Unit,
    places: &[RowPlace],
    t_n: usize,
    a: &mut Acts<B>,
) -> Result<()> {
    let layers = &model.weights.layers;
    let l = &layers[li];
    let in_proj = be.norms_in_projections(t_n);
    let qkv = &mut [
        (Mat::Layer(LayerMat::Q), &mut a.q),
        (Mat::Layer(LayerMat::K), &mut a.k),
        (Mat::Layer(LayerMat::V), &mut a.v),
    ];
    if in_proj {
        be.norm_project(blk, Norm::Attn, &a.x, t_n, &mut a.h, qkv)?;
    } else {
        if li == 0 {
            be.norm(blk, Norm::Attn, &a.x, 0, t_n, &mut a.h)?;
        }
        be.project(blk, &a.h, t_n, qkv, false)?;
    }
    let sub = l.attn_sub_norm.is_some().then_some(blk);
    be.rope_attention(kv, li, places, &a.q, &a.k, &a.v, &mut a.qr, &mut a.att, sub)?;
    let ffn_act = model.config.ffn_act;
    let sub = l.ffn_sub_norm.is_some();
    if in_proj {
        let o = Mat::Layer(LayerMat::O);
        be.project(blk, &a.att, t_n, &mut [(o, &mut a.x)], true)?;
        let gate_up = &mut [
            (Mat::Layer(LayerMat::Gate), &mut a.g),
            (Mat::Layer(LayerMat::Up), &mut a.u),
        ];
        be.norm_project(blk, Norm::Ffn, &a.x, t_n, &mut a.h, gate_up)?;
        be.ffn_act(blk, &mut a.g, &a.u, t_n, ffn_act, sub)?;
    } else {
        be.project_residual_norm(
            blk,
            &a.att,
            t_n,
            Mat::Layer(LayerMat::O),
            &mut a.x,
            Norm::Ffn,
            &mut a.h,
        )?;
        be.project_act(blk, &a.h, t_n, &mut a.g, &mut a.u, ffn_act, sub)?;
    }
    if li + 1 < layers.len() && !in_proj {
        be.project_residual_norm(
            blk,
            &a.g,
            t_n,
            Mat::Layer(LayerMat::Down),
            &mut a.x,
            Norm::Next,
            &mut a.h,
        )
    } else {
        be.project(
            blk,
            &a.g,
            t_n,
            &mut [(Mat::Layer(LayerMat::Down), &mut a.x)],
            true,
        )
    }
}

/// The head over rows `row0 .. row0 + rows` of the residual stream `a.x`: the output norm into
/// `a.h`, then the logits into `out`.
fn head_ops<B: Backend>(
    be: &B,
    head: &B::Unit,
    a: &mut Acts<B>,
    row0: usize,
    rows: usize,
    out: &mut B::Buf,
) -> Result<()> {
    be.norm(head, Norm::Output, &a.x, row0, rows, &mut a.h)?;
    be.project(head, &a.h, rows, &mut [(Mat::Output, out)], false)
}

/// Pins `unit` for a pass: while the pass keeps its pins (`keep`), one that is resident
/// already is pinned without waiting; otherwise the pins in `held` go back first (a page-in
/// may wait for room) and the unit is acquired.
fn pin_unit(
    model: &Model,
    unit: UnitId,
    keep: bool,
    held: &mut Vec<UnitGuard>,
) -> Result<UnitGuard> {
    if keep && let Some(g) = model.pin_if_resident(unit)? {
        return Ok(g);
    }
    held.clear();
    model.acquire(unit)
}

/// One pass of the tokens of `feed` at `places`: the architecture's op list, then `sink`.
fn pass<B: Backend>(
    be: &B,
    model: &Model,
    kv: &mut B::Kv,
    feed: Feed<'_>,
    places: &[RowPlace],
    sink: Sink<'_>,
) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let t_n = match feed {
        Feed::Host(tokens) => tokens.len(),
        Feed::Picked => 1,
    };
    if t_n != places.len() || (matches!(sink, Sink::Pick) && t_n != 1) {
        return Err(Error::Request(format!(
            "a pass of {t_n} tokens at {} places{}",
            places.len(),
            if matches!(sink, Sink::Pick) {
                " (a device pick takes one)"
            } else {
                ""
            }
        )));
    }
    let (e, qd, kvd, ff) = (
        c.n_embd,
        c.n_head * c.head_dim,
        c.n_head_kv * c.head_dim,
        c.n_ff,
    );
    let mut x = be.alloc(t_n * e)?;
    {
        // A tied head that is resident already serves the lookup on the device.
        let head = if w.tied && matches!(model.placement, Placement::OpenCl(_)) {
            model.peek(UnitId::Head)?
        } else {
            None
        };
        let head = head.as_ref().map(|g| be.unit(g)).transpose()?;
        match feed {
            Feed::Host(tokens) => be.embed(head, tokens, &mut x)?,
            Feed::Picked => be.embed_picked(kv, head, &mut x)?,
        }
    }
    let mut a = Acts::<B> {
        h: be.alloc(t_n * e)?,
        q: be.alloc(t_n * qd)?,
        k: be.alloc(t_n * kvd)?,
        v: be.alloc(t_n * kvd)?,
        qr: be.alloc(t_n * qd)?,
        att: be.alloc(t_n * qd)?,
        g: be.alloc(t_n * ff)?,
        u: be.alloc(t_n * ff)?,
        x,
    };
    let n_out = match &sink {
        Sink::Logits { n_out, .. } => (*n_out).min(t_n),
        Sink::Pick => 1,
    };
    let (row0, rows) = (t_n - n_out, n_out);
    let mut out = (n_out > 0)
        .then(|| be.alloc(rows * c.n_vocab))
        .transpose()?;
    let head_work = w.output.range.len() * rows;
    let n_layers = w.layers.len();
    let mut head_done = false;
    let mut li = 0;
    // Pins of resident blocks kept until the pass is queued (`Backend::unpins_together`).
    let together = be.unpins_together();
    let mut held = Vec::new();
    while li < n_layers {
        // Pinned while the blocks' ops run; the next page-in may start as soon as the guards
        // drop (a device keeps computing while the host copies). Units are pinned here,
        // outside `compute`: a page-in may wait for room, and `compute`'s ops must not block.
        // A backend that takes runs of blocks gets this one and every block after it that is
        // resident already (pinned without waiting), and the head with the last run when it is
        // resident too: the rest of the pass as one job.
        // Block 0 through `acquire` always: it marks the start of a pass for the multiplexer.
        let mut guards = vec![pin_unit(
            model,
            UnitId::Block(li),
            together && li > 0,
            &mut held,
        )?];
        let runs = be.runs_of_blocks();
        while runs && li + guards.len() < n_layers {
            match model.pin_if_resident(UnitId::Block(li + guards.len()))? {
                Some(g) => guards.push(g),
                None => break,
            }
        }
        let end = li + guards.len();
        let head_guard = match out {
            Some(_) if runs && end == n_layers => model.pin_if_resident(UnitId::Head)?,
            _ => None,
        };
        let head = head_guard.as_ref().map(|g| be.unit(g)).transpose()?;
        if let Some(hu) = head {
            be.prepare_head(hu)?;
        }
        let units = guards
            .iter()
            .map(|g| be.unit(g))
            .collect::<Result<Vec<_>>>()?;
        let work = (li..end).map(|i| w.layers[i].matrix_bytes()).sum::<usize>() * t_n
            + head.map_or(0, |_| head_work);
        let head_out = head.zip(out.as_mut());
        let (kv, a, first) = (&mut *kv, &mut a, li);
        be.compute(work, move || {
            for (i, blk) in units.iter().enumerate() {
                block(be, model, kv, first + i, blk, places, t_n, a)?;
            }
            match head_out {
                Some((hu, o)) => head_ops(be, hu, a, row0, rows, o),
                None => Ok(()),
            }
        })?;
        head_done = head.is_some();
        li = end;
        if together {
            held.extend(guards);
        }
    }
    let Some(mut out) = out else {
        return Ok(());
    };
    if !head_done {
        let guard = pin_unit(model, UnitId::Head, together, &mut held)?;
        let head = be.unit(&guard)?;
        be.prepare_head(head)?;
        let a = &mut a;
        be.compute(head_work, || head_ops(be, head, a, row0, rows, &mut out))?;
        held.push(guard);
    }
    // Every pin back, together: the pass is queued.
    drop(held);
    match sink {
        Sink::Logits {
            logits,
            n_pick,
            picks,
            ..
        } => {
            let full = rows.saturating_sub(n_pick);
            if full > 0 {
                be.read(&out, full * c.n_vocab, logits)?;
            }
            be.pick_rows(kv, &out, full, rows - full, c.n_vocab, picks)
        }
        Sink::Pick => be.pick_greedy(kv, &out, c.n_vocab),
    }
}
