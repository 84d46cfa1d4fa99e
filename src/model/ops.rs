//! Element-wise and row operations of the forward pass, written as plain Rust (no intrinsics:
//! `model/` never calls one). Numerics follow llama.cpp's CPU ops (FORMATS.md 3.4) so greedy
//! outputs can be compared with it.

/// `Σ v²` of a row in f64, as ggml takes it, in eight interleaved partial sums (independent
/// lanes the compiler vectorizes, instead of one chain of dependent adds). Each square is the
/// f32 product, exact in f64, so only the f64 rounding order differs from a sequential sum:
/// far below the f32 the mean is rounded to.
fn sum_squares(xr: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xr.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v * v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v * v);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// RMSNorm of each `n`-wide row of `x`, times `w`: `y = (x · 1/sqrt(mean(x²) + eps)) · w`.
/// The sum of squares is taken in f64, as ggml does.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = (sum_squares(xr) / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *y = (v * scale) * g;
        }
    }
}

/// In-place RMSNorm (for sub-norms).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let mean = (sum_squares(xr) / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = (*v * scale) * g;
        }
    }
}

/// Rotary position embedding tables for one position: `cos[i], sin[i]` for `i < n_rot / 2`,
/// angles built as ggml does (`θ_i = pos · base^(−2i/n_rot)` by repeated f32 multiplication,
/// divided by `freq_factors[i]` when the model has `rope_freqs`).
pub fn rope_table(
    pos: usize,
    n_rot: usize,
    base: f32,
    freq_factors: Option<&[f32]>,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut theta = pos as f32;
    for i in 0..n_rot / 2 {
        let t = match freq_factors {
            Some(f) => theta / f[i],
            None => theta,
        };
        cos[i] = t.cos();
        sin[i] = t.sin();
        theta *= theta_scale;
    }
}

/// Applies RoPE to every `head_dim`-wide head of `x` (one token): NEOX pairs `(i, i + n_rot/2)`,
/// normal pairs `(2i, 2i + 1)`; dimensions past `n_rot` are left unchanged.
pub fn rope(x: &mut [f32], head_dim: usize, n_rot: usize, neox: bool, cos: &[f32], sin: &[f32]) {
    let half = n_rot / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// `x ← softmax(x)` in f32 (the kernels crate's, shared with its attention kernels).
pub use ternmux_kernels::attend::softmax;

/// `silu(g) · u` in place into `g`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// `relu(g)² · u` in place into `g`.
pub fn relu2_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        let r = a.max(0.0);
        *a = r * r * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, -4.0];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut y = [0.0f32; 4];
        rms_norm(&x, &w, 1e-6, &mut y);
        let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f64 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((f64::from(y[i]) - f64::from(x[i]) / rms * f64::from(w[i])).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let (hd, n_rot) = (8, 8);
        let mut cos = [0.0; 4];
        let mut sin = [0.0; 4];
        rope_table(3, n_rot, 10000.0, None, &mut cos, &mut sin);
        for neox in [true, false] {
            let mut x: Vec<f32> = (0..hd).map(|i| i as f32 - 3.5).collect();
            let before: f32 = x.iter().map(|v| v * v).sum();
            rope(&mut x, hd, n_rot, neox, &cos, &sin);
            let after: f32 = x.iter().map(|v| v * v).sum();
            assert!((before - after).abs() < 1e-3);
        }
        // Position 0 is the identity.
        rope_table(0, n_rot, 10000.0, None, &mut cos, &mut sin);
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        rope(&mut x, hd, n_rot, true, &cos, &sin);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1000.0f32, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }
}
