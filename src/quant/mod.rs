//! Block formats: encode, decode and convert between the ternary formats.
//!
//! * Decoding covers every format the kernels read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
//!   Q5_K, Q6_K, TQ1_0, TQ2_0, I2_S); values equal PyPI `gguf` 0.19's `dequantize` bit for bit
//!   (tests compare against fixtures it wrote).
//! * Encoding (F32, F16, BF16, Q8_0, TQ1_0, TQ2_0, I2_S) follows ggml's `quantize_row_*_ref`
//!   (bitnet.cpp's `quantize_i2_s` for I2_S), so bytes equal those of the reference writers.
//! * [`convert_ternary`] rewrites a ternary tensor in another ternary format without changing a
//!   single weight value where that is possible, and refuses (naming the tensor's scales) where it
//!   is not (FORMATS.md 2.5).
//!
//! This module knows nothing of files: it works on byte slices and shapes.

mod convert;
mod encode;

pub use convert::{convert_ternary, ternary_codes, ternary_codes_valid};
pub use encode::{encode, fp32_to_bf16};

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use ternmux_kernels::dequant::{self, FloatFormat};
use ternmux_kernels::ternary::TernaryFormat;

/// Dequantizes a whole tensor of `rows × cols` elements stored as `ty` into f32.
///
/// ```
/// use ternmux::gguf::GgmlType;
/// use ternmux_kernels::dequant::FloatFormat;
/// let x = [1.5f32, -2.0, 0.25, 8.0];
/// let bytes = ternmux::quant::encode(GgmlType::Float(FloatFormat::F16), &x, 1, 4)?;
/// assert_eq!(ternmux::quant::decode(GgmlType::Float(FloatFormat::F16), &bytes, 1, 4)?, x);
/// # Ok::<(), ternmux::Error>(())
/// ```
pub fn decode(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<f32>> {
    check_tensor_len(ty, bytes, rows, cols)?;
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return Ok(out);
    }
    match ty {
        GgmlType::Float(f) => {
            let rb = f.row_bytes(cols);
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                f.dequantize(&bytes[r * rb..(r + 1) * rb], o);
            }
        }
        GgmlType::Ternary(t) => {
            let rb = t.row_bytes(cols);
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                let row = &bytes[r * rb..(r + 1) * rb];
                match t {
                    TernaryFormat::Tq2_0 => dequant::dequantize_row_tq2_0(row, o),
                    TernaryFormat::Tq1_0 => dequant::dequantize_row_tq1_0(row, o),
                    TernaryFormat::I2S => {
                        dequant::dequantize_row_i2_s(row, i2s_scale(bytes, rows, cols), o)
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The f32 scale in an I2_S tensor's tail.
pub fn i2s_scale(bytes: &[u8], rows: usize, cols: usize) -> f32 {
    let at = rows * cols / 4;
    match bytes.get(at..at + 4) {
        Some(b) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0.0,
    }
}

/// Checks that `bytes` is exactly a `rows × cols` tensor of `ty`.
pub fn check_tensor_len(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<()> {
    let want = tensor_bytes(ty, rows, cols)?;
    if bytes.len() != want {
        return Err(Error::Quant(format!(
            "{} tensor of {rows} x {cols} needs {want} bytes, got {}",
            ty.name(),
            bytes.len()
        )));
    }
    Ok(())
}

/// Bytes of a `rows × cols` tensor of `ty`, or an error naming the shape constraint.
pub fn tensor_bytes(ty: GgmlType, rows: usize, cols: usize) -> Result<usize> {
    let elems = (rows as u64)
        .checked_mul(cols as u64)
        .ok_or_else(|| Error::Quant(format!("{rows} x {cols} overflows")))?;
    let multiple = match ty {
        GgmlType::Float(f) => f.block_elems(),
        GgmlType::Ternary(t) => t.k_multiple(),
    };
    if cols == 0 || !cols.is_multiple_of(multiple) {
        return Err(Error::Quant(format!(
            "{} needs a row length divisible by {multiple}, got {cols}",
            ty.name()
        )));
    }
    ty.tensor_bytes(cols as u64, elems)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| Error::Quant(format!("{rows} x {cols} {} tensor overflows", ty.name())))
}

/// Formats the converter and encoder accept, by the names the CLI uses.
pub fn parse_type(name: &str) -> Option<GgmlType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlType::Float(FloatFormat::F32),
        "f16" => GgmlType::Float(FloatFormat::F16),
        "bf16" => GgmlType::Float(FloatFormat::BF16),
        "q8_0" => GgmlType::Float(FloatFormat::Q8_0),
        "tq1_0" => GgmlType::Ternary(TernaryFormat::Tq1_0),
        "tq2_0" => GgmlType::Ternary(TernaryFormat::Tq2_0),
        "i2_s" => GgmlType::Ternary(TernaryFormat::I2S),
        _ => return None,
    })
}
