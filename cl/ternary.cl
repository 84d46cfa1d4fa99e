// Ternary matrix × int8 activations, multiplication-free in the weight arithmetic: each weight's
// 2-bit (or base-3) code selects +q, −q or nothing; sums are int32 per super-block, then one float
// scale per block (TQ) or per tensor (I2_S) and one per token.
//
// Work split: a team of 32 work-items owns one output row; lane l reads byte l of every 32-byte
// group, so a team's loads of weights and activations are contiguous. Each team computes up to TB
// tokens per pass (dimension 1 of the grid walks token tiles), so a prefill reads weights once per
// tile. Up to three matrices that share one input (q/k/v, gate/up) go in one launch.

#define TEAM 32
#define TB 8
#define TFMT_TQ2_0 0
#define TFMT_TQ1_0 1
#define TFMT_I2_S 2

// (code − 1) · x by selection: code 0 → −x, 1 → 0, 2 (and a corrupt 3, as on the CPU) → +x.
inline int tsel(int code, int x) { return (code & 2) ? x : (code == 0 ? -x : 0); }

// TQ1_0 trit n of a packed byte: ((b · 3^n) mod 256) · 3 >> 8 (an unpacking step, as on the CPU).
inline int trit(uint b, uint pow3) { return (int)((((b * pow3) & 255u) * 3u) >> 8); }

inline int row_bytes_of(int fmt, int k) {
    return fmt == TFMT_TQ2_0 ? (k / 256) * 66 : fmt == TFMT_TQ1_0 ? (k / 256) * 54 : k / 4;
}

__kernel void ternary_matmul(int fmt, int k, __global const char* q, __global const float* qsc,
                             int n_tok,
                             __global const uchar* w0, int n0, __global float* o0, float s0,
                             __global const float* b0, int hb0,
                             __global const uchar* w1, int n1, __global float* o1, float s1,
                             __global const float* b1, int hb1,
                             __global const uchar* w2, int n2, __global float* o2, float s2,
                             __global const float* b2, int hb2,
                             int accumulate, __local float* red) {
    int lane = get_local_id(0) % TEAM, team = get_local_id(0) / TEAM;
    int rows_per_group = get_local_size(0) / TEAM;
    int r = get_group_id(0) * rows_per_group + team;
    int t0 = get_group_id(1) * TB;
    int nt = min(TB, n_tok - t0);
    // Which matrix this team's row belongs to.
    __global const uchar* w = w0;
    __global float* o = o0;
    __global const float* bias = b0;
    int n = n0, hb = hb0, rr = r;
    float s = s0;
    if (r >= n0 && r < n0 + n1) {
        w = w1; o = o1; bias = b1; n = n1; hb = hb1; s = s1; rr = r - n0;
    } else if (r >= n0 + n1) {
        w = w2; o = o2; bias = b2; n = n2; hb = hb2; s = s2; rr = r - n0 - n1;
    }
    bool valid = rr < n;
    float acc[TB];
    for (int t = 0; t < TB; t++) acc[t] = 0.0f;
    if (valid) {
        const __global uchar* wr = w + (size_t)rr * row_bytes_of(fmt, k);
        const __global char* qa = q + (size_t)t0 * k;
        if (fmt == TFMT_TQ2_0) {
            for (int b = 0; b < k / 256; b++) {
                const __global uchar* blk = wr + b * 66;
                int c0 = blk[lane], c1 = blk[32 + lane];
                float d = ld_f16(blk + 64);
                for (int t = 0; t < nt; t++) {
                    const __global char* qt = qa + (size_t)t * k + b * 256 + lane;
                    int sum = 0;
                    for (int l = 0; l < 4; l++) {
                        sum += tsel((c0 >> (2 * l)) & 3, qt[32 * l]);
                        sum += tsel((c1 >> (2 * l)) & 3, qt[128 + 32 * l]);
                    }
                    acc[t] += (float)sum * d;
                }
            }
        } else if (fmt == TFMT_TQ1_0) {
            for (int b = 0; b < k / 256; b++) {
                const __global uchar* blk = wr + b * 54;
                uint c0 = blk[lane];
                uint c1 = lane < 16 ? blk[32 + lane] : 0u;
                uint c2 = lane < 4 ? blk[48 + lane] : 0u;
                float d = ld_f16(blk + 52);
                for (int t = 0; t < nt; t++) {
                    const __global char* qt = qa + (size_t)t * k + b * 256;
                    int sum = 0;
                    uint p = 1;
                    for (int m = 0; m < 5; m++) {
                        sum += tsel(trit(c0, p), qt[lane + 32 * m]);
                        if (lane < 16) sum += tsel(trit(c1, p), qt[160 + lane + 16 * m]);
                        if (lane < 4 && m < 4) sum += tsel(trit(c2, p), qt[240 + lane + 4 * m]);
                        p *= 3u;
                    }
                    acc[t] += (float)sum * d;
                }
            }
        } else {
            // I2_S: 128-element blocks of 32 bytes; group g in bits [7−2g : 6−2g]. Integer sums
            // stay exact in float (|Σ| ≤ 65536 · 127 < 2^24).
            for (int b = 0; b < k / 128; b++) {
                int c = wr[b * 32 + lane];
                for (int t = 0; t < nt; t++) {
                    const __global char* qt = qa + (size_t)t * k + b * 128 + lane;
                    int sum = 0;
                    for (int g = 0; g < 4; g++) sum += tsel((c >> (6 - 2 * g)) & 3, qt[32 * g]);
                    acc[t] += (float)sum;
                }
            }
        }
    }
    for (int t = 0; t < TB; t++) red[(team * TB + t) * TEAM + lane] = acc[t];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (valid && lane < nt) {
        int t = lane;
        float v = 0.0f;
        for (int i = 0; i < TEAM; i++) v += red[(team * TB + t) * TEAM + i];
        v = v / qsc[t0 + t] * s;
        if (hb) v += bias[rr];
        size_t at = (size_t)(t0 + t) * n + rr;
        o[at] = accumulate ? o[at] + v : v;
    }
}
