//! The output head as the CPU backend computes it: the file's own matrix, or an int8 copy
//! made on first use ([`HeadMode`]).
//!
//! A batch-1 token reads the whole head. In BitNet 2B-4T that is a 656 MB F16 table, more
//! than the model's ternary layers together (520 MB), so a CPU token costs more head than
//! ternary reads. Requantized to int8 per row (`ternmux_kernels::int8`: one scale per row, the
//! activations per 256-block) it is 328 MB, multiplied with VNNI integer dot products; the
//! logits move by the quantization error only (the top-1 and a cosine against the F16 head are
//! checked in the tests and against llama.cpp by `scripts/bench_vs_llamacpp.sh`).
//!
//! Memory: the copy is owned (the one exception to zero copy, by choice), and the file's head
//! pages leave the resident set as it is made (`GgufFile::release`): a tied table's rows are
//! read back one token at a time for embedding lookups. A model in a multiplexer on the CPU
//! pages this copy in as its head unit (`mux::units`), so its budget counts the int8 bytes.

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use ternmux_kernels::Kernels;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::int8::{INT8_BLOCK, Int8Matrix};
use ternmux_kernels::matmul::FloatMatrix;

use super::TensorRef;

/// How the CPU backend computes the output head.
///
/// ```
/// use ternmux::model::HeadMode;
/// assert_eq!("file".parse::<HeadMode>()?, HeadMode::File);
/// assert_eq!(HeadMode::default(), HeadMode::Int8);
/// # Ok::<(), ternmux::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HeadMode {
    /// An F32, F16, BF16 or Q8_0 head whose rows are a multiple of 256 long is requantized to
    /// int8 per row on first use (half an F16 head's bytes per token); other heads are used as
    /// stored.
    #[default]
    Int8,
    /// The head as the file stores it (bit-for-bit the file's arithmetic).
    File,
}

impl FromStr for HeadMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<HeadMode> {
        match s {
            "int8" => Ok(HeadMode::Int8),
            "file" => Ok(HeadMode::File),
            _ => Err(Error::Request(format!(
                "unknown head mode {s:?}: use int8 or file"
            ))),
        }
    }
}

impl fmt::Display for HeadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadMode::Int8 => "int8",
            HeadMode::File => "file",
        })
    }
}

/// Bytes of the file's head read between two releases of their pages while the int8 head is
/// made (what the making adds to the resident set at most).
const RELEASE_CHUNK: usize = 32 << 20;

/// The int8 copy of a head and what making it cost.
pub(crate) struct Int8Head {
    pub(crate) matrix: Int8Matrix,
    pub(crate) made_in: Duration,
}

/// A model's int8 head, made at most once.
#[derive(Default)]
pub(crate) struct HeadCache {
    cell: OnceLock<std::result::Result<Int8Head, String>>,
}

/// Whether a head of this type and shape has an int8 form.
pub(crate) fn int8_applies(t: &TensorRef) -> bool {
    matches!(
        t.ty,
        GgmlType::Float(
            FloatFormat::F32 | FloatFormat::F16 | FloatFormat::BF16 | FloatFormat::Q8_0
        )
    ) && t.cols.is_multiple_of(INT8_BLOCK)
}

impl HeadCache {
    /// The int8 head of `t` in `file`, made now if it was not yet (rows in parallel; the
    /// file's head pages are released as they are read); `None` when `t` has no int8 form or memory
    /// for it could not be had (the reason is kept for [`HeadCache::describe`]).
    pub(crate) fn get(&self, file: &GgufFile, t: &TensorRef) -> Option<&Int8Head> {
        if !int8_applies(t) {
            return None;
        }
        let made = self.cell.get_or_init(|| {
            let GgmlType::Float(f) = t.ty else {
                return Err("not a float head".into());
            };
            let start = Instant::now();
            let bytes = file
                .as_bytes()
                .get(t.range.clone())
                .ok_or_else(|| "the head's bytes are outside the file".to_string())?;
            let w = FloatMatrix::new(f, bytes, t.rows, t.cols).map_err(|e| e.to_string())?;
            // The file's head pages leave the resident set chunk by chunk as they are read.
            let row_bytes = f.row_bytes(t.cols);
            let chunk_rows = (RELEASE_CHUNK / row_bytes.max(1)).max(1);
            let matrix = Int8Matrix::quantize_in_chunks(Kernels::get(), &w, chunk_rows, |r| {
                file.release(t.range.start + r.start * row_bytes..t.range.start + r.end * row_bytes)
            })
            .map_err(|e| e.to_string())?;
            Ok(Int8Head {
                matrix,
                made_in: start.elapsed(),
            })
        });
        made.as_ref().ok()
    }

    /// One line saying how the head is computed, e.g. `int8 (328.4 MB, made in 212 ms)`.
    pub(crate) fn describe(&self, mode: HeadMode, t: &TensorRef) -> String {
        let file = format!("{} as stored", t.ty.name());
        if mode == HeadMode::File {
            return file;
        }
        if !int8_applies(t) {
            return format!("{file} (no int8 form)");
        }
        match self.cell.get() {
            None => "int8 (made on first use)".into(),
            Some(Ok(h)) => format!(
                "int8 ({:.1} MB, made in {:.0} ms)",
                h.matrix.bytes() as f64 / 1e6,
                h.made_in.as_secs_f64() * 1e3
            ),
            Some(Err(why)) => format!("{file} (int8 failed: {why})"),
        }
    }
}
