//! The bundled TinyStories model end to end: tokenizer, forward pass, greedy text equal to
//! llama.cpp's, on all three ternary encodings.

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
