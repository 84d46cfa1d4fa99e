//! Our tokenizers against llama.cpp's own tokenizer test cases (`test-tokenizer-0`): the
//! vocabulary GGUFs and their `.inp` (strings) / `.out` (llama.cpp's ids) files, fetched from
//! the pinned llama-cpp-python sdist by `scripts/fetch_vocabs.py` into `target/vocab/` (or
//! `TERNMUX_VOCAB_DIR`). ASCII, Unicode, emoji, whitespace runs, numbers and code.
//!
//! In CI (`CI=true`) missing files fail the run; elsewhere the test says it was skipped and why.

use ternmux::gguf::GgufFile;
use ternmux::tokenizer::Tokenizer;

fn vocab_dir() -> Option<String> {
    let dir = std::env::var("TERNMUX_VOCAB_DIR")
        .unwrap_or_else(|_| format!("{}/target/vocab", env!("CARGO_MANIFEST_DIR")));
    if std::path::Path::new(&format!("{dir}/ggml-vocab-llama-spm.gguf")).exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tokenizer vocabularies missing in {dir}: run scripts/fetch_vocabs.py"
    );
    eprintln!("SKIPPED: llama.cpp vocabularies not found in {dir} (run scripts/fetch_vocabs.py)");
    None
}

fn check(dir: &str, name: &str) -> usize {
    let f = GgufFile::open(format!("{dir}/{name}")).unwrap();
    let t = Tokenizer::from_gguf(&f).unwrap();
    let inp = std::fs::read_to_string(format!("{dir}/{name}.inp")).unwrap();
    let out = std::fs::read_to_string(format!("{dir}/{name}.out")).unwrap();
    let cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let want: Vec<&str> = out.split('\n').collect();
    assert!(
        cases.len() >= 40 && want.len() >= cases.len(),
        "unexpected test file layout"
    );
    for (i, case) in cases.iter().enumerate() {
        let ids: Vec<u32> = want[i]
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            t.encode(case, false, false),
            ids,
            "{name} case {i}: {case:?}"
        );
        // Decoding gives the text back (SPM drops the space prefix it added).
        assert_eq!(t.decode(&ids), *case, "{name} decode case {i}");
    }
    cases.len()
}

#[test]
fn spm_matches_llama_cpp_on_llama_vocab() {
    if let Some(dir) = vocab_dir() {
        let n = check(&dir, "ggml-vocab-llama-spm.gguf");
        eprintln!("{n} llama.cpp cases agree");
    }
}

#[test]
fn bpe_llama3_matches_llama_cpp() {
    if let Some(dir) = vocab_dir() {
        let n = check(&dir, "ggml-vocab-llama-bpe.gguf");
        eprintln!("{n} llama.cpp cases agree (llama-bpe)");
    }
}

#[test]
fn bpe_gpt2_matches_llama_cpp() {
    if let Some(dir) = vocab_dir() {
        let n = check(&dir, "ggml-vocab-gpt-2.gguf");
        eprintln!("{n} llama.cpp cases agree (gpt-2)");
    }
}

#[test]
fn llama3_specials_and_bos() {
    if let Some(dir) = vocab_dir() {
        let f = GgufFile::open(format!("{dir}/ggml-vocab-llama-bpe.gguf")).unwrap();
        let t = Tokenizer::from_gguf(&f).unwrap();
        // BOS added; control tokens parsed only when asked.
        let ids = t.encode("<|start_header_id|>user<|end_header_id|>", true, true);
        assert_eq!(ids[..2], [128000, 128006]);
        assert_eq!(ids[ids.len() - 1], 128007);
        let plain = t.encode("<|eot_id|>", false, false);
        assert!(
            plain.len() > 1,
            "control text must not be matched without parse_special"
        );
        assert!(t.is_eog(128009) && t.is_eog(128001));
        // Decoding a UTF-8 character split across tokens.
        let ids = t.encode("héllo 🦙 wörld", false, false);
        assert_eq!(t.decode(&ids), "héllo 🦙 wörld");
    }
}

/// ids recorded from llama-cpp-python 0.3.36 `Llama.tokenize` by scripts/make_tokenizer_fixtures.py:
/// ASCII, Unicode, emoji, whitespace runs, numbers, code, contractions and special-token texts,
/// each with and without BOS and special-token parsing.
#[test]
fn ids_equal_llama_cpp_tokenize_fixtures() {
    let Some(dir) = vocab_dir() else { return };
    let path = format!(
        "{}/tests/fixtures/tokenizer_ids.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut n = 0;
    for (vocab, cases) in fx["vocabs"].as_object().unwrap() {
        let f = GgufFile::open(format!("{dir}/{vocab}")).unwrap();
        let t = Tokenizer::from_gguf(&f).unwrap();
        for c in cases.as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let (add, special) = (
                c["add_special"].as_bool().unwrap(),
                c["parse_special"].as_bool().unwrap(),
            );
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                t.encode(text, add, special),
                want,
                "{vocab}: {text:?} add_special={add} parse_special={special}"
            );
            n += 1;
        }
    }
    assert!(n >= 150, "only {n} fixture cases");
    eprintln!("{n} llama-cpp-python tokenize cases agree");
}
