//! The scalar twins: the correctness ground truth for every ternary kernel.
//!
//! Written for obviousness, not speed: each weight's code is read by the format's placement rule
//! (FORMATS.md 2.3–2.5) and acts on the activation by add / subtract / skip. Every SIMD kernel
//! must produce exactly the same super-block sums (integer arithmetic, no rounding anywhere).
//!
//! All functions share the ISA kernels' signature:
//! `(w_row, q, k, n_act, sums)` where `w_row` is one packed weight row of `k` weights, `q` holds
//! `n_act` activation rows of `k` int8 values each (row-major), and `sums[t * nsb + b]` receives the
//! exact sum of super-block `b` (256 elements; I2_S's last may hold 128) for activation row `t`,
//! with `nsb = k.div_ceil(256)`.

use crate::blocks::{I2S_BLOCK, QK_K};

/// Code (0, 1 or 2) of element `e` (0..256) of one TQ2_0 block.
#[inline]
pub fn code_tq2_0(block: &[u8], e: usize) -> u8 {
    let (c, rest) = (e / 128, e % 128);
    let (l, m) = (rest / 32, rest % 32);
    (block[32 * c + m] >> (2 * l)) & 3
}

/// Trit n (0..5) of a TQ1_0-packed byte: `((b * 3^n) mod 256) * 3 >> 8`.
#[inline]
pub fn trit(b: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = b.wrapping_mul(POW3[n]);
    ((u16::from(q) * 3) >> 8) as u8
}

/// Code (0, 1 or 2) of element `e` (0..256) of one TQ1_0 block.
#[inline]
pub fn code_tq1_0(block: &[u8], e: usize) -> u8 {
    if e < 160 {
        trit(block[e % 32], e / 32)
    } else if e < 240 {
        let r = e - 160;
        trit(block[32 + r % 16], r / 16)
    } else {
        let r = e - 240;
        trit(block[48 + r % 4], r / 4)
    }
}

/// Code (0, 1 or 2) of element `j` of an I2_S row: group `g = (j % 128) / 32` sits in bits
/// `[7 − 2g : 6 − 2g]` of byte `(j / 128) * 32 + j % 32`.
#[inline]
pub fn code_i2_s(row: &[u8], j: usize) -> u8 {
    let (blk, r) = (j / I2S_BLOCK, j % I2S_BLOCK);
    let (g, p) = (r / 32, r % 32);
    (row[blk * 32 + p] >> (6 - 2 * g)) & 3
}

/// Adds, subtracts or skips `q` according to a ternary code: `(code − 1) · q` without multiplying.
///
/// Code 3 is never written by any quantizer; a corrupt file may hold it. Every kernel reads it as
/// +1 ("bit 1 set"), so results on such data are deterministic and equal across ISAs (ggml's
/// dequantizer gives `2·d`; `quant::ternary_codes_valid` finds such tensors).
#[inline(always)]
fn apply(code: u8, q: i8, acc: i32) -> i32 {
    match code {
        0 => acc - i32::from(q),
        1 => acc,
        _ => acc + i32::from(q),
    }
}

fn dot_blocks(k: usize, q: &[i8], n_act: usize, sums: &mut [i32], code: impl Fn(usize) -> u8) {
    let nsb = k.div_ceil(QK_K);
    for t in 0..n_act {
        let qt = &q[t * k..(t + 1) * k];
        for b in 0..nsb {
            let end = ((b + 1) * QK_K).min(k);
            let mut acc = 0i32;
            for (j, &qj) in qt.iter().enumerate().take(end).skip(b * QK_K) {
                acc = apply(code(j), qj, acc);
            }
            sums[t * nsb + b] = acc;
        }
    }
}

/// TQ2_0 super-block sums (scalar twin).
pub fn dot_tq2_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    dot_blocks(k, q, n_act, sums, |j| {
        code_tq2_0(&w_row[j / QK_K * 66..], j % QK_K)
    });
}

/// TQ1_0 super-block sums (scalar twin).
pub fn dot_tq1_0(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    dot_blocks(k, q, n_act, sums, |j| {
        code_tq1_0(&w_row[j / QK_K * 54..], j % QK_K)
    });
}

/// I2_S super-block sums (scalar twin).
pub fn dot_i2_s(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
    dot_blocks(k, q, n_act, sums, |j| code_i2_s(w_row, j));
}

/// Plain f32 dot product in index order (scalar twin of the float kernels).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// Per-token row product (scalar twin of the `*_tok` kernels): for each activation row, TQ
/// formats give `Σ_b d_b · sumi_b` in block order (f32), I2_S the exact integer `Σ w·q` as f32.
/// The caller divides by the token scale (and multiplies by I2_S's `w_s`).
pub fn tok_row(
    format: crate::ternary::TernaryFormat,
    w_row: &[u8],
    q: &[i8],
    k: usize,
    n_act: usize,
    out: &mut [f32],
) {
    use crate::ternary::TernaryFormat;
    let nsb = k.div_ceil(QK_K);
    let mut sums = vec![0i32; nsb * n_act];
    match format {
        TernaryFormat::Tq2_0 => dot_tq2_0(w_row, q, k, n_act, &mut sums),
        TernaryFormat::Tq1_0 => dot_tq1_0(w_row, q, k, n_act, &mut sums),
        TernaryFormat::I2S => dot_i2_s(w_row, q, k, n_act, &mut sums),
    }
    let bb = format.row_bytes(QK_K);
    for (t, o) in out.iter_mut().enumerate().take(n_act) {
        let s = &sums[t * nsb..(t + 1) * nsb];
        *o = match format {
            TernaryFormat::I2S => s.iter().map(|&x| i64::from(x)).sum::<i64>() as f32,
            _ => {
                let mut acc = 0.0f32;
                for (b, &x) in s.iter().enumerate() {
                    acc += x as f32 * crate::blocks::read_f16(w_row, b * bb + bb - 2);
                }
                acc
            }
        };
    }
}
