//! ternmux (placeholder while the kernels crate builds).
