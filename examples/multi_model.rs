//! Three models under one weight budget that holds about two of them: the bundled model in
//! TQ2_0 and TQ1_0 and an I2_S conversion, queried in turn. Prints each answer, what was paged
//! in and evicted for it, and the budget bar.
//!
//! ```text
//! cargo run --release --example multi_model [-- BUDGET DEVICE]     e.g. -- 3MiB cpu
//! ```

use std::sync::{Arc, Mutex};
use ternmux::backend::Device;
use ternmux::kernels::ternary::TernaryFormat;
use ternmux::model::GenerateOptions;
use ternmux::mux::{Mux, MuxEvent, parse_bytes};

fn main() -> Result<(), ternmux::Error> {
    let mut args = std::env::args().skip(1);
    let budget = parse_bytes(&args.next().unwrap_or_else(|| "3MiB".into()))?;
    let device: Device = args.next().unwrap_or_else(|| "auto".into()).parse()?;

    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
    let i2s = std::env::temp_dir().join("ternmux-example-stories3M-I2_S.gguf");
    let tq2 = format!("{models}/bitllama2c-stories3M-TQ2_0.gguf");
    ternmux::convert::convert_file(tq2.as_ref(), &i2s, TernaryFormat::I2S)?;

    let mux = Mux::new(device, budget)?;
    println!("{}", mux.placement().describe());
    mux.register("alpha", &tq2)?;
    mux.register("beta", format!("{models}/bitllama2c-stories3M-TQ1_0.gguf"))?;
    mux.register("gamma", &i2s)?;

    // Collect what the mux does; print it after each answer.
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    mux.set_event_sink(Some(Arc::new(move |e: &MuxEvent| {
        if !matches!(e, MuxEvent::Hit { .. }) {
            sink.lock().unwrap().push(e.clone());
        }
    })));

    let opts = GenerateOptions {
        max_tokens: 24,
        ..GenerateOptions::default()
    };
    for (name, prompt) in [
        ("alpha", "Once upon a time"),
        ("beta", "The little dog"),
        ("gamma", "Lily and Ben"),
        ("alpha", "One day"),
    ] {
        let g = mux.generate(name, prompt, &opts, |_| true)?;
        println!("\n{name}: {prompt}{}", g.text);
        for e in log.lock().unwrap().drain(..) {
            match e {
                MuxEvent::PageIn {
                    model,
                    unit,
                    bytes,
                    micros,
                    ..
                } => {
                    println!("  page-in {model}/{unit} {bytes} B in {micros} µs")
                }
                MuxEvent::Evict {
                    model, unit, bytes, ..
                } => {
                    println!("  evicted {model}/{unit} {bytes} B")
                }
                MuxEvent::Hit { .. } => {}
            }
        }
        println!("  {}", mux.budget_bar(40));
    }
    let s = mux.stats();
    for m in &s.models {
        println!(
            "{:<6} hit rate {:5.1}%  page-ins {:3}  evictions {:3}",
            m.name,
            100.0 * m.hit_rate(),
            m.misses,
            m.evictions
        );
    }
    println!("peak {} of {} bytes", s.peak, s.budget);
    let _ = std::fs::remove_file(&i2s);
    Ok(())
}
