//! Model hyper-parameters from GGUF metadata (FORMATS.md 4), with llama.cpp's defaults.
//!
//! Keys are prefixed by `general.architecture` (`llama.embedding_length`,
//! `bitnet-b1.58.block_count`, …). Required keys (as llama.cpp requires them): context length,
//! embedding length, block count, feed-forward length, head count, RMS epsilon. Defaults:
//! `head_count_kv = head_count`, `rope.dimension_count = n_embd / n_head`,
//! `rope.freq_base = 10000`, vocabulary size = number of tokenizer tokens.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The supported graph families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Plain llama (SiLU FFN, normal RoPE, no sub-norms); any TQ/I2_S-quantized llama model.
    Llama,
    /// llama.cpp's `bitnet` (1bitLLM): sub-norms, NEOX RoPE, SiLU unless
    /// `bitnet.hidden_activation = relu2`, optional per-tensor `.scale`.
    Bitnet,
    /// BitNet b1.58 2B-4T (`bitnet-b1.58`, `bitnet-25`, `bitnet-1.58`): sub-norms, NEOX RoPE, ReLU².
    BitnetB158,
}

impl Arch {
    /// Maps `general.architecture`.
    pub fn parse(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "bitnet" => Arch::Bitnet,
            "bitnet-b1.58" | "bitnet-25" | "bitnet-1.58" => Arch::BitnetB158,
            _ => return None,
        })
    }
}

/// Feed-forward activation applied to the gate before multiplying by up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    /// `x · sigmoid(x)`.
    Silu,
    /// `max(x, 0)²`.
    Relu2,
}

/// Hyper-parameters of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `general.architecture` as written in the file.
    pub arch_name: String,
    /// Graph family.
    pub arch: Arch,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Training context length.
    pub n_ctx_train: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when < n_head).
    pub n_head_kv: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Dimensions rotated per head.
    pub n_rot: usize,
    /// NEOX (rotate-half) RoPE instead of interleaved pairs.
    pub rope_neox: bool,
    /// Feed-forward activation.
    pub ffn_act: FfnAct,
    /// Whether blocks carry `attn_sub_norm` / `ffn_sub_norm`.
    pub sub_norms: bool,
}

fn key_u(file: &GgufFile, arch: &str, key: &str) -> Result<Option<usize>> {
    let full = format!("{arch}.{key}");
    match file.get(&full) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| Error::Gguf(format!("key {full}: {n} does not fit usize"))),
            // llama.cpp accepts a per-layer array for some keys; we need one value per model.
            None => match v.as_array() {
                Some(a) => {
                    let vals: Vec<u64> = a
                        .iter()
                        .filter_map(|x| x.ok().and_then(|x| x.as_u64()))
                        .collect();
                    match vals.first() {
                        Some(&first) if vals.iter().all(|&x| x == first) => {
                            Ok(Some(first as usize))
                        }
                        _ => Err(Error::Gguf(format!(
                            "key {full}: per-layer values differ; not supported"
                        ))),
                    }
                }
                None => Err(Error::Gguf(format!(
                    "key {full}: expected an integer, found {}",
                    v.value_type().name()
                ))),
            },
        },
    }
}

fn required(v: Option<usize>, arch: &str, key: &str) -> Result<usize> {
    match v {
        Some(0) => Err(Error::Gguf(format!("key {arch}.{key} is 0"))),
        Some(n) => Ok(n),
        None => Err(Error::Gguf(format!("missing key {arch}.{key}"))),
    }
}

fn key_f(file: &GgufFile, arch: &str, key: &str) -> Result<Option<f32>> {
    let full = format!("{arch}.{key}");
    match file.get(&full) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
            Error::Gguf(format!(
                "key {full}: expected a number, found {}",
                v.value_type().name()
            ))
        }),
    }
}

impl Config {
    /// Reads the configuration; errors name the key that is missing or wrong.
    pub fn from_gguf(file: &GgufFile) -> Result<Config> {
        let arch_name = file
            .architecture()
            .ok_or_else(|| Error::Gguf("missing key general.architecture".into()))?
            .to_string();
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            Error::Gguf(format!(
                "unknown architecture {arch_name:?} (supported: llama, bitnet, bitnet-b1.58, bitnet-25, bitnet-1.58)"
            ))
        })?;
        let a = arch_name.as_str();
        let n_embd = required(key_u(file, a, "embedding_length")?, a, "embedding_length")?;
        let n_layer = required(key_u(file, a, "block_count")?, a, "block_count")?;
        let n_ff = required(
            key_u(file, a, "feed_forward_length")?,
            a,
            "feed_forward_length",
        )?;
        let n_head = required(
            key_u(file, a, "attention.head_count")?,
            a,
            "attention.head_count",
        )?;
        let n_ctx_train = required(key_u(file, a, "context_length")?, a, "context_length")?;
        let n_head_kv = key_u(file, a, "attention.head_count_kv")?.unwrap_or(n_head);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::Gguf(format!(
                "{a}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}"
            )));
        }
        if n_embd % n_head != 0 {
            return Err(Error::Gguf(format!(
                "{a}.embedding_length {n_embd} is not a multiple of head_count {n_head}"
            )));
        }
        let head_dim = n_embd / n_head;
        let n_rot = key_u(file, a, "rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::Gguf(format!(
                "{a}.rope.dimension_count {n_rot} must be even and at most the head size {head_dim}"
            )));
        }
        let rms_eps = key_f(file, a, "attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            Error::Gguf(format!("missing key {a}.attention.layer_norm_rms_epsilon"))
        })?;
        let rope_base = key_f(file, a, "rope.freq_base")?.unwrap_or(10000.0);
        let n_vocab = match key_u(file, a, "vocab_size")? {
            Some(n) => n,
            None => file
                .get_array("tokenizer.ggml.tokens")
                .map(|t| t.len())
                .ok_or_else(|| {
                    Error::Gguf(format!(
                        "missing keys {a}.vocab_size and tokenizer.ggml.tokens"
                    ))
                })?,
        };
        let hidden = file.get_str(&format!("{a}.hidden_activation"));
        let ffn_act = match (arch, hidden) {
            (Arch::BitnetB158, _) | (_, Some("relu2")) => FfnAct::Relu2,
            _ => FfnAct::Silu,
        };
        Ok(Config {
            arch_name,
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            rms_eps,
            rope_base,
            n_rot,
            rope_neox: arch != Arch::Llama,
            ffn_act,
            sub_norms: arch != Arch::Llama,
        })
    }
}
