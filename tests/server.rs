//! The OpenAI-compatible server over loopback: concurrent streaming clients get the same text
//! as one request at a time, a client that hangs up frees its slot, a full queue answers 429,
//! bad requests get 4xx error objects, and /metrics is valid Prometheus text.

use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ternmux::backend::Device;
use ternmux::engine::{Engine, EngineOptions};
use ternmux::model::{GenerateOptions, Model};
use ternmux::mux::Mux;
use ternmux::server::client::{post_events, request};
use ternmux::server::{Running, Server, ServerOptions};

const BUNDLED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/bitllama2c-stories3M-TQ2_0.gguf"
);

fn start(opts: EngineOptions) -> (Running, String) {
    let mux = Mux::new(Device::Cpu, 64 << 20).unwrap();
    mux.register("stories", BUNDLED).unwrap();
    let engine = Arc::new(Engine::new(mux, opts).unwrap());
    let server = Server::bind(engine, "127.0.0.1:0", ServerOptions::default())
        .unwrap()
        .spawn()
        .unwrap();
    let url = format!("http://{}", server.local_addr());
    (server, url)
}

fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = request(url, "POST", path, Some(body.to_string().as_bytes())).unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// Streams a completion; returns the concatenated text and the finish reason.
fn stream_text(url: &str, prompt: &str, max_tokens: usize) -> (String, String) {
    let body = json!({"model": "stories", "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "stream": true});
    let mut text = String::new();
    let mut reason = String::new();
    let mut done = false;
    let r = post_events(url, "/v1/completions", body.to_string().as_bytes(), |d| {
        if d == "[DONE]" {
            done = true;
            return false;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "text_completion");
        text.push_str(v["choices"][0]["text"].as_str().unwrap());
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            reason = f.to_string();
        }
        true
    })
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(done, "no [DONE]");
    (text, reason)
}

fn metric(url: &str, name: &str) -> f64 {
    let r = request(url, "GET", "/metrics", None).unwrap();
    r.text()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn concurrent_streams_equal_one_at_a_time() {
    let prompts = [
        "Once upon a time",
        "The little dog",
        "Lily and Ben went to the park. They",
        "One day, a big red ball",
        "Tom was sad because",
        "Mom said",
    ];
    let model = Model::open(BUNDLED).unwrap();
    let opts = GenerateOptions {
        max_tokens: 40,
        ..GenerateOptions::default()
    };
    let want: Vec<String> = prompts
        .iter()
        .map(|p| model.generate(p, &opts, |_| true).unwrap().text)
        .collect();
    let (_server, url) = start(EngineOptions {
        max_seqs: 4,
        prefill_chunk: 4,
        ..EngineOptions::default()
    });
    let got: Vec<(String, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let url = url.clone();
                s.spawn(move || stream_text(&url, p, 40))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((text, reason), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(text, w, "prompt {i}");
        assert!(reason == "length" || reason == "stop", "{reason}");
    }
    // The same through the non-streaming endpoint.
    let (st, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": "stories", "prompt": prompts[0], "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(st, 200);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want[0]);
    assert_eq!(v["usage"]["completion_tokens"], 40);
    // Batching happened.
    assert!(metric(&url, "ternmux_batch_rows_total") > metric(&url, "ternmux_batch_steps_total"));
}

#[test]
fn chat_models_and_health() {
    let (_server, url) = start(EngineOptions::default());
    let (st, v) = post(
        &url,
        "/v1/chat/completions",
        &json!({"model": "stories", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a story."}]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    // Streamed chat: a role delta first, then content deltas, then a finish reason.
    let body = json!({"model": "stories", "max_tokens": 6, "stream": true, "temperature": 0,
                      "messages": [{"role": "user", "content": "Hi"}]});
    let mut chunks = Vec::new();
    post_events(
        &url,
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        |d| {
            if d != "[DONE]" {
                chunks.push(serde_json::from_str::<Value>(d).unwrap());
            }
            d != "[DONE]"
        },
    )
    .unwrap();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    let r = request(&url, "GET", "/v1/models", None).unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["data"][0]["id"], "stories");
    let r = request(&url, "GET", "/health", None).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn bad_requests_get_4xx_error_objects() {
    let (_server, url) = start(EngineOptions::default());
    let raw = |method: &str, path: &str, body: &[u8]| {
        let r = request(&url, method, path, Some(body)).unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    };
    let long = "word ".repeat(3000);
    let cases: Vec<(u16, (u16, Value))> = vec![
        (400, raw("POST", "/v1/completions", b"{not json")),
        (400, raw("POST", "/v1/completions", b"[1,2]")),
        (400, raw("POST", "/v1/completions", &[0xff, 0xfe, 0x00])),
        (
            404,
            post(
                &url,
                "/v1/completions",
                &json!({"model": "nope", "prompt": "x"}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/completions",
                &json!({"model": "stories", "prompt": long}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/completions",
                &json!({"model": "stories", "prompt": "x", "max_tokens": -5}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/completions",
                &json!({"model": "stories", "prompt": "x", "temperature": -1}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/completions",
                &json!({"model": "stories", "prompt": [1, 99999999]}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/chat/completions",
                &json!({"model": "stories", "messages": []}),
            ),
        ),
        (
            400,
            post(
                &url,
                "/v1/chat/completions",
                &json!({"model": "stories", "messages": "hi"}),
            ),
        ),
        (404, raw("POST", "/v2/everything", b"{}")),
        (405, raw("DELETE", "/v1/completions", b"")),
        (
            413,
            raw("POST", "/v1/completions", &vec![b' '; (4 << 20) + 10]),
        ),
    ];
    for (i, (want, (got, v))) in cases.into_iter().enumerate() {
        assert_eq!(got, want, "case {i}: {v}");
        assert!(v["error"]["message"].is_string(), "case {i}: {v}");
        assert!(v["error"]["type"].is_string(), "case {i}: {v}");
    }
    let (_, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": "stories", "prompt": long}),
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Still serving.
    let (st, _) = post(
        &url,
        "/v1/completions",
        &json!({"model": "stories", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}

#[test]
fn hanging_up_frees_the_slot_and_a_full_queue_is_429() {
    // A long context so A's generation (up to 4096 tokens) outlasts the checks below.
    let (_server, url) = start(EngineOptions {
        max_seqs: 1,
        queue: 1,
        n_ctx: 4096,
        ..EngineOptions::default()
    });
    // A: a long stream that takes the only slot; it reads two events, waits for `go`, reads
    // eight more and hangs up mid-stream.
    let url_a = url.clone();
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let a = std::thread::spawn(move || {
        let body = json!({"model": "stories", "prompt": "Once", "max_tokens": 100000,
                          "temperature": 0, "stream": true, "ignore_eos": true});
        let mut n = 0;
        post_events(
            &url_a,
            "/v1/completions",
            body.to_string().as_bytes(),
            |_| {
                n += 1;
                if n == 2 {
                    let _ = started_tx.send(());
                    let _ = go_rx.recv_timeout(Duration::from_secs(60));
                }
                n < 10
            },
        )
        .unwrap();
        n
    });
    started.recv_timeout(Duration::from_secs(30)).unwrap();
    // B waits in the only queue place.
    let url_b = url.clone();
    let b = std::thread::spawn(move || {
        post(
            &url_b,
            "/v1/completions",
            &json!({"model": "stories", "prompt": "The dog",
                  "max_tokens": 300, "temperature": 0, "ignore_eos": true}),
        )
    });
    let t = Instant::now();
    while metric(&url, "ternmux_queue_length") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "B never queued");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(metric(&url, "ternmux_running_sequences"), 1.0);
    // C finds the slot and the queue taken: busy at once.
    let (st, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": "stories", "prompt": "x"}),
    );
    assert_eq!(st, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("retry"));
    go.send(()).unwrap();
    assert_eq!(a.join().unwrap(), 10);
    // A hung up: its slot went to B, which finishes.
    let (st, v) = b.join().unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 300);
    let t = Instant::now();
    while metric(&url, "ternmux_running_sequences") != 0.0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        metric(
            &url,
            "ternmux_requests_total{model=\"stories\",outcome=\"cancelled\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &url,
            "ternmux_requests_total{model=\"stories\",outcome=\"rejected\"}"
        ),
        1.0
    );
}

/// Prometheus text exposition 0.0.4: comments, then `name{labels} value` samples; every
/// histogram's buckets rise and end at +Inf = count.
#[test]
fn metrics_are_prometheus_text() {
    let (_server, url) = start(EngineOptions::default());
    stream_text(&url, "Once upon a time", 12);
    let r = request(&url, "GET", "/metrics", None).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    let mut types = std::collections::HashMap::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment {line}");
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name {name}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair.split_once("=\"").expect(line);
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        if name.ends_with("_bucket") {
            let model = series.split("le=").next().unwrap().to_string();
            if let Some((m, prev)) = &last_bucket
                && *m == model
            {
                assert!(value >= *prev, "buckets fall: {line}");
            }
            last_bucket = Some((model, value));
        }
        if name.ends_with("_count") && family != name {
            let inf = format!(
                "{family}_bucket{}",
                series
                    .strip_prefix(name)
                    .unwrap()
                    .replace('}', ",le=\"+Inf\"}")
            );
            let want = text.lines().find(|l| l.starts_with(&inf)).expect(&inf);
            assert_eq!(
                want.rsplit(' ').next().unwrap().parse::<f64>().unwrap(),
                value
            );
        }
    }
    assert!(metric(&url, "ternmux_generated_tokens_total") >= 12.0);
    assert!(metric(&url, "ternmux_time_to_first_token_seconds_count") >= 1.0);
    assert!(metric(&url, "ternmux_mux_page_ins_total") >= 1.0);
    // Passes asked the multiplexer for units, and that took time.
    assert!(metric(&url, "ternmux_mux_acquire_seconds_total") > 0.0);
}
