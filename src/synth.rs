//! Synthetic models: random ternary weights at real shapes, so speed can be measured at real
//! sizes without downloading anything (speed depends on shapes, not on what weights learned).
//!
//! The file is a complete, loadable GGUF: architecture metadata, every tensor the graph needs
//! (ternary linear layers in TQ2_0, TQ1_0 or I2_S; F16 embeddings; F32 norms) and a working
//! SentencePiece vocabulary (control tokens, all 256 byte tokens for byte fallback, characters,
//! a few hundred English words, then filler pieces up to the vocabulary size), so any text
//! tokenizes and generation runs end to end — in ternmux and in llama.cpp (`bitnet`, `llama`).
//!
//! Weights use one scale per tensor (as ternary-trained models do), so conversions between the
//! ternary formats are exact.

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufWriter, Value, ValueType, ids};
use half::f16;
use std::path::Path;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::ternary::TernaryFormat;

/// Model shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Embedding width.
    pub n_embd: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Training context length.
    pub n_ctx: usize,
}

impl Shape {
    /// Named presets: `2b` (BitNet b1.58 2B-4T), `0.7b` (bitnet_b1_58-large), `3b`
    /// (bitnet_b1_58-3B), `8b` (Llama3-8B-1.58 class), `tiny` (tests).
    pub fn preset(name: &str) -> Option<Shape> {
        let s = |n_embd, n_ff, n_layer, n_head, n_head_kv, n_vocab, n_ctx| Shape {
            n_embd,
            n_ff,
            n_layer,
            n_head,
            n_head_kv,
            n_vocab,
            n_ctx,
        };
        Some(match name {
            "2b" => s(2560, 6912, 30, 20, 5, 128_256, 4096),
            "0.7b" => s(1536, 4096, 24, 16, 16, 32_000, 2048),
            "3b" => s(3200, 8640, 26, 32, 32, 32_000, 2048),
            "8b" => s(4096, 14_336, 32, 32, 8, 128_256, 8192),
            "tiny" => s(256, 512, 2, 4, 2, 1000, 256),
            _ => return None,
        })
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// `general.architecture`: `bitnet`, `bitnet-b1.58` (ReLU²) or `llama`.
    pub arch: String,
    /// Shape.
    pub shape: Shape,
    /// Ternary format of the linear layers.
    pub format: TernaryFormat,
    /// Seed of the weights.
    pub seed: u64,
}

/// SplitMix64: fast, seedable, good enough to fill weights.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Every byte whose four 2-bit fields are valid codes (0, 1, 2): the 81 valid TQ2_0 / I2_S bytes.
fn two_bit_bytes() -> Vec<u8> {
    (0..=255u8)
        .filter(|b| (0..4).all(|i| (b >> (2 * i)) & 3 != 3))
        .collect()
}

/// The 243 TQ1_0 bytes (`ceil(V · 256 / 243)` for V < 243).
fn trit_bytes() -> Vec<u8> {
    (0..243u32).map(|v| (v * 256).div_ceil(243) as u8).collect()
}

fn ternary_tensor(
    format: TernaryFormat,
    rows: usize,
    cols: usize,
    scale: f32,
    rng: &mut Rand,
) -> Vec<u8> {
    let size = format.tensor_bytes(rows, cols).unwrap_or(0);
    let mut out = vec![0u8; size];
    let table = if format == TernaryFormat::Tq1_0 {
        trit_bytes()
    } else {
        two_bit_bytes()
    };
    let fill = |buf: &mut [u8], rng: &mut Rand| {
        for chunk in buf.chunks_mut(8) {
            let mut r = rng.next();
            for b in chunk {
                *b = table[(r % table.len() as u64) as usize];
                r /= table.len() as u64;
            }
        }
    };
    match format {
        TernaryFormat::I2S => {
            let body = rows * cols / 4;
            fill(&mut out[..body], rng);
            out[body..body + 4].copy_from_slice(&scale.to_le_bytes());
        }
        _ => {
            let bb = format.row_bytes(256);
            let d = f16::from_f32(scale).to_le_bytes();
            for blk in out.chunks_exact_mut(bb) {
                fill(&mut blk[..bb - 2], rng);
                blk[bb - 2..].copy_from_slice(&d);
            }
        }
    }
    out
}

const WORDS: &str = "the a and to of in was he she it is that for on with as his her they at be this had not but one said all from were we there have so then an you i when up out little day time big about what very could into some them would do like once upon saw went play happy friend mom dad house tree sun dog cat ball run jump fun good new old red blue green small girl boy named lily tom park";

/// A working SentencePiece vocabulary of exactly `n` tokens (n ≥ 512).
fn vocabulary(n: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = vec!["\u{2581}".into()];
    for c in ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(".,!?'\";:-()".chars())
    {
        pieces.push(c.to_string());
        pieces.push(format!("\u{2581}{c}"));
    }
    for w in WORDS.split(' ') {
        pieces.push(format!("\u{2581}{w}"));
        pieces.push(w.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    for p in pieces {
        if tokens.len() < n && seen.insert(p.clone()) {
            tokens.push(p);
            types.push(1);
        }
    }
    let mut i = 0usize;
    while tokens.len() < n {
        tokens.push(format!("\u{2581}x{i}"));
        types.push(1);
        i += 1;
    }
    tokens.truncate(n);
    types.truncate(n);
    let scores = (0..n)
        .map(|i| if types[i] == 1 { -(i as f32) } else { 0.0 })
        .collect();
    (tokens, scores, types)
}

/// Writes a synthetic model to `path`; returns the file size.
pub fn write_synthetic(spec: &SynthSpec, path: &Path) -> Result<u64> {
    let s = &spec.shape;
    let arch = spec.arch.as_str();
    if crate::model::Arch::parse(arch).is_none() {
        return Err(Error::Gguf(format!(
            "unknown architecture {arch:?} for a synthetic model"
        )));
    }
    if s.n_vocab < 512
        || !s.n_embd.is_multiple_of(256)
        || !s.n_ff.is_multiple_of(256)
        || !s.n_embd.is_multiple_of(s.n_head)
        || !s.n_head.is_multiple_of(s.n_head_kv)
    {
        return Err(Error::Gguf(format!(
            "shape {s:?} does not fit ternary blocks of 256 and its head counts"
        )));
    }
    let head_dim = s.n_embd / s.n_head;
    let kv = s.n_head_kv * head_dim;
    let mut rng = Rand(spec.seed);
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::Str(arch.into()));
    w.add_kv(
        "general.name",
        Value::Str(format!("ternmux synthetic {arch} {}", spec.format.name())),
    );
    let k = |key: &str| format!("{arch}.{key}");
    w.add_kv(k("context_length"), Value::U32(s.n_ctx as u32));
    w.add_kv(k("embedding_length"), Value::U32(s.n_embd as u32));
    w.add_kv(k("feed_forward_length"), Value::U32(s.n_ff as u32));
    w.add_kv(k("block_count"), Value::U32(s.n_layer as u32));
    w.add_kv(k("attention.head_count"), Value::U32(s.n_head as u32));
    w.add_kv(k("attention.head_count_kv"), Value::U32(s.n_head_kv as u32));
    w.add_kv(k("rope.dimension_count"), Value::U32(head_dim as u32));
    w.add_kv(k("rope.freq_base"), Value::F32(500_000.0));
    w.add_kv(k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    w.add_kv(k("vocab_size"), Value::U32(s.n_vocab as u32));
    let (tokens, scores, types) = vocabulary(s.n_vocab);
    w.add_kv("tokenizer.ggml.model", Value::Str("llama".into()));
    w.add_kv("tokenizer.ggml.tokens", Value::strings(tokens));
    w.add_kv(
        "tokenizer.ggml.scores",
        Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
    );
    w.add_kv(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.add_kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.add_kv("tokenizer.ggml.add_eos_token", Value::Bool(false));

    let f32_bytes = |v: f32, n: usize| v.to_le_bytes().repeat(n);
    let mut embd = vec![0u8; s.n_vocab * s.n_embd * 2];
    for c in embd.chunks_exact_mut(2) {
        // Uniform in ±0.05: the scale of trained embeddings.
        let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
        c.copy_from_slice(&f16::from_f32((u - 0.5) * 0.1).to_le_bytes());
    }
    w.add_tensor(
        "token_embd.weight",
        &[s.n_embd as u64, s.n_vocab as u64],
        GgmlType::Float(FloatFormat::F16).id(),
        embd,
    )?;
    w.add_tensor(
        "output_norm.weight",
        &[s.n_embd as u64],
        ids::F32,
        f32_bytes(1.0, s.n_embd),
    )?;
    let t = GgmlType::Ternary(spec.format).id();
    let sub = arch != "llama";
    // 1/sqrt(K) keeps the outputs of random ternary layers near unit scale.
    let scale = |cols: usize| 1.0 / (cols as f32).sqrt();
    // A random ternary matrix of `rows` outputs × `cols` inputs (ggml dims: [cols, rows]).
    let mut matrix = |w: &mut GgufWriter<'_>, name: String, rows: usize, cols: usize| {
        let data = ternary_tensor(spec.format, rows, cols, scale(cols), &mut rng);
        w.add_tensor(name, &[cols as u64, rows as u64], t, data)
    };
    for i in 0..s.n_layer {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        let (e, ff) = (s.n_embd, s.n_ff);
        w.add_tensor(n("attn_norm"), &[e as u64], ids::F32, f32_bytes(1.0, e))?;
        matrix(&mut w, n("attn_q"), e, e)?;
        matrix(&mut w, n("attn_k"), kv, e)?;
        matrix(&mut w, n("attn_v"), kv, e)?;
        matrix(&mut w, n("attn_output"), e, e)?;
        if sub {
            w.add_tensor(n("attn_sub_norm"), &[e as u64], ids::F32, f32_bytes(1.0, e))?;
        }
        w.add_tensor(n("ffn_norm"), &[e as u64], ids::F32, f32_bytes(1.0, e))?;
        matrix(&mut w, n("ffn_gate"), ff, e)?;
        matrix(&mut w, n("ffn_up"), ff, e)?;
        matrix(&mut w, n("ffn_down"), e, ff)?;
        if sub {
            w.add_tensor(
                n("ffn_sub_norm"),
                &[ff as u64],
                ids::F32,
                f32_bytes(1.0, ff),
            )?;
        }
    }
    w.write_file(path)?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io(path, e))
}
