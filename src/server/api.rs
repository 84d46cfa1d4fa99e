//! The OpenAI wire format: request fields read leniently (unknown fields ignored, as OpenAI's
//! clients send many), checked strictly (a wrong type or value is a 400 naming the field), and
//! the response, chunk and error objects with OpenAI's field names.

use crate::chat::Message;
use crate::engine::{Prompt, Request};
use crate::model::StopReason;
use crate::sampling::SamplingParams;
use serde_json::{Value, json};

/// An error answer: HTTP status and OpenAI's `{"error": {...}}` object.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`.
    pub kind: &'static str,
    /// `error.message`.
    pub message: String,
    /// `error.param`: the offending field, if one.
    pub param: Option<&'static str>,
    /// `error.code`.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about field `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }
    /// Any status with a type and message.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> ApiError {
        use crate::Error as E;
        match &e {
            E::Busy(_) => ApiError::new(429, "server_overloaded", e.to_string()),
            E::Context { .. } => ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::new(400, "invalid_request_error", e.to_string())
            },
            E::Request(_) | E::Tokenizer(_) => {
                ApiError::new(400, "invalid_request_error", e.to_string())
            }
            E::Mux(m) if m.starts_with("no model named") => ApiError {
                code: Some("model_not_found"),
                ..ApiError::new(404, "invalid_request_error", e.to_string())
            },
            _ => ApiError::new(500, "server_error", e.to_string()),
        }
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// A parsed completion or chat request.
#[derive(Debug)]
pub struct Parsed {
    /// `model`.
    pub model: String,
    /// `stream`.
    pub stream: bool,
    /// `max_tokens` if given (`max_completion_tokens` for chat).
    pub max_tokens: Option<usize>,
    /// The prompt: text or tokens (completions) or messages (chat).
    pub input: Input,
    /// Sampling.
    pub sampling: SamplingParams,
    /// `stop`.
    pub stop: Vec<String>,
    /// `ignore_eos` (vLLM's extension, for benchmarks).
    pub ignore_eos: bool,
}

/// The prompt of a request.
#[derive(Debug)]
pub enum Input {
    /// Completion text.
    Text(String),
    /// Completion token ids.
    Tokens(Vec<u32>),
    /// Chat messages.
    Messages(Vec<Message>),
}

fn num(v: &Value, field: &'static str) -> Result<Option<f64>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::invalid(field, format!("{field} must be a finite number"))),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} must be a number"),
        )),
    }
}

fn ranged(v: &Value, field: &'static str, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    let x = num(v, field)?.unwrap_or(default);
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(x)
}

fn count(v: &Value, field: &'static str) -> Result<Option<usize>, ApiError> {
    match num(v, field)? {
        None => Ok(None),
        Some(x) if x.fract() != 0.0 => Err(ApiError::invalid(
            field,
            format!("{field} must be an integer, got {x}"),
        )),
        Some(x) if x < 1.0 => Err(ApiError::invalid(
            field,
            format!("{field} must be at least 1, got {x}"),
        )),
        Some(x) => Ok(Some(x.min(u32::MAX as f64) as usize)),
    }
}

fn strings(v: &Value, field: &'static str) -> Result<Vec<String>, ApiError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(field, format!("{field} must hold strings only"))
                })
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} must be a string or an array of strings"),
        )),
    }
}

/// Reads a request body for `endpoint`.
pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "invalid_request_error", format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "the body must be a JSON object",
        ));
    }
    let model = match v.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ApiError::invalid("model", "model (a string) is required")),
    };
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "stream must be a boolean")),
    };
    if let Some(n) = count(&v, "n")?
        && n != 1
    {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    if v.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if matches!(v.get("logprobs"), Some(x) if !x.is_null() && x != &Value::Bool(false)) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    let input = match endpoint {
        Endpoint::Completions => match v.get("prompt") {
            Some(Value::String(s)) => Input::Text(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Input::Text(a[0].as_str().unwrap_or_default().to_string())
            }
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                let ids: Option<Vec<u32>> = a
                    .iter()
                    .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect();
                Input::Tokens(
                    ids.ok_or_else(|| ApiError::invalid("prompt", "token id out of range"))?,
                )
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "prompt must be a string, one string in an array, or an array of token ids",
                ));
            }
        },
        Endpoint::Chat => {
            let Some(Value::Array(msgs)) = v.get("messages") else {
                return Err(ApiError::invalid(
                    "messages",
                    "messages (an array) is required",
                ));
            };
            if msgs.is_empty() {
                return Err(ApiError::invalid("messages", "messages is empty"));
            }
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid("messages", "each message needs a role (a string)")
                })?;
                if !matches!(role, "system" | "developer" | "user" | "assistant") {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("unknown role {role:?} (system, developer, user, assistant)"),
                    ));
                }
                let content = match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    // Content parts: the text parts, joined.
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(""),
                    None | Some(Value::Null) => String::new(),
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "messages",
                            "message content must be a string or an array of text parts",
                        ));
                    }
                };
                let role = if role == "developer" { "system" } else { role };
                out.push(Message::new(role, content));
            }
            Input::Messages(out)
        }
    };
    let max_tokens = match endpoint {
        Endpoint::Chat => match count(&v, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => count(&v, "max_tokens")?,
        },
        Endpoint::Completions => count(&v, "max_tokens")?,
    };
    let d = SamplingParams::default();
    let temperature = ranged(&v, "temperature", 0.0, 2.0, 1.0)?;
    let top_p = ranged(&v, "top_p", 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be above 0"));
    }
    let top_k = ranged(&v, "top_k", 0.0, 1e9, d.top_k as f64)? as usize;
    let min_p = ranged(&v, "min_p", 0.0, 1.0, f64::from(d.min_p))?;
    let frequency_penalty = ranged(&v, "frequency_penalty", -2.0, 2.0, 0.0)?;
    let repeat_penalty = ranged(&v, "repeat_penalty", 0.01, 10.0, 1.0)?;
    let seed = match num(&v, "seed")? {
        Some(s) => s as i64 as u64,
        None => fresh_seed(),
    };
    let stop = strings(&v, "stop")?;
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(Parsed {
        model,
        stream,
        max_tokens,
        input,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repeat_penalty: repeat_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            seed,
            ..d
        },
        stop,
        ignore_eos: v
            .get("ignore_eos")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// A seed for a request that gave none (different per request).
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

impl Parsed {
    /// The engine request, with `prompt` already rendered for chat and `default_max` used when
    /// the client gave no limit.
    pub fn request(self, prompt: Prompt, default_max: usize) -> Request {
        Request {
            prompt,
            max_tokens: self.max_tokens.unwrap_or(default_max).max(1),
            sampling: self.sampling,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
        }
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

/// Identity of one response: id, creation time, model.
pub struct Head {
    /// `id`.
    pub id: String,
    /// `created` (Unix seconds).
    pub created: u64,
    /// `model`.
    pub model: String,
    /// The endpoint.
    pub endpoint: Endpoint,
}

impl Head {
    /// A new response identity.
    pub fn new(endpoint: Endpoint, model: &str) -> Head {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Head {
            id: format!(
                "{prefix}-{created:x}{:06x}",
                N.fetch_add(1, Ordering::Relaxed)
            ),
            created,
            model: model.to_string(),
            endpoint,
        }
    }

    /// The whole (non-streamed) response.
    pub fn complete(
        &self,
        text: &str,
        reason: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Value {
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
        };
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage,
        })
    }

    /// One streamed chunk: `text` so far new, `reason` on the last.
    pub fn chunk(&self, text: Option<&str>, role: bool, reason: Option<StopReason>) -> Value {
        let fr = reason.map(finish_reason);
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": fr}],
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": fr}],
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked() {
        let p = |s: &str| parse(s.as_bytes(), Endpoint::Completions);
        assert!(p("{").is_err());
        assert!(p("[]").is_err());
        assert_eq!(
            p(r#"{"model":"m","prompt":"x","max_tokens":-1}"#)
                .unwrap_err()
                .param,
            Some("max_tokens")
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":"x","temperature":"hot"}"#)
                .unwrap_err()
                .param,
            Some("temperature")
        );
        assert!(p(r#"{"prompt":"x"}"#).is_err());
        assert!(p(r#"{"model":"m","prompt":{"a":1}}"#).is_err());
        let ok =
            p(r#"{"model":"m","prompt":[1,2,3],"max_tokens":5,"stop":"\n","seed":7}"#).unwrap();
        assert!(matches!(ok.input, Input::Tokens(ref t) if t == &[1, 2, 3]));
        assert_eq!(ok.stop, vec!["\n".to_string()]);
        assert_eq!(ok.sampling.seed, 7);
        let chat = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":3}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(chat.max_tokens, Some(3));
        assert!(
            parse(
                br#"{"model":"m","messages":[{"role":"robot","content":"hi"}]}"#,
                Endpoint::Chat
            )
            .is_err()
        );
    }
}
