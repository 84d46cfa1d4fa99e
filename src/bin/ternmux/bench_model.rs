//! `ternmux bench` on one model: prefill and decode tok/s of one sequence, decode of a batch of
//! sequences, and (with `TERNMUX_CL_PROFILE=1`) the device time of every kernel.

use crate::{BenchArgs, Failure, io_failure, open_model, set_threads};
use std::io::Write;

/// The model's OpenCL device when it records per-kernel times (`TERNMUX_CL_PROFILE=1`).
fn profiled_device(
    model: &ternmux::model::Model,
) -> Option<std::sync::Arc<ternmux::backend::opencl::ClDevice>> {
    match model.placement() {
        ternmux::backend::Placement::OpenCl(d) if d.profiling() => Some(d.clone()),
        _ => None,
    }
}

/// Kernel launches so far on the model's OpenCL device, and the host seconds spent queueing
/// them (0 on the CPU).
fn launches_of(model: &ternmux::model::Model) -> (u64, f64) {
    match model.placement() {
        ternmux::backend::Placement::OpenCl(d) => (d.launches(), d.queue_time().as_secs_f64()),
        ternmux::backend::Placement::Cpu => (0, 0.0),
    }
}

pub(crate) fn bench_model(a: BenchArgs, out: &mut impl Write) -> Result<(), Failure> {
    use ternmux::model::{KvCache, KvType, Logits};
    set_threads(a.threads)?;
    let mut model = open_model(&a.model, a.device)?;
    model.set_head_mode(a.head);
    let n_vocab = model.config.n_vocab as u64;
    // A fixed pseudo-random prompt (llama-bench also uses random tokens).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let prompt: Vec<u32> = (0..a.prompt_tokens.max(1))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_vocab) as u32
        })
        .collect();
    let n_ctx = prompt.len() + a.gen_tokens + 1;
    let (mut best_pp, mut best_tg) = (f64::INFINITY, f64::INFINITY);
    let mut launches_per_token = 0.0;
    let mut queue_per_token = 0.0;
    // With TERNMUX_CL_PROFILE=1: device time per kernel of the last repetition.
    let profiled = profiled_device(&model);
    let take_profile = || -> Result<Vec<ternmux::backend::opencl::KernelTime>, Failure> {
        Ok(match &profiled {
            Some(d) => d.take_profile()?,
            None => Vec::new(),
        })
    };
    let (mut prefill_profile, mut decode_profile) = (Vec::new(), Vec::new());
    for _ in 0..a.reps.max(1) {
        let mut cache = KvCache::new(&model, n_ctx, KvType::F16)?;
        take_profile()?;
        let t = std::time::Instant::now();
        let logits = model.forward(&mut cache, &prompt, Logits::Last)?;
        best_pp = best_pp.min(t.elapsed().as_secs_f64());
        prefill_profile = take_profile()?;
        if let Some(path) = &a.logits_out {
            let mut buf = Vec::with_capacity(8 + 4 * (prompt.len() + logits.len()));
            buf.extend_from_slice(&(prompt.len() as u32).to_le_bytes());
            prompt
                .iter()
                .for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
            buf.extend_from_slice(&(logits.len() as u32).to_le_bytes());
            logits
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            std::fs::write(path, buf).map_err(|e| ternmux::Error::Io {
                path: path.clone(),
                source: e,
            })?;
        }
        drop(cache);
        // Decoding as `ternmux run` and the library's streams do it (greedy; on OpenCL the
        // device chooses each token and the next pass is queued before it is read back),
        // from the same prompt: its first token comes from the prompt's logits, then
        // `gen_tokens` passes are timed.
        let opts = ternmux::model::GenerateOptions {
            max_tokens: a.gen_tokens + 1,
            n_ctx,
            ignore_eog: true,
            ..ternmux::model::GenerateOptions::default()
        };
        let mut stream = model.stream_tokens(&prompt, &opts)?;
        stream.next().transpose()?;
        // The stream's own prompt pass stays out of the decode profile.
        take_profile()?;
        let launches0 = launches_of(&model);
        let t = std::time::Instant::now();
        let mut decoded = 0;
        for piece in stream.by_ref() {
            piece?;
            decoded += 1;
        }
        if a.gen_tokens > 0 {
            if decoded != a.gen_tokens {
                return Err(ternmux::Error::Request(format!(
                    "bench: {decoded} of {} tokens decoded (stopped: {:?})",
                    a.gen_tokens,
                    stream.stop_reason()
                ))
                .into());
            }
            best_tg = best_tg.min(t.elapsed().as_secs_f64());
            let (n, q) = launches_of(&model);
            launches_per_token = (n - launches0.0) as f64 / a.gen_tokens as f64;
            queue_per_token = (q - launches0.1) / a.gen_tokens as f64;
        }
        decode_profile = take_profile()?;
    }
    let pp = prompt.len() as f64 / best_pp;
    let tg = if a.gen_tokens > 0 {
        a.gen_tokens as f64 / best_tg
    } else {
        0.0
    };
    let threads = rayon::current_num_threads();
    let isa = ternmux::kernels::Kernels::get().isa();
    if a.json {
        writeln!(
            out,
            "{{\"engine\":\"ternmux\",\"model\":{:?},\"threads\":{threads},\"isa\":\"{isa}\",\"prompt_tokens\":{},\"gen_tokens\":{},\"prefill_tok_s\":{pp:.3},\"decode_tok_s\":{tg:.3},\"head\":{:?}}}",
            a.model.display().to_string(),
            prompt.len(),
            a.gen_tokens,
            model.head_description()
        )
        .map_err(io_failure)?;
    } else {
        writeln!(
            out,
            "model: {} ({}), {}, best of {}",
            a.model.display(),
            model.config.arch_name,
            model.placement().describe(),
            a.reps.max(1)
        )
        .map_err(io_failure)?;
        writeln!(out, "prefill pp{:<5} {pp:>9.2} tok/s", prompt.len()).map_err(io_failure)?;
        writeln!(out, "decode  tg{:<5} {tg:>9.2} tok/s", a.gen_tokens).map_err(io_failure)?;
        if matches!(model.placement(), ternmux::backend::Placement::Cpu) {
            writeln!(out, "head: {}", model.head_description()).map_err(io_failure)?;
        }
        if launches_per_token > 0.0 {
            writeln!(
                out,
                "kernel launches per decoded token: {launches_per_token:.0} ({:.2} ms of host \
                 time queueing them, {:.1} µs a launch)",
                queue_per_token * 1e3,
                queue_per_token * 1e6 / launches_per_token
            )
            .map_err(io_failure)?;
        }
        if profiled.is_some() {
            write_profile(out, "prefill (one pass)", &prefill_profile, 1)?;
            write_profile(out, "decode (per token)", &decode_profile, a.gen_tokens)?;
        }
    }
    if a.batch > 1 {
        bench_batched_decode(&model, &prompt, &a, out)?;
    }
    Ok(())
}

/// Decode of `a.batch` sequences at once, one token each per pass (what the engine runs at that
/// concurrency, without its scheduling): every slot is prefilled with `prompt`, then
/// `a.gen_tokens` passes of [`forward_batch`](ternmux::model::Model::forward_batch) with greedy
/// tokens. Prints the total tok/s, the time per pass and, when profiling, the kernels per pass.
fn bench_batched_decode(
    model: &ternmux::model::Model,
    prompt: &[u32],
    a: &BenchArgs,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use ternmux::model::{KvCache, KvType, SeqChunk};
    let n_ctx = prompt.len() + a.gen_tokens + 1;
    let profiled = profiled_device(model);
    let mut best = f64::INFINITY;
    let mut profile = Vec::new();
    for _ in 0..a.reps.max(1) {
        let mut cache = KvCache::with_slots(model, n_ctx, a.batch, KvType::F16)?;
        let rows = model.max_batch_rows(&cache).max(1);
        if a.batch > rows {
            return Err(Failure {
                error: ternmux::Error::Request(format!(
                    "--batch {}: one pass of this model takes at most {rows} rows here",
                    a.batch
                )),
                hint: Some(
                    "ask for a smaller --batch (the engine's steps are capped the same way)",
                ),
            });
        }
        let mut next = vec![0u32; a.batch];
        for (slot, next) in next.iter_mut().enumerate() {
            for (i, chunk) in prompt.chunks(rows).enumerate() {
                let last = (i + 1) * rows >= prompt.len();
                let seq = [SeqChunk {
                    slot,
                    tokens: chunk,
                    logits: last,
                    pick: false,
                }];
                let logits = model.forward_batch(&mut cache, &seq)?;
                if last {
                    *next = ternmux::sampling::argmax(&logits);
                }
            }
        }
        if let Some(d) = &profiled {
            d.take_profile()?;
        }
        // One logits vector for every pass, as the engine keeps (empty here: greedy rows get
        // their tokens chosen where the logits are, as the engine's greedy sequences do).
        let (mut logits, mut picks) = (Vec::new(), Vec::new());
        let t = std::time::Instant::now();
        for _ in 0..a.gen_tokens {
            let ids = next.clone();
            let seqs: Vec<SeqChunk<'_>> = ids
                .iter()
                .enumerate()
                .map(|(slot, id)| SeqChunk {
                    slot,
                    tokens: std::slice::from_ref(id),
                    logits: true,
                    pick: true,
                })
                .collect();
            model.forward_batch_picks(&mut cache, &seqs, &mut logits, &mut picks)?;
            next.copy_from_slice(&picks);
        }
        best = best.min(t.elapsed().as_secs_f64());
        if let Some(d) = &profiled {
            profile = d.take_profile()?;
        }
    }
    let steps = a.gen_tokens.max(1);
    writeln!(
        out,
        "decode  batch {:<4} {:>9.2} tok/s ({:.2} ms per pass of {} tokens)",
        a.batch,
        (a.batch * a.gen_tokens) as f64 / best,
        best / steps as f64 * 1e3,
        a.batch
    )
    .map_err(io_failure)?;
    if profiled.is_some() {
        write_profile(
            out,
            &format!("decode batch {} (per pass)", a.batch),
            &profile,
            steps,
        )?;
    }
    Ok(())
}

/// The per-kernel table of a profiled phase, per `per` units (e.g. per decoded token).
fn write_profile(
    out: &mut impl Write,
    phase: &str,
    kernels: &[ternmux::backend::opencl::KernelTime],
    per: usize,
) -> Result<(), Failure> {
    let per = per.max(1) as f64;
    let device: f64 = kernels.iter().map(|k| k.device_s).sum();
    let host: f64 = kernels.iter().map(|k| k.host_s).sum();
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io_failure);
    w(
        out,
        format!(
            "\n## {phase}: device {:.3} ms, host queueing {:.3} ms (profiling events)",
            device / per * 1e3,
            host / per * 1e3
        ),
    )?;
    w(
        out,
        format!(
            "{:<28} {:>9} {:>12} {:>12} {:>11} {:>6}",
            "kernel", "launches", "host µs/l", "device µs/l", "device ms", "share"
        ),
    )?;
    for k in kernels {
        let n = k.launches.max(1) as f64;
        w(
            out,
            format!(
                "{:<28} {:>9.1} {:>12.2} {:>12.2} {:>11.3} {:>5.1}%",
                k.name,
                k.launches as f64 / per,
                k.host_s / n * 1e6,
                k.device_s / n * 1e6,
                k.device_s / per * 1e3,
                100.0 * k.device_s / device.max(1e-12)
            ),
        )?;
    }
    Ok(())
}
