//! On-disk block layouts of every weight format the kernels read.
//!
//! Each block is a `#[repr(C)]` plain-old-data struct with a compile-time size check, following
//! ggml's `ggml-common.h` (upstream `ggml-org/llama.cpp`) field by field. All multi-byte fields are
//! little-endian; `f16` is IEEE binary16. Blocks inside a memory-mapped GGUF are only guaranteed
//! 32-byte aligned as a whole tensor, and TQ1_0 (54 B) / TQ2_0 (66 B) blocks put their `f16` scale
//! at odd offsets, so code reads blocks from byte slices with unaligned loads
//! ([`bytemuck::pod_read_unaligned`]) and never casts a possibly misaligned pointer.
//!
//! I2_S (bitnet.cpp) is not a block format: it is a packed 2-bit matrix with one f32 scale for the
//! whole tensor in a 32-byte tail; see [`I2S_BLOCK`] and the `reference` module.

use bytemuck::{Pod, Zeroable};
use half::f16;

/// Elements in a k-quant / ternary super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;
/// Elements in a Q4_0 / Q4_1 / Q8_0 block.
pub const QK8_0: usize = 32;
/// Elements in one I2_S packing group: 128 weights in 32 bytes (bitnet.cpp `QK_I2_S`).
pub const I2S_BLOCK: usize = 128;
/// Bytes of the tail after I2_S packed data; its first four bytes hold the f32 tensor scale.
pub const I2S_TAIL: usize = 32;

/// TQ2_0: 256 ternary weights, 2.0625 bits per weight.
///
/// Byte `32c + m` of `qs` holds element `128c + 32l + m` in bits `[2l+1:2l]` (group 0 in the low
/// bits) as the code `round(x/d) + 1` in `{0, 1, 2}`; value = `(code - 1) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockTq2_0 {
    /// Four 2-bit codes per byte.
    pub qs: [u8; QK_K / 4],
    /// Block scale: the absolute maximum of the 256 source values.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockTq2_0>() == 66);

/// TQ1_0: 256 ternary weights, 1.6875 bits per weight (five trits per byte, `3^5 = 243 < 256`).
///
/// `qs[0..32)` byte m holds elements `m + 32n` (n = 0..5); `qs[32..48)` byte m holds
/// `160 + m + 16n` (n = 0..5); `qh[j]` holds `240 + j + 4n` (n = 0..4). A byte encodes the trits as
/// the fixed-point fraction `ceil(V * 256 / 243)`; trit n is `((b * 3^n) mod 256) * 3 >> 8`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockTq1_0 {
    /// Five trits per byte for elements 0..240.
    pub qs: [u8; (QK_K - 4 * QK_K / 64) / 5],
    /// Four trits per byte for elements 240..256.
    pub qh: [u8; QK_K / 64],
    /// Block scale (absolute maximum), stored **last**.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockTq1_0>() == 54);

/// Q8_0: 32 weights, 8.5 bits per weight; value = `d * qs[j]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Block scale.
    pub d: f16,
    /// Signed 8-bit quants.
    pub qs: [i8; QK8_0],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// Q4_0: 32 weights, 4.5 bits per weight; value = `d * (nibble - 8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Block scale.
    pub d: f16,
    /// Element j < 16 in the low nibble of byte j, element j + 16 in its high nibble.
    pub qs: [u8; QK8_0 / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Q4_1: 32 weights, 5 bits per weight; value = `d * nibble + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Block scale.
    pub d: f16,
    /// Block minimum.
    pub m: f16,
    /// Same nibble order as Q4_0.
    pub qs: [u8; QK8_0 / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// Q4_K: 256 weights in 8 sub-blocks of 32, 4.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4K {
    /// Super-block scale for the sub-block scales.
    pub d: f16,
    /// Super-block scale for the sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums (`get_scale_min_k4`).
    pub scales: [u8; 12],
    /// 32-byte chunk c gives sub-block 2c (low nibbles) and 2c + 1 (high nibbles).
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Q5_K: Q4_K plus one high bit per weight, 5.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5K {
    /// Super-block scale for the sub-block scales.
    pub d: f16,
    /// Super-block scale for the sub-block minimums.
    pub dmin: f16,
    /// As in Q4_K.
    pub scales: [u8; 12],
    /// Bit `2c` (low half) / `2c + 1` (high half) of `qh[l]` adds 16 to element l of chunk c.
    pub qh: [u8; QK_K / 8],
    /// As in Q4_K.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// Q6_K: 256 weights in 16 sub-blocks of 16, 6.5625 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low four bits of each quant.
    pub ql: [u8; QK_K / 2],
    /// High two bits of each quant.
    pub qh: [u8; QK_K / 4],
    /// Signed 8-bit sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Reads a block of type `T` from the start of `bytes` with an unaligned load.
///
/// Panics if `bytes` is shorter than the block; callers slice by validated block counts.
#[inline(always)]
pub fn read_block<T: Pod>(bytes: &[u8]) -> T {
    bytemuck::pod_read_unaligned(&bytes[..size_of::<T>()])
}

/// Reads a little-endian `f16` at `bytes[at..at + 2]` and widens it (exactly).
#[inline(always)]
pub fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Exact IEEE binary16 → binary32 widening in plain integer code: no runtime feature check
/// and no call, so it inlines into per-block loops (`half`'s conversion checks for F16C on every
/// call). Equal to `half::f16::to_f32` for all 65 536 inputs (tested).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // Zero or subnormal: mant · 2^-24, exact in f32.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            f32::from_bits(sign | v.to_bits())
        }
        // Infinity, or NaN made quiet (as `half` and F16C do).
        31 if mant == 0 => f32::from_bits(sign | 0x7f80_0000),
        31 => f32::from_bits(sign | 0x7fc0_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn f16_widening_is_exact_for_every_input() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            assert_eq!(
                super::f16_bits_to_f32(h).to_bits(),
                want.to_bits(),
                "f16 bits {h:#06x}"
            );
        }
    }
}
