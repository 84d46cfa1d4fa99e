//! SentencePiece-style tokenization as llama.cpp's `llm_tokenizer_spm` does it: split into UTF-8
//! characters, then repeatedly merge the adjacent pair whose concatenation is a vocabulary entry
//! with the highest score (ties: the leftmost pair), then emit each final piece's id, or its
//! bytes as `<0xXX>` tokens when the piece is not in the vocabulary (byte fallback).

use super::{Tokenizer, utf8_len};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Max-heap order: higher score first, then the smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Appends the ids of `text` (spaces already replaced by U+2581) to `out`.
pub(super) fn encode(tok: &Tokenizer, text: &str, out: &mut Vec<u32>) {
    let bytes = text.as_bytes();
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut offs = 0;
    while offs < bytes.len() {
        let n = utf8_len(bytes[offs]).min(bytes.len() - offs);
        let idx = symbols.len();
        symbols.push(Symbol {
            start: offs,
            len: n,
            prev: idx.checked_sub(1),
            next: if offs + n == bytes.len() {
                None
            } else {
                Some(idx + 1)
            },
        });
        offs += n;
    }
    let mut queue = BinaryHeap::new();
    let try_add = |queue: &mut BinaryHeap<Bigram>,
                   symbols: &[Symbol],
                   left: Option<usize>,
                   right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let (a, b) = (symbols[l], symbols[r]);
        let piece = &bytes[a.start..b.start + b.len];
        let Ok(piece) = std::str::from_utf8(piece) else {
            return;
        };
        if let Some(id) = tok.token_id(piece) {
            queue.push(Bigram {
                score: tok.score(id),
                left: l,
                right: r,
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut queue, &symbols, Some(i - 1), Some(i));
    }
    while let Some(bg) = queue.pop() {
        let (l, r) = (symbols[bg.left], symbols[bg.right]);
        // Skip bigrams whose symbols have been merged since they were queued.
        if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
            continue;
        }
        symbols[bg.left].len += r.len;
        symbols[bg.right].len = 0;
        symbols[bg.left].next = r.next;
        if let Some(n) = r.next {
            symbols[n].prev = Some(bg.left);
        }
        let (prev, next) = (symbols[bg.left].prev, symbols[bg.left].next);
        try_add(&mut queue, &symbols, prev, Some(bg.left));
        try_add(&mut queue, &symbols, Some(bg.left), next);
    }
    let mut i = if symbols.is_empty() { None } else { Some(0) };
    while let Some(idx) = i {
        let s = symbols[idx];
        let piece = &bytes[s.start..s.start + s.len];
        match std::str::from_utf8(piece)
            .ok()
            .and_then(|p| tok.token_id(p))
        {
            Some(id) => out.push(id),
            None => {
                // Merged pieces are always vocabulary entries; only single characters fall back.
                for &b in piece {
                    if let Some(id) = tok.byte_token(b).or(tok.unk) {
                        out.push(id);
                    }
                }
            }
        }
        i = s.next;
    }
}
