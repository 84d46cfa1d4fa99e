//! Packing ternary codes (0, 1, 2 = weight −1, 0, +1) into each format's bytes: the inverse of
//! the placement rules in [`crate::reference`], shared by the quantizers, the format converters and
//! the tests.

use crate::blocks::{I2S_BLOCK, QK_K};
use half::f16;

/// Packs 256 codes and a scale into one 66-byte TQ2_0 block.
pub fn pack_tq2_0(codes: &[u8; QK_K], d: f16, out: &mut [u8]) {
    let out = &mut out[..66];
    out[..64].fill(0);
    for (e, &c) in codes.iter().enumerate() {
        let (chunk, rest) = (e / 128, e % 128);
        let (l, m) = (rest / 32, rest % 32);
        out[32 * chunk + m] |= (c & 3) << (2 * l);
    }
    out[64..66].copy_from_slice(&d.to_le_bytes());
}

/// Fixed-point byte of up to five trits, most significant first (`ceil(V · 256 / 243)`).
fn pack_trits(trits: &[u8]) -> u8 {
    let mut v: u32 = 0;
    for &t in trits {
        v = v * 3 + u32::from(t.min(2));
    }
    // Four-trit bytes (qh) are scaled by one more factor of 3 so trit n decodes identically.
    for _ in trits.len()..5 {
        v *= 3;
    }
    ((v * 256).div_ceil(243)) as u8
}

/// Packs 256 codes and a scale into one 54-byte TQ1_0 block.
pub fn pack_tq1_0(codes: &[u8; QK_K], d: f16, out: &mut [u8]) {
    let out = &mut out[..54];
    for m in 0..32 {
        let t: [u8; 5] = core::array::from_fn(|n| codes[m + 32 * n]);
        out[m] = pack_trits(&t);
    }
    for m in 0..16 {
        let t: [u8; 5] = core::array::from_fn(|n| codes[160 + m + 16 * n]);
        out[32 + m] = pack_trits(&t);
    }
    for j in 0..4 {
        let t: [u8; 4] = core::array::from_fn(|n| codes[240 + j + 4 * n]);
        out[48 + j] = pack_trits(&t);
    }
    out[52..54].copy_from_slice(&d.to_le_bytes());
}

/// Packs one I2_S row of `codes.len()` codes (a multiple of 128) into `codes.len() / 4` bytes.
pub fn pack_i2_s_row(codes: &[u8], out: &mut [u8]) {
    let out = &mut out[..codes.len() / 4];
    out.fill(0);
    for (j, &c) in codes.iter().enumerate() {
        let (blk, r) = (j / I2S_BLOCK, j % I2S_BLOCK);
        let (g, p) = (r / 32, r % 32);
        out[blk * 32 + p] |= (c & 3) << (6 - 2 * g);
    }
}

/// Packs a whole `rows × cols` I2_S tensor: every row, then the 32-byte tail whose first four
/// bytes hold the f32 scale `w_s` (`out` is `rows · cols / 4 + 32` bytes).
pub fn pack_i2_s_tensor(codes: &[u8], rows: usize, cols: usize, w_s: f32, out: &mut [u8]) {
    let rb = cols / 4;
    for r in 0..rows {
        pack_i2_s_row(
            &codes[r * cols..(r + 1) * cols],
            &mut out[r * rb..(r + 1) * rb],
        );
    }
    let at = rows * rb;
    out[at..at + 32].fill(0);
    out[at..at + 4].copy_from_slice(&w_s.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{code_i2_s, code_tq1_0, code_tq2_0, trit};

    #[test]
    fn every_trit_combination_round_trips() {
        for v in 0..243u32 {
            let t: [u8; 5] = core::array::from_fn(|n| ((v / 3u32.pow(4 - n as u32)) % 3) as u8);
            let b = pack_trits(&t);
            for (n, &tn) in t.iter().enumerate() {
                assert_eq!(trit(b, n), tn, "byte {b} trit {n} of {t:?}");
            }
        }
        for v in 0..81u32 {
            let t: [u8; 4] = core::array::from_fn(|n| ((v / 3u32.pow(3 - n as u32)) % 3) as u8);
            let b = pack_trits(&t);
            for (n, &tn) in t.iter().enumerate() {
                assert_eq!(trit(b, n), tn, "qh byte {b} trit {n} of {t:?}");
            }
        }
    }

    #[test]
    fn blocks_round_trip_positionally() {
        let codes: [u8; 256] = core::array::from_fn(|e| ((e * 7 + e / 5) % 3) as u8);
        let mut b2 = [0u8; 66];
        pack_tq2_0(&codes, f16::ONE, &mut b2);
        let mut b1 = [0u8; 54];
        pack_tq1_0(&codes, f16::ONE, &mut b1);
        let mut bi = [0u8; 64];
        pack_i2_s_row(&codes, &mut bi);
        for (e, &c) in codes.iter().enumerate() {
            assert_eq!(code_tq2_0(&b2, e), c);
            assert_eq!(code_tq1_0(&b1, e), c);
            assert_eq!(code_i2_s(&bi, e), c);
        }
    }
}
