//! CPU feature detection and the kernel table, chosen once per process.
//!
//! [`Kernels::get`] picks the widest ISA the CPU supports (AVX-512 VNNI, AVX2, NEON + dotprod,
//! NEON, scalar) on first use and caches it in a `OnceLock`; `TERNMUX_ISA=scalar|avx2|avx512|
//! avx512-vbmi|neon|neon-dotprod` forces one. A forced ISA the CPU lacks is reported on stderr once and the
//! detected one is used instead (never an illegal instruction). AMX is never used: on these
//! machines CPUID reports it while executing it raises SIGILL (CRATES.md).

use std::fmt;
use std::sync::OnceLock;

/// A row kernel: exact super-block sums for one weight row and `n_act` activation rows.
///
/// Arguments: `(w_row, q, k, n_act, sums)`; see `reference` for the contract.
pub type TernaryRowFn = unsafe fn(&[u8], &[i8], usize, usize, &mut [i32]);
/// A per-token row kernel: `(w_row, acts, out)` writes, per activation row of `acts`, the TQ
/// block-scaled sum `Σ_b d_b · sumi_b` or the I2_S integer sum `Σ w·q` (see
/// `reference::tok_row`).
pub type TokRowFn = unsafe fn(&[u8], &crate::act::TokActs<'_>, &mut [f32]);
/// A per-token multi-row kernel: `(w, row_bytes, rows, acts, out)` writes the per-token products
/// of `rows` consecutive weight rows (`row_bytes` apart in `w`) for every row of `acts` into
/// `out[r · n_act + t]` — the same values as its [`TokRowFn`] row by row.
pub type TokRowsFn = unsafe fn(&[u8], usize, usize, &crate::act::TokActs<'_>, &mut [f32]);
/// An f32 dot product.
pub type DotF32Fn = unsafe fn(&[f32], &[f32]) -> f32;
/// `Σ f16(w_i) · x_i` from f16 bytes.
pub type DotF16Fn = unsafe fn(&[u8], &[f32]) -> f32;
/// F16 rows × a batch: `(w, row_bytes, rows, x, k, n_tok, out)` writes `out[r · n_tok + t] =
/// Σ_j f16(w[r, j]) · x[t, j]`.
pub type RowsF16Fn = unsafe fn(&[u8], usize, usize, &[f32], usize, usize, &mut [f32]);
/// `out_i += a · f16(w_i)` over `out.len()` elements of f16 bytes `w`.
pub type AxpyF16Fn = unsafe fn(f32, &[u8], &mut [f32]);
/// An int8 row against a batch: `(codes, acts, out)` writes `out[t] = Σ_b s_b · Σ c · q` for
/// every token of `acts` (see [`crate::int8`]).
pub type Int8RowFn = unsafe fn(&[u8], &crate::int8::Int8Acts, &mut [f32]);
/// Attention of a head group over one KV head's f16 cache (see [`crate::attend`]).
pub type AttendF16Fn = unsafe fn(&[f32], &crate::attend::F16Cache<'_>, f32, &mut [f32], &mut [f32]);
/// f16 bytes → f32 conversion.
pub type F16ToF32Fn = unsafe fn(&[u8], &mut [f32]);

/// Instruction-set families with a kernel implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar twins (the definition).
    Scalar,
    /// x86-64 AVX2 (+ FMA, F16C for the float kernels).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/VNNI.
    Avx512,
    /// x86-64 AVX-512 F/BW/VL/VNNI plus VBMI (the 2-bit codes by one table lookup).
    Avx512Vbmi,
    /// AArch64 NEON without dotprod.
    Neon,
    /// AArch64 NEON with the dotprod extension.
    NeonDotprod,
}

impl Isa {
    /// Every ISA, widest first within each architecture.
    pub const ALL: [Isa; 6] = [
        Isa::Avx512Vbmi,
        Isa::Avx512,
        Isa::Avx2,
        Isa::NeonDotprod,
        Isa::Neon,
        Isa::Scalar,
    ];

    /// Name accepted by `TERNMUX_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vbmi => "avx512-vbmi",
            Isa::Neon => "neon",
            Isa::NeonDotprod => "neon-dotprod",
        }
    }

    /// Parses a `TERNMUX_ISA` value.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the ISA's kernels.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vbmi => {
                Isa::Avx512.supported() && std::is_x86_feature_detected!("avx512vbmi")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One ISA's kernels. Obtain with [`Kernels::get`] or [`Kernels::for_isa`]; a table only exists
/// for an ISA the running CPU supports, which is what makes calling its entries sound.
#[derive(Debug)]
pub struct Kernels {
    isa: Isa,
    pub(crate) tq2_0: TernaryRowFn,
    pub(crate) tq1_0: TernaryRowFn,
    pub(crate) i2_s: TernaryRowFn,
    /// Fast per-token kernels (TQ2_0, TQ1_0, I2_S); `None` → super-block sums + `combine`.
    pub(crate) tok: Option<[TokRowFn; 3]>,
    /// Multi-row per-token kernels (register tiles of rows × tokens), where an ISA has them.
    pub(crate) tok_rows: [Option<TokRowsFn>; 3],
    pub(crate) dot_f32: DotF32Fn,
    pub(crate) f16_to_f32: F16ToF32Fn,
    /// Fused f16 dot product for single-token heads; `None` → convert, then `dot_f32`.
    pub(crate) dot_f16: Option<DotF16Fn>,
    /// Batched f16 rows (register tiles of rows × tokens); `None` → dequantize, then `dot_f32`.
    pub(crate) rows_f16: Option<RowsF16Fn>,
    /// Fused `out += a · f16(w)` (attention values over an f16 cache); `None` → convert, then
    /// add. Same IEEE operations either way (a multiply, then an add: no FMA), so the same bits.
    pub(crate) axpy_f16: Option<AxpyF16Fn>,
    /// Int8 rows (requantized heads) against per-block int8 activations.
    pub(crate) int8_row: Int8RowFn,
    /// Fused attention over an f16 cache and the multiple of the head dimension it takes (its
    /// lane count); `None`, or another head dimension → the per-position twin
    /// ([`crate::attend::attend_f16_twin`]).
    pub(crate) attend_f16: Option<(AttendF16Fn, usize)>,
}

/// Scalar f16 → f32 conversion (the `half` crate; it uses F16C/FP16 itself when present).
fn f16_to_f32_scalar(bytes: &[u8], out: &mut [f32]) {
    crate::dequant::dequantize_row_f16(bytes, out);
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    tq2_0: crate::reference::dot_tq2_0,
    tq1_0: crate::reference::dot_tq1_0,
    i2_s: crate::reference::dot_i2_s,
    tok: None,
    tok_rows: [None; 3],
    dot_f32: crate::reference::dot_f32,
    f16_to_f32: f16_to_f32_scalar,
    dot_f16: None,
    rows_f16: None,
    axpy_f16: None,
    int8_row: crate::int8::int8_row,
    attend_f16: None,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    isa: Isa::Avx2,
    tq2_0: crate::x86_64::avx2::dot_tq2_0,
    tq1_0: crate::x86_64::avx2::dot_tq1_0,
    i2_s: crate::x86_64::avx2::dot_i2_s,
    tok: Some([
        crate::x86_64::avx2::tok_tq2_0,
        crate::x86_64::avx2::tok_tq1_0,
        crate::x86_64::avx2::tok_i2_s,
    ]),
    tok_rows: [None; 3],
    dot_f32: crate::x86_64::avx2::dot_f32,
    f16_to_f32: crate::x86_64::avx2::f16_to_f32,
    dot_f16: Some(crate::x86_64::avx2::dot_f16),
    rows_f16: None,
    axpy_f16: Some(crate::x86_64::avx2::axpy_f16),
    int8_row: crate::x86_64::avx2::int8_row,
    attend_f16: Some((crate::x86_64::avx2_attend::attend_f16, 8)),
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    isa: Isa::Avx512,
    tq2_0: crate::x86_64::avx512::dot_tq2_0,
    tq1_0: crate::x86_64::avx512::dot_tq1_0,
    i2_s: crate::x86_64::avx512::dot_i2_s,
    tok: Some([
        crate::x86_64::avx512_tok::bw::tok_tq2_0,
        crate::x86_64::avx512::tok_tq1_0,
        crate::x86_64::avx512_tok::bw::tok_i2_s,
    ]),
    tok_rows: [
        Some(crate::x86_64::avx512_tok::bw::tok_rows_tq2_0),
        None,
        Some(crate::x86_64::avx512_tok::bw::tok_rows_i2_s),
    ],
    dot_f32: crate::x86_64::avx512::dot_f32,
    f16_to_f32: crate::x86_64::avx2::f16_to_f32,
    dot_f16: Some(crate::x86_64::avx512::dot_f16),
    rows_f16: Some(crate::x86_64::avx512::rows_f16),
    axpy_f16: Some(crate::x86_64::avx2::axpy_f16),
    int8_row: crate::x86_64::avx512::int8_row,
    attend_f16: Some((crate::x86_64::avx512_attend::attend_f16, 16)),
};

/// AVX-512 with VBMI: the same table but the 2-bit per-token kernels' code conversion.
#[cfg(target_arch = "x86_64")]
static AVX512_VBMI: Kernels = Kernels {
    isa: Isa::Avx512Vbmi,
    tok: Some([
        crate::x86_64::avx512_tok::vbmi::tok_tq2_0,
        crate::x86_64::avx512::tok_tq1_0,
        crate::x86_64::avx512_tok::vbmi::tok_i2_s,
    ]),
    tok_rows: [
        Some(crate::x86_64::avx512_tok::vbmi::tok_rows_tq2_0),
        None,
        Some(crate::x86_64::avx512_tok::vbmi::tok_rows_i2_s),
    ],
    ..AVX512
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernels = Kernels {
    isa: Isa::Neon,
    tq2_0: crate::aarch64::neon::plain::dot_tq2_0,
    tq1_0: crate::aarch64::neon::plain::dot_tq1_0,
    i2_s: crate::aarch64::neon::plain::dot_i2_s,
    tok: None,
    tok_rows: [None; 3],
    dot_f32: crate::aarch64::neon::dot_f32,
    f16_to_f32: f16_to_f32_scalar,
    dot_f16: None,
    rows_f16: None,
    axpy_f16: None,
    int8_row: crate::int8::int8_row,
    attend_f16: None,
};

#[cfg(target_arch = "aarch64")]
static NEON_DOTPROD: Kernels = Kernels {
    isa: Isa::NeonDotprod,
    tq2_0: crate::aarch64::neon::dotprod::dot_tq2_0,
    tq1_0: crate::aarch64::neon::dotprod::dot_tq1_0,
    i2_s: crate::aarch64::neon::dotprod::dot_i2_s,
    tok: None,
    tok_rows: [None; 3],
    dot_f32: crate::aarch64::neon::dot_f32,
    f16_to_f32: f16_to_f32_scalar,
    dot_f16: None,
    rows_f16: None,
    axpy_f16: None,
    int8_row: crate::int8::int8_row,
    attend_f16: None,
};

impl Kernels {
    /// The kernels of `isa`, or `None` if this CPU (or this build's architecture) lacks it.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        if !isa.supported() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&AVX2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(&AVX512),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vbmi => Some(&AVX512_VBMI),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(&NEON),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => Some(&NEON_DOTPROD),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The widest ISA this CPU supports.
    pub fn detect() -> &'static Kernels {
        Isa::ALL
            .into_iter()
            .find_map(Kernels::for_isa)
            .unwrap_or(&SCALAR)
    }

    /// Every ISA this CPU supports (for tests and benchmarks).
    pub fn available() -> Vec<&'static Kernels> {
        Isa::ALL.into_iter().filter_map(Kernels::for_isa).collect()
    }

    /// The process-wide choice: `TERNMUX_ISA` if set and supported, else [`Kernels::detect`].
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            let detected = Kernels::detect();
            let Ok(want) = std::env::var("TERNMUX_ISA") else {
                return detected;
            };
            match Isa::parse(&want) {
                Some(isa) => Kernels::for_isa(isa).unwrap_or_else(|| {
                    eprintln!(
                        "ternmux: TERNMUX_ISA={want} is not supported by this CPU; using {}",
                        detected.isa
                    );
                    detected
                }),
                None => {
                    eprintln!(
                        "ternmux: TERNMUX_ISA={want} is not one of scalar, avx2, avx512, \
                         avx512-vbmi, neon, neon-dotprod; using {}",
                        detected.isa
                    );
                    detected
                }
            }
        })
    }

    /// Which ISA these kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }
}
