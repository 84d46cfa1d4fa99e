//! Row dequantizers for every weight format, following ggml's `dequantize_row_*`.
//!
//! Each function turns `out.len()` elements' worth of blocks from `bytes` into f32. Lengths are
//! validated by [`FloatFormat::row_bytes`] at the safe boundary; here they are checked with
//! ordinary slice indexing (a panic would be a bug in a caller, never UB).

use crate::blocks::*;
use crate::reference::{code_i2_s, code_tq1_0, code_tq2_0};
use half::{bf16, f16};

/// Storage formats of non-ternary weights (embeddings, heads, norms) and all decodable formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatFormat {
    /// IEEE f32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit, blocks of 32.
    Q8_0,
    /// 4-bit, blocks of 32.
    Q4_0,
    /// 4-bit with minimum, blocks of 32.
    Q4_1,
    /// k-quant 4-bit, blocks of 256.
    Q4K,
    /// k-quant 5-bit, blocks of 256.
    Q5K,
    /// k-quant 6-bit, blocks of 256.
    Q6K,
}

impl FloatFormat {
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            FloatFormat::F32 | FloatFormat::F16 | FloatFormat::BF16 => 1,
            FloatFormat::Q8_0 | FloatFormat::Q4_0 | FloatFormat::Q4_1 => QK8_0,
            FloatFormat::Q4K | FloatFormat::Q5K | FloatFormat::Q6K => QK_K,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            FloatFormat::F32 => 4,
            FloatFormat::F16 | FloatFormat::BF16 => 2,
            FloatFormat::Q8_0 => 34,
            FloatFormat::Q4_0 => 18,
            FloatFormat::Q4_1 => 20,
            FloatFormat::Q4K => 144,
            FloatFormat::Q5K => 176,
            FloatFormat::Q6K => 210,
        }
    }
    /// Bytes of one row of `k` elements (`k` must be a multiple of [`Self::block_elems`]);
    /// saturates instead of overflowing, so an absurd `k` fails the length check that follows.
    pub fn row_bytes(self, k: usize) -> usize {
        (k / self.block_elems()).saturating_mul(self.block_bytes())
    }
    /// Lower-case name as ggml spells it.
    pub fn name(self) -> &'static str {
        match self {
            FloatFormat::F32 => "f32",
            FloatFormat::F16 => "f16",
            FloatFormat::BF16 => "bf16",
            FloatFormat::Q8_0 => "q8_0",
            FloatFormat::Q4_0 => "q4_0",
            FloatFormat::Q4_1 => "q4_1",
            FloatFormat::Q4K => "q4_k",
            FloatFormat::Q5K => "q5_k",
            FloatFormat::Q6K => "q6_k",
        }
    }

    /// Dequantizes `out.len()` elements (a whole number of blocks) from `bytes`.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            FloatFormat::F32 => dequantize_row_f32(bytes, out),
            FloatFormat::F16 => dequantize_row_f16(bytes, out),
            FloatFormat::BF16 => dequantize_row_bf16(bytes, out),
            FloatFormat::Q8_0 => dequantize_row_q8_0(bytes, out),
            FloatFormat::Q4_0 => dequantize_row_q4_0(bytes, out),
            FloatFormat::Q4_1 => dequantize_row_q4_1(bytes, out),
            FloatFormat::Q4K => dequantize_row_q4_k(bytes, out),
            FloatFormat::Q5K => dequantize_row_q5_k(bytes, out),
            FloatFormat::Q6K => dequantize_row_q6_k(bytes, out),
        }
    }
}

/// f32 from little-endian bytes.
pub fn dequantize_row_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// f16 from little-endian bytes (uses F16C / NEON fp16 when the `half` crate detects them).
pub fn dequantize_row_f16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// bf16: the f32 bit pattern is the bf16 bits shifted left by 16.
pub fn dequantize_row_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// Q8_0: `d * qs[j]`.
pub fn dequantize_row_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK8_0).zip(bytes.chunks_exact(34)) {
        let b: BlockQ8_0 = read_block(blk);
        let d = b.d.to_f32();
        for (x, &q) in o.iter_mut().zip(&b.qs) {
            *x = d * f32::from(q);
        }
    }
}

/// Q4_0: `d * (nibble − 8)`, low nibbles first.
pub fn dequantize_row_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK8_0).zip(bytes.chunks_exact(18)) {
        let b: BlockQ4_0 = read_block(blk);
        let d = b.d.to_f32();
        for j in 0..16 {
            o[j] = d * (i32::from(b.qs[j] & 15) - 8) as f32;
            o[j + 16] = d * (i32::from(b.qs[j] >> 4) - 8) as f32;
        }
    }
}

/// Q4_1: `d * nibble + m`.
pub fn dequantize_row_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK8_0).zip(bytes.chunks_exact(20)) {
        let b: BlockQ4_1 = read_block(blk);
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..16 {
            o[j] = f32::from(b.qs[j] & 15) * d + m;
            o[j + 16] = f32::from(b.qs[j] >> 4) * d + m;
        }
    }
}

/// ggml `get_scale_min_k4`: 6-bit scale and minimum of sub-block `j` (0..8).
#[inline]
pub fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: `d·sc·q − dmin·m` per sub-block of 32.
pub fn dequantize_row_q4_k(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(144)) {
        let b: BlockQ4K = read_block(blk);
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &b.scales);
            let (d1, mm1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, mm2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for l in 0..32 {
                let q = b.qs[32 * c + l];
                o[64 * c + l] = d1 * f32::from(q & 15) - mm1;
                o[64 * c + 32 + l] = d2 * f32::from(q >> 4) - mm2;
            }
        }
    }
}

/// Q5_K: Q4_K plus 16 where the chunk's high bit is set in `qh`.
pub fn dequantize_row_q5_k(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(176)) {
        let b: BlockQ5K = read_block(blk);
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &b.scales);
            let (d1, mm1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, mm2) = (d * f32::from(sc2), dmin * f32::from(m2));
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let q = b.qs[32 * c + l];
                let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                o[64 * c + l] = d1 * f32::from((q & 15) + h1) - mm1;
                o[64 * c + 32 + l] = d2 * f32::from((q >> 4) + h2) - mm2;
            }
        }
    }
}

/// Q6_K: `d · sc · (q − 32)` with 6-bit q split over `ql` and `qh`.
pub fn dequantize_row_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
        let b: BlockQ6K = read_block(blk);
        let d = b.d.to_f32();
        for h in 0..2 {
            let (ql, qh, sc) = (&b.ql[64 * h..], &b.qh[32 * h..], &b.scales[8 * h..]);
            let o = &mut o[128 * h..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                o[l] = d * f32::from(sc[is]) * q1 as f32;
                o[l + 32] = d * f32::from(sc[is + 2]) * q2 as f32;
                o[l + 64] = d * f32::from(sc[is + 4]) * q3 as f32;
                o[l + 96] = d * f32::from(sc[is + 6]) * q4 as f32;
            }
        }
    }
}

/// TQ2_0: `(code − 1) · d`.
pub fn dequantize_row_tq2_0(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(66)) {
        let d = read_f16(blk, 64);
        for (e, x) in o.iter_mut().enumerate() {
            *x = (f32::from(code_tq2_0(blk, e)) - 1.0) * d;
        }
    }
}

/// TQ1_0: `(trit − 1) · d`.
pub fn dequantize_row_tq1_0(bytes: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(54)) {
        let d = read_f16(blk, 52);
        for (e, x) in o.iter_mut().enumerate() {
            *x = (f32::from(code_tq1_0(blk, e)) - 1.0) * d;
        }
    }
}

/// I2_S: `(code − 1) · w_s` for one packed row (`out.len()` a multiple of 128).
pub fn dequantize_row_i2_s(row: &[u8], w_s: f32, out: &mut [f32]) {
    for (j, x) in out.iter_mut().enumerate() {
        *x = (f32::from(code_i2_s(row, j)) - 1.0) * w_s;
    }
}
