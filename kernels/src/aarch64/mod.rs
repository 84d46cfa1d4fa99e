//! AArch64 kernels: NEON, with and without the dotprod extension.
pub mod neon;
