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
            // Rows of k % 8 == 0 halves start 16-byte aligned (buffers are): aligned vector loads.
#pragma unroll 4
            for (int j = lane; j < k / 8; j += FTEAM) {
                float8 wv = vloada_half8(j, (const __global half*)wr);
#pragma unroll
                for (int t = 0; t < FTB; t++) {
                    if (t < nt) {
                        float8 xv = ((const __global float8*)(xa + (size_t)t * k))[j];
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

// F16 rows × one token on GPUs (the output head of a decode step, hundreds of megabytes read
// once): a team of FTEAM work-items owns GV_R rows, and each work-item issues the loads of GV_U
// 16-byte chunks of every one of its rows before summing any, so enough bytes are in flight to
// keep the memory busy (the one-row teams of `float_matmul` waited on few loads at a time, and
// reduced through local memory per row); each chunk's activations are read once for all GV_R
// rows. The team's sums meet by warp shuffles on NVIDIA, else in local memory (`red`: GV_R
// floats per work-item). Needs k % 8 == 0 (rows then start 16-byte aligned). Grid: teams · FTEAM.
#define GV_R 4
#define GV_U 2

__kernel void float_gemv_f16(int k, int row_bytes, __global const float* x,
                             __global const uchar* w, int n, __global float* o, float s,
                             int accumulate, __local float* red) {
    int lid = get_local_id(0), lane = lid % FTEAM, team = lid / FTEAM;
    int r0 = (get_group_id(0) * (get_local_size(0) / FTEAM) + team) * GV_R;
    int k8 = k / 8;
    const __global half* wr[GV_R];
    float acc[GV_R];
#pragma unroll
    for (int r = 0; r < GV_R; r++) {
        // Rows past the end read row r0 again (always valid) and are not stored.
        wr[r] = (const __global half*)(w + (size_t)(r0 + r < n ? r0 + r : r0) * row_bytes);
        acc[r] = 0.0f;
    }
    if (r0 < n) {
        for (int j0 = lane; j0 < k8; j0 += FTEAM * GV_U) {
            float8 wv[GV_U][GV_R], xv[GV_U];
#pragma unroll
            for (int u = 0; u < GV_U; u++) {
                int j = j0 + u * FTEAM;
                bool in = j < k8;
                xv[u] = in ? vload8(j, x) : (float8)(0.0f);
#pragma unroll
                for (int r = 0; r < GV_R; r++) wv[u][r] = in ? vloada_half8(j, wr[r]) : (float8)(0.0f);
            }
#pragma unroll
            for (int u = 0; u < GV_U; u++) {
#pragma unroll
                for (int r = 0; r < GV_R; r++) {
                    acc[r] += dot(wv[u][r].lo, xv[u].lo) + dot(wv[u][r].hi, xv[u].hi);
                }
            }
        }
    }
    float v = 0.0f;
#ifdef TERNMUX_DP4A
    // A team is one warp: every lane gets each row's sum; lane r keeps row r's.
#pragma unroll
    for (int r = 0; r < GV_R; r++) {
        float t = warp_sum(acc[r]);
        if (lane == r) v = t;
    }
#else
#pragma unroll
    for (int r = 0; r < GV_R; r++) red[(team * GV_R + r) * FTEAM + lane] = acc[r];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lane < GV_R) {
        for (int i = 0; i < FTEAM; i++) v += red[(team * GV_R + lane) * FTEAM + i];
    }
#endif
    int r = r0 + lane;
    if (lane < GV_R && r < n) {
        v *= s;
        o[r] = accumulate ? o[r] + v : v;
    }
}

// out[t][j] = row tokens[t] of the table, dequantized. Grid: (k, n_tok).
__kernel void get_rows(int fmt, int k, int row_bytes, __global const uchar* w,
                       __global const int* tokens, __global float* out) {
    int j = get_global_id(0), t = get_global_id(1);
    if (j >= k) return;
    out[(size_t)t * k + j] = deq(fmt, w + (size_t)tokens[t] * row_bytes, j);
}

// F16 rows × a tile of FTB tokens, four output rows per team: each token's activations are
// loaded once per 8 columns and applied to the four rows, cutting the activation traffic that
// bounds the one-row kernel at batch > 1 (the output head of a batched decode step). Same
// summation order per row as `float_matmul`'s F16 path. Needs k % 8 == 0.
// Grid: (teams · FTEAM, token tiles).
__kernel void float_matmul_f16_quad(int k, int row_bytes, __global const float* x, int n_tok,
                                    __global const uchar* w, int n, __global float* o, float s,
                                    int accumulate, __local float* red) {
    int lane = get_local_id(0) % FTEAM, team = get_local_id(0) / FTEAM;
    int teams = get_local_size(0) / FTEAM;
    int r0 = (get_group_id(0) * teams + team) * 4;
    int t0 = get_group_id(1) * FTB;
    int nt = min(FTB, n_tok - t0);
    float acc0[FTB], acc1[FTB], acc2[FTB], acc3[FTB];
#pragma unroll
    for (int t = 0; t < FTB; t++) {
        acc0[t] = 0.0f;
        acc1[t] = 0.0f;
        acc2[t] = 0.0f;
        acc3[t] = 0.0f;
    }
    if (r0 < n) {
        // Rows past the end read the last row again; their sums are dropped.
        const __global half* w0 = (const __global half*)(w + (size_t)r0 * row_bytes);
        const __global half* w1 = (const __global half*)(w + (size_t)min(r0 + 1, n - 1) * row_bytes);
        const __global half* w2 = (const __global half*)(w + (size_t)min(r0 + 2, n - 1) * row_bytes);
        const __global half* w3 = (const __global half*)(w + (size_t)min(r0 + 3, n - 1) * row_bytes);
        const __global float* xa = x + (size_t)t0 * k;
        for (int j = lane; j < k / 8; j += FTEAM) {
            float8 a = vloada_half8(j, w0), b = vloada_half8(j, w1);
            float8 c = vloada_half8(j, w2), d = vloada_half8(j, w3);
#pragma unroll
            for (int t = 0; t < FTB; t++) {
                if (t < nt) {
                    float8 xv = ((const __global float8*)(xa + (size_t)t * k))[j];
                    acc0[t] += dot(a.lo, xv.lo) + dot(a.hi, xv.hi);
                    acc1[t] += dot(b.lo, xv.lo) + dot(b.hi, xv.hi);
                    acc2[t] += dot(c.lo, xv.lo) + dot(c.hi, xv.hi);
                    acc3[t] += dot(d.lo, xv.lo) + dot(d.hi, xv.hi);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < FTB; t++) {
        red[((team * 4 + 0) * FTB + t) * FTEAM + lane] = acc0[t];
        red[((team * 4 + 1) * FTB + t) * FTEAM + lane] = acc1[t];
        red[((team * 4 + 2) * FTB + t) * FTEAM + lane] = acc2[t];
        red[((team * 4 + 3) * FTB + t) * FTEAM + lane] = acc3[t];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    // Lane l finishes row r0 + l / FTB, token l % FTB (4 rows × FTB tokens = FTEAM lanes).
    int i = lane / FTB, t = lane % FTB, r = r0 + i;
    if (r < n && t < nt) {
        float v = 0.0f;
        for (int e = 0; e < FTEAM; e++) v += red[((team * 4 + i) * FTB + t) * FTEAM + e];
        v *= s;
        size_t at = (size_t)(t0 + t) * n + r;
        o[at] = accumulate ? o[at] + v : v;
    }
}

// F16 rows × a batch of f32 activations, tiled for GPUs (the output head of a batched decode
// step): a work-item owns FT_RPT rows × FT_TPT tokens, the work-group's tokens are staged in
// local memory FT_CHUNK columns at a time and shared by all its teams, and each weight is read
// once per token tile (the row-team kernels above read every token's activations from global
// memory for each row). Lane layout within a team as in `ternary_matmul_tq2_tiled`: lane =
// tg · rgroups + rg, rows rg · FT_RPT.., tokens tg, tg + tgroups, …; the work-group's teams take
// consecutive row blocks. Rows start 64-byte aligned (aligned 16-byte weight loads). Each
// chunk's products are summed apart and then added to the running sum (error bound γ(FT_CHUNK +
// k / FT_CHUNK)). Needs k % FT_CHUNK == 0.
// Grid: (row tiles · local size, token tiles); local: `xs16`, tile tokens · FT_STRIDE floats.
#define FT_RPT 4
#define FT_TPT 8
#define FT_CHUNK 32
#define FT_STRIDE 36

__kernel void float_matmul_f16_tiled(int k, int row_bytes, __global const float* x, int n_tok,
                                     int tgroups, __global const uchar* w, int n,
                                     __global float* o, float s, int accumulate,
                                     __local float4* xs16) {
    // Declared as float4: NVIDIA aligns a local argument only to its declared type.
    __local float* xs = (__local float*)xs16;
    int lane = get_local_id(0) % FTEAM, team = get_local_id(0) / FTEAM;
    int teams = get_local_size(0) / FTEAM;
    int rgroups = FTEAM / tgroups;
    int rg = lane % rgroups, tg = lane / rgroups;
    int tile_rows = teams * rgroups * FT_RPT, tile_toks = tgroups * FT_TPT;
    int r0 = get_group_id(0) * tile_rows + (team * rgroups + rg) * FT_RPT;
    int t0 = get_group_id(1) * tile_toks;
    int nt = min(tile_toks, n_tok - t0);
    // Rows past the end read the last row; their sums are dropped.
    const __global half* wr[FT_RPT];
#pragma unroll
    for (int r = 0; r < FT_RPT; r++) {
        wr[r] = (const __global half*)(w + (size_t)min(r0 + r, n - 1) * row_bytes);
    }
    float acc[FT_RPT][FT_TPT];
#pragma unroll
    for (int r = 0; r < FT_RPT; r++) {
#pragma unroll
        for (int t = 0; t < FT_TPT; t++) acc[r][t] = 0.0f;
    }
    for (int c = 0; c < k / FT_CHUNK; c++) {
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int u = get_local_id(0); u < nt * (FT_CHUNK / 4); u += get_local_size(0)) {
            int t = u / (FT_CHUNK / 4), g = u % (FT_CHUNK / 4);
            float4 v = *(const __global float4*)(x + (size_t)(t0 + t) * k + c * FT_CHUNK + 4 * g);
            *(__local float4*)(xs + t * FT_STRIDE + 4 * g) = v;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        float part[FT_RPT][FT_TPT];
#pragma unroll
        for (int r = 0; r < FT_RPT; r++) {
#pragma unroll
            for (int t = 0; t < FT_TPT; t++) part[r][t] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < FT_CHUNK; e += 8) {
            float8 wv[FT_RPT];
#pragma unroll
            for (int r = 0; r < FT_RPT; r++) wv[r] = vloada_half8((c * FT_CHUNK + e) / 8, wr[r]);
#pragma unroll
            for (int t = 0; t < FT_TPT; t++) {
                int tl = tg + tgroups * t;
                if (tl < nt) {
                    float4 a = *(__local const float4*)(xs + tl * FT_STRIDE + e);
                    float4 b = *(__local const float4*)(xs + tl * FT_STRIDE + e + 4);
#pragma unroll
                    for (int r = 0; r < FT_RPT; r++) {
                        float p = part[r][t];
                        p = fma(wv[r].s0, a.x, p);
                        p = fma(wv[r].s1, a.y, p);
                        p = fma(wv[r].s2, a.z, p);
                        p = fma(wv[r].s3, a.w, p);
                        p = fma(wv[r].s4, b.x, p);
                        p = fma(wv[r].s5, b.y, p);
                        p = fma(wv[r].s6, b.z, p);
                        part[r][t] = fma(wv[r].s7, b.w, p);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < FT_RPT; r++) {
#pragma unroll
            for (int t = 0; t < FT_TPT; t++) acc[r][t] += part[r][t];
        }
    }
#pragma unroll
    for (int t = 0; t < FT_TPT; t++) {
        int tl = tg + tgroups * t;
#pragma unroll
        for (int r = 0; r < FT_RPT; r++) {
            if (tl < nt && r0 + r < n) {
                size_t at = (size_t)(t0 + tl) * n + r0 + r;
                float v = acc[r][t] * s;
                o[at] = accumulate ? o[at] + v : v;
            }
        }
    }
}
