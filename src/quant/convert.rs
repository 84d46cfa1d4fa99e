//! Exact conversion between the ternary formats (FORMATS.md 2.5).
//!
//! All three formats store the same 3-level code per weight; they differ in bit placement, block
//! length and scale. A conversion reads every code, re-packs it, and maps the scales:
//!
//! * TQ2_0 ↔ TQ1_0: codes and f16 block scales carried over unchanged — exact.
//! * I2_S → TQ1_0/TQ2_0: every block gets `d = f16(w_s)`. Exact when `w_s` is representable in
//!   f16 (it is for files that came from a TQ format); otherwise values move by the f16 rounding of
//!   `w_s` (at most 2^-11 relative, FORMATS.md P9). Refused if `w_s` overflows f16.
//! * TQ1_0/TQ2_0 → I2_S: one f32 scale per tensor, so every block that holds a non-zero weight
//!   must carry the same `d` (true of ternary-trained models, whose absmax per block is the
//!   tensor's scale); then `w_s = d` and the conversion is exact. Otherwise it is refused, naming
//!   the scales — never silently approximated.
//!
//! Code 3 (corrupt 2-bit data) is refused: it has no meaning in the target formats.

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use half::f16;
use ternmux_kernels::blocks::{QK_K, read_f16};
use ternmux_kernels::pack::{pack_i2_s_tensor, pack_tq1_0, pack_tq2_0};
use ternmux_kernels::reference::{code_i2_s, code_tq1_0, code_tq2_0};
use ternmux_kernels::ternary::TernaryFormat;

/// Every code (0, 1, 2; 3 only in corrupt 2-bit data) of a ternary tensor, row-major.
pub fn ternary_codes(t: TernaryFormat, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    super::check_tensor_len(GgmlType::Ternary(t), bytes, rows, cols)?;
    let rb = t.row_bytes(cols);
    let mut codes =
        Vec::with_capacity(rows.saturating_mul(cols).min(bytes.len().saturating_mul(5)));
    for r in 0..rows {
        let row = &bytes[r * rb..(r + 1) * rb];
        for j in 0..cols {
            codes.push(match t {
                TernaryFormat::Tq2_0 => code_tq2_0(&row[j / QK_K * 66..], j % QK_K),
                TernaryFormat::Tq1_0 => code_tq1_0(&row[j / QK_K * 54..], j % QK_K),
                TernaryFormat::I2S => code_i2_s(row, j),
            });
        }
    }
    Ok(codes)
}

/// Checks that no weight holds the invalid code 3; the error names the first position.
pub fn ternary_codes_valid(t: TernaryFormat, bytes: &[u8], rows: usize, cols: usize) -> Result<()> {
    let codes = ternary_codes(t, bytes, rows, cols)?;
    match codes.iter().position(|&c| c > 2) {
        None => Ok(()),
        Some(i) => Err(Error::Quant(format!(
            "{} weight at row {} column {} holds code 3, which no quantizer writes (corrupt data)",
            t.name(),
            i / cols,
            i % cols
        ))),
    }
}

/// Rewrites a `rows × cols` ternary tensor from `from` to `to` (see the module docs for when this
/// is exact and when it is refused).
///
/// ```
/// use ternmux::gguf::GgmlType;
/// use ternmux::quant::{convert_ternary, decode, encode};
/// use ternmux_kernels::ternary::TernaryFormat::{I2S, Tq1_0, Tq2_0};
/// let x: Vec<f32> = (0..512).map(|i| [0.5f32, 0.0, -0.5][i % 3]).collect();
/// let tq2 = encode(GgmlType::Ternary(Tq2_0), &x, 2, 256)?;
/// let i2s = convert_ternary(Tq2_0, &tq2, 2, 256, I2S)?;
/// let tq1 = convert_ternary(I2S, &i2s, 2, 256, Tq1_0)?;
/// assert_eq!(decode(GgmlType::Ternary(Tq1_0), &tq1, 2, 256)?, x);
/// # Ok::<(), ternmux::Error>(())
/// ```
pub fn convert_ternary(
    from: TernaryFormat,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    to: TernaryFormat,
) -> Result<Vec<u8>> {
    let codes = ternary_codes(from, bytes, rows, cols)?;
    if let Some(i) = codes.iter().position(|&c| c > 2) {
        return Err(Error::Quant(format!(
            "cannot convert: {} weight at row {} column {} holds code 3 (corrupt data)",
            from.name(),
            i / cols,
            i % cols
        )));
    }
    if !cols.is_multiple_of(to.k_multiple()) {
        return Err(Error::Quant(format!(
            "cannot convert to {}: rows of {cols} weights are not a multiple of {}",
            to.name(),
            to.k_multiple()
        )));
    }
    let nb = cols / QK_K;
    // Per-256-block scales as f16 bits, when the source has them.
    let block_d = |r: usize, b: usize| -> f16 {
        let rb = from.row_bytes(cols);
        let bb = from.row_bytes(QK_K);
        f16::from_f32(read_f16(bytes, r * rb + b * bb + bb - 2))
    };
    let size = to
        .tensor_bytes(rows, cols)
        .ok_or_else(|| Error::Quant(format!("{rows} x {cols} {} tensor overflows", to.name())))?;
    let mut out = vec![0u8; size];
    match to {
        TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0 => {
            let i2s_d = if from == TernaryFormat::I2S {
                let w_s = super::i2s_scale(bytes, rows, cols);
                let d = f16::from_f32(w_s);
                if !w_s.is_finite() || !d.is_finite() {
                    return Err(Error::Quant(format!(
                        "cannot convert: I2_S scale {w_s} does not fit the f16 block scale of {}",
                        to.name()
                    )));
                }
                Some(d)
            } else {
                None
            };
            let bb = to.row_bytes(QK_K);
            for r in 0..rows {
                for b in 0..nb {
                    let c: [u8; QK_K] = core::array::from_fn(|j| codes[r * cols + b * QK_K + j]);
                    let d = i2s_d.unwrap_or_else(|| block_d(r, b));
                    let o = &mut out[(r * nb + b) * bb..];
                    if to == TernaryFormat::Tq2_0 {
                        pack_tq2_0(&c, d, o);
                    } else {
                        pack_tq1_0(&c, d, o);
                    }
                }
            }
        }
        TernaryFormat::I2S => {
            let w_s = if from == TernaryFormat::I2S {
                super::i2s_scale(bytes, rows, cols)
            } else {
                // The one scale shared by every block that holds a non-zero weight.
                let mut scale: Option<f16> = None;
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                let mut mismatch = false;
                for r in 0..rows {
                    for b in 0..nb {
                        let block = &codes[r * cols + b * QK_K..r * cols + (b + 1) * QK_K];
                        if block.iter().all(|&c| c == 1) {
                            continue;
                        }
                        let d = block_d(r, b);
                        lo = lo.min(d.to_f32());
                        hi = hi.max(d.to_f32());
                        match scale {
                            None => scale = Some(d),
                            Some(s) if s.to_bits() != d.to_bits() => mismatch = true,
                            Some(_) => {}
                        }
                    }
                }
                if mismatch {
                    return Err(Error::Quant(format!(
                        "cannot convert {} to i2_s exactly: block scales range from {lo} to {hi}, \
                         but i2_s holds one scale per tensor",
                        from.name()
                    )));
                }
                scale.map_or(0.0, f16::to_f32)
            };
            pack_i2_s_tensor(&codes, rows, cols, w_s, &mut out);
        }
    }
    Ok(out)
}
