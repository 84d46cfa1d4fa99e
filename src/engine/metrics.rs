//! What the engine counts, per model: queue and batch gauges, request outcomes, tokens, and
//! time-to-first-token / inter-token histograms, rendered with the multiplexer's counters as
//! Prometheus text (exposition format 0.0.4) for `GET /metrics`.

use crate::mux::{ModelStats, MuxStats};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One of a model's time counters in [`ModelStats`].
type ModelTime = fn(&ModelStats) -> Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with Prometheus' cumulative-bucket semantics.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    /// Observations at or below each of [`LATENCY_BUCKETS`] (not cumulative here).
    pub counts: [u64; LATENCY_BUCKETS.len()],
    /// Observations above the last bound.
    pub over: u64,
    /// Sum of all observations, seconds.
    pub sum: f64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.sum += s;
        match LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }
}

/// Why a request ended, for the outcome counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Generation ran to a stop condition.
    Finished,
    /// The client went away or dropped its stream.
    Cancelled,
    /// The forward pass failed.
    Failed,
    /// Refused at submission (queue full).
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
            Outcome::Rejected => "rejected",
        }
    }
    const ALL: [Outcome; 4] = [
        Outcome::Finished,
        Outcome::Cancelled,
        Outcome::Failed,
        Outcome::Rejected,
    ];
}

/// Counters of one model's queue and worker. Shared by the submitting threads and the worker.
#[derive(Debug, Default)]
pub struct ModelMetrics {
    /// Requests waiting for a sequence slot.
    pub queued: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    /// Prompt tokens run through the model.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Batched forward passes run.
    pub steps: AtomicU64,
    /// Rows of all those passes (rows / steps = mean batch size).
    pub step_rows: AtomicU64,
    /// Nanoseconds in those passes (`Model::forward_batch`, logits read back included).
    pub forward_ns: AtomicU64,
    /// Nanoseconds sampling and handing tokens to the streams after the passes.
    pub sample_ns: AtomicU64,
    /// Nanoseconds waiting at the gate for a turn on the device (models that do not all fit
    /// in the weight budget take turns).
    pub gate_wait_ns: AtomicU64,
    outcomes: [AtomicU64; 4],
    ttft: Mutex<LatencyHistogram>,
    inter_token: Mutex<LatencyHistogram>,
}

impl ModelMetrics {
    /// Counts a request's outcome.
    pub fn outcome(&self, o: Outcome) {
        self.outcomes[o as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Requests that ended with `o` so far.
    pub fn outcomes(&self, o: Outcome) -> u64 {
        self.outcomes[o as usize].load(Ordering::Relaxed)
    }
    /// Records a time to first token (submission to first token).
    pub fn observe_ttft(&self, d: Duration) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(d);
        }
    }
    /// Records the gap between two tokens of one sequence.
    pub fn observe_inter_token(&self, d: Duration) {
        if let Ok(mut h) = self.inter_token.lock() {
            h.observe(d);
        }
    }
    /// A copy of the time-to-first-token histogram.
    pub fn ttft(&self) -> LatencyHistogram {
        self.ttft.lock().map(|h| h.clone()).unwrap_or_default()
    }
    /// A copy of the inter-token histogram.
    pub fn inter_token(&self) -> LatencyHistogram {
        self.inter_token
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }
}

/// A metric family with one sample per model: kind, name, help text, and how to read it.
type Series<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Writes each family of `series` with one sample per (model, value) of `rows`.
fn families<T>(out: &mut String, series: &[Series<T>], rows: &[(&str, &T)]) {
    for &(kind, name, help, get) in series {
        header(out, name, kind, help);
        for (model, x) in rows {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label(model), get(x));
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, model: &str, h: &LatencyHistogram) {
    let mut cum = 0;
    for (b, c) in LATENCY_BUCKETS.iter().zip(h.counts) {
        cum += c;
        let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{b}\"}} {cum}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
        h.count()
    );
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count());
}

/// Prometheus text for the engine's models and the multiplexer under them.
pub fn render(models: &[(&str, &ModelMetrics)], mux: &MuxStats) -> String {
    let mut o = String::new();
    let engine_series: [Series<ModelMetrics>; 9] = [
        (
            "gauge",
            "ternmux_queue_length",
            "Requests waiting for a sequence slot.",
            |m| m.queued.load(Ordering::Relaxed),
        ),
        (
            "gauge",
            "ternmux_running_sequences",
            "Sequences in the running batch.",
            |m| m.running.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_prompt_tokens_total",
            "Prompt tokens run through the model.",
            |m| m.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_generated_tokens_total",
            "Tokens generated.",
            |m| m.generated_tokens.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_batch_steps_total",
            "Batched forward passes run.",
            |m| m.steps.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_batch_rows_total",
            "Rows (tokens) of all batched passes.",
            |m| m.step_rows.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_batch_forward_nanoseconds_total",
            "Time in batched forward passes (logits read back included).",
            |m| m.forward_ns.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_batch_sample_nanoseconds_total",
            "Time sampling and streaming tokens after the passes.",
            |m| m.sample_ns.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "ternmux_gate_wait_nanoseconds_total",
            "Time waiting for a turn on the device while models that do not fit the budget \
             together take turns.",
            |m| m.gate_wait_ns.load(Ordering::Relaxed),
        ),
    ];
    families(&mut o, &engine_series, models);
    header(
        &mut o,
        "ternmux_requests_total",
        "counter",
        "Requests by how they ended.",
    );
    for (model, m) in models {
        for oc in Outcome::ALL {
            let _ = writeln!(
                o,
                "ternmux_requests_total{{model=\"{}\",outcome=\"{}\"}} {}",
                label(model),
                oc.label(),
                m.outcomes(oc)
            );
        }
    }
    header(
        &mut o,
        "ternmux_time_to_first_token_seconds",
        "histogram",
        "Submission to first generated token.",
    );
    for (model, m) in models {
        histogram(
            &mut o,
            "ternmux_time_to_first_token_seconds",
            &label(model),
            &m.ttft(),
        );
    }
    header(
        &mut o,
        "ternmux_inter_token_seconds",
        "histogram",
        "Gap between consecutive tokens of one sequence.",
    );
    for (model, m) in models {
        histogram(
            &mut o,
            "ternmux_inter_token_seconds",
            &label(model),
            &m.inter_token(),
        );
    }
    for (name, help, v) in [
        (
            "ternmux_mux_budget_bytes",
            "Weight budget of the multiplexer.",
            mux.budget,
        ),
        (
            "ternmux_mux_used_bytes",
            "Bytes of resident weight units.",
            mux.used,
        ),
        (
            "ternmux_mux_peak_bytes",
            "Most bytes of weight units ever resident.",
            mux.peak,
        ),
        (
            "ternmux_mux_runtime_bytes",
            "KV caches and activation scratch held.",
            mux.runtime_used,
        ),
    ] {
        header(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    let mux_rows: Vec<(&str, &crate::mux::ModelStats)> =
        mux.models.iter().map(|m| (m.name.as_str(), m)).collect();
    let mux_series: [Series<crate::mux::ModelStats>; 6] = [
        (
            "gauge",
            "ternmux_mux_resident_bytes",
            "Bytes of the model's units now resident.",
            |m| m.resident_bytes as u64,
        ),
        (
            "counter",
            "ternmux_mux_hits_total",
            "Unit uses that found the unit resident.",
            |m| m.hits,
        ),
        (
            "counter",
            "ternmux_mux_page_ins_total",
            "Units paged in (misses).",
            |m| m.misses,
        ),
        (
            "counter",
            "ternmux_mux_evictions_total",
            "Units of the model evicted.",
            |m| m.evictions,
        ),
        (
            "counter",
            "ternmux_mux_page_in_bytes_total",
            "Bytes paged in.",
            |m| m.bytes_in,
        ),
        (
            "counter",
            "ternmux_mux_evicted_bytes_total",
            "Bytes evicted.",
            |m| m.bytes_out,
        ),
    ];
    families(&mut o, &mux_series, &mux_rows);
    let times: [(&str, &str, ModelTime); 3] = [
        (
            "ternmux_mux_page_in_seconds_total",
            "Time spent paging units in.",
            |m| m.page_in_total,
        ),
        (
            "ternmux_mux_acquire_seconds_total",
            "Time passes spent asking for units (page-ins and waits for room included).",
            |m| m.acquire_total,
        ),
        (
            "ternmux_mux_release_seconds_total",
            "Time passes spent giving units back (each use's completion fence).",
            |m| m.release_total,
        ),
    ];
    for (name, help, get) in times {
        header(&mut o, name, "counter", help);
        for m in &mux.models {
            let _ = writeln!(
                o,
                "{name}{{model=\"{}\"}} {}",
                label(&m.name),
                get(m).as_secs_f64()
            );
        }
    }
    o
}
