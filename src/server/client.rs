//! A small blocking HTTP/1.1 client for the server's own tools: the concurrency benchmark
//! against a server URL and the loopback tests. Plain `http://` only; bodies by
//! `Content-Length`, chunked transfer or connection close; server-sent events read as they
//! arrive.

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `host:port` of an `http://host:port[/...]` URL (or of a bare `host:port`).
pub fn authority(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if url.starts_with("https://") {
        return Err(Error::Request("https is not supported; use http://".into()));
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(Error::Request(format!("{url:?} names no host")));
    }
    Ok(if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    })
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Engine(format!("http: {what}: {e}"))
}

fn send(
    host: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect(host).map_err(|e| io(&format!("connect {host}"), e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io("timeout", e))?;
    let _ = s.set_nodelay(true);
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: */*\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body.unwrap_or_default()))
        .map_err(|e| io("send", e))?;
    Ok(BufReader::new(s))
}

fn read_head(r: &mut BufReader<TcpStream>) -> Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| io("status line", e))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Engine(format!("http: bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| io("header", e))?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads a body, calling `on_bytes` with each piece as it arrives; stops early when it returns
/// false.
fn read_body(
    r: &mut BufReader<TcpStream>,
    headers: &[(String, String)],
    mut on_bytes: impl FnMut(&[u8]) -> bool,
) -> Result<()> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| io("chunk size", e))?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Error::Engine(format!("http: bad chunk size {line:?}")))?;
            if size == 0 {
                return Ok(());
            }
            let mut buf = vec![0u8; size + 2];
            r.read_exact(&mut buf).map_err(|e| io("chunk", e))?;
            if !on_bytes(&buf[..size]) {
                return Ok(());
            }
        }
    }
    if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).map_err(|e| io("body", e))?;
        on_bytes(&buf);
        return Ok(());
    }
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|e| io("body", e))?;
    on_bytes(&buf);
    Ok(())
}

/// One request and its whole response. `url` is `http://host:port`; `path` starts with `/`.
pub fn request(url: &str, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
    let host = authority(url)?;
    let mut r = send(&host, method, path, body, Duration::from_secs(600))?;
    let (status, headers) = read_head(&mut r)?;
    let mut out = Vec::new();
    read_body(&mut r, &headers, |b| {
        out.extend_from_slice(b);
        true
    })?;
    Ok(Response {
        status,
        headers,
        body: out,
    })
}

/// Posts `body` and reads a server-sent-events answer, calling `on_data` with each event's
/// `data:` payload as it arrives (return false to hang up, which cancels the request). A
/// non-200 answer is returned whole instead.
pub fn post_events(
    url: &str,
    path: &str,
    body: &[u8],
    mut on_data: impl FnMut(&str) -> bool,
) -> Result<Response> {
    let host = authority(url)?;
    let mut r = send(&host, "POST", path, Some(body), Duration::from_secs(600))?;
    let (status, headers) = read_head(&mut r)?;
    let mut raw = Vec::new();
    if status != 200 {
        read_body(&mut r, &headers, |b| {
            raw.extend_from_slice(b);
            true
        })?;
        return Ok(Response {
            status,
            headers,
            body: raw,
        });
    }
    let mut pending = String::new();
    read_body(&mut r, &headers, |b| {
        pending.push_str(&String::from_utf8_lossy(b));
        while let Some(at) = pending.find("\n\n") {
            let event: String = pending.drain(..at + 2).collect();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data:")
                    && !on_data(d.trim_start())
                {
                    return false;
                }
            }
        }
        true
    })?;
    Ok(Response {
        status,
        headers,
        body: Vec::new(),
    })
}
