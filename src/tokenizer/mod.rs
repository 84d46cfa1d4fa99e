//! Tokenizers built from GGUF metadata (FORMATS.md 5), matching llama.cpp's `llama-vocab.cpp`
//! token for token: SentencePiece-style (`llama`) and GPT-2 byte-level BPE (`gpt2`) with the
//! `llama3`/`llama-bpe`, `gpt-2`, `default` and other pre-tokenizer regex lists.
//!
//! Special tokens (control, user-defined, unknown) are split out of the raw text first, longest
//! match first; control and unknown tokens only when the caller asks to parse specials (a prompt
//! template), user-defined ones always. Decoding returns bytes; [`Utf8Stream`] turns a token
//! stream into text that never splits a UTF-8 character across two chunks.

mod bpe;
mod spm;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use std::collections::HashMap;

/// Token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// 0 or unknown values.
    Undefined,
    /// 1
    Normal,
    /// 2
    Unknown,
    /// 3: `<s>`, `<|eot_id|>`, …
    Control,
    /// 4: matched in raw text always.
    UserDefined,
    /// 5
    Unused,
    /// 6: `<0xAB>`.
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Which algorithm the vocabulary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SentencePiece (`tokenizer.ggml.model = llama`).
    Spm,
    /// GPT-2 byte-level BPE (`gpt2`).
    Bpe,
}

/// A tokenizer: vocabulary, special tokens and the algorithm.
pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    index: HashMap<String, u32>,
    /// Special tokens matched in raw text, longest first: (text, id, only-when-parsing-specials).
    specials: Vec<(String, u32, bool)>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    bpe: Option<bpe::Bpe>,
}

fn opt_id(file: &GgufFile, key: &str) -> Option<u32> {
    file.get_u64(key).and_then(|v| u32::try_from(v).ok())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` keys.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| Error::Tokenizer("missing key tokenizer.ggml.model".into()))?;
        let kind = match model {
            "llama" => Kind::Spm,
            "gpt2" => Kind::Bpe,
            other => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer model {other:?} is not supported (supported: llama, gpt2)"
                )));
            }
        };
        let toks = file
            .get_array("tokenizer.ggml.tokens")
            .ok_or_else(|| Error::Tokenizer("missing key tokenizer.ggml.tokens".into()))?;
        let tokens: Vec<String> = toks
            .strings()
            .map(|s| s.map(str::to_owned))
            .collect::<Result<_>>()
            .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.tokens: {e}")))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(Error::Tokenizer(format!("vocabulary of {n} tokens")));
        }
        let scores: Vec<f32> = match file.get_array("tokenizer.ggml.scores") {
            Some(a) => a
                .iter()
                .map(|v| v.ok().and_then(|v| v.as_f64()).unwrap_or(0.0) as f32)
                .collect(),
            None => vec![0.0; n],
        };
        let types: Vec<TokenType> = match file.get_array("tokenizer.ggml.token_type") {
            Some(a) => a
                .iter()
                .map(|v| {
                    let x = v.ok().and_then(|v| v.as_f64()).unwrap_or(1.0);
                    TokenType::from_i64(x as i64)
                })
                .collect(),
            None => vec![TokenType::Normal; n],
        };
        if scores.len() != n || types.len() != n {
            return Err(Error::Tokenizer(format!(
                "tokenizer arrays disagree: {n} tokens, {} scores, {} types",
                scores.len(),
                types.len()
            )));
        }
        let mut index = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            index.entry(t.clone()).or_insert(i as u32);
        }
        let check = |id: Option<u32>, key: &str| -> Result<Option<u32>> {
            match id {
                Some(v) if v as usize >= n => Err(Error::Tokenizer(format!(
                    "{key} {v} is outside the vocabulary of {n}"
                ))),
                other => Ok(other),
            }
        };
        let pre = file.get_str("tokenizer.ggml.pre");
        let (def_bos, def_eos, def_unk, def_add_bos, def_space) = match kind {
            Kind::Spm => (Some(1), Some(2), Some(0), true, true),
            // llama3-style vocabularies add BOS; GPT-2 ones do not.
            Kind::Bpe => (
                None,
                None,
                None,
                matches!(pre, Some("llama3" | "llama-v3" | "llama-bpe")),
                false,
            ),
        };
        let bos = check(
            opt_id(file, "tokenizer.ggml.bos_token_id").or(def_bos),
            "tokenizer.ggml.bos_token_id",
        )?;
        let eos = check(
            opt_id(file, "tokenizer.ggml.eos_token_id").or(def_eos),
            "tokenizer.ggml.eos_token_id",
        )?;
        let unk = check(
            opt_id(file, "tokenizer.ggml.unknown_token_id").or(def_unk),
            "tokenizer.ggml.unknown_token_id",
        )?;
        let mut eog: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = check(opt_id(file, key), key)? {
                eog.push(id);
            }
        }
        if let Some(e) = eos {
            eog.push(e);
        }
        for (i, t) in tokens.iter().enumerate() {
            if matches!(
                t.as_str(),
                "<|eot_id|>"
                    | "<|eom_id|>"
                    | "<|end_of_text|>"
                    | "<|end|>"
                    | "<|im_end|>"
                    | "<end_of_turn>"
                    | "<|endoftext|>"
            ) && types[i] == TokenType::Control
            {
                eog.push(i as u32);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let bpe = match kind {
            Kind::Bpe => Some(bpe::Bpe::new(file, &index, pre)?),
            Kind::Spm => None,
        };
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(def_add_bos);
        let add_eos = file
            .get("tokenizer.ggml.add_eos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let add_space_prefix = file
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.as_bool())
            .unwrap_or(def_space);
        let mut specials: Vec<(String, u32, bool)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !t.is_empty()
                    && matches!(
                        types[*i],
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, t)| (t.clone(), i as u32, types[i] != TokenType::UserDefined))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Tokenizer {
            kind,
            tokens,
            scores,
            types,
            index,
            specials,
            bos,
            eos,
            unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            bpe,
        })
    }

    /// A note about how the vocabulary was interpreted (e.g. an unknown pre-tokenizer name).
    pub fn warning(&self) -> Option<&str> {
        self.bpe.as_ref().and_then(|b| b.warning.as_deref())
    }
    /// The algorithm.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// Whether the vocabulary is empty (never, for a loaded tokenizer).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    /// Whether `id` ends generation (eos, eot, eom and the usual end-of-turn texts).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
    /// A token's text as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    /// The id of a vocabulary entry.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// Tokenizes `text`, adding BOS/EOS as the vocabulary asks when `add_special`, matching
    /// control tokens in the text when `parse_special`.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special
            && self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        let mut prev_special = true; // the start of text counts as following a special
        for frag in self.split_specials(text, parse_special) {
            match frag {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match &self.bpe {
                        Some(b) => b.encode(self, t, &mut out),
                        None => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            spm::encode(self, &s.replace(' ', "\u{2581}"), &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special
            && self.add_eos
            && let Some(e) = self.eos
        {
            out.push(e);
        }
        out
    }

    fn split_specials<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = Vec::new();
        let mut start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        'outer: while i < bytes.len() {
            for (s, id, control) in &self.specials {
                if (*control && !parse_special) || !text[i..].starts_with(s.as_str()) {
                    continue;
                }
                if start < i {
                    frags.push(Fragment::Text(&text[start..i]));
                }
                frags.push(Fragment::Special(*id));
                i += s.len();
                start = i;
                continue 'outer;
            }
            i += utf8_len(bytes[i]);
        }
        if start < text.len() {
            frags.push(Fragment::Text(&text[start..]));
        }
        frags
    }

    /// The bytes one token stands for. Control tokens give their text only when `special`.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown | TokenType::Unused => {
                if special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            TokenType::Normal | TokenType::Undefined => match &self.bpe {
                Some(b) => b.token_bytes(text),
                None => text.replace('\u{2581}', " ").into_bytes(),
            },
        }
    }

    /// Decodes a whole token sequence (lossy for invalid UTF-8), dropping control tokens and
    /// the space prefix SPM adds to the first word.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = Utf8Stream::new(self);
        let mut out = String::new();
        for &id in ids {
            out.push_str(&s.push(id));
        }
        out.push_str(&s.finish());
        out
    }

    fn byte_token(&self, b: u8) -> Option<u32> {
        self.index.get(&format!("<0x{b:02X}>")).copied()
    }

    fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Turns tokens into text as they arrive, holding back an incomplete UTF-8 character until
/// the token that completes it.
pub struct Utf8Stream<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
    first: bool,
}

impl<'t> Utf8Stream<'t> {
    /// A new stream whose first text token starts the text: SPM's space prefix on it is
    /// dropped, as llama.cpp's detokenizer does.
    pub fn new(tok: &'t Tokenizer) -> Self {
        Utf8Stream {
            tok,
            pending: Vec::new(),
            first: true,
        }
    }

    /// A new stream that continues existing text (a prompt): every space is kept.
    pub fn continuing(tok: &'t Tokenizer) -> Self {
        Utf8Stream {
            tok,
            pending: Vec::new(),
            first: false,
        }
    }

    /// Text completed by token `id` (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let mut b = self.tok.token_bytes(id, false);
        if b.is_empty() {
            return String::new();
        }
        if self.first {
            self.first = false;
            if self.tok.kind == Kind::Spm && self.tok.add_space_prefix && b.first() == Some(&b' ') {
                b.remove(0);
            }
        }
        self.pending.extend_from_slice(&b);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(), // incomplete tail: wait
            Err(e) => e.valid_up_to() + e.error_len().unwrap_or(1), // invalid: emit lossily
        };
        let done: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&done).into_owned()
    }

    /// Whatever is still held back (lossy).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}
