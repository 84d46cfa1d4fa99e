//! ternmux runs 1.58-bit ternary language models — BitNet b1.58 and any GGUF whose linear layers
//! are TQ1_0, TQ2_0 or I2_S — on CPUs (and, in later milestones, OpenCL GPUs).
//!
//! This milestone is the foundation:
//!
//! * [`gguf`] — a zero-copy, hostile-input-safe GGUF v2/v3 reader over a memory mapping, and a
//!   writer.
//! * [`quant`] — every block format: decode (F32 … Q6_K, TQ1_0, TQ2_0, I2_S), encode, and exact
//!   conversion between the ternary formats.
//! * [`kernels`] (the `ternmux-kernels` crate) — multiplication-free ternary × int8 matrix
//!   products with scalar, AVX2, AVX-512 and NEON implementations chosen at start-up, and float
//!   products for embeddings and heads.
//!
//! ```
//! use ternmux::gguf::GgufFile;
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/bitllama2c-stories3M-TQ2_0.gguf");
//! let file = GgufFile::open(path)?;
//! assert_eq!(file.architecture(), Some("bitnet"));
//! let t = file.tensor("blk.0.ffn_up.weight").unwrap();
//! assert_eq!(t.type_name(), "TQ2_0");
//! # Ok::<(), ternmux::Error>(())
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod chat;
pub mod convert;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod model;
pub mod mux;
pub mod quant;
pub mod sampling;
pub mod server;
pub mod synth;
pub mod tokenizer;

pub use error::{Error, Result};
pub use ternmux_kernels as kernels;

include!(concat!(env!("OUT_DIR"), "/cl_sources.rs"));
