//! NEON ternary kernels (bit-exact with `reference`), with and without the dotprod extension.
//!
//! Per 256-element super-block the packed weights are decoded once into sixteen pairs of byte
//! masks (`pos`: weight +1, `neg`: weight −1) in natural element order, shared by the batch:
//! * TQ2_0 / I2_S: 8-bit shifts select the 2-bit plane; `pos = tst(c, 2)`, `neg = !tst(c, 3)`.
//! * TQ1_0: trit n of a byte is `q = b·3^n mod 256` (byte adds), weight −1 if `q < 86`, +1 if
//!   `q ≥ 171` (two unsigned compares); the four `qh` bytes are spread over one vector and scaled
//!   by the constant powers of three (a decode of the packing, not weight arithmetic).
//!
//! An activation vector is applied by selection — `(q & pos) − (q & neg)` — and summed
//! horizontally: plain NEON with `vpadalq_s8` (pairwise add-accumulate into i16: at most
//! 32 · 127 = 4 064 per lane per super-block), dotprod with `sdot` against a vector of ones
//! (a 4-way horizontal add into i32). `vdotq_s32` is unstable in Rust, so `sdot` is emitted with
//! `asm!` as candle does.

use core::arch::aarch64::*;

/// Selection masks of 16 weights.
#[derive(Clone, Copy)]
pub(crate) struct Masks {
    pos: int8x16_t,
    neg: int8x16_t,
}

#[target_feature(enable = "neon")]
#[inline]
fn load16(bytes: &[u8]) -> uint8x16_t {
    let bytes = &bytes[..16];
    // SAFETY: `bytes` has exactly 16 readable bytes; vld1q has no alignment requirement.
    unsafe { vld1q_u8(bytes.as_ptr()) }
}

#[target_feature(enable = "neon")]
#[inline]
fn load16_i8(q: &[i8]) -> int8x16_t {
    let q = &q[..16];
    // SAFETY: `q` has exactly 16 readable bytes; vld1q has no alignment requirement.
    unsafe { vld1q_s8(q.as_ptr()) }
}

/// 2-bit code in bits [1:0] of each byte → masks.
#[target_feature(enable = "neon")]
#[inline]
fn code_masks(c: uint8x16_t) -> Masks {
    Masks {
        pos: vreinterpretq_s8_u8(vtstq_u8(c, vdupq_n_u8(2))),
        neg: vreinterpretq_s8_u8(vmvnq_u8(vtstq_u8(c, vdupq_n_u8(3)))),
    }
}

/// TQ1_0 fixed-point trit byte → masks.
#[target_feature(enable = "neon")]
#[inline]
fn trit_masks(q: uint8x16_t) -> Masks {
    Masks {
        pos: vreinterpretq_s8_u8(vcgeq_u8(q, vdupq_n_u8(171))),
        neg: vreinterpretq_s8_u8(vcltq_u8(q, vdupq_n_u8(86))),
    }
}

#[target_feature(enable = "neon")]
#[inline]
fn times3(x: uint8x16_t) -> uint8x16_t {
    vaddq_u8(vaddq_u8(x, x), x)
}

/// Shifts right by `2l` (l = 0..4) for TQ2_0 planes.
#[target_feature(enable = "neon")]
#[inline]
fn plane_tq2(c: uint8x16_t, l: usize) -> uint8x16_t {
    match l {
        0 => c,
        1 => vshrq_n_u8::<2>(c),
        2 => vshrq_n_u8::<4>(c),
        _ => vshrq_n_u8::<6>(c),
    }
}

/// Decodes one 66-byte TQ2_0 block.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn decode_tq2_0(blk: &[u8]) -> [Masks; 16] {
    let raw = [
        load16(&blk[0..]),
        load16(&blk[16..]),
        load16(&blk[32..]),
        load16(&blk[48..]),
    ];
    core::array::from_fn(|i| {
        // i = 8c + 2l + h: chunk c, plane l, half h of the 32 bytes → elements 128c + 32l + 16h.
        let (c, l, h) = (i / 8, (i % 8) / 2, i % 2);
        code_masks(plane_tq2(raw[2 * c + h], l))
    })
}

/// Decodes 32 bytes of I2_S (one 128-element group).
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn decode_i2_s_group(bytes: &[u8]) -> [Masks; 8] {
    let raw = [load16(&bytes[0..]), load16(&bytes[16..])];
    core::array::from_fn(|i| {
        // i = 2g + h: group g (shift 6 − 2g), half h → elements 32g + 16h.
        let (g, h) = (i / 2, i % 2);
        code_masks(plane_tq2(raw[h], 3 - g))
    })
}

/// Decodes one 54-byte TQ1_0 block.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn decode_tq1_0(blk: &[u8]) -> [Masks; 16] {
    let mut a = [load16(&blk[0..]), load16(&blk[16..])];
    let mut v = load16(&blk[32..]);
    let mut out = [code_masks(vdupq_n_u8(1)); 16];
    for n in 0..5 {
        out[2 * n] = trit_masks(a[0]); // elements 32n .. 32n + 16
        out[2 * n + 1] = trit_masks(a[1]); // 32n + 16 .. 32n + 32
        out[10 + n] = trit_masks(v); // 160 + 16n ..
        a = [times3(a[0]), times3(a[1])];
        v = times3(v);
    }
    let h = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes([
        blk[48], blk[49], blk[50], blk[51],
    ])));
    const POW3: [u8; 16] = [1, 1, 1, 1, 3, 3, 3, 3, 9, 9, 9, 9, 27, 27, 27, 27];
    // SAFETY: POW3 is a 16-byte array.
    let pow3 = unsafe { vld1q_u8(POW3.as_ptr()) };
    out[15] = trit_masks(vmulq_u8(h, pow3)); // lane 4n + j = element 240 + 4n + j
    out
}

/// `(q & pos) − (q & neg)`: the weight applied by selection.
#[target_feature(enable = "neon")]
#[inline]
fn select(m: &Masks, x: int8x16_t) -> int8x16_t {
    vsubq_s8(vandq_s8(x, m.pos), vandq_s8(x, m.neg))
}

/// Exact `Σ w·q` with plain NEON pairwise accumulation.
#[target_feature(enable = "neon")]
#[inline]
fn block_sum_plain<const N: usize>(m: &[Masks; N], q: &[i8]) -> i32 {
    let q = &q[..16 * N];
    let mut acc = vdupq_n_s16(0);
    for (j, mj) in m.iter().enumerate() {
        acc = vpadalq_s8(acc, select(mj, load16_i8(&q[16 * j..])));
    }
    vaddlvq_s16(acc)
}

/// `acc += Σ4 a·b` per i32 lane (`sdot`); used with `b` = ones as a horizontal add.
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads and writes the named vector registers; the dotprod feature is
    // enabled on this function, which is only reached from dotprod-gated kernels.
    unsafe {
        core::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack),
        );
    }
    acc
}

/// Exact `Σ w·q` with `sdot` horizontal adds.
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn block_sum_dotprod<const N: usize>(m: &[Masks; N], q: &[i8]) -> i32 {
    let q = &q[..16 * N];
    let ones = vdupq_n_s8(1);
    let mut acc = vdupq_n_s32(0);
    for (j, mj) in m.iter().enumerate() {
        acc = sdot(acc, select(mj, load16_i8(&q[16 * j..])), ones);
    }
    vaddvq_s32(acc)
}

macro_rules! neon_kernels {
    ($attr:meta, $sum:ident, $tq2:ident, $tq1:ident, $i2s:ident) => {
        /// TQ2_0 super-block sums; same contract as `reference::dot_tq2_0`.
        ///
        /// # Safety
        /// The CPU must support the enabled features. Slice lengths are checked by indexing.
        #[$attr]
        pub unsafe fn $tq2(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
            let nsb = k / 256;
            for b in 0..nsb {
                let m = decode_tq2_0(&w_row[b * 66..b * 66 + 66]);
                for t in 0..n_act {
                    sums[t * nsb + b] = $sum(&m, &q[t * k + b * 256..]);
                }
            }
        }

        /// TQ1_0 super-block sums; same contract as `reference::dot_tq1_0`.
        ///
        /// # Safety
        /// The CPU must support the enabled features. Slice lengths are checked by indexing.
        #[$attr]
        pub unsafe fn $tq1(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
            let nsb = k / 256;
            for b in 0..nsb {
                let m = decode_tq1_0(&w_row[b * 54..b * 54 + 54]);
                for t in 0..n_act {
                    sums[t * nsb + b] = $sum(&m, &q[t * k + b * 256..]);
                }
            }
        }

        /// I2_S super-block sums; same contract as `reference::dot_i2_s`.
        ///
        /// # Safety
        /// The CPU must support the enabled features. Slice lengths are checked by indexing.
        #[$attr]
        pub unsafe fn $i2s(w_row: &[u8], q: &[i8], k: usize, n_act: usize, sums: &mut [i32]) {
            let nsb = k.div_ceil(256);
            let full = k / 256;
            for b in 0..full {
                let lo = decode_i2_s_group(&w_row[b * 64..]);
                let hi = decode_i2_s_group(&w_row[b * 64 + 32..]);
                let m: [Masks; 16] =
                    core::array::from_fn(|i| if i < 8 { lo[i] } else { hi[i - 8] });
                for t in 0..n_act {
                    sums[t * nsb + b] = $sum(&m, &q[t * k + b * 256..]);
                }
            }
            if nsb > full {
                let m = decode_i2_s_group(&w_row[full * 64..]);
                for t in 0..n_act {
                    sums[t * nsb + full] = $sum(&m, &q[t * k + full * 256..]);
                }
            }
        }
    };
}

/// Plain NEON kernels (every AArch64 CPU).
pub mod plain {
    use super::*;
    neon_kernels!(
        target_feature(enable = "neon"),
        block_sum_plain,
        dot_tq2_0,
        dot_tq1_0,
        dot_i2_s
    );
}

/// NEON + dotprod kernels (Armv8.2-A and later with FEAT_DotProd).
pub mod dotprod {
    use super::*;
    neon_kernels!(
        target_feature(enable = "neon,dotprod"),
        block_sum_dotprod,
        dot_tq2_0,
        dot_tq1_0,
        dot_i2_s
    );
}

/// f32 dot product with four FMA accumulators (≤ ε class).
///
/// # Safety
/// The CPU must support NEON (every AArch64 CPU does).
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (j, accj) in acc.iter_mut().enumerate() {
            let (x, y) = (&a[i + 4 * j..i + 4 * j + 4], &b[i + 4 * j..i + 4 * j + 4]);
            // SAFETY: both slices hold exactly 4 readable f32.
            let (vx, vy) = unsafe { (vld1q_f32(x.as_ptr()), vld1q_f32(y.as_ptr())) };
            *accj = vfmaq_f32(*accj, vx, vy);
        }
        i += 16;
    }
    let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    let mut total = vaddvq_f32(s);
    for j in i..n {
        total += a[j] * b[j];
    }
    total
}
