//! GPT-2 byte-level BPE as llama.cpp's `llm_tokenizer_bpe` does it.
//!
//! 1. Pre-tokenize: the regex list chosen by `tokenizer.ggml.pre` is applied in sequence; each
//!    regex splits every fragment from the previous step into matches and the text between them
//!    (both kept), as llama.cpp's `unicode_regex_split` does.
//! 2. Each fragment's bytes are mapped to GPT-2's printable characters (`Ġ` for space, …).
//! 3. With `ignore_merges` (llama3), a fragment that is itself a vocabulary entry is emitted whole.
//! 4. Otherwise its characters are merged pairwise by lowest merge rank (ties: the leftmost
//!    pair) until no listed merge applies; each piece is emitted, or its bytes one by one when it
//!    is not in the vocabulary.

use super::Tokenizer;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use fancy_regex::Regex;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's pattern (`gpt2`, `mpt`, `olmo`, `jais`, …).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's pattern (`llama3`, `llama-bpe`, `llama-v3`).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex list and merge policy for a `tokenizer.ggml.pre` value (FORMATS.md 5).
fn pre_tokenizer(pre: Option<&str>) -> (Vec<&'static str>, bool, Option<String>) {
    match pre {
        Some("llama3" | "llama-v3" | "llama-bpe") => (vec![LLAMA3], true, None),
        Some("gpt-2" | "gpt2" | "mpt" | "olmo" | "jais") => (vec![GPT2], false, None),
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva",
        ) => (vec![r"\p{N}", GPT2], false, None),
        Some("falcon") => (
            vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
            None,
        ),
        None | Some("default") => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            None,
        ),
        Some(other) => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            Some(format!(
                "unknown tokenizer.ggml.pre {other:?}: using the default pre-tokenizer"
            )),
        ),
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_encoder() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

/// The byte-level BPE state built from a GGUF vocabulary.
pub(super) struct Bpe {
    regexes: Vec<Regex>,
    ignore_merges: bool,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    encoder: [char; 256],
    decoder: HashMap<char, u8>,
    /// Why the default pre-tokenizer was chosen, if `pre` was not recognised.
    pub(super) warning: Option<String>,
}

impl Bpe {
    pub(super) fn new(
        file: &GgufFile,
        index: &HashMap<String, u32>,
        pre: Option<&str>,
    ) -> Result<Bpe> {
        let (patterns, ignore_merges, warning) = pre_tokenizer(pre);
        let regexes = patterns
            .iter()
            .map(|p| {
                Regex::new(p)
                    .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {p:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let list = file.get_array("tokenizer.ggml.merges").ok_or_else(|| {
            Error::Tokenizer(
                "missing key tokenizer.ggml.merges (required by gpt2 vocabularies)".into(),
            )
        })?;
        let mut merges = HashMap::with_capacity(list.len());
        for (rank, m) in list.strings().enumerate() {
            let m = m.map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.merges: {e}")))?;
            // "A B": split at the first space after index 0 (a merge side may itself be a space).
            let Some(sp) = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
            else {
                return Err(Error::Tokenizer(format!(
                    "merge #{rank} {m:?} has no separating space"
                )));
            };
            let (a, b) = (&m[..sp], &m[sp + 1..]);
            if let (Some(&l), Some(&r), Some(&both)) = (
                index.get(a),
                index.get(b),
                index.get(&m.replacen(' ', "", 1)),
            ) {
                merges.entry((l, r)).or_insert((rank as u32, both));
            }
        }
        let encoder = byte_encoder();
        let decoder = encoder
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Bpe {
            regexes,
            ignore_merges,
            merges,
            encoder,
            decoder,
            warning,
        })
    }

    /// Splits `text` by the regex list.
    fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut frags = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(frags.len() * 2);
            for f in frags {
                let mut last = 0;
                for m in re.find_iter(f).flatten() {
                    if m.start() > last {
                        next.push(&f[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(&f[m.start()..m.end()]);
                    }
                    last = m.end();
                }
                if last < f.len() {
                    next.push(&f[last..]);
                }
            }
            frags = next;
        }
        frags
    }

    /// Appends the ids of `text` to `out`.
    pub(super) fn encode(&self, tok: &Tokenizer, text: &str, out: &mut Vec<u32>) {
        for word in self.pre_tokenize(text) {
            let mapped: String = word.bytes().map(|b| self.encoder[b as usize]).collect();
            if self.ignore_merges
                && let Some(id) = tok.token_id(&mapped)
            {
                out.push(id);
                continue;
            }
            self.merge_word(tok, &mapped, out);
        }
    }

    fn merge_word(&self, tok: &Tokenizer, word: &str, out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            id: Option<u32>,
            start: usize,
            end: usize,
            prev: Option<usize>,
            next: Option<usize>,
            alive: bool,
        }
        #[derive(PartialEq, Eq)]
        struct Pair {
            rank: u32,
            left: usize,
            right: usize,
            merged: u32,
            left_id: u32,
            right_id: u32,
        }
        impl Ord for Pair {
            /// Max-heap order: lowest rank first, then the leftmost pair.
            fn cmp(&self, o: &Self) -> Ordering {
                o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Pair {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (at, c)) in word.char_indices().enumerate() {
            let end = at + c.len_utf8();
            syms.push(Sym {
                id: tok.token_id(&word[at..end]),
                start: at,
                end,
                prev: i.checked_sub(1),
                next: if end == word.len() { None } else { Some(i + 1) },
                alive: true,
            });
        }
        let mut heap = BinaryHeap::new();
        let pair = |syms: &[Sym], l: Option<usize>, r: Option<usize>| -> Option<Pair> {
            let (l, r) = (l?, r?);
            let (a, b) = (syms[l].id?, syms[r].id?);
            let &(rank, merged) = self.merges.get(&(a, b))?;
            Some(Pair {
                rank,
                left: l,
                right: r,
                merged,
                left_id: a,
                right_id: b,
            })
        };
        for i in 1..syms.len() {
            if let Some(p) = pair(&syms, Some(i - 1), Some(i)) {
                heap.push(p);
            }
        }
        while let Some(p) = heap.pop() {
            let (l, r) = (syms[p.left], syms[p.right]);
            // Skip pairs made stale by an earlier merge.
            if !l.alive
                || !r.alive
                || l.next != Some(p.right)
                || l.id != Some(p.left_id)
                || r.id != Some(p.right_id)
            {
                continue;
            }
            syms[p.left].id = Some(p.merged);
            syms[p.left].end = r.end;
            syms[p.left].next = r.next;
            syms[p.right].alive = false;
            if let Some(n) = r.next {
                syms[n].prev = Some(p.left);
            }
            let (prev, next) = (syms[p.left].prev, syms[p.left].next);
            if let Some(q) = pair(&syms, prev, Some(p.left)) {
                heap.push(q);
            }
            if let Some(q) = pair(&syms, Some(p.left), next) {
                heap.push(q);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(idx) = i {
            let s = syms[idx];
            match s.id {
                Some(id) => out.push(id),
                None => {
                    // Not a vocabulary entry: its characters' bytes one by one, where listed.
                    for c in word[s.start..s.end].chars() {
                        if let Some(id) = tok.token_id(c.encode_utf8(&mut [0u8; 4])) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    /// The bytes a byte-level token text stands for.
    pub(super) fn token_bytes(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.decoder.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
            }
        }
        out
    }
}
