//! The one error type of the library.
//!
//! Messages are lower-case, carry no trailing period, start with the subsystem (`gguf:`,
//! `quant:`, `kernel:`, `io:`) and put the offending value next to the limit it broke.

use std::path::PathBuf;

/// Every fallible public function returns `Result<T, Error>`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("io: {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file is malformed, hostile, or uses something ternmux cannot compute.
    #[error("gguf: {0}")]
    Gguf(String),
    /// A tensor cannot be encoded, decoded or converted as asked.
    #[error("quant: {0}")]
    Quant(String),
    /// A sequence would grow past its context size.
    #[error(
        "context: {needed} positions are needed but the context holds {limit}; start a new session or raise the context size"
    )]
    Context {
        /// Positions the request needs.
        needed: usize,
        /// Positions the cache holds.
        limit: usize,
    },
    /// The tokenizer's metadata is missing or malformed, or text cannot be tokenized.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A compute device cannot be used or failed (OpenCL: no library, platform or device; a
    /// build log; an exhausted or lost device).
    #[error("device: {0}")]
    Device(String),
    /// A multiplexer limit cannot be met: a unit larger than the weight budget, every resident
    /// unit pinned, KV caches past their limit, or an unknown model name.
    #[error("mux: {0}")]
    Mux(String),
    /// A request cannot run as given: an invalid parameter, a batch that breaks the cache's
    /// shape, a prompt too long for the context. The caller's fault; retrying as is fails again.
    #[error("request: {0}")]
    Request(String),
    /// The engine is at its limit (queue full): retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// The engine is shutting down or its worker for the model has stopped.
    #[error("engine: {0}")]
    Engine(String),
    /// A kernel refused its inputs (shapes, lengths).
    #[error("{0}")]
    Kernel(#[from] ternmux_kernels::KernelError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
