//! `ternmux convert`: rewrite the ternary tensors of a GGUF file in another ternary format.
//!
//! Every ternary tensor (TQ1_0, TQ2_0, I2_S) is re-packed with [`crate::quant::convert_ternary`]
//! (exact, or refused with the reason); every other tensor is copied byte for byte straight from
//! the input's mapping; metadata is copied unchanged except `general.file_type`, which describes
//! the old encoding and is dropped (readers derive types per tensor).

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use crate::quant::convert_ternary;
use std::path::Path;
use ternmux_kernels::ternary::TernaryFormat;

/// What a conversion did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// Ternary tensors re-packed.
    pub converted: usize,
    /// Tensors copied unchanged (including ternary ones already in the target format).
    pub copied: usize,
    /// Bytes of the output file.
    pub bytes_written: u64,
}

/// Converts the ternary tensors of `input` to `to` and writes `output`.
pub fn convert_file(input: &Path, output: &Path, to: TernaryFormat) -> Result<ConvertReport> {
    let file = GgufFile::open(input)?;
    let mut w = GgufWriter::new();
    let alignment = u32::try_from(file.alignment())
        .map_err(|_| Error::Gguf(format!("alignment {} does not fit u32", file.alignment())))?;
    w.set_alignment(alignment)?;
    for (key, value) in file.metadata() {
        if key == "general.file_type" || key == "general.alignment" {
            continue;
        }
        w.add_kv(key, Value::from_meta(&value)?);
    }
    let mut report = ConvertReport::default();
    for t in file.tensors() {
        let raw = file.raw_tensor_data(t);
        match t.ggml_type() {
            Ok(GgmlType::Ternary(from)) if from != to => {
                let (rows, cols) = t.rows_cols();
                let bytes = convert_ternary(from, raw, rows, cols, to)
                    .map_err(|e| Error::Quant(format!("tensor {:?}: {e}", t.name())))?;
                w.add_tensor(t.name(), t.dims(), GgmlType::Ternary(to).id(), bytes)?;
                report.converted += 1;
            }
            _ => {
                w.add_tensor(t.name(), t.dims(), t.type_id(), raw)?;
                report.copied += 1;
            }
        }
    }
    w.write_file(output)?;
    report.bytes_written = std::fs::metadata(output)
        .map_err(|e| Error::io(output, e))?
        .len();
    Ok(report)
}
