//! Chat prompts: turning a conversation into the text a model was trained on.
//!
//! * BitNet b1.58 2B-4T (FORMATS.md 5): `<|begin_of_text|>` then per message `System: `,
//!   `User: ` or `Assistant: ` + content + `<|eot_id|>`, generation after `Assistant: `. Used when
//!   the GGUF's template is the known placeholder (`BITNETAssistant`) or absent on a
//!   `bitnet-b1.58` model.
//! * Any other GGUF with `tokenizer.chat_template`: the Jinja template, rendered with minijinja
//!   (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).
//! * No template: a plain `User:` / `Assistant:` transcript.

use crate::error::{Error, Result};
use crate::model::{GenerateOptions, KvCache, Logits, Model, StopReason};
use crate::sampling::Sampler;
use crate::tokenizer::Utf8Stream;

/// A message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with a role.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a model formats conversations.
#[derive(Clone, Debug)]
pub enum ChatFormat {
    /// BitNet b1.58 2B-4T's form.
    Bitnet,
    /// A Jinja template from the GGUF.
    Template(String),
    /// `User: …` / `Assistant: …` lines.
    Plain,
}

impl ChatFormat {
    /// The format for `model`.
    pub fn for_model(model: &Model) -> ChatFormat {
        let template = model.file().get_str("tokenizer.chat_template");
        match template {
            Some(t) if t.contains("BITNETAssistant") || t.trim().is_empty() => ChatFormat::Bitnet,
            Some(t) => ChatFormat::Template(t.to_string()),
            None if model.config.arch == crate::model::Arch::BitnetB158 => ChatFormat::Bitnet,
            None => ChatFormat::Plain,
        }
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    /// Control tokens are written as text: tokenize with `parse_special = true`.
    pub fn render(&self, model: &Model, messages: &[Message]) -> Result<String> {
        let tok = &model.tokenizer;
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        match self {
            ChatFormat::Bitnet => {
                let mut s = text(tok.bos());
                for m in messages {
                    let role = match m.role.as_str() {
                        "system" => "System",
                        "assistant" => "Assistant",
                        _ => "User",
                    };
                    s.push_str(&format!("{role}: {}<|eot_id|>", m.content));
                }
                s.push_str("Assistant: ");
                Ok(s)
            }
            ChatFormat::Plain => {
                let mut s = String::new();
                for m in messages {
                    let role = if m.role == "assistant" {
                        "Assistant"
                    } else if m.role == "system" {
                        "System"
                    } else {
                        "User"
                    };
                    s.push_str(&format!("{role}: {}\n", m.content));
                }
                s.push_str("Assistant:");
                Ok(s)
            }
            ChatFormat::Template(t) => {
                let mut env = minijinja::Environment::new();
                env.add_function(
                    "raise_exception",
                    |msg: String| -> std::result::Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template("chat", t)
                    .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
                let tmpl = env
                    .get_template("chat")
                    .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
                tmpl.render(minijinja::context! {
                    messages => messages
                        .iter()
                        .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
                        .collect::<Vec<_>>(),
                    add_generation_prompt => true,
                    bos_token => text(tok.bos()),
                    eos_token => text(tok.eos()),
                })
                .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
            }
        }
    }

    /// Whether the rendered prompt already holds BOS (so it must not be added again).
    pub fn includes_bos(&self) -> bool {
        !matches!(self, ChatFormat::Plain)
    }
}

/// A conversation with a model that keeps its KV cache between turns: each turn only runs the
/// tokens after the longest prefix already cached.
pub struct Chat<'m> {
    model: &'m Model,
    format: ChatFormat,
    messages: Vec<Message>,
    cache: KvCache,
    cached: Vec<u32>,
    opts: GenerateOptions,
    sampler: Sampler,
}

/// One reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The assistant's text.
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Prompt tokens that had to be run (the rest came from the cache).
    pub new_prompt_tokens: usize,
    /// Why the reply ended.
    pub stop: StopReason,
}

impl<'m> Chat<'m> {
    /// A new conversation (`opts.n_ctx` 0 means the model's context, at most 4096). Fails when
    /// the model's device cannot hold the KV cache.
    pub fn new(model: &'m Model, opts: GenerateOptions) -> crate::Result<Chat<'m>> {
        let n_ctx = if opts.n_ctx == 0 {
            model.config.n_ctx_train.min(4096)
        } else {
            opts.n_ctx
        };
        Ok(Chat {
            model,
            format: ChatFormat::for_model(model),
            messages: Vec::new(),
            cache: KvCache::new(model, n_ctx, opts.kv_type)?,
            cached: Vec::new(),
            sampler: Sampler::new(opts.sampling.clone()),
            opts,
        })
    }

    /// The chat format in use.
    pub fn format(&self) -> &ChatFormat {
        &self.format
    }

    /// Adds a system message.
    pub fn system(&mut self, text: &str) {
        self.messages.push(Message::new("system", text));
    }

    /// Sends a user message and streams the reply through `on_text` (return `false` to stop).
    pub fn say(&mut self, user: &str, mut on_text: impl FnMut(&str) -> bool) -> Result<Reply> {
        self.messages.push(Message::new("user", user));
        let prompt = self.format.render(self.model, &self.messages)?;
        let tok = &self.model.tokenizer;
        let ids = tok.encode(&prompt, !self.format.includes_bos(), true);
        let common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        self.cache.truncate(common);
        self.cached.truncate(common);
        let mut logits = self
            .model
            .forward(&mut self.cache, &ids[common..], Logits::Last)?;
        self.cached.extend_from_slice(&ids[common..]);
        let mut text = String::new();
        let mut utf8 = Utf8Stream::continuing(tok);
        let mut stop = StopReason::MaxTokens;
        let mut n = 0;
        while n < self.opts.max_tokens {
            let id = self.sampler.sample(&logits, &self.cached);
            n += 1;
            if tok.is_eog(id) {
                stop = StopReason::EndOfGeneration;
                break;
            }
            let piece = utf8.push(id);
            text.push_str(&piece);
            if !on_text(&piece) {
                stop = StopReason::Cancelled;
                break;
            }
            if self.cache.len() >= self.cache.capacity() {
                stop = StopReason::ContextFull;
                break;
            }
            logits = self.model.forward(&mut self.cache, &[id], Logits::Last)?;
            self.cached.push(id);
        }
        let rest = utf8.finish();
        on_text(&rest);
        text.push_str(&rest);
        self.messages.push(Message::new("assistant", text.trim()));
        Ok(Reply {
            text,
            tokens: n,
            new_prompt_tokens: ids.len() - common,
            stop,
        })
    }
}
