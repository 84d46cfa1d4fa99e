//! One model's worker: admits queued requests into free cache slots between steps, runs one
//! batched pass per step (a token per decoding sequence, then prompt chunks of newcomers), samples
//! each sequence's next token in parallel and streams it out.

use super::gate::Gate;
use super::metrics::{ModelMetrics, Outcome};
use super::{Event, Finish, Job};
use crate::error::Error;
use crate::model::{KvCache, Model, SeqChunk, StopReason, TextOut};
use crate::mux::Mux;
use crate::sampling::Sampler;
use rayon::prelude::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Instant;

/// What a worker owns.
pub(super) struct Context {
    pub name: String,
    /// Bytes of all the model's units (what the gate admits against the budget).
    pub weight_bytes: usize,
    pub mux: Arc<Mux>,
    pub gate: Arc<Gate>,
    pub model: Arc<Model>,
    pub cache: KvCache,
    pub jobs: Receiver<Job>,
    pub metrics: Arc<ModelMetrics>,
    pub prefill_chunk: usize,
    pub max_rows: usize,
    /// How long an admitted model with an empty batch waits for its next request before it
    /// leaves the gate ([`super::EngineOptions::linger`]).
    pub linger: std::time::Duration,
    /// The OpenCL compute queue this worker's passes go on (models side by side).
    pub lane: usize,
}

/// A running sequence.
struct Seq<'m> {
    job: Job,
    slot: usize,
    prompt_len: usize,
    /// Prompt then generated tokens.
    history: Vec<u32>,
    /// Positions in the cache.
    fed: usize,
    sampler: Sampler,
    text: TextOut<'m>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    produced: usize,
}

impl Seq<'_> {
    fn decoding(&self) -> bool {
        self.fed >= self.prompt_len
    }
    fn finish(&mut self, reason: StopReason) -> Finish {
        let now = Instant::now();
        Finish {
            reason,
            tail: self.text.flush(),
            prompt_tokens: self.prompt_len,
            completion_tokens: self.produced,
            ttft: self
                .first_token
                .unwrap_or(now)
                .duration_since(self.job.submitted),
            total: now.duration_since(self.job.submitted),
        }
    }
}

/// How one sequence left the batch.
enum Leave {
    Done(StopReason),
    Cancelled,
}

/// Runs until the queue is closed and the last sequence has finished.
pub(super) fn run(mut ctx: Context) {
    crate::backend::opencl::ClDevice::bind_lane(ctx.lane);
    let model = ctx.model.clone();
    let tok = &model.tokenizer;
    let n_ctx = ctx.cache.capacity();
    let mut free: Vec<usize> = (0..ctx.cache.slots()).rev().collect();
    let mut seqs: Vec<Seq<'_>> = Vec::new();
    // The step's logits, one vector for the worker's life (a fresh one per step costs the OS
    // zeroing of up to n_slots × n_vocab floats each time).
    let mut logits: Vec<f32> = Vec::new();
    let mut picks: Vec<u32> = Vec::new();
    let mut closed = false;
    // When this model was admitted by the gate, while it holds it.
    let mut admitted: Option<Instant> = None;
    // A request that arrived while the model lingered at the gate with an empty batch.
    let mut lingered: Option<Job> = None;
    loop {
        if seqs.is_empty() && admitted.is_some() && !closed && !ctx.linger.is_zero() {
            // Keep the turn a little while for the next request (see `EngineOptions::linger`).
            match ctx.jobs.recv_timeout(ctx.linger) {
                Ok(job) => lingered = Some(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        if seqs.is_empty() && lingered.is_none() && admitted.take().is_some() {
            ctx.gate.leave(&ctx.name);
        }
        // Admit newcomers into free slots (block only when nothing is running).
        while let (false, Some(&slot)) = (closed && lingered.is_none(), free.last()) {
            let next = if let Some(job) = lingered.take() {
                Ok(job)
            } else if seqs.is_empty() {
                ctx.jobs.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                ctx.jobs.try_recv()
            };
            let mut job = match next {
                Ok(j) => j,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            };
            ctx.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            if job.cancel.load(Ordering::Relaxed) {
                ctx.metrics.outcome(Outcome::Cancelled);
                continue;
            }
            free.pop();
            ctx.cache.reset_slot(slot);
            ctx.metrics.running.fetch_add(1, Ordering::Relaxed);
            // The prompt starts the history; the stop strings move to the text releaser.
            let history = std::mem::take(&mut job.prompt);
            let text = TextOut::new(tok, &history, std::mem::take(&mut job.stop));
            seqs.push(Seq {
                slot,
                prompt_len: history.len(),
                history,
                fed: 0,
                sampler: Sampler::new(job.sampling.clone()),
                text,
                first_token: None,
                last_token: None,
                produced: 0,
                job,
            });
        }
        if seqs.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        // Cancelled sequences leave before the step; full contexts finish.
        let mut leaving: Vec<(usize, Leave)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.job.cancel.load(Ordering::Relaxed) {
                leaving.push((i, Leave::Cancelled));
            } else if s.decoding() && s.fed >= n_ctx {
                leaving.push((i, Leave::Done(StopReason::ContextFull)));
            }
        }
        retire(&mut seqs, leaving, &mut free, &ctx.metrics);
        if seqs.is_empty() {
            continue;
        }
        if admitted.is_none() {
            let mux = &ctx.mux;
            let waiting_from = Instant::now();
            ctx.gate
                .enter(ctx.name.as_str(), ctx.weight_bytes, || mux.budget());
            ctx.metrics
                .gate_wait_ns
                .fetch_add(waiting_from.elapsed().as_nanos() as u64, Ordering::Relaxed);
            admitted = Some(Instant::now());
        }
        // The step: one row per decoding sequence, then prompt chunks in arrival order.
        let mut rows = 0;
        let mut plan: Vec<(usize, usize, bool)> = Vec::new(); // (seq, tokens, wants logits)
        for (i, s) in seqs.iter().enumerate() {
            if s.decoding() && rows < ctx.max_rows {
                plan.push((i, 1, true));
                rows += 1;
            }
        }
        let mut budget = ctx.prefill_chunk.min(ctx.max_rows - rows);
        for (i, s) in seqs.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if !s.decoding() {
                let n = (s.prompt_len - s.fed).min(budget);
                plan.push((i, n, s.fed + n == s.prompt_len));
                budget -= n;
                rows += n;
            }
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(i, n, logits)| {
                // A decoding sequence feeds its last sampled token, at history[fed].
                let s = &seqs[i];
                SeqChunk {
                    slot: s.slot,
                    tokens: &s.history[s.fed..s.fed + n],
                    logits,
                    // Greedy sequences get their token chosen where the logits are.
                    pick: logits && s.sampler.params().is_plain_greedy(),
                }
            })
            .collect();
        let started = Instant::now();
        let mut result =
            model.forward_batch_picks(&mut ctx.cache, &chunks, &mut logits, &mut picks);
        let picked: Vec<bool> = chunks.iter().map(|c| c.logits && c.pick).collect();
        let asked = picked.iter().filter(|&&p| p).count();
        if result.is_ok() && picks.len() != asked {
            result = Err(Error::Engine(format!(
                "a pass returned {} greedy tokens for {asked} sequences",
                picks.len()
            )));
        }
        let sampling_from = Instant::now();
        ctx.metrics.forward_ns.fetch_add(
            sampling_from.duration_since(started).as_nanos() as u64,
            Ordering::Relaxed,
        );
        drop(chunks);
        ctx.metrics.steps.fetch_add(1, Ordering::Relaxed);
        ctx.metrics
            .step_rows
            .fetch_add(rows as u64, Ordering::Relaxed);
        if let Err(e) = result {
            // The pass failed for every sequence in it: each gets the error.
            let msg = e.to_string();
            for s in seqs.drain(..) {
                let _ = s.job.events.send(Event::Failed(Error::Engine(msg.clone())));
                ctx.metrics.outcome(Outcome::Failed);
                ctx.metrics.running.fetch_sub(1, Ordering::Relaxed);
                free.push(s.slot);
            }
            continue;
        }
        for &(i, n, _) in &plan {
            let s = &mut seqs[i];
            if !s.decoding() {
                ctx.metrics
                    .prompt_tokens
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            s.fed += n;
        }
        // Sample every sequence that got logits, in parallel; greedy ones got their token from
        // the pass.
        let n_vocab = model.config.n_vocab;
        // Logits rows and picks follow the plan's order (decode rows, then finished prompts).
        let mut row_of = vec![None; seqs.len()];
        let mut sampled: Vec<(usize, u32)> = Vec::new();
        let (mut r, mut k) = (0, 0);
        for (&(i, _, wants), &pick) in plan.iter().zip(&picked) {
            match (wants, pick) {
                (true, true) => {
                    // As many as asked: checked with the pass's result above.
                    sampled.push((i, picks[k]));
                    k += 1;
                }
                (true, false) => {
                    row_of[i] = Some(r);
                    r += 1;
                }
                _ => {}
            }
        }
        let mut refs: Vec<(usize, usize, &mut Seq<'_>)> = seqs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| row_of[i].map(|r| (i, r, s)))
            .collect();
        sampled.extend(
            refs.par_iter_mut()
                .map(|(i, r, s)| {
                    let l = &logits[*r * n_vocab..(*r + 1) * n_vocab];
                    (*i, s.sampler.sample(l, &s.history))
                })
                .collect::<Vec<_>>(),
        );
        drop(refs);
        let now = Instant::now();
        let mut leaving: Vec<(usize, Leave)> = Vec::new();
        for (i, id) in sampled {
            let s = &mut seqs[i];
            s.history.push(id);
            s.produced += 1;
            ctx.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
            match s.last_token {
                None => {
                    s.first_token = Some(now);
                    ctx.metrics
                        .observe_ttft(now.duration_since(s.job.submitted));
                }
                Some(t) => ctx.metrics.observe_inter_token(now.duration_since(t)),
            }
            s.last_token = Some(now);
            if tok.is_eog(id) && !s.job.ignore_eos {
                leaving.push((i, Leave::Done(StopReason::EndOfGeneration)));
                continue;
            }
            let text = s.text.push(id);
            if s.job.events.send(Event::Token { id, text }).is_err() {
                leaving.push((i, Leave::Cancelled));
            } else if s.text.stopped() {
                leaving.push((i, Leave::Done(StopReason::StopString)));
            } else if s.produced >= s.job.max_tokens {
                leaving.push((i, Leave::Done(StopReason::MaxTokens)));
            }
        }
        retire(&mut seqs, leaving, &mut free, &ctx.metrics);
        ctx.metrics
            .sample_ns
            .fetch_add(sampling_from.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if admitted.is_some_and(|since| ctx.gate.should_yield(&ctx.name, since)) {
            admitted = None;
            ctx.gate.leave(&ctx.name);
        }
    }
}

/// Removes the leaving sequences (indices ascending), tells their clients, frees their slots.
fn retire(
    seqs: &mut Vec<Seq<'_>>,
    mut leaving: Vec<(usize, Leave)>,
    free: &mut Vec<usize>,
    metrics: &ModelMetrics,
) {
    leaving.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, why) in leaving {
        let mut s = seqs.remove(i);
        // Counted before the client hears of it, so a client that saw the end sees the counts.
        metrics.running.fetch_sub(1, Ordering::Relaxed);
        free.push(s.slot);
        match why {
            Leave::Done(reason) => {
                metrics.outcome(Outcome::Finished);
                let f = s.finish(reason);
                let _ = s.job.events.send(Event::Done(f));
            }
            Leave::Cancelled => metrics.outcome(Outcome::Cancelled),
        }
    }
}
