// Row-wise ops, one work-group per token row (`regs`: GPUs keep the row in registers; CPU
// devices loop, which suits their work-item loops around barriers better): RMSNorm, per-token
// int8 quantization of a ternary layer's input (bitnet.cpp's absmax rule: s = 127 /
// max(absmax, 1e-5), q = clamp(rint(v·s))), and the FFN activation. Fused so that a layer's
// input is normed and quantized in one launch. Both paths are common.cl's row functions
// (`*_regs` and `*_row`; the GEMV and attention epilogues use the `*_row` ones).

// y = RMSNorm(x row `row0 + t`) · w (when has_norm; else y = x), written to y when write_y;
// its int8 quantization to q / qs[t] when write_q. x and y may alias (same index, same work-item).
__kernel void norm_quant(__global const float* x, int n, int row0,
                         __global const float* w, int has_norm, float eps,
                         __global float* y, int write_y,
                         __global char* q, __global float* qs, int write_q, int regs,
                         __local float* scratch) {
    int t = get_group_id(0), lid = get_local_id(0), wg = get_local_size(0);
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

// g = act(g) · u (act 0: SiLU, 1: ReLU²), then the optional sub-norm, then int8 quantization for
// the down projection. One work-group per token row.
__kernel void ffn_act_quant(__global float* g, __global const float* u, int n, int act,
                            __global const float* w, int has_norm, float eps,
                            __global char* q, __global float* qs, int regs,
                            __local float* scratch) {
    int t = get_group_id(0), lid = get_local_id(0), wg = get_local_size(0);
    __global float* gr = g + (size_t)t * n;
    const __global float* ur = u + (size_t)t * n;
    if (regs && n <= RQ * wg) {
        // The row in registers (GPUs): one batch of loads of g and u, no second read.
        ffn_act_quant_regs(gr, ur, n, act, w, has_norm, eps, q + (size_t)t * n, qs + t, scratch);
        return;
    }
    ffn_act_quant_row(gr, ur, n, act, w, has_norm, eps, q + (size_t)t * n, qs + t, scratch);
}
