//! An OpenAI-compatible HTTP server over an [`Engine`]: `POST /v1/completions`,
//! `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! One thread per connection (up to [`ServerOptions::max_connections`]; past it, 503 at once).
//! A streaming client that goes away cancels its request at the next token, freeing its slot.
//! Every client error is a 4xx with OpenAI's error object; nothing a client sends panics the
//! server (bodies are capped, JSON is parsed into values and checked field by field).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ternmux::backend::Device;
//! use ternmux::engine::{Engine, EngineOptions};
//! use ternmux::mux::Mux;
//! use ternmux::server::{Server, ServerOptions};
//! let mux = Mux::new(Device::Auto, 512 << 20)?;
//! mux.register("stories", "models/bitllama2c-stories3M-TQ2_0.gguf")?;
//! let engine = Arc::new(Engine::new(mux, EngineOptions::default())?);
//! let server = Server::bind(engine, "127.0.0.1:8080", ServerOptions::default())?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(); // until the process ends
//! # Ok::<(), ternmux::Error>(())
//! ```

pub mod api;
pub mod client;

use crate::chat::ChatFormat;
use crate::engine::{Engine, Event, Prompt, Waited};
use crate::error::{Error, Result};
use api::{ApiError, Endpoint, Head, Input};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Limits of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Requests handled at once (each on its own thread); past it, 503 at once.
    pub max_connections: usize,
    /// Largest request body accepted (413 past it).
    pub max_body: usize,
    /// Default `max_tokens` of `/v1/completions` (OpenAI's is 16).
    pub default_max_tokens: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 512,
            max_body: 4 << 20,
            default_max_tokens: 16,
        }
    }
}

/// A bound server (see the module docs).
pub struct Server {
    http: Arc<tiny_http::Server>,
    engine: Arc<Engine>,
    opts: ServerOptions,
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// A server running on its own thread; dropping it stops the server.
pub struct Running {
    http: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// Binds `addr` (e.g. `127.0.0.1:8080`; port 0 picks a free one).
    pub fn bind(engine: Arc<Engine>, addr: &str, opts: ServerOptions) -> Result<Server> {
        let http = tiny_http::Server::http(addr)
            .map_err(|e| Error::Engine(format!("cannot listen on {addr}: {e}")))?;
        let addr = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Engine(format!("{addr} is not an IP address")))?;
        Ok(Server {
            http: Arc::new(http),
            engine,
            opts,
            addr,
            active: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves on a thread of its own until the returned handle is dropped.
    pub fn spawn(self) -> Result<Running> {
        let (http, stop, addr) = (self.http.clone(), self.stop.clone(), self.addr);
        let thread = std::thread::Builder::new()
            .name("ternmux-http".into())
            .spawn(move || self.run())
            .map_err(|e| Error::Engine(format!("cannot start the server thread: {e}")))?;
        Ok(Running {
            http,
            stop,
            addr,
            thread: Some(thread),
        })
    }

    /// Serves until stopped (see [`Server::spawn`]) or the listener fails.
    pub fn run(self) {
        loop {
            let rq = match self.http.recv() {
                Ok(rq) => rq,
                Err(_) => break,
            };
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            if self.active.fetch_add(1, Ordering::AcqRel) >= self.opts.max_connections {
                self.active.fetch_sub(1, Ordering::AcqRel);
                let e = ApiError::new(503, "server_overloaded", "too many open requests");
                respond_json(rq, e.status, &e.body());
                continue;
            }
            let (engine, opts, active) =
                (self.engine.clone(), self.opts.clone(), self.active.clone());
            let spawned = std::thread::Builder::new()
                .name("ternmux-request".into())
                .spawn(move || {
                    handle(&engine, &opts, rq);
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                self.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

fn respond_json(rq: tiny_http::Request, status: u16, body: &Value) {
    respond(
        rq,
        status,
        "application/json",
        body.to_string().into_bytes(),
    );
}

fn respond(rq: tiny_http::Request, status: u16, content_type: &str, body: Vec<u8>) {
    let mut resp = tiny_http::Response::from_data(body).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
        resp.add_header(h);
    }
    if status == 429
        && let Ok(h) = tiny_http::Header::from_bytes("Retry-After", "1")
    {
        resp.add_header(h);
    }
    let _ = rq.respond(resp);
}

fn handle(engine: &Engine, opts: &ServerOptions, mut rq: tiny_http::Request) {
    let path = rq.url().split('?').next().unwrap_or("").to_string();
    let method = rq.method().clone();
    use tiny_http::Method::{Get, Post};
    match (method, path.as_str()) {
        (Get, "/health") => respond_json(
            rq,
            200,
            &json!({"status": "ok", "models": engine.models(), "load": engine.load()}),
        ),
        (Get, "/metrics") => respond(
            rq,
            200,
            "text/plain; version=0.0.4",
            engine.prometheus().into_bytes(),
        ),
        (Get, "/v1/models") => {
            let data: Vec<Value> = engine
                .models()
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "ternmux"}))
                .collect();
            respond_json(rq, 200, &json!({"object": "list", "data": data}));
        }
        (Post, "/v1/completions" | "/v1/chat/completions") => {
            let endpoint = if path == "/v1/completions" {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            };
            let mut body = Vec::new();
            let read = rq
                .as_reader()
                .take(opts.max_body as u64 + 1)
                .read_to_end(&mut body);
            if let Err(e) = read {
                let e = ApiError::new(400, "invalid_request_error", format!("reading body: {e}"));
                return respond_json(rq, e.status, &e.body());
            }
            if body.len() > opts.max_body {
                let e = ApiError::new(
                    413,
                    "invalid_request_error",
                    format!("the body is larger than {} bytes", opts.max_body),
                );
                return respond_json(rq, e.status, &e.body());
            }
            generate(engine, opts, endpoint, &body, rq);
        }
        (_, "/health" | "/metrics" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
            let e = ApiError::new(405, "invalid_request_error", "method not allowed");
            respond_json(rq, e.status, &e.body());
        }
        _ => {
            let e = ApiError::new(404, "invalid_request_error", format!("no route {path}"));
            respond_json(rq, e.status, &e.body());
        }
    }
}

/// Runs a completion and answers it: JSON, server-sent events, or an error object.
fn generate(
    engine: &Engine,
    opts: &ServerOptions,
    endpoint: Endpoint,
    body: &[u8],
    rq: tiny_http::Request,
) {
    let fail = |rq, e: ApiError| respond_json(rq, e.status, &e.body());
    let parsed = match api::parse(body, endpoint) {
        Ok(p) => p,
        Err(e) => return fail(rq, e),
    };
    let model = match engine.model(&parsed.model) {
        Ok(m) => m,
        Err(e) => return fail(rq, e.into()),
    };
    let n_ctx = engine.context_size(&parsed.model).unwrap_or(0);
    let prompt = match &parsed.input {
        Input::Text(t) => Prompt::Text {
            text: t.clone(),
            add_special: true,
            parse_special: false,
        },
        Input::Tokens(t) => Prompt::Tokens(t.clone()),
        Input::Messages(m) => {
            let format = ChatFormat::for_model(&model);
            match format.render(&model, m) {
                Ok(text) => Prompt::Text {
                    text,
                    add_special: !format.includes_bos(),
                    parse_special: true,
                },
                Err(e) => return fail(rq, e.into()),
            }
        }
    };
    let default_max = match endpoint {
        Endpoint::Completions => opts.default_max_tokens,
        // Chat replies run to an end-of-generation token or the context's end.
        Endpoint::Chat => n_ctx,
    };
    let (stream_mode, name) = (parsed.stream, parsed.model.clone());
    let req = parsed.request(prompt, default_max);
    let stream = match engine.submit(&name, req) {
        Ok(s) => s,
        Err(e) => return fail(rq, e.into()),
    };
    let head = Head::new(endpoint, &name);
    if !stream_mode {
        match stream.collect_text() {
            Ok(c) => {
                let body = head.complete(&c.text, c.reason, c.prompt_tokens, c.completion_tokens);
                respond_json(rq, 200, &body);
            }
            Err(e) => fail(rq, e.into()),
        }
        return;
    }
    // Server-sent events over a chunked response, flushed per token.
    let mut w = rq.into_writer();
    let started = w
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .and_then(|_| w.flush());
    if started.is_err() {
        return; // the client is gone; dropping the stream cancels
    }
    let mut first = true;
    loop {
        // A quiet stream (a long prompt, a page-in) still notices a client that went away.
        let ev = match stream.recv_timeout(Duration::from_secs(15)) {
            Waited::Event(ev) => ev,
            Waited::Ended => break,
            Waited::TimedOut => {
                if send_chunk(&mut w, b": keep-alive\n\n").is_err() {
                    return;
                }
                continue;
            }
        };
        let (data, last) = match ev {
            Event::Token { text, .. } => {
                if text.is_empty() && !first {
                    continue;
                }
                let chunk = head.chunk(Some(&text), first, None);
                first = false;
                (chunk, false)
            }
            Event::Done(f) => {
                if !f.tail.is_empty() {
                    let chunk = head.chunk(Some(&f.tail), first, None);
                    first = false;
                    if send_event(&mut w, &chunk).is_err() {
                        return;
                    }
                }
                let mut end = head.chunk(None, first, Some(f.reason));
                end["usage"] = json!({
                    "prompt_tokens": f.prompt_tokens,
                    "completion_tokens": f.completion_tokens,
                    "total_tokens": f.prompt_tokens + f.completion_tokens,
                });
                (end, true)
            }
            Event::Failed(e) => (ApiError::from(e).body(), true),
        };
        if send_event(&mut w, &data).is_err() {
            return; // client gone: the stream drops here and the request is cancelled
        }
        if last {
            break;
        }
    }
    let _ = send_chunk(&mut w, b"data: [DONE]\n\n");
    let _ = w.write_all(b"0\r\n\r\n").and_then(|_| w.flush());
}

fn send_event(w: &mut impl Write, data: &Value) -> std::io::Result<()> {
    send_chunk(w, format!("data: {data}\n\n").as_bytes())
}

fn send_chunk(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    write!(w, "{:x}\r\n", payload.len())?;
    w.write_all(payload)?;
    w.write_all(b"\r\n")?;
    w.flush()
}
