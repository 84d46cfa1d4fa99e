// Row-wise ops, one work-group per token row (`regs`: GPUs keep the row in registers; CPU
// devices loop, which suits their work-item loops around barriers better): RMSNorm, per-token
// int8 quantization of a ternary layer's input (bitnet.cpp's absmax rule: s = 127 /
// max(absmax, 1e-5), q = clamp(rint(v·s))), and the FFN activation. Fused so that a layer's
// input is normed and quantized in one launch. The norm's two paths are common.cl's
// `norm_quant_row` / `norm_quant_regs` (the GEMV and attention epilogues use the first); the FFN
// activation's follow here, with the same split.

// y = RMSNorm(x row `row0 + t`) · w (when has_norm; else y = x), written to y when write_y;
// its int8 quantization to q / qs[t] when write_q. x and y may alias (same index, same work-item).
__kernel void norm_quant(__global const float* x, int n, int row0,
                         __global const float* w, int has_norm, float eps,
                         __global float* y, int write_y,
                         __global char* q, __global float* qs, int write_q, int regs,
                         __local float* scratch) {
    int t = get_group_id(0), wg = get_local_size(0);
    const __global float* xr = x + (size_t)(row0 + t) * n;
    __global float* yr = y + (size_t)t * n;
    if (regs && n <= RQ * wg) {
        // The row in registers (GPUs): one batch of loads, no second read.
        norm_quant_regs(xr, n, w, has_norm, eps, yr, write_y, q + (size_t)t * n, qs + t, write_q,
                        scratch);
        return;
    }
    norm_quant_row(xr, n, w, has_norm, eps, yr, write_y, q + (size_t)t * n, qs + t, write_q,
                   scratch);
}

// One value of the FFN activation: act(a) · u (act 0: SiLU, 1: ReLU²); a chunk of them.
inline float act_one(float a, float u, int act) {
    if (act == 0) return a / (1.0f + exp(-a)) * u;
    float r = fmax(a, 0.0f);
    return r * r * u;
}
inline float4 act4(float4 a, float4 u, int act) {
    return (float4)(act_one(a.x, u.x, act), act_one(a.y, u.y, act), act_one(a.z, u.z, act),
                    act_one(a.w, u.w, act));
}

// g = act(g) · u, then RMSNorm · w when has_norm, written back to g and quantized to qr / *qs
// as in `norm_quant_row` (chunk by chunk, in its order).
inline void ffn_act_quant_row(__global float* gr, const __global float* ur, int n, int act,
                              const __global float* w, int has_norm, float eps,
                              __global char* qr, __global float* qs, __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    float ss = 0.0f;
#pragma unroll 4
    for (int c = lid; c < nc; c += wg) {
        float4 h = act4(row_ld4(gr, c, n), row_ld4(ur, c, n), act);
        row_st4(gr, c, n, h);
        ss = sumsq4(ss, h);
    }
    ss = wg_sum(ss, scratch);
    float scale = 1.0f / sqrt(ss / (float)n + eps);
    float amax = 0.0f;
#pragma unroll 4
    for (int c = lid; c < nc; c += wg) {
        float4 v = row_ld4(gr, c, n);
        if (has_norm) {
            v = (v * scale) * row_ld4(w, c, n);
            row_st4(gr, c, n, v);
        }
        amax = amax4(amax, v);
    }
    float s = quant_scale(amax, scratch);
#pragma unroll 4
    for (int c = lid; c < nc; c += wg) quant_st4(qr, c, n, row_ld4(gr, c, n), s);
    if (lid == 0) *qs = s;
}

// `ffn_act_quant_row` with the row in registers.
inline void ffn_act_quant_regs(__global float* gr, const __global float* ur,
                               int n, int act, const __global float* w, int has_norm, float eps,
                               __global char* qr, __global float* qs, __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    // Every load issued before any use.
    float4 h[RQ4], up[RQ4];
#pragma unroll
    for (int i = 0; i < RQ4; i++) {
        int c = lid + i * wg;
        h[i] = c < nc ? row_ld4(gr, c, n) : (float4)(0.0f);
        up[i] = c < nc ? row_ld4(ur, c, n) : (float4)(0.0f);
    }
    // Zero past n (act(0) · 0 = 0), so the sum of squares is the one the looping path adds.
#pragma unroll
    for (int i = 0; i < RQ4; i++) h[i] = act4(h[i], up[i], act);
    norm_quant_held(h, n, w, has_norm, eps, gr, 1, qr, qs, 1, scratch);
}

// g = act(g) · u (act 0: SiLU, 1: ReLU²), then the optional sub-norm, then int8 quantization for
// the down projection. One work-group per token row.
__kernel void ffn_act_quant(__global float* g, __global const float* u, int n, int act,
                            __global const float* w, int has_norm, float eps,
                            __global char* q, __global float* qs, int regs,
                            __local float* scratch) {
    int t = get_group_id(0), wg = get_local_size(0);
    __global float* gr = g + (size_t)t * n;
    const __global float* ur = u + (size_t)t * n;
    if (regs && n <= RQ * wg) {
        // The row in registers (GPUs): one batch of loads of g and u, no second read.
        ffn_act_quant_regs(gr, ur, n, act, w, has_norm, eps, q + (size_t)t * n, qs + t, scratch);
        return;
    }
    ffn_act_quant_row(gr, ur, n, act, w, has_norm, eps, q + (size_t)t * n, qs + t, scratch);
}
