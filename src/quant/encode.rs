//! Encoders that follow the reference quantizers byte for byte.
//!
//! * TQ2_0 / TQ1_0 (ggml `quantize_row_tq{1,2}_0_ref`, gguf-py `quants.py`): per 256-block
//!   `d = max|x|`, `id = 1/d` (0 if d = 0), code `= round_half_away(x·id) + 1` clamped to {0,1,2},
//!   `d` stored as f16 (round to nearest even).
//! * I2_S (bitnet.cpp `quantize_i2_s`): `w_s = max|x|` over the tensor, code 1 where
//!   `|x| < 1e-6`, else 2 for positive and 0 for negative. This is not a general ternarizer: it
//!   is exact for weights that are already ternary (`{−w_s, 0, w_s}`), as bitnet.cpp's converter
//!   guarantees by applying absmean ternarization first.
//! * Q8_0 (`quantize_row_q8_0_ref`): `d = max|x| / 127`, `q = round_half_away(x / d)`.
//! * F16: IEEE round to nearest even. BF16: ggml's `ggml_compute_fp32_to_bf16` (NaN made quiet,
//!   round to nearest even). F32: the bits.

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use half::f16;
use ternmux_kernels::blocks::{QK_K, QK8_0};
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::pack::{pack_i2_s_tensor, pack_tq1_0, pack_tq2_0};
use ternmux_kernels::ternary::TernaryFormat;

/// Encodes `rows × cols` f32 values (row-major) as `ty`.
pub fn encode(ty: GgmlType, x: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let size = super::tensor_bytes(ty, rows, cols)?;
    if x.len() != rows * cols {
        return Err(Error::Quant(format!(
            "expected {} values ({rows} x {cols}), got {}",
            rows * cols,
            x.len()
        )));
    }
    let mut out = vec![0u8; size];
    match ty {
        GgmlType::Float(FloatFormat::F32) => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::Float(FloatFormat::F16) => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::Float(FloatFormat::BF16) => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&fp32_to_bf16(*v).to_le_bytes());
            }
        }
        GgmlType::Float(FloatFormat::Q8_0) => {
            for (o, xb) in out.chunks_exact_mut(34).zip(x.chunks_exact(QK8_0)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                o[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for (q, v) in o[2..].iter_mut().zip(xb) {
                    *q = ((v * id).round() as i32).clamp(-128, 127) as i8 as u8;
                }
            }
        }
        GgmlType::Float(other) => {
            return Err(Error::Quant(format!(
                "encoding to {} is not supported (decode only)",
                other.name()
            )));
        }
        GgmlType::Ternary(t @ (TernaryFormat::Tq2_0 | TernaryFormat::Tq1_0)) => {
            let bb = t.row_bytes(QK_K);
            for (o, xb) in out.chunks_exact_mut(bb).zip(x.chunks_exact(QK_K)) {
                let d = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let codes: [u8; QK_K] =
                    core::array::from_fn(|j| ((xb[j] * id).round() as i32 + 1).clamp(0, 2) as u8);
                if t == TernaryFormat::Tq2_0 {
                    pack_tq2_0(&codes, f16::from_f32(d), o);
                } else {
                    pack_tq1_0(&codes, f16::from_f32(d), o);
                }
            }
        }
        GgmlType::Ternary(TernaryFormat::I2S) => {
            let w_s = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let codes: Vec<u8> = x
                .iter()
                .map(|&v| {
                    if v.abs() < 1e-6 {
                        1
                    } else if v > 0.0 {
                        2
                    } else {
                        0
                    }
                })
                .collect();
            pack_i2_s_tensor(&codes, rows, cols, w_s, &mut out);
        }
    }
    Ok(out)
}

/// ggml's `ggml_compute_fp32_to_bf16`: quiet NaNs, round to nearest even.
pub fn fp32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
}
