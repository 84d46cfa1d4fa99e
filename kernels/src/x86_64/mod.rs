//! x86-64 kernels: AVX2 (+FMA, F16C) and AVX-512 (F, BW, VL, VNNI; VBMI where present).
pub mod attend_tiles;
pub mod avx2;
pub mod avx2_attend;
pub mod avx512;
pub mod avx512_attend;
pub mod avx512_tok;
