//! The bundled TinyStories model end to end: tokenizer, forward pass, greedy text equal to
//! llama.cpp's, on all three ternary encodings.

mod common;
use common::cosine;
use ternmux::model::{GenerateOptions, Model};

fn model(name: &str) -> String {
    format!("{}/models/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// llama.cpp's greedy continuation from BOS (models/README.md).
const EXPECTED: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside and explore the world around her. One day, she saw a big, red ball.";

fn greedy_from_bos(m: &Model, n: usize) -> String {
    let bos = m.tokenizer.bos().unwrap();
    let opts = GenerateOptions {
        max_tokens: n,
        ..GenerateOptions::default()
    };
    let mut s = m.stream_tokens(&[bos], &opts).unwrap();
    let mut text = String::new();
    for p in s.by_ref() {
        text.push_str(&p.unwrap().text);
    }
    text.push_str(&s.flush());
    text
}

#[test]
fn tokenizer_matches_llama_cpp_ids() {
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    assert_eq!(
        m.tokenizer.encode("Once upon a time", true, false),
        [1, 403, 407, 261, 378]
    );
}

#[test]
fn greedy_text_equals_llama_cpp_tq2_0() {
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    let text = greedy_from_bos(&m, 80);
    eprintln!("{text}");
    assert!(text.starts_with(EXPECTED), "got: {text}");
}

#[test]
fn greedy_text_equals_llama_cpp_tq1_0() {
    let m = Model::open(model("bitllama2c-stories3M-TQ1_0.gguf")).unwrap();
    let text = greedy_from_bos(&m, 80);
    assert!(text.starts_with(EXPECTED), "got: {text}");
}

#[test]
fn greedy_text_equals_llama_cpp_i2_s_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories-i2s.gguf");
    ternmux::convert::convert_file(
        model("bitllama2c-stories3M-TQ2_0.gguf").as_ref(),
        &out,
        ternmux::kernels::ternary::TernaryFormat::I2S,
    )
    .unwrap();
    let m = Model::open(&out).unwrap();
    let text = greedy_from_bos(&m, 80);
    assert!(text.starts_with(EXPECTED), "got: {text}");
}

#[test]
fn prompt_continuation_and_stop_strings() {
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    let opts = GenerateOptions {
        max_tokens: 60,
        stop: vec![" Lily".into()],
        ..GenerateOptions::default()
    };
    let mut streamed = String::new();
    let g = m
        .generate("Once upon a time", &opts, |p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(g.text, streamed);
    assert_eq!(g.stop, ternmux::model::StopReason::StopString);
    assert_eq!(g.text, ", there was a little girl named");
    assert!(g.timings.prompt_tokens == 5 && g.timings.decode_tokens > 0);
    // A continuation keeps the space that starts its first word.
    let g = m
        .generate(
            "Once upon a time, there was a little girl named",
            &GenerateOptions {
                max_tokens: 1,
                ..GenerateOptions::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(g.text, " Lily");
}

#[test]
fn same_seed_same_text() {
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    let mut opts = GenerateOptions {
        max_tokens: 30,
        ..GenerateOptions::default()
    };
    opts.sampling.temperature = 0.8;
    opts.sampling.seed = 42;
    let a = m
        .generate("Once upon a time", &opts, |_| true)
        .unwrap()
        .text;
    let b = m
        .generate("Once upon a time", &opts, |_| true)
        .unwrap()
        .text;
    opts.sampling.seed = 43;
    let c = m
        .generate("Once upon a time", &opts, |_| true)
        .unwrap()
        .text;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn context_limit_is_a_clear_error() {
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    let opts = GenerateOptions {
        n_ctx: 4,
        ..GenerateOptions::default()
    };
    let e = m
        .stream("Once upon a time", &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("5 positions") && e.contains("holds 4"), "{e}");
    // Generation stops (without error) when the context fills up.
    let opts = GenerateOptions {
        n_ctx: 8,
        max_tokens: 100,
        ..GenerateOptions::default()
    };
    let g = m.generate("Once upon a time", &opts, |_| true).unwrap();
    assert_eq!(g.stop, ternmux::model::StopReason::ContextFull);
}

#[test]
fn batched_prefill_equals_token_by_token() {
    use ternmux::model::{KvCache, KvType, Logits};
    let m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    let toks = m
        .tokenizer
        .encode("Once upon a time there was a dog", true, false);
    let mut c1 = KvCache::new(&m, 64, KvType::F32).unwrap();
    let batched = m.forward(&mut c1, &toks, Logits::All).unwrap();
    let mut c2 = KvCache::new(&m, 64, KvType::F32).unwrap();
    let v = m.config.n_vocab;
    for (i, &t) in toks.iter().enumerate() {
        let one = m.forward(&mut c2, &[t], Logits::Last).unwrap();
        let b = &batched[i * v..(i + 1) * v];
        let max_diff = one
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(
            max_diff <= 1e-4 * scale.max(1.0),
            "token {i}: max diff {max_diff} (scale {scale})"
        );
    }
}

/// The default int8 head (requantized per row) against the file's own head: every position's
/// logits close (cosine ≥ 0.9999) with the same top-1, on the bundled model (F32 head) and a
/// synthetic model with an F16 head; the greedy text is llama.cpp's either way.
#[test]
fn int8_head_logits_close_to_the_files_head() {
    use ternmux::model::{HeadMode, KvCache, KvType, Logits};
    use ternmux::sampling::argmax;
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("tiny.gguf");
    let spec = ternmux::synth::SynthSpec {
        arch: "bitnet".into(),
        shape: ternmux::synth::Shape::preset("tiny").unwrap(),
        format: ternmux::kernels::ternary::TernaryFormat::Tq2_0,
        seed: 11,
    };
    ternmux::synth::write_synthetic(&spec, &synth).unwrap();
    for path in [
        model("bitllama2c-stories3M-TQ2_0.gguf"),
        synth.display().to_string(),
    ] {
        let mut m = Model::open(&path).unwrap();
        let toks = m
            .tokenizer
            .encode("Once upon a time there was a dog", true, false);
        let v = m.config.n_vocab;
        let mut logits = Vec::new();
        for mode in [HeadMode::File, HeadMode::Int8] {
            m.set_head_mode(mode);
            let mut c = KvCache::new(&m, 64, KvType::F32).unwrap();
            logits.push(m.forward(&mut c, &toks, Logits::All).unwrap());
        }
        let d = m.head_description();
        assert!(d.starts_with("int8 ("), "{path}: {d}");
        for i in 0..toks.len() {
            let (f, q) = (
                &logits[0][i * v..(i + 1) * v],
                &logits[1][i * v..(i + 1) * v],
            );
            let cos = cosine(f, q);
            assert!(cos >= 0.9999, "{path}: position {i}: cosine {cos}");
            assert_eq!(argmax(f), argmax(q), "{path}: position {i}");
        }
    }
    let mut m = Model::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    m.set_head_mode(HeadMode::File);
    let text = greedy_from_bos(&m, 80);
    assert!(text.starts_with(EXPECTED), "file head: {text}");
}

/// On the CPU a multiplexer's copy of the head is the int8 head (codes and scales: what the
/// budget counts and what the CPU reads), and greedy text through it is llama.cpp's.
#[test]
fn cpu_multiplexer_holds_the_int8_head() {
    use ternmux::backend::Device;
    use ternmux::mux::{Mux, UnitId};
    let mux = Mux::new(Device::Cpu, 64 << 20).unwrap();
    let m = mux
        .register("s", model("bitllama2c-stories3M-TQ2_0.gguf"))
        .unwrap();
    let (v, e) = (m.config.n_vocab, m.config.n_embd);
    let opts = GenerateOptions {
        max_tokens: 40,
        ..GenerateOptions::default()
    };
    let text = mux.generate("s", "", &opts, |_| true).unwrap().text;
    assert!(
        text.len() > 100 && EXPECTED.starts_with(text.trim_end()),
        "got: {text:?}"
    );
    let stats = mux.stats();
    let head = stats
        .model("s")
        .unwrap()
        .units
        .iter()
        .find(|u| u.0 == UnitId::Head);
    let bytes = head.unwrap().1.bytes;
    // Codes (one byte per weight) then f32 scales, each piece aligned: far below F32's 4 bytes.
    assert!(
        bytes >= v * e + v * 4 && bytes < v * e + v * 4 + 4096,
        "{bytes}"
    );
}
