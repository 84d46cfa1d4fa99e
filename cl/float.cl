// Float and block-quantized matrices (embeddings and output heads) × f32 activations, and the
// embedding lookup. Same team layout as ternary.cl: 32 work-items per output row, TB tokens per
// pass. F16 and Q8_0 have vectorized paths; every other format goes element by element through
// deq() in common.cl.

#define FTEAM 32
#define FTB 8

__kernel void float_matmul(int fmt, int k, int row_bytes, __global const float* x, int n_tok,
                           __global const uchar* w, int n, __global float* o, float s,
                           int accumulate, __local float* red) {
    int lane = get_local_id(0) % FTEAM, team = get_local_id(0) / FTEAM;
    int r = get_group_id(0) * (get_local_size(0) / FTEAM) + team;
    int t0 = get_group_id(1) * FTB;
    int nt = min(FTB, n_tok - t0);
    bool valid = r < n;
    // Constant trip counts with guards keep acc[] in registers.
    float acc[FTB];
#pragma unroll
    for (int t = 0; t < FTB; t++) acc[t] = 0.0f;
    if (valid) {
        const __global uchar* wr = w + (size_t)r * row_bytes;
        const __global float* xa = x + (size_t)t0 * k;
        if (fmt == FMT_F16 && k % 8 == 0) {
            for (int j = lane; j < k / 8; j += FTEAM) {
                float8 wv = vload_half8(j, (const __global half*)wr);
#pragma unroll
                for (int t = 0; t < FTB; t++) {
                    if (t < nt) {
                        float8 xv = vload8(j, xa + (size_t)t * k);
                        acc[t] += dot(wv.lo, xv.lo) + dot(wv.hi, xv.hi);
                    }
                }
            }
        } else if (fmt == FMT_Q8_0) {
            for (int b = lane; b < k / 32; b += FTEAM) {
                const __global uchar* blk = wr + b * 34;
                float d = ld_f16(blk);
                const __global char* qs = (const __global char*)(blk + 2);
#pragma unroll
                for (int t = 0; t < FTB; t++) {
                    if (t < nt) {
                        const __global float* xt = xa + (size_t)t * k + b * 32;
                        float sum = 0.0f;
                        for (int e = 0; e < 32; e++) sum += (float)qs[e] * xt[e];
                        acc[t] += d * sum;
                    }
                }
            }
        } else {
            for (int j = lane; j < k; j += FTEAM) {
                float wv = deq(fmt, wr, j);
#pragma unroll
                for (int t = 0; t < FTB; t++) {
                    if (t < nt) acc[t] += wv * xa[(size_t)t * k + j];
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < FTB; t++) red[(team * FTB + t) * FTEAM + lane] = acc[t];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (valid && lane < nt) {
        int t = lane;
        float v = 0.0f;
        for (int i = 0; i < FTEAM; i++) v += red[(team * FTB + t) * FTEAM + i];
        v *= s;
        size_t at = (size_t)(t0 + t) * n + r;
        o[at] = accumulate ? o[at] + v : v;
    }
}

// out[t][j] = row tokens[t] of the table, dequantized. Grid: (k, n_tok).
__kernel void get_rows(int fmt, int k, int row_bytes, __global const uchar* w,
                       __global const int* tokens, __global float* out) {
    int j = get_global_id(0), t = get_global_id(1);
    if (j >= k) return;
    out[(size_t)t * k + j] = deq(fmt, w + (size_t)tokens[t] * row_bytes, j);
}
