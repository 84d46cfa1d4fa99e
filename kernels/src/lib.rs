//! CPU compute kernels for ternmux: ternary (TQ1_0, TQ2_0, I2_S) × int8 matrix products that
//! never multiply by a weight, and float/quantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
//! Q6_K) matrix products for embeddings and output heads.
//!
//! This crate knows nothing of files, models or devices: inputs are packed weight bytes and
//! activations, outputs are f32. Layout (after memchr):
//!
//! * [`blocks`] — on-disk block layouts with compile-time size checks.
//! * [`reference`](mod@reference) — the scalar twins, the definition every fast kernel must equal.
//! * `x86_64::{avx2, avx512}`, `aarch64::neon` — ISA kernels sharing the twins' signature.
//! * [`dispatch`] — CPU detection once per process; `TERNMUX_ISA` forces an ISA.
//! * [`act`] — int8 activation quantization: per token (bitnet.cpp) or per 256-block (Q8_K).
//! * [`ternary`], [`matmul`] — validated matrices and the parallel (rayon) products.
//! * [`dequant`] — row dequantizers of every format.
//! * [`int8`] — float heads requantized to int8 per row, against int8 activations per block.
//! * [`attend`] — attention of a head group over an f16 key/value cache.
//! * [`copy`] — copies with streaming stores, for memory a device reads next.
//! * [`serial`] — products kept on the calling thread, for callers that split work themselves.
//!
//! Exactness classes: integer work is always exact. I2_S results and everything with Q8_K
//! activations are **bit-exact** with the scalar twin on every ISA (and I2_S with bitnet.cpp's
//! arithmetic); TQ1_0/TQ2_0 with per-token activations on AVX2/AVX-512 accumulate in float lanes
//! like llama.cpp and are **≤ ε** of the twin; the float kernels are **≤ ε**. The bounds are
//! derived next to the tests.
//!
//! ```
//! use ternmux_kernels::{Kernels, act::{ActQuant, QuantizedActs}};
//! use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};
//! let k = 256;
//! // Two I2_S rows of all-zero weights (code 1 = 0b01 in every 2-bit field), scale 0.5 in the tail.
//! let mut bytes = vec![0b0101_0101u8; 2 * k / 4];
//! let mut tail = [0u8; 32];
//! tail[..4].copy_from_slice(&0.5f32.to_le_bytes());
//! bytes.extend_from_slice(&tail);
//! let w = TernaryMatrix::new(TernaryFormat::I2S, &bytes, 2, k).unwrap();
//! let mut acts = QuantizedActs::new(ActQuant::PerToken);
//! acts.quantize(&vec![1.0; k], k).unwrap();
//! let mut out = [1.0f32; 2];
//! Kernels::get().ternary_matmul(&w, &acts, &mut out).unwrap();
//! assert_eq!(out, [0.0, 0.0]);
//! ```
#![deny(missing_docs)]

pub mod act;
pub mod attend;
pub mod blocks;
pub mod copy;
pub mod dequant;
pub mod dispatch;
pub mod int8;
pub mod matmul;
pub mod pack;
pub mod reference;
pub mod serial;
pub mod ternary;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;

pub use dispatch::{Isa, Kernels};

/// Why a kernel call was refused: shapes and lengths, or memory for a buffer it owns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    /// A length, shape or value range did not fit the operation; the message has the numbers.
    Shape(String),
    /// Memory for a kernel's own buffers could not be had; the message says how much.
    Memory(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Shape(m) => write!(f, "kernel: {m}"),
            KernelError::Memory(m) => write!(f, "kernel: out of memory: {m}"),
        }
    }
}

impl std::error::Error for KernelError {}
