//! The multiplexer's invariants under random use: a proptest state machine over 3–8 models
//! (register, unregister, generate, budget changes, pins) checks after every step that the
//! budget was never exceeded, that every eviction chose the least recently used unpinned unit
//! (or, for a model larger than the budget, followed the streaming rule), that pinned units were
//! never evicted, that hits and page-ins match residency, and that every text equals the same
//! request's text with unlimited memory. A threaded stress test does the same concurrently.
//! The OpenCL variant runs on PoCL in CI (CI=true fails when no device is found).

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;
use ternmux::backend::Device;
use ternmux::kernels::ternary::TernaryFormat;
use ternmux::model::{GenerateOptions, Model};
use ternmux::mux::{Mux, MuxEvent, MuxOptions, PageIn, UnitId};
use ternmux::synth::{Shape, SynthSpec, write_synthetic};

const PROMPTS: [&str; 3] = ["Once upon a time", "The cat", "Lily saw a big"];

struct Zoo {
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
}

/// Eight models of different sizes, formats and architectures: the bundled model in its three
/// encodings and five small synthetic ones.
fn zoo() -> &'static Zoo {
    static Z: OnceLock<Zoo> = OnceLock::new();
    Z.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut paths = vec![
            bundled.join("bitllama2c-stories3M-TQ2_0.gguf"),
            bundled.join("bitllama2c-stories3M-TQ1_0.gguf"),
        ];
        let i2s = dir.path().join("stories-I2_S.gguf");
        ternmux::convert::convert_file(&paths[0], &i2s, TernaryFormat::I2S).unwrap();
        paths.push(i2s);
        let shapes = [
            ("bitnet-b1.58", 2, 256, 512, TernaryFormat::Tq2_0),
            ("bitnet", 3, 256, 768, TernaryFormat::Tq1_0),
            ("llama", 2, 512, 768, TernaryFormat::I2S),
            ("bitnet-b1.58", 4, 256, 512, TernaryFormat::Tq1_0),
            ("bitnet", 1, 512, 1024, TernaryFormat::Tq2_0),
        ];
        for (i, (arch, n_layer, n_embd, n_ff, format)) in shapes.into_iter().enumerate() {
            let p = dir.path().join(format!("synth{i}.gguf"));
            let spec = SynthSpec {
                arch: arch.into(),
                shape: Shape {
                    n_embd,
                    n_ff,
                    n_layer,
                    n_head: 4,
                    n_head_kv: 2,
                    n_vocab: 1000,
                    n_ctx: 128,
                },
                format,
                seed: 7 + i as u64,
            };
            write_synthetic(&spec, &p).unwrap();
            paths.push(p);
        }
        Zoo { _dir: dir, paths }
    })
}

fn opts() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 5,
        n_ctx: 64,
        ..GenerateOptions::default()
    }
}

/// The text of (model, prompt) with unlimited memory on `device`.
fn reference(device: Device, model: usize, prompt: usize) -> String {
    type Texts = Mutex<HashMap<(String, usize, usize), String>>;
    static CACHE: OnceLock<Texts> = OnceLock::new();
    let key = (device.to_string(), model, prompt);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap().get(&key) {
        return t.clone();
    }
    let m = Model::open_on(&zoo().paths[model], device).unwrap();
    let text = m.generate(PROMPTS[prompt], &opts(), |_| true).unwrap().text;
    cache.lock().unwrap().insert(key, text.clone());
    text
}

/// Records every event with the budget in force when it happened.
#[derive(Default)]
struct Log {
    events: Vec<(MuxEvent, usize)>,
}

fn attach(mux: &Mux, log: &Arc<Mutex<Log>>, budget: &Arc<Mutex<usize>>) {
    let (log, budget) = (log.clone(), budget.clone());
    mux.set_event_sink(Some(Arc::new(move |e: &MuxEvent| {
        let b = *budget.lock().unwrap();
        log.lock().unwrap().events.push((e.clone(), b));
    })));
}

/// Replays the events against a reference LRU and checks every rule. `sizes` maps
/// (model, unit) to bytes; `totals` maps model to its bytes; `held` lists pinned units.
struct Replay {
    /// Resident units in recency order (front = least recent).
    order: Vec<(String, UnitId)>,
    sizes: HashMap<(String, UnitId), usize>,
    /// Bytes of each resident unit's storage: its own size, or a victim's a little larger
    /// that it took over (see `fits`).
    storage: HashMap<(String, UnitId), usize>,
    totals: HashMap<String, usize>,
    held: HashSet<(String, UnitId)>,
    /// A counter of uses, each unit's last use on it, and per model the use that began its
    /// current pass and its previous one (a pass begins with `Block(0)`).
    tick: u64,
    last: HashMap<(String, UnitId), u64>,
    passes: HashMap<String, (u64, u64)>,
}

/// The multiplexer's rule for reusing a victim's storage: the unit's size, or for a streaming
/// model up to an eighth larger.
fn fits(storage: usize, want: usize, slack: bool) -> bool {
    storage == want || (slack && storage > want && storage - want <= want / 8)
}

impl Replay {
    fn touch(&mut self, k: (String, UnitId)) {
        self.tick += 1;
        if k.1 == UnitId::Block(0) {
            let p = self.passes.entry(k.0.clone()).or_default();
            *p = (self.tick, p.0);
        }
        self.last.insert(k.clone(), self.tick);
        self.order.retain(|x| *x != k);
        self.order.push(k);
    }

    /// Checks a run of events; `pending` collects evictions until the page-in they made room
    /// for, whose requester decides which rule applies.
    fn check(&mut self, events: &[(MuxEvent, usize)]) -> Result<(), TestCaseError> {
        let mut pending: Vec<(String, UnitId, String, usize)> = Vec::new();
        for (e, budget) in events {
            match e {
                MuxEvent::Hit { model, unit } => {
                    let k = (model.to_string(), *unit);
                    prop_assert!(self.order.contains(&k), "hit on non-resident {k:?}");
                    self.touch(k);
                }
                MuxEvent::Evict {
                    model,
                    unit,
                    for_model,
                    used,
                    ..
                } => {
                    prop_assert!(used <= budget, "used {used} > budget {budget}");
                    let k = (model.to_string(), *unit);
                    prop_assert!(!self.held.contains(&k), "pinned unit {k:?} was evicted");
                    pending.push((k.0, k.1, for_model.to_string(), *budget));
                }
                MuxEvent::PageIn {
                    model,
                    unit,
                    bytes,
                    used,
                    budget: b,
                    ..
                } => {
                    prop_assert!(
                        used <= budget && b == budget,
                        "used {used} > budget {budget}"
                    );
                    let k = (model.to_string(), *unit);
                    prop_assert!(!self.order.contains(&k), "page-in of resident {k:?}");
                    let streaming = self.totals[&k.0] > *budget;
                    // The previous pass of this model began before this page-in (which may
                    // begin a new one).
                    let prev = match self.passes.get(&k.0) {
                        Some(&(cur, _)) if k.1 == UnitId::Block(0) => cur,
                        Some(&(_, prev)) => prev,
                        None => 0,
                    };
                    let mut reused: Option<usize> = None;
                    for (vm, vu, for_model, _) in pending.drain(..) {
                        prop_assert_eq!(&for_model, &k.0);
                        let v = (vm, vu);
                        let pos = self.order.iter().position(|x| *x == v);
                        prop_assert!(pos.is_some(), "evicted non-resident {v:?}");
                        let evictable: Vec<&(String, UnitId)> = self
                            .order
                            .iter()
                            .filter(|x| !self.held.contains(*x))
                            .collect();
                        let own: Vec<&(String, UnitId)> =
                            evictable.iter().copied().filter(|x| x.0 == k.0).collect();
                        let own_resident = self.order.iter().filter(|x| x.0 == k.0).count();
                        let others: Vec<&(String, UnitId)> =
                            evictable.iter().copied().filter(|x| x.0 != k.0).collect();
                        // Own units: among all but the most recent, the most recent whose
                        // storage fits; else the second most recent (the only one when alone).
                        let own_pick = own
                            .iter()
                            .rev()
                            .skip(1)
                            .find(|x| fits(self.storage[*x], *bytes, streaming))
                            .or(own.get(own.len().saturating_sub(2)))
                            .copied();
                        // Other models' units unused since this model's previous pass
                        // began, least recent first.
                        let cold = others
                            .iter()
                            .copied()
                            .find(|x| self.last.get(*x).is_some_and(|&t| t < prev));
                        if streaming && own_resident >= 2 && cold.is_some() {
                            prop_assert_eq!(Some(&v), cold, "streaming victim (cold unit)");
                        } else if streaming && own_resident >= 2 && !own.is_empty() {
                            prop_assert_eq!(Some(&v), own_pick, "streaming victim");
                        } else if !others.is_empty() {
                            prop_assert_eq!(&v, others[0], "LRU victim among other models");
                        } else {
                            prop_assert_eq!(Some(&v), own_pick, "own victim");
                        }
                        let freed = self.storage.remove(&v).unwrap_or(0);
                        if reused.is_none() && fits(freed, *bytes, streaming) {
                            reused = Some(freed);
                        }
                        self.order.retain(|x| *x != v);
                    }
                    self.storage.insert(k.clone(), reused.unwrap_or(*bytes));
                    self.touch(k);
                }
            }
        }
        prop_assert!(pending.is_empty() || pending.iter().all(|p| p.2.is_empty()));
        for (vm, vu, _, _) in pending {
            // Evictions from a budget change: least recent first.
            let v = (vm, vu);
            let evictable: Vec<&(String, UnitId)> = self
                .order
                .iter()
                .filter(|x| !self.held.contains(*x))
                .collect();
            prop_assert_eq!(&v, evictable[0], "budget-change victim");
            self.storage.remove(&v);
            self.order.retain(|x| *x != v);
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Register(usize),
    Unregister(usize),
    Generate(usize, usize),
    /// Budget as a fraction (per mille) of the registered models' total.
    Budget(u32),
    /// Pin model a, generate on model b, unpin.
    PinWhile(usize, usize, usize),
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..n).prop_map(Op::Register),
        1 => (0..n).prop_map(Op::Unregister),
        6 => (0..n, 0..PROMPTS.len()).prop_map(|(m, p)| Op::Generate(m, p)),
        2 => (150u32..1200).prop_map(Op::Budget),
        1 => (0..n, 0..n, 0..PROMPTS.len()).prop_map(|(a, b, p)| Op::PinWhile(a, b, p)),
    ]
}

fn name(i: usize) -> String {
    format!("m{i}")
}

/// Runs `ops` on a mux over the first `n` zoo models on `device`.
/// Runs `ops` on a mux of 4 MiB on `device`; with `host_cache`, page-ins are staged through a
/// pinned host cache of that many bytes.
fn run_machine(device: Device, ops: &[Op], host_cache: Option<usize>) -> Result<(), TestCaseError> {
    let zoo = zoo();
    let mux = Mux::with_options(
        device,
        MuxOptions {
            budget: 4 << 20,
            page_in: if host_cache.is_some() {
                PageIn::Staged
            } else {
                PageIn::Auto
            },
            host_cache: host_cache.unwrap_or(0),
            ..MuxOptions::default()
        },
    )
    .unwrap();
    let budget = Arc::new(Mutex::new(mux.budget()));
    let log = Arc::new(Mutex::new(Log::default()));
    attach(&mux, &log, &budget);
    let mut replay = Replay {
        order: Vec::new(),
        sizes: HashMap::new(),
        storage: HashMap::new(),
        totals: HashMap::new(),
        held: HashSet::new(),
        tick: 0,
        last: HashMap::new(),
        passes: HashMap::new(),
    };
    let mut registered: HashSet<usize> = HashSet::new();
    // Sizes are known once a model is registered.
    let learn = |mux: &Mux, replay: &mut Replay| {
        for m in mux.stats().models {
            replay.totals.insert(m.name.clone(), m.total_bytes);
            for (u, s) in m.units {
                replay.sizes.insert((m.name.clone(), u), s.bytes);
            }
        }
    };
    for op in ops {
        match op {
            Op::Register(i) => {
                let r = mux.register(&name(*i), &zoo.paths[*i]);
                prop_assert_eq!(r.is_ok(), !registered.contains(i));
                registered.insert(*i);
                learn(&mux, &mut replay);
            }
            Op::Unregister(i) => {
                let r = mux.unregister(&name(*i));
                prop_assert_eq!(r.is_ok(), registered.remove(i));
                // A model registered again starts afresh: no resident units, no passes.
                replay.order.retain(|x| x.0 != name(*i));
                replay.storage.retain(|k, _| k.0 != name(*i));
                replay.passes.remove(&name(*i));
                replay.last.retain(|k, _| k.0 != name(*i));
            }
            Op::Generate(i, p) => {
                let r = mux.generate(&name(*i), PROMPTS[*p], &opts(), |_| true);
                if !registered.contains(i) {
                    prop_assert!(r.is_err());
                    continue;
                }
                let b = *budget.lock().unwrap();
                let largest = replay
                    .sizes
                    .iter()
                    .filter(|(k, _)| k.0 == name(*i))
                    .map(|(_, &v)| v)
                    .max()
                    .unwrap_or(0);
                match r {
                    Ok(g) => prop_assert_eq!(g.text, reference(device, *i, *p)),
                    Err(e) => prop_assert!(largest > b, "generate failed: {e}"),
                }
            }
            Op::Budget(per_mille) => {
                let total: usize = registered
                    .iter()
                    .map(|i| replay.totals.get(&name(*i)).copied().unwrap_or(0))
                    .sum();
                let b = (total.max(1 << 20) as u64 * u64::from(*per_mille) / 1000) as usize;
                // While shrinking, evictions bring `used` down from under the old budget.
                let old = mux.budget();
                *budget.lock().unwrap() = old.max(b);
                mux.set_budget(b).unwrap();
                *budget.lock().unwrap() = b;
            }
            Op::PinWhile(a, b, p) => {
                if !registered.contains(a) || !registered.contains(b) || a == b {
                    continue;
                }
                let bud = *budget.lock().unwrap();
                let total_a = replay.totals[&name(*a)];
                if total_a > bud {
                    // Cannot fit (checked in `limits_are_errors`); its partial holds would
                    // hide from the replay.
                    continue;
                }
                let pin = mux
                    .pin(&name(*a))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Check the page-ins of the pin before marking its units held.
                let events = std::mem::take(&mut log.lock().unwrap().events);
                replay.check(&events)?;
                for (k, _) in replay.sizes.iter().filter(|(k, _)| k.0 == name(*a)) {
                    replay.held.insert(k.clone());
                }
                let largest_b = replay
                    .sizes
                    .iter()
                    .filter(|(k, _)| k.0 == name(*b))
                    .map(|(_, &v)| v)
                    .max()
                    .unwrap_or(0);
                let r = mux.generate(&name(*b), PROMPTS[*p], &opts(), |_| true);
                match r {
                    Ok(g) => prop_assert_eq!(g.text, reference(device, *b, *p)),
                    Err(e) => prop_assert!(largest_b > bud - total_a, "generate failed: {e}"),
                }
                let events = std::mem::take(&mut log.lock().unwrap().events);
                replay.check(&events)?;
                drop(pin);
                replay.held.clear();
            }
        }
        let events = std::mem::take(&mut log.lock().unwrap().events);
        replay.check(&events)?;
        let s = mux.stats();
        prop_assert!(s.used <= s.budget, "used {} > budget {}", s.used, s.budget);
        let resident: usize = s.models.iter().map(|m| m.resident_bytes).sum();
        prop_assert_eq!(resident, s.used, "accounting");
        let c = s.host_cache;
        prop_assert!(c.used <= c.budget && c.peak <= c.budget, "host cache {c:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn cpu_mux_state_machine(n in 3usize..=8, ops in prop::collection::vec(op(8), 4..28)) {
        let ops: Vec<Op> = ops.into_iter().map(|o| clamp(o, n)).collect();
        run_machine(Device::Cpu, &ops, None)?;
    }
}

fn clamp(o: Op, n: usize) -> Op {
    match o {
        Op::Register(i) => Op::Register(i % n),
        Op::Unregister(i) => Op::Unregister(i % n),
        Op::Generate(i, p) => Op::Generate(i % n, p),
        Op::Budget(b) => Op::Budget(b),
        Op::PinWhile(a, b, p) => Op::PinWhile(a % n, b % n, p),
    }
}

fn opencl() -> Option<Device> {
    match ternmux::backend::opencl::ClDevice::best(false) {
        Ok(_) => Some(Device::OpenCl(None)),
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but OpenCL is unusable: {why}");
            }
            eprintln!("skipped: {why}");
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]
    #[test]
    fn opencl_mux_state_machine(n in 3usize..=5, ops in prop::collection::vec(op(5), 4..16), cache in prop_oneof![Just(None), prop::sample::select(vec![Some(512 << 10), Some(3 << 20), Some(64 << 20)])]) {
        let Some(dev) = opencl() else { return Ok(()) };
        let ops: Vec<Op> = ops.into_iter().map(|o| clamp(o, n)).collect();
        run_machine(dev, &ops, cache)?;
    }
}

/// Registers the first three models of the zoo, sets the budget to about one of them (every
/// round evicts), runs `rounds` rounds of one request to each, and checks every text against
/// unlimited memory. Returns the first model's weight bytes.
fn rotate_three(mux: &Mux, device: Device, rounds: usize) -> usize {
    let zoo = zoo();
    for i in 0..3 {
        mux.register(&name(i), &zoo.paths[i]).unwrap();
    }
    let total = mux.stats().models[0].total_bytes;
    mux.set_budget(total + total / 4).unwrap();
    for round in 0..rounds {
        for i in 0..3 {
            let g = mux
                .generate(&name(i), PROMPTS[0], &opts(), |_| true)
                .unwrap();
            assert_eq!(g.text, reference(device, i, 0), "round {round} model {i}");
        }
    }
    total
}

/// A fixed sequence that must evict, stream and hit: the budget holds about one bundled model.
#[test]
fn eviction_streaming_and_hits_happen() {
    let mux = Mux::new(Device::Cpu, 1 << 20).unwrap();
    let total = rotate_three(&mux, Device::Cpu, 2);
    let s = mux.stats();
    assert!(s.evictions() > 0 && s.hits() > 0 && s.misses() > 0, "{s:?}");
    assert!(s.peak <= s.budget);
    // Streaming: a budget of two of its largest units still runs it.
    let largest = s.models[0].units.iter().map(|u| u.1.bytes).max().unwrap();
    assert!(2 * largest < total);
    mux.set_budget(2 * largest).unwrap();
    let g = mux
        .generate(&name(0), PROMPTS[1], &opts(), |_| true)
        .unwrap();
    assert_eq!(g.text, reference(Device::Cpu, 0, 1));
    assert!(mux.stats().model(&name(0)).unwrap().streaming);
    assert!(mux.stats().peak <= total + total / 4);
}

/// Units larger than the budget, unknown names and pins that cannot fit are errors, not panics.
#[test]
fn limits_are_errors() {
    let zoo = zoo();
    let mux = Mux::new(Device::Cpu, 64 << 10).unwrap();
    mux.register("a", &zoo.paths[0]).unwrap();
    assert!(mux.register("a", &zoo.paths[1]).is_err());
    let e = mux.generate("a", "x", &opts(), |_| true).unwrap_err();
    assert!(e.to_string().contains("raise the budget"), "{e}");
    let e = mux.generate("zzz", "x", &opts(), |_| true).unwrap_err();
    assert!(e.to_string().contains("registered: a"), "{e}");
    mux.register("b", &zoo.paths[1]).unwrap();
    let total_a = mux.stats().model("a").unwrap().total_bytes;
    mux.set_budget(total_a / 2).unwrap();
    assert!(
        mux.pin("a").is_err(),
        "a pin larger than the budget must fail"
    );
    // The failed pin released what it held: b still runs.
    mux.generate("b", "x", &opts(), |_| true).unwrap();
    mux.set_budget(64 << 20).unwrap();
    mux.set_runtime_limit(1000);
    let e = mux.generate("a", "x", &opts(), |_| true).unwrap_err();
    assert!(e.to_string().contains("KV caches"), "{e}");
}

/// Concurrent requests to different models under a budget that holds about two of them: no
/// deadlock, every text right, the budget held at every page-in and eviction.
/// Page-ins staged through the pinned host cache: the first page-in of a unit fills a copy,
/// later ones (after eviction from the device) copy from it; texts stay those of unlimited
/// memory; the cache never passes its budget, shrinking it drops copies, and an unregistered
/// model's copies go with it.
#[test]
fn opencl_host_cache_serves_repeat_page_ins() {
    let Some(dev) = opencl() else { return };
    let mux = Mux::with_options(
        dev,
        MuxOptions {
            budget: usize::MAX,
            page_in: PageIn::Staged,
            host_cache: 64 << 20,
            ..MuxOptions::default()
        },
    )
    .unwrap();
    let log: Arc<Mutex<Vec<MuxEvent>>> = Arc::default();
    let sink = log.clone();
    mux.set_event_sink(Some(Arc::new(move |e: &MuxEvent| {
        sink.lock().unwrap().push(e.clone())
    })));
    let total = rotate_three(&mux, dev, 3);
    let s = mux.stats();
    let c = s.host_cache;
    assert!(c.fills > 0 && c.hits > 0 && c.bytes_from_cache > 0, "{c:?}");
    assert_eq!(c.bypasses, 0, "{c:?}");
    assert!(c.used <= c.budget && c.peak <= c.budget, "{c:?}");
    // Every page-in of a unit after its first came from the cache.
    let ins: Vec<bool> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            MuxEvent::PageIn {
                from_host_cache, ..
            } => Some(*from_host_cache),
            _ => None,
        })
        .collect();
    assert_eq!(ins.iter().filter(|&&h| h).count() as u64, c.hits);
    assert_eq!(ins.iter().filter(|&&h| !h).count() as u64, c.fills);
    // A cache smaller than the models: copies are dropped, texts unchanged.
    mux.set_host_cache(total / 2).unwrap();
    let c = mux.stats().host_cache;
    assert!(c.used <= total / 2 && c.evictions > 0, "{c:?}");
    for i in 0..3 {
        let g = mux
            .generate(&name(i), PROMPTS[1], &opts(), |_| true)
            .unwrap();
        assert_eq!(g.text, reference(dev, i, 1), "small cache, model {i}");
    }
    let c = mux.stats().host_cache;
    assert!(c.used <= c.budget, "{c:?}");
    // Unregistering drops a model's copies.
    let before = c.used;
    for i in 0..3 {
        mux.unregister(&name(i)).unwrap();
    }
    let c = mux.stats().host_cache;
    assert!(c.used == 0 && before > 0, "{c:?} (was {before})");
}

/// Six threads, four requests each, over four models under a budget that forces evictions.
/// `staged_streaming`: page-ins staged through a pinned host cache (copies that run while
/// passes of other threads may find the unit), and a budget under the largest model, so it
/// streams while the others come and go.
fn stress(device: Device, staged_streaming: bool) {
    let zoo = zoo();
    let n = 4;
    let mux = Arc::new(
        Mux::with_options(
            device,
            MuxOptions {
                budget: 64 << 20,
                page_in: if staged_streaming {
                    PageIn::Staged
                } else {
                    PageIn::Auto
                },
                host_cache: if staged_streaming { 8 << 20 } else { 0 },
                ..MuxOptions::default()
            },
        )
        .unwrap(),
    );
    for i in 0..n {
        mux.register(&name(i), &zoo.paths[i]).unwrap();
    }
    let totals: Vec<usize> = mux.stats().models.iter().map(|m| m.total_bytes).collect();
    let mut sorted = totals.clone();
    sorted.sort_unstable();
    let largest_unit = mux
        .stats()
        .models
        .iter()
        .flat_map(|m| m.units.iter().map(|u| u.1.bytes))
        .max()
        .unwrap();
    let budget = if staged_streaming {
        (sorted[n - 1] * 3 / 4).max(2 * largest_unit + largest_unit / 4)
    } else {
        sorted[n - 1] + sorted[n - 2] / 2
    };
    assert!(
        !staged_streaming || budget < sorted[n - 1],
        "the largest model should stream: budget {budget}, models {sorted:?}, unit {largest_unit}"
    );
    mux.set_budget(budget).unwrap();
    let worst = Arc::new(Mutex::new(0usize));
    {
        let worst = worst.clone();
        mux.set_event_sink(Some(Arc::new(move |e: &MuxEvent| {
            let used = match e {
                MuxEvent::PageIn { used, .. } | MuxEvent::Evict { used, .. } => *used,
                MuxEvent::Hit { .. } => 0,
            };
            let mut w = worst.lock().unwrap();
            *w = (*w).max(used);
        })));
    }
    for i in 0..n {
        for p in 0..2 {
            reference(device, i, p);
        }
    }
    let (tx, rx) = mpsc::channel();
    for t in 0..6 {
        let (mux, tx) = (mux.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            for r in 0..4 {
                let (i, p) = ((t + r) % n, (t * 3 + r) % 2);
                match mux.generate(&name(i), PROMPTS[p], &opts(), |_| true) {
                    Ok(g) if g.text == reference(device, i, p) => {}
                    Ok(g) => bad.push(format!("model {i} prompt {p}: {:?}", g.text)),
                    Err(e) => bad.push(format!("model {i} prompt {p}: {e}")),
                }
            }
            tx.send(bad).unwrap();
        });
    }
    drop(tx);
    for _ in 0..6 {
        let bad = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("a request did not finish in 300 s: deadlock");
        assert!(bad.is_empty(), "{bad:?}");
    }
    let s = mux.stats();
    assert!(s.peak <= budget && *worst.lock().unwrap() <= budget);
    assert!(
        s.evictions() > 0,
        "the budget should force evictions: {s:?}"
    );
    if staged_streaming {
        let c = s.host_cache;
        assert!(c.hits > 0 && c.used <= c.budget, "{c:?}");
    }
    println!(
        "stress on {device}: {} page-ins, {} hits, {} evictions, peak {} of {budget}",
        s.misses(),
        s.hits(),
        s.evictions(),
        s.peak
    );
}

#[test]
fn cpu_concurrent_stress() {
    stress(Device::Cpu, false);
}

#[test]
fn opencl_concurrent_stress_staged_streaming() {
    if let Some(d) = opencl() {
        stress(d, true);
    }
}

#[test]
fn opencl_concurrent_stress() {
    if let Some(d) = opencl() {
        stress(d, false);
    }
}
