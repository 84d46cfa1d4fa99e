//! ggml tensor type ids, their block sizes, and the dialect clashes between upstream llama.cpp,
//! Microsoft's bitnet.cpp fork and ik_llama.cpp (FORMATS.md 2.1).
//!
//! Ids are kept as the raw `u32` read from the file; [`TypeInfo::of`] maps them to what we know.
//! Ids whose meaning depends on the dialect (36, 37, 38, 39) are resolved per tensor by
//! [`super::reader`] from the tensor's byte range.

use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::ternary::TernaryFormat;

/// A tensor storage type ternmux can compute with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// A float or block-quantized format for embeddings, heads and norms.
    Float(FloatFormat),
    /// A ternary format for linear layers.
    Ternary(TernaryFormat),
}

impl GgmlType {
    /// The ggml type id (bitnet.cpp's for I2_S).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Float(f) => match f {
                FloatFormat::F32 => ids::F32,
                FloatFormat::F16 => ids::F16,
                FloatFormat::BF16 => ids::BF16,
                FloatFormat::Q8_0 => ids::Q8_0,
                FloatFormat::Q4_0 => ids::Q4_0,
                FloatFormat::Q4_1 => ids::Q4_1,
                FloatFormat::Q4K => ids::Q4_K,
                FloatFormat::Q5K => ids::Q5_K,
                FloatFormat::Q6K => ids::Q6_K,
            },
            GgmlType::Ternary(t) => match t {
                TernaryFormat::Tq1_0 => ids::TQ1_0,
                TernaryFormat::Tq2_0 => ids::TQ2_0,
                TernaryFormat::I2S => ids::I2_S,
            },
        }
    }

    /// Upper-case name as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        TypeInfo::of(self.id()).name
    }

    /// Bytes of a tensor with `elems` elements whose rows have `ne0` elements, or `None` when the
    /// shape does not fit the block size or the size overflows.
    pub fn tensor_bytes(self, ne0: u64, elems: u64) -> Option<u64> {
        match self {
            GgmlType::Ternary(TernaryFormat::I2S) => {
                if !ne0.is_multiple_of(128) {
                    return None;
                }
                (elems / 4).checked_add(32)
            }
            _ => {
                let info = TypeInfo::of(self.id());
                if !ne0.is_multiple_of(info.block_elems) {
                    return None;
                }
                (elems / info.block_elems).checked_mul(info.block_bytes)
            }
        }
    }
}

/// Type ids (ggml's `enum ggml_type`, upstream `ggml.h`; 36–39 per FORMATS.md 2.1).
pub mod ids {
    #![allow(missing_docs)]
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
    pub const TQ1_0: u32 = 34;
    pub const TQ2_0: u32 = 35;
    /// bitnet.cpp / ik_llama.cpp I2_S; upstream: removed IQ4_NL_4_4 (reserved).
    pub const I2_S: u32 = 36;
    /// bitnet.cpp I8_S (activation type, never on disk); upstream: removed IQ4_NL_4_8.
    pub const I8_S: u32 = 37;
    /// bitnet.cpp TL1; upstream: removed IQ4_NL_8_8.
    pub const TL1: u32 = 38;
    /// Upstream MXFP4; bitnet.cpp TL2.
    pub const MXFP4_OR_TL2: u32 = 39;
}

/// What is known about a type id: its name, block shape and whether ternmux computes with it.
#[derive(Clone, Copy, Debug)]
pub struct TypeInfo {
    /// Name as llama.cpp prints it (dialect-qualified for clashing ids).
    pub name: &'static str,
    /// Elements per block (0 when unknown).
    pub block_elems: u64,
    /// Bytes per block (0 when unknown or shape-dependent).
    pub block_bytes: u64,
    /// The computable type, when ternmux supports it.
    pub supported: Option<GgmlType>,
}

impl TypeInfo {
    /// Looks up a raw id. Unknown ids give a name of `"unknown"` and zero sizes.
    pub fn of(id: u32) -> TypeInfo {
        use FloatFormat as F;
        let (name, be, bb, sup) = match id {
            0 => ("F32", 1, 4, Some(GgmlType::Float(F::F32))),
            1 => ("F16", 1, 2, Some(GgmlType::Float(F::F16))),
            2 => ("Q4_0", 32, 18, Some(GgmlType::Float(F::Q4_0))),
            3 => ("Q4_1", 32, 20, Some(GgmlType::Float(F::Q4_1))),
            6 => ("Q5_0", 32, 22, None),
            7 => ("Q5_1", 32, 24, None),
            8 => ("Q8_0", 32, 34, Some(GgmlType::Float(F::Q8_0))),
            9 => ("Q8_1", 32, 36, None),
            10 => ("Q2_K", 256, 84, None),
            11 => ("Q3_K", 256, 110, None),
            12 => ("Q4_K", 256, 144, Some(GgmlType::Float(F::Q4K))),
            13 => ("Q5_K", 256, 176, Some(GgmlType::Float(F::Q5K))),
            14 => ("Q6_K", 256, 210, Some(GgmlType::Float(F::Q6K))),
            15 => ("Q8_K", 256, 292, None),
            16 => ("IQ2_XXS", 256, 66, None),
            17 => ("IQ2_XS", 256, 74, None),
            18 => ("IQ3_XXS", 256, 98, None),
            19 => ("IQ1_S", 256, 50, None),
            20 => ("IQ4_NL", 32, 18, None),
            21 => ("IQ3_S", 256, 110, None),
            22 => ("IQ2_S", 256, 82, None),
            23 => ("IQ4_XS", 256, 136, None),
            24 => ("I8", 1, 1, None),
            25 => ("I16", 1, 2, None),
            26 => ("I32", 1, 4, None),
            27 => ("I64", 1, 8, None),
            28 => ("F64", 1, 8, None),
            29 => ("IQ1_M", 256, 56, None),
            30 => ("BF16", 1, 2, Some(GgmlType::Float(F::BF16))),
            34 => (
                "TQ1_0",
                256,
                54,
                Some(GgmlType::Ternary(TernaryFormat::Tq1_0)),
            ),
            35 => (
                "TQ2_0",
                256,
                66,
                Some(GgmlType::Ternary(TernaryFormat::Tq2_0)),
            ),
            36 => ("I2_S", 128, 32, Some(GgmlType::Ternary(TernaryFormat::I2S))),
            37 => (
                "I8_S (bitnet.cpp) / IQ4_NL_4_8 (removed upstream)",
                0,
                0,
                None,
            ),
            38 => (
                "TL1 (bitnet.cpp) / IQ4_NL_8_8 (removed upstream)",
                0,
                0,
                None,
            ),
            39 => ("MXFP4 (upstream) / TL2 (bitnet.cpp)", 32, 17, None),
            _ => ("unknown", 0, 0, None),
        };
        TypeInfo {
            name,
            block_elems: be,
            block_bytes: bb,
            supported: sup,
        }
    }
}
