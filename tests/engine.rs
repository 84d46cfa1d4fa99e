//! The engine: continuous batching gives the same greedy text as one request at a time, on the
//! CPU and on OpenCL (PoCL in CI); cancellation frees the slot; a full queue is busy.

use std::time::{Duration, Instant};
use ternmux::backend::Device;
use ternmux::engine::metrics::Outcome;
use ternmux::engine::{Engine, EngineOptions, Event, Request};
use ternmux::model::{GenerateOptions, Model};
use ternmux::mux::Mux;

const BUNDLED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/bitllama2c-stories3M-TQ2_0.gguf"
);

const PROMPTS: [&str; 7] = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park. They",
    "One day, a big red ball",
    "Tom was sad because",
    "The sun was shining and the birds",
    "Mom said",
];

/// Greedy text of each prompt, one request at a time on `device`, without a mux or engine.
fn sequential(device: Device, max_tokens: usize) -> Vec<Vec<u32>> {
    let model = Model::open_on(BUNDLED, device).unwrap();
    let opts = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    PROMPTS
        .iter()
        .map(|p| model.generate(p, &opts, |_| true).unwrap().tokens)
        .collect()
}

fn batched(device: Device, max_seqs: usize, max_tokens: usize) -> (Vec<Vec<u32>>, Engine) {
    let mux = Mux::new(device, 64 << 20).unwrap();
    mux.register("m", BUNDLED).unwrap();
    let opts = EngineOptions {
        max_seqs,
        prefill_chunk: 5,
        ..EngineOptions::default()
    };
    let engine = Engine::new(mux, opts).unwrap();
    // All at once: the first max_seqs run together, the rest join as slots free up, and the
    // prompts (chunks of 5 tokens) are fed while the others decode.
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| engine.submit("m", Request::text(p, max_tokens)).unwrap())
        .collect();
    let out = streams
        .into_iter()
        .map(|s| s.collect_text().unwrap().tokens)
        .collect();
    (out, engine)
}

fn check_same(device: Device) {
    let want = sequential(device, 48);
    for max_seqs in [3, 8] {
        let (got, engine) = batched(device, max_seqs, 48);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "prompt {i} ({:?}) with {max_seqs} slots", PROMPTS[i]);
        }
        let m = engine.metrics("m").unwrap();
        let steps = m.steps.load(std::sync::atomic::Ordering::Relaxed);
        let rows = m.step_rows.load(std::sync::atomic::Ordering::Relaxed);
        // Batching happened: fewer passes than tokens.
        assert!(
            rows > steps,
            "{rows} rows in {steps} steps: nothing was batched"
        );
        assert_eq!(m.outcomes(Outcome::Finished), PROMPTS.len() as u64);
    }
}

#[test]
fn batched_greedy_equals_sequential_cpu() {
    check_same(Device::Cpu);
}

#[test]
fn batched_greedy_equals_sequential_opencl() {
    match ternmux::backend::opencl::ClDevice::best(false) {
        Ok(d) => {
            println!("opencl device: {}", d.info());
            check_same(Device::OpenCl(None));
        }
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the OpenCL engine test: {why}"
            );
            println!("skipped: no OpenCL device ({why})");
        }
    }
}

#[test]
fn dropping_a_stream_frees_its_slot() {
    let mux = Mux::new(Device::Cpu, 64 << 20).unwrap();
    mux.register("m", BUNDLED).unwrap();
    let opts = EngineOptions {
        max_seqs: 1,
        ..EngineOptions::default()
    };
    let engine = Engine::new(mux, opts).unwrap();
    let s = engine
        .submit("m", Request::text("Once upon a time", 100_000))
        .unwrap();
    // Two tokens arrive, then the client goes away.
    for _ in 0..2 {
        assert!(matches!(s.recv(), Some(Event::Token { .. })));
    }
    drop(s);
    // The one slot serves the next request.
    let next = engine.submit("m", Request::text("The dog", 4)).unwrap();
    let done = next.collect_text().unwrap();
    assert_eq!(done.completion_tokens, 4);
    let m = engine.metrics("m").unwrap();
    let start = Instant::now();
    while m.running.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "slot not freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(m.outcomes(Outcome::Cancelled), 1);
    assert_eq!(m.outcomes(Outcome::Finished), 1);
}

/// Three models, all busy at once, each text equal to the one-at-a-time text. With `budget_x2`
/// the budget holds `budget_x2 / 2` models: the gate makes them take turns and units are evicted
/// for one another; `None` holds all three. On OpenCL each model's worker queues on its own
/// compute queue, so this checks the page-in and eviction fences across queues too.
fn three_models(device: Device, budget_x2: Option<usize>) {
    let want = sequential(device, 24);
    let mux = Mux::new(device, usize::MAX).unwrap();
    for name in ["a", "b", "c"] {
        mux.register(name, BUNDLED).unwrap();
    }
    let total = mux.stats().model("a").unwrap().total_bytes;
    let budget = budget_x2.map_or(total * 4, |x2| total * x2 / 2);
    mux.set_budget(budget).unwrap();
    let opts = EngineOptions {
        max_seqs: 4,
        slice: Duration::from_millis(2),
        ..EngineOptions::default()
    };
    let engine = Engine::new(mux, opts).unwrap();
    let mut streams = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        for name in ["a", "b", "c"] {
            streams.push((i, engine.submit(name, Request::text(p, 24)).unwrap()));
        }
    }
    for (i, s) in streams {
        assert_eq!(s.collect_text().unwrap().tokens, want[i], "prompt {i}");
    }
    let stats = engine.mux().stats();
    assert!(stats.peak <= budget, "budget exceeded");
    if budget_x2.is_some() {
        assert!(stats.evictions() > 0, "the models never had to take turns");
    } else {
        assert_eq!(stats.evictions(), 0, "evictions with room for every model");
    }
}

#[test]
fn models_that_do_not_fit_together_take_turns() {
    three_models(Device::Cpu, Some(3));
}

/// The same on OpenCL (PoCL in CI): three models at once on three compute queues, then under a
/// budget for one and a half of them.
#[test]
fn models_on_their_own_queues_opencl() {
    match ternmux::backend::opencl::ClDevice::best(false) {
        Ok(d) => {
            println!("opencl device: {} ({} compute queues)", d.info(), d.lanes());
            three_models(Device::OpenCl(None), None);
            three_models(Device::OpenCl(None), Some(3));
        }
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the OpenCL engine test: {why}"
            );
            println!("skipped: no OpenCL device ({why})");
        }
    }
}

/// Which of two models under a budget for one ends its next request first, when `a`'s client
/// sends its second request as soon as its first ends while `b` waits at the gate: with a
/// linger, `a` keeps its turn for that request (no swap per request); without one, `b` goes
/// first. `None` when the scene could not be set (`a`'s first request ended before `b` was seen
/// waiting: a loaded machine), for the caller to try again.
fn second_request_wins(linger: Duration) -> Option<bool> {
    let mux = Mux::new(Device::Cpu, usize::MAX).unwrap();
    for name in ["a", "b"] {
        mux.register(name, BUNDLED).unwrap();
    }
    let one = mux.stats().model("a").unwrap().total_bytes;
    mux.set_budget(one + one / 2).unwrap();
    let opts = EngineOptions {
        max_seqs: 2,
        slice: Duration::from_secs(30),
        linger,
        ..EngineOptions::default()
    };
    let engine = Engine::new(mux, opts).unwrap();
    // A long first request, so that `b` is surely waiting before it ends.
    let mut long = Request::text(PROMPTS[0], 160);
    long.ignore_eos = true;
    let a1 = engine.submit("a", long).unwrap();
    // `a` holds the gate once its first token is out; `b` then waits for it.
    assert!(matches!(a1.recv(), Some(Event::Token { .. })));
    let b1 = engine.submit("b", Request::text(PROMPTS[1], 24)).unwrap();
    let since = Instant::now();
    while !engine.waiting_at_gate().iter().any(|n| n == "b") {
        if since.elapsed() > Duration::from_secs(5) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if engine
        .metrics("a")
        .unwrap()
        .running
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        return None;
    }
    let b_done = std::thread::spawn(move || {
        b1.collect_text().unwrap();
        Instant::now()
    });
    a1.collect_text().unwrap();
    let a2 = engine.submit("a", Request::text(PROMPTS[2], 24)).unwrap();
    a2.collect_text().unwrap();
    let a_done = Instant::now();
    Some(a_done < b_done.join().unwrap())
}

/// [`second_request_wins`], tried until the scene is set (at most five times).
fn second_request_wins_retried(linger: Duration) -> bool {
    (0..5)
        .find_map(|_| second_request_wins(linger))
        .expect("b was never seen waiting at the gate while a's first request ran")
}

#[test]
fn a_lingering_model_keeps_its_turn_for_the_next_request() {
    assert!(
        second_request_wins_retried(Duration::from_millis(500)),
        "with a linger, a's next request should run before b's turn"
    );
    assert!(
        !second_request_wins_retried(Duration::ZERO),
        "without a linger, b should run before a's next request"
    );
}
