//! Generated tokens to released text: UTF-8 characters split across tokens are held until
//! complete, and text that may be the start of a stop string is held until it is known not to
//! be one. Shared by [`super::TokenStream`] and the engine's sequences.

use crate::tokenizer::{Tokenizer, Utf8Stream};

/// Text released token by token, ending at the first stop string.
pub struct TextOut<'t> {
    utf8: Utf8Stream<'t>,
    stop: Vec<String>,
    held: String,
    stopped: bool,
}

impl<'t> TextOut<'t> {
    /// Text following `prompt`: output starts the text only when the prompt holds no text token
    /// (e.g. BOS alone), so SPM's leading space is dropped only then.
    pub fn new(tok: &'t Tokenizer, prompt: &[u32], stop: Vec<String>) -> TextOut<'t> {
        let utf8 = if prompt.iter().all(|&t| tok.token_bytes(t, false).is_empty()) {
            Utf8Stream::new(tok)
        } else {
            Utf8Stream::continuing(tok)
        };
        TextOut {
            utf8,
            stop,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been produced (nothing more is released).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text token `id` releases: what cannot be the start of a stop string. On a stop
    /// string, the text before it, and [`TextOut::stopped`] turns true.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.utf8.push(id);
        self.held.push_str(&text);
        if self.stop.is_empty() {
            return std::mem::take(&mut self.held);
        }
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// Whatever is still held back, at the end of generation (nothing after a stop string).
    pub fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut s = std::mem::take(&mut self.held);
        s.push_str(&self.utf8.finish());
        s
    }
}
