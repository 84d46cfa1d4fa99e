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

// Σ of the four signed bytes of `a`, plus `acc`: one dp4a with ones on NVIDIA (the build adds
// -DTERNMUX_DP4A where the driver takes inline PTX), else four byte extractions and adds. Only
// ever applied to activations already selected by a weight mask: weights are never multiplied.
#ifdef TERNMUX_DP4A
inline int sum4(uint a, int acc) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x01010101), "r"(acc));
    return d;
}
#else
inline int sum4(uint a, int acc) {
    char4 v = as_char4(a);
    return acc + v.x + v.y + v.z + v.w;
}
#endif

// (code − 1) · x by selection: code 0 → −x, 1 → 0, 2 (and a corrupt 3, as on the CPU) → +x.
inline int tsel(int code, int x) { return (code & 2) ? x : (code == 0 ? -x : 0); }

// TQ2_0 byte masks of code plane j (bits 2j+1..2j of each byte of c): all ones where the code
// has bit 1 set (+1: code 2, and a corrupt 3, as on the CPU), and where it is 0 (−1). The GEMM
// paths make them once per block and apply them to every token of a tile (an AND and a byte sum
// each); the GEMV uses the one-op select below, which measured faster there and slower here.
inline uint tq2_pos(uint c, int j) {
    uint x = (c >> (2 * j)) & 0x03030303u;
    return ((x >> 1) & 0x01010101u) * 0xFFu;
}
inline uint tq2_neg(uint c, int j) {
    uint x = (c >> (2 * j)) & 0x03030303u;
    return ((((x >> 1) | x) & 0x01010101u) ^ 0x01010101u) * 0xFFu;
}

// Byte masks from bit `bit` (0..7) of each byte of `c`: 0xFF where it is set. On NVIDIA one
// byte permute with sign replication (`prmt`, selector 0xBA98) after moving the bit to bit 7;
// elsewhere the bit times 0xFF (no carries: each byte's product is below 256).
#ifdef TERNMUX_DP4A
inline uint bit_bytes(uint c, int bit) {
    uint d;
    asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(d) : "r"(c << (7 - bit)));
    return d;
}
#else
inline uint bit_bytes(uint c, int bit) { return ((c >> bit) & 0x01010101u) * 0xFFu; }
#endif

// TQ2_0 code plane j (bits 2j+1..2j of each byte of c) as two byte masks that apply it to four
// activations by selection (`tq2_apply`): +1 (code 2, and a corrupt 3 as on the CPU) keeps the
// byte, 0 (code 1) clears it, −1 (code 0) flips its bits (~a = −a − 1 in two's complement; the
// −1 of each flipped byte is given back by `tq2_neg_count`). x: bytes kept, y: bytes flipped.
inline uint2 tq2_plane(uint c, int j) {
    uint m1 = bit_bytes(c, 2 * j + 1), m0 = bit_bytes(c, 2 * j);
    return (uint2)(m1 | ~m0, ~(m1 | m0));
}

// Four activations selected by a plane's masks: one three-input logic op (lop3 on NVIDIA).
inline uint tq2_apply(uint a, uint2 m) { return (a & m.x) ^ m.y; }

// How many of the 16 codes in c are 0 (weight −1): the correction to the byte sums of
// `tq2_apply`.
inline int tq2_neg_count(uint c) { return popcount(~(c | (c >> 1)) & 0x55555555u); }

// Σ weight · activation over the 16 codes of c against the activations a0..a3 (plane j of c
// pairs with aj).
inline int tq2_dot16(uint c, uint a0, uint a1, uint a2, uint a3) {
    int acc = sum4(tq2_apply(a0, tq2_plane(c, 0)), tq2_neg_count(c));
    acc = sum4(tq2_apply(a1, tq2_plane(c, 1)), acc);
    acc = sum4(tq2_apply(a2, tq2_plane(c, 2)), acc);
    return sum4(tq2_apply(a3, tq2_plane(c, 3)), acc);
}

// TQ2_0's GPU kernels also take I2_S rows whose length is a multiple of 256 (`i2s`: a constant
// of each kernel entry point, so each entry is compiled for its format). An I2_S row's 256
// weights are two 32-byte blocks whose byte p holds positions p + 32g in bits 7−2g..6−2g: a
// TQ2_0 block's 64 code bytes with the four planes in reverse order (TQ2_0: plane j in bits
// 2j+1..2j), with the same codes (0 → −1, 1 → 0, 2 and a corrupt 3 → +1), and no block scale
// (I2_S has one per tensor, in the launch's `scale`): 64 bytes per 256 weights instead of 66.
// Integer sums stay exact in float (|Σ| ≤ 65536 · 127 < 2^24), so I2_S gives the same bits on
// every path.
inline int tblk_bytes(int i2s) { return i2s ? 64 : 66; }
inline float tblk_scale(const __global uchar* blk, int i2s) {
    return i2s ? 1.0f : ld_f16(blk + 64);
}
// The bit plane of a code word that pairs with activation group j (elements +32j).
inline int tplane(int j, int i2s) { return i2s ? 3 - j : j; }

// TQ1_0 trit n of a packed byte: ((b · 3^n) mod 256) · 3 >> 8 (an unpacking step, as on the CPU).
inline int trit(uint b, uint pow3) { return (int)((((b * pow3) & 255u) * 3u) >> 8); }

// I2_S: four code bytes (positions p..p+3 of a 32-byte block; group g in bits 7−2g) against
// the activations at qt + 32g + 0..3.
inline int i2s_dot4(uchar4 c, const __global char* qt) {
    int sum = 0;
#pragma unroll
    for (int g = 0; g < 4; g++) {
        char4 a = vload4(0, qt + 32 * g);
        int sh = 6 - 2 * g;
        sum += tsel((c.x >> sh) & 3, a.x) + tsel((c.y >> sh) & 3, a.y) + tsel((c.z >> sh) & 3, a.z) +
               tsel((c.w >> sh) & 3, a.w);
    }
    return sum;
}

// One output row of a launch: the matrix it belongs to (up to three share the input) and its
// index there.
typedef struct {
    __global const uchar* w;
    __global float* o;
    __global const float* bias;
    int n, hb, rr;
    float s;
} Row;

// The parameters of up to three matrices sharing one input (weights, rows, output, scale,
// bias, has-bias), as every ternary kernel and `pick_row` take them; ROW_ARGS passes them on.
#define ROW_PARAMS                                                                         \
    __global const uchar *w0, int n0, __global float *o0, float s0, __global const float *b0, \
        int hb0, __global const uchar *w1, int n1, __global float *o1, float s1,             \
        __global const float *b1, int hb1, __global const uchar *w2, int n2,                 \
        __global float *o2, float s2, __global const float *b2, int hb2

inline Row pick_row(int r, ROW_PARAMS) {
    Row x;
    if (r >= n0 && r < n0 + n1) {
        x.w = w1; x.o = o1; x.bias = b1; x.n = n1; x.hb = hb1; x.s = s1; x.rr = r - n0;
    } else if (r >= n0 + n1) {
        x.w = w2; x.o = o2; x.bias = b2; x.n = n2; x.hb = hb2; x.s = s2; x.rr = r - n0 - n1;
    } else {
        x.w = w0; x.o = o0; x.bias = b0; x.n = n0; x.hb = hb0; x.s = s0; x.rr = r;
    }
    return x;
}

#define ROW_ARGS w0, n0, o0, s0, b0, hb0, w1, n1, o1, s1, b1, hb1, w2, n2, o2, s2, b2, hb2

inline int row_bytes_of(int fmt, int k) {
    return fmt == TFMT_TQ2_0 ? (k / 256) * 66 : fmt == TFMT_TQ1_0 ? (k / 256) * 54 : k / 4;
}

__kernel void ternary_matmul(int fmt, int k, __global const char* q, __global const float* qsc,
                             int n_tok,
                             ROW_PARAMS,
                             int accumulate, __local float* red) {
    int lane = get_local_id(0) % TEAM, team = get_local_id(0) / TEAM;
    int rows_per_group = get_local_size(0) / TEAM;
    int r = get_group_id(0) * rows_per_group + team;
    int t0 = get_group_id(1) * TB;
    int nt = min(TB, n_tok - t0);
    // Which matrix this team's row belongs to.
    Row row = pick_row(r, ROW_ARGS);
    __global const uchar* w = row.w;
    __global float* o = row.o;
    __global const float* bias = row.bias;
    int n = row.n, hb = row.hb, rr = row.rr;
    float s = row.s;
    bool valid = rr < n;
    // TB accumulators in registers: every loop over t has a constant trip count (unrolled) and
    // a guard, so no private array is indexed dynamically.
    float acc[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = 0.0f;
    if (valid) {
        const __global uchar* wr = w + (size_t)rr * row_bytes_of(fmt, k);
        const __global char* qa = q + (size_t)t0 * k;
        if (fmt == TFMT_TQ2_0) {
            // Two blocks per team pass: lanes 0–15 take block b, lanes 16–31 block b + 1. Lane
            // l reads qs bytes m..m+3 (m = 4 · (l % 16)): byte m + i of chunk c = m / 32 holds
            // elements 128c + 32j + m % 32 + i, j = 0..3, so each j pairs 4 codes with 4
            // consecutive activations (one aligned 32-bit load: k is a multiple of 256 and the
            // activation buffer is aligned). The codes become byte masks once per block (+1:
            // code bit 1; −1: code 0), reused for every token of the tile: per 4 weights and
            // token, two ANDs select the activations and two byte sums add them (the one-op
            // select of the GEMV, `tq2_apply`, measured slower here on the H100).
            int pair = lane / 16, m = 4 * (lane % 16), base = 128 * (m / 32) + m % 32;
            int nblk = k / 256;
            for (int b = pair; b < nblk; b += 2) {
                const __global uchar* blk = wr + b * 66;
                uint c = (uint)blk[m] | ((uint)blk[m + 1] << 8) | ((uint)blk[m + 2] << 16) |
                         ((uint)blk[m + 3] << 24);
                float d = ld_f16(blk + 64);
                uint p0 = tq2_pos(c, 0), n0 = tq2_neg(c, 0), p1 = tq2_pos(c, 1), n1 = tq2_neg(c, 1);
                uint p2 = tq2_pos(c, 2), n2 = tq2_neg(c, 2), p3 = tq2_pos(c, 3), n3 = tq2_neg(c, 3);
                const __global uint* qb = (const __global uint*)(qa + b * 256 + base);
#pragma unroll
                for (int t = 0; t < TB; t++) {
                    if (t < nt) {
                        const __global uint* qt = qb + (size_t)t * (k / 4);
                        uint a0 = qt[0], a1 = qt[8], a2 = qt[16], a3 = qt[24];
                        int sp = sum4(a0 & p0, 0), sn = sum4(a0 & n0, 0);
                        sp = sum4(a1 & p1, sp);
                        sn = sum4(a1 & n1, sn);
                        sp = sum4(a2 & p2, sp);
                        sn = sum4(a2 & n2, sn);
                        sp = sum4(a3 & p3, sp);
                        sn = sum4(a3 & n3, sn);
                        acc[t] += (float)(sp - sn) * d;
                    }
                }
            }
        } else if (fmt == TFMT_TQ1_0) {
            for (int b = 0; b < k / 256; b++) {
                const __global uchar* blk = wr + b * 54;
                uint c0 = blk[lane];
                uint c1 = lane < 16 ? blk[32 + lane] : 0u;
                uint c2 = lane < 4 ? blk[48 + lane] : 0u;
                float d = ld_f16(blk + 52);
#pragma unroll
                for (int t = 0; t < TB; t++) {
                    if (t < nt) {
                        const __global char* qt = qa + (size_t)t * k + b * 256;
                        int sum = 0;
                        uint p = 1;
#pragma unroll
                        for (int mm = 0; mm < 5; mm++) {
                            sum += tsel(trit(c0, p), qt[lane + 32 * mm]);
                            if (lane < 16) sum += tsel(trit(c1, p), qt[160 + lane + 16 * mm]);
                            if (lane < 4 && mm < 4) sum += tsel(trit(c2, p), qt[240 + lane + 4 * mm]);
                            p *= 3u;
                        }
                        acc[t] += (float)sum * d;
                    }
                }
            }
        } else {
            // I2_S: 128-element blocks of 32 bytes; group g in bits [7−2g : 6−2g]. Lane l reads
            // bytes 4l..4l+3 of each 128-byte span (one 128-byte load per team): block
            // 4l / 32, positions p..p+3 with p = 4l % 32. Integer sums stay exact in float
            // (|Σ| ≤ 65536 · 127 < 2^24).
            int off = 4 * lane, blk_in = off / 32, p0 = off % 32;
#pragma unroll 2
            for (int sp = 0; sp < k / 512; sp++) {
                uchar4 c = vload4(0, wr + sp * 128 + off);
#pragma unroll
                for (int t = 0; t < TB; t++) {
                    if (t < nt) {
                        acc[t] += (float)i2s_dot4(c, qa + (size_t)t * k + (sp * 4 + blk_in) * 128 + p0);
                    }
                }
            }
            // A row length that is an odd multiple of 128: the last 128 elements, 32 bytes.
            if ((k % 512) != 0 && lane < 8 * ((k % 512) / 128)) {
                int sp = k / 512;
                uchar4 c = vload4(0, wr + sp * 128 + off);
#pragma unroll
                for (int t = 0; t < TB; t++) {
                    if (t < nt) {
                        acc[t] += (float)i2s_dot4(c, qa + (size_t)t * k + (sp * 4 + blk_in) * 128 + p0);
                    }
                }
            }
        }
    }
#pragma unroll
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

// TQ2_0 × a tile of TB tokens, two output rows per team: the activations of each token are
// loaded once and applied to both rows' masks, halving the activation traffic that bounds the
// one-row kernel at batch > 1 (each team re-reads its tile for every row). Same arithmetic and
// lane layout as the TQ2_0 path of `ternary_matmul`. Grid: (teams · TEAM, token tiles).
inline void pair_body(int k, __global const char* q, __global const float* qsc, int n_tok,
                      ROW_PARAMS, int accumulate, __local float* red, const int i2s) {
    int lane = get_local_id(0) % TEAM, team = get_local_id(0) / TEAM;
    int teams = get_local_size(0) / TEAM;
    int r0 = (get_group_id(0) * teams + team) * 2;
    int t0 = get_group_id(1) * TB;
    int nt = min(TB, n_tok - t0);
    Row ra = pick_row(r0, ROW_ARGS), rb = pick_row(r0 + 1, ROW_ARGS);
    bool va = ra.rr < ra.n, vb = rb.rr < rb.n;
    float acc_a[TB], acc_b[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) {
        acc_a[t] = 0.0f;
        acc_b[t] = 0.0f;
    }
    if (va) {
        int bbytes = tblk_bytes(i2s), rb_bytes = (k / 256) * bbytes;
        const __global uchar* wa = ra.w + (size_t)ra.rr * rb_bytes;
        // A missing second row reads the first again; its sums are dropped.
        const __global uchar* wb = vb ? rb.w + (size_t)rb.rr * rb_bytes : wa;
        const __global char* qa = q + (size_t)t0 * k;
        int pair = lane / 16, m = 4 * (lane % 16), base = 128 * (m / 32) + m % 32;
        int nblk = k / 256;
        for (int b = pair; b < nblk; b += 2) {
            const __global uchar* ba = wa + b * bbytes;
            const __global uchar* bb = wb + b * bbytes;
            uint ca = (uint)ba[m] | ((uint)ba[m + 1] << 8) | ((uint)ba[m + 2] << 16) |
                      ((uint)ba[m + 3] << 24);
            uint cb = (uint)bb[m] | ((uint)bb[m + 1] << 8) | ((uint)bb[m + 2] << 16) |
                      ((uint)bb[m + 3] << 24);
            float da = tblk_scale(ba, i2s), db = tblk_scale(bb, i2s);
            uint pa[4], na[4], pb[4], nb[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int pl = tplane(j, i2s);
                pa[j] = tq2_pos(ca, pl);
                na[j] = tq2_neg(ca, pl);
                pb[j] = tq2_pos(cb, pl);
                nb[j] = tq2_neg(cb, pl);
            }
            const __global uint* qb = (const __global uint*)(qa + b * 256 + base);
#pragma unroll
            for (int t = 0; t < TB; t++) {
                if (t < nt) {
                    const __global uint* qt = qb + (size_t)t * (k / 4);
                    int spa = 0, sna = 0, spb = 0, snb = 0;
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        uint a = qt[8 * j];
                        spa = sum4(a & pa[j], spa);
                        sna = sum4(a & na[j], sna);
                        spb = sum4(a & pb[j], spb);
                        snb = sum4(a & nb[j], snb);
                    }
                    acc_a[t] += (float)(spa - sna) * da;
                    acc_b[t] += (float)(spb - snb) * db;
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TB; t++) {
        red[((team * 2) * TB + t) * TEAM + lane] = acc_a[t];
        red[((team * 2 + 1) * TB + t) * TEAM + lane] = acc_b[t];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    // Lanes 0..TB-1 finish row a, lanes 16..16+TB-1 row b (TB ≤ 16).
    int which = lane / 16, t = lane % 16;
    Row x = which ? rb : ra;
    if ((which ? vb : va) && t < nt) {
        float v = 0.0f;
        for (int i = 0; i < TEAM; i++) v += red[((team * 2 + which) * TB + t) * TEAM + i];
        v = v / qsc[t0 + t] * x.s;
        if (x.hb) v += x.bias[x.rr];
        size_t at = (size_t)(t0 + t) * x.n + x.rr;
        x.o[at] = accumulate ? x.o[at] + v : v;
    }
}

#define PAIR_PARAMS                                                                          \
    int k, __global const char *q, __global const float *qsc, int n_tok, ROW_PARAMS,           \
        int accumulate, __local float *red
#define PAIR_ARGS k, q, qsc, n_tok, ROW_ARGS, accumulate, red

__kernel void ternary_matmul_tq2_pair(PAIR_PARAMS) { pair_body(PAIR_ARGS, 0); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_matmul_i2s_pair(PAIR_PARAMS) { pair_body(PAIR_ARGS, 1); }

// TQ2_0 × one token (decode): the GEMV. A team of 32 work-items per output row, lanes laid out
// as in the TQ2_0 path of `ternary_matmul`, but every lane first issues the loads of GEMV_U of
// its blocks (codes, scale and the matching activations) and only then computes: with one row
// per team the kernel is bound by how many bytes are in flight, and the loop that loads one
// block and waits for it before the next left most of the memory bandwidth idle. The row's
// partial sums meet by warp shuffles on NVIDIA, else in local memory (one barrier). Grid: teams ·
// TEAM work-items.
#define GEMV_U 8

// This lane's share of one row's sum (the row's sums are not yet added across the team).
inline float gemv_tq2_lane(Row row, int k, const __global char* q, int lane, const int i2s) {
    float acc = 0.0f;
    int nblk = k / 256, bb = tblk_bytes(i2s);
    const __global uchar* wr = row.w + (size_t)row.rr * (nblk * bb);
    int pair = lane / 16, m = 4 * (lane % 16), base = 128 * (m / 32) + m % 32;
    for (int b0 = pair; b0 < nblk; b0 += 2 * GEMV_U) {
        uint c[GEMV_U], a[GEMV_U][4];
        float d[GEMV_U];
#pragma unroll
        for (int u = 0; u < GEMV_U; u++) {
            int b = b0 + 2 * u;
            if (b < nblk) {
                const __global uchar* blk = wr + b * bb;
                if (i2s) {
                    c[u] = *(const __global uint*)(blk + m);
                } else {
                    // Rows are 66-byte blocks, so only 2-byte alignment holds: two 16-bit loads.
                    ushort2 h = vload2(0, (const __global ushort*)(blk + m));
                    c[u] = (uint)h.x | ((uint)h.y << 16);
                }
                d[u] = tblk_scale(blk, i2s);
                const __global uint* qb = (const __global uint*)(q + b * 256 + base);
#pragma unroll
                for (int j = 0; j < 4; j++) a[u][j] = qb[8 * j];
            } else {
                c[u] = 0x55555555u;  // code 1 everywhere: weight 0
                d[u] = 0.0f;
#pragma unroll
                for (int j = 0; j < 4; j++) a[u][j] = 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_U; u++) {
            int dot = i2s ? tq2_dot16(c[u], a[u][3], a[u][2], a[u][1], a[u][0])
                          : tq2_dot16(c[u], a[u][0], a[u][1], a[u][2], a[u][3]);
            acc += (float)dot * d[u];
        }
    }
    return acc;
}

// Adds the team's partial sums (every work-item calls it) and writes the row:
// (Σ / s_token) · scale + bias, added to the output when `accumulate`.
inline void gemv_store(Row row, float acc, const __global float* qsc, int accumulate,
                       __local float* red) {
    int lid = get_local_id(0), lane = lid % TEAM;
#ifdef TERNMUX_DP4A
    // NVIDIA: a team is one warp, so its sums meet by shuffles (no local memory, no barrier).
    float v = warp_sum(acc);
#else
    red[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    float v = 0.0f;
    if (lane == 0) {
        for (int i = 0; i < TEAM; i++) v += red[lid + i];
    }
#endif
    if (row.rr < row.n && lane == 0) {
        v = v / qsc[0] * row.s;
        if (row.hb) v += row.bias[row.rr];
        row.o[row.rr] = accumulate ? row.o[row.rr] + v : v;
    }
}

// The row of this work-item's team.
inline Row gemv_row(ROW_PARAMS) {
    int r = get_group_id(0) * (get_local_size(0) / TEAM) + get_local_id(0) / TEAM;
    return pick_row(r, ROW_ARGS);
}

inline void gemv_body(int k, __global const char* q, __global const float* qsc, ROW_PARAMS,
                      int accumulate, __local float* red, const int i2s) {
    Row row = gemv_row(ROW_ARGS);
    int lane = get_local_id(0) % TEAM;
    float acc = row.rr < row.n ? gemv_tq2_lane(row, k, q, lane, i2s) : 0.0f;
    gemv_store(row, acc, qsc, accumulate, red);
}

__kernel void ternary_gemv_tq2(int k, __global const char* q, __global const float* qsc,
                               ROW_PARAMS,
                               int accumulate, __local float* red) {
    gemv_body(k, q, qsc, ROW_ARGS, accumulate, red, 0);
}

// The same GEMV over I2_S rows (a multiple of 256 long).
__kernel void ternary_gemv_i2s(int k, __global const char* q, __global const float* qsc,
                               ROW_PARAMS,
                               int accumulate, __local float* red) {
    gemv_body(k, q, qsc, ROW_ARGS, accumulate, red, 1);
}

// One output of a batched GEMM (token t of row x): (Σ / s_token) · scale + bias, added when
// `accumulate`; the token's scale `sc` given, or read from qsc[t].
inline void tiled_store_s(Row x, float v, float sc, int t, int accumulate) {
    v = v / sc * x.s;
    if (x.hb) v += x.bias[x.rr];
    size_t at = (size_t)t * x.n + x.rr;
    x.o[at] = accumulate ? x.o[at] + v : v;
}
inline void tiled_store(Row x, float v, const __global float* qsc, int t, int accumulate) {
    tiled_store_s(x, v, qsc[t], t, accumulate);
}

// TQ2_0 (I2_S) × 1..FEW_T tokens (the small batched steps of several sequences decoding): the
// weights are read once for all the tokens, each code word made into selection masks once and
// applied to every token. A team of 32 work-items per output row walks it a block at a time,
// lane l taking, of each 128-weight half, the four weights that pair with activation word l:
// activation group g = l / 8 (elements 32g + 4(l % 8) + 0..3) against code bytes 4(l % 8) + 0..3,
// bit plane g (TQ2_0; I2_S's planes run the other way). So each activation load of a team is
// 128 contiguous bytes, one cache wavefront: with the GEMV's lanes (16 weights each, four
// lines per load) the activation loads, repeated per token, were what each token cost. Each
// lane loads the codes and scales of FEW_U blocks before any sum. Each entry point is built for
// a fixed count NT (2, 4 or 8), so every loop over tokens is straight-line code whose loads are
// all in flight together; rows past n_tok read the last token again and are dropped. Exact
// integer sums per block, one float scale per block, the lanes' sums added in a fixed order:
// a token's outputs do not depend on how many tokens share the launch.
// Grid: teams · TEAM work-items; local `red`: FEW_T floats per work-item (CPU devices).
#define FEW_T 8
#define FEW_U 8

inline void few_body(int k, __global const char* q, __global const float* qsc, int n_tok,
                     ROW_PARAMS, int accumulate, __local float* red, const int i2s,
                     const int NT) {
    Row row = gemv_row(ROW_ARGS);
    int lid = get_local_id(0), lane = lid % TEAM;
    int nt = clamp(n_tok, 1, NT);
    bool valid = row.rr < row.n;
    // This lane's code bytes in a half block, and its bit plane.
    int cb = 4 * (lane % 8), pl = tplane(lane / 8, i2s);
    float acc[FEW_T];
#pragma unroll
    for (int t = 0; t < FEW_T; t++) acc[t] = 0.0f;
    if (valid) {
        int nblk = k / 256, bb = tblk_bytes(i2s);
        const __global uchar* wr = row.w + (size_t)row.rr * (nblk * bb);
        const __global uint* qa = (const __global uint*)q + lane;
        for (int b0 = 0; b0 < nblk; b0 += FEW_U) {
            // Codes of both halves of FEW_U blocks, and their scales, before any sum.
            uint c0[FEW_U], c1[FEW_U];
            float d[FEW_U];
#pragma unroll
            for (int u = 0; u < FEW_U; u++) {
                int b = b0 + u;
                c0[u] = 0x55555555u;
                c1[u] = 0x55555555u;
                d[u] = 0.0f;
                if (b < nblk) {
                    const __global uchar* blk = wr + b * bb + cb;
                    if (i2s) {
                        c0[u] = *(const __global uint*)blk;
                        c1[u] = *(const __global uint*)(blk + 32);
                    } else {
                        // 66-byte blocks: only 2-byte alignment holds.
                        ushort2 h0 = vload2(0, (const __global ushort*)blk);
                        ushort2 h1 = vload2(0, (const __global ushort*)(blk + 32));
                        c0[u] = (uint)h0.x | ((uint)h0.y << 16);
                        c1[u] = (uint)h1.x | ((uint)h1.y << 16);
                    }
                    d[u] = tblk_scale(wr + b * bb, i2s);
                }
            }
#pragma unroll
            for (int u = 0; u < FEW_U; u++) {
                int b = b0 + u;
                if (b < nblk) {
                    uint2 m0 = tq2_plane(c0[u], pl), m1 = tq2_plane(c1[u], pl);
                    // The −1 of each flipped byte (code 0) given back.
                    int neg = popcount(m0.y & 0x01010101u) + popcount(m1.y & 0x01010101u);
                    const __global uint* qb = qa + b * 64;
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        const __global uint* qt = qb + (size_t)min(t, nt - 1) * (k / 4);
                        int dot = sum4(tq2_apply(qt[0], m0), neg);
                        dot = sum4(tq2_apply(qt[32], m1), dot);
                        acc[t] += (float)dot * d[u];
                    }
                }
            }
        }
    }
    // Each token's row sum: warp shuffles on NVIDIA (lane 0 writes), else lane t adds the
    // team's sums in order.
#ifdef TERNMUX_DP4A
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(acc[t]);
        if (t < nt && valid && lane == 0) tiled_store(row, v, qsc, t, accumulate);
    }
#else
#pragma unroll
    for (int t = 0; t < NT; t++) red[t * get_local_size(0) + lid] = acc[t];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (valid && lane < nt) {
        int t = lane;
        float v = 0.0f;
        for (int i = 0; i < TEAM; i++) v += red[t * get_local_size(0) + lid - lane + i];
        tiled_store(row, v, qsc, t, accumulate);
    }
#endif
}

#define FEW_PARAMS                                                                           \
    int k, __global const char *q, __global const float *qsc, int n_tok, ROW_PARAMS,           \
        int accumulate, __local float *red
#define FEW_ARGS k, q, qsc, n_tok, ROW_ARGS, accumulate, red

__kernel void ternary_few2_tq2(FEW_PARAMS) { few_body(FEW_ARGS, 0, 2); }
__kernel void ternary_few4_tq2(FEW_PARAMS) { few_body(FEW_ARGS, 0, 4); }
__kernel void ternary_few8_tq2(FEW_PARAMS) { few_body(FEW_ARGS, 0, 8); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_few2_i2s(FEW_PARAMS) { few_body(FEW_ARGS, 1, 2); }
__kernel void ternary_few4_i2s(FEW_PARAMS) { few_body(FEW_ARGS, 1, 4); }
__kernel void ternary_few8_i2s(FEW_PARAMS) { few_body(FEW_ARGS, 1, 8); }

// The GEMV of one matrix (output o0, n0 rows) followed by RMSNorm · w and the int8
// quantization of that output (`norm_quant` of norm.cl with a norm, y written), done by the last
// work-group to finish: the launch of a residual projection and the next norm in one.
#define GEMV_NORM_PARAMS                                                                    \
    int k, __global const char *q, __global const float *qsc, ROW_PARAMS, int accumulate,       \
        __local float *red, volatile __global int *ticket, __global const float *nw, float eps, \
        __global float *y, __global char *tq, __global float *tqs
#define GEMV_NORM_ARGS k, q, qsc, ROW_ARGS, accumulate, red, ticket, nw, eps, y, tq, tqs

inline void gemv_norm_body(GEMV_NORM_PARAMS, const int i2s) {
    Row row = gemv_row(ROW_ARGS);
    int lane = get_local_id(0) % TEAM;
    float acc = row.rr < row.n ? gemv_tq2_lane(row, k, q, lane, i2s) : 0.0f;
    gemv_store(row, acc, qsc, accumulate, red);
    if (!last_group(ticket, get_num_groups(0), red)) return;
    norm_quant_row(o0, n0, nw, 1, eps, y, 1, tq, tqs, 1, red);
}

__kernel void ternary_gemv_tq2_norm(GEMV_NORM_PARAMS) { gemv_norm_body(GEMV_NORM_ARGS, 0); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_gemv_i2s_norm(GEMV_NORM_PARAMS) { gemv_norm_body(GEMV_NORM_ARGS, 1); }

// The gate/up GEMV of an FFN (gate in o0, up in o1, n0 == n1 rows) followed by the activation
// of the pair (`ffn_act_quant_row` of norm.cl: g = act(g) · u, the sub-norm when has_norm, the
// int8 quantization to tq / tqs), done by the last work-group to finish: one launch instead of
// two per decoded token and layer.
#define GEMV_ACT_PARAMS                                                                     \
    int k, __global const char *q, __global const float *qsc, ROW_PARAMS, int accumulate,       \
        __local float *red, volatile __global int *ticket, int act, __global const float *nw,   \
        int has_norm, float eps, __global char *tq, __global float *tqs
#define GEMV_ACT_ARGS k, q, qsc, ROW_ARGS, accumulate, red, ticket, act, nw, has_norm, eps, tq, tqs

inline void gemv_act_body(GEMV_ACT_PARAMS, const int i2s) {
    Row row = gemv_row(ROW_ARGS);
    int lane = get_local_id(0) % TEAM;
    float acc = row.rr < row.n ? gemv_tq2_lane(row, k, q, lane, i2s) : 0.0f;
    gemv_store(row, acc, qsc, accumulate, red);
    if (!last_group(ticket, get_num_groups(0), red)) return;
    ffn_act_quant_row(o0, o1, n0, act, nw, has_norm, eps, tq, tqs, red);
}

__kernel void ternary_gemv_tq2_act(GEMV_ACT_PARAMS) { gemv_act_body(GEMV_ACT_ARGS, 0); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_gemv_i2s_act(GEMV_ACT_PARAMS) { gemv_act_body(GEMV_ACT_ARGS, 1); }

// TQ2_0 × a batch of tokens, tiled for GPUs (batched decode and prefill): the row teams of the
// kernels above re-read every token's activations for each row, so their time grows with the
// batch; here a work-item owns TT_RPT rows × TT_TPT tokens and reuses each row's masks for all
// its tokens and each activation word for all its rows, with the activations of the tile staged
// in local memory.
//
// A work-group is `teams` teams (warps; the local size / TEAM) that split the row length: team w
// takes the 128-element chunks w, w + teams, … (a chunk is half a TQ2_0 block: its 32 code bytes
// and 128 activations), so a small matrix still spreads over many work-groups; the teams' sums
// meet in local memory in a fixed order at the end. Within a team, lane = tg · rgroups + rg: rg
// picks TT_RPT consecutive rows, tg the tokens tg, tg + tgroups, … (tgroups · TT_TPT tokens per
// tile; `tgroups` is a launch argument so that small batches give the lanes rows instead).
//
// A team's activation tile holds each token's chunk as 32 words, reordered so that the four
// words one code word pairs with (planes j = 0..3, elements 32j + 4i..4i+3) are contiguous (one
// 16-byte local load), rows padded to TT_STRIDE words so that the tokens of one load fall in
// different banks. Per row and chunk the sums are exact integers that start from the chunk's
// `tq2_neg_count` correction, scaled by the block's d once.
//
// When the matrix has too few row tiles to fill the device (the 2560-row projections of a 2B
// model), `splits` work-groups share a tile, each taking a contiguous share of its rounds; their
// sums meet in `part` (splits · n_tok · rows floats) and the last to arrive, by a per-tile
// ticket in `tickets`, adds them in split order — deterministic, one launch.
//
// Grid: (row tiles · teams · TEAM, token tiles, splits); local: `tile16`, teams · max(tile
// tokens · TT_STRIDE, tile rows · tile tokens) + 1 words (the last one a flag).
#define TT_RPT 2
#define TT_TPT 16
#define TT_STRIDE 36

// Whether this work-group is the last of its tile's `splits` to finish (always, unsplit): its
// ticket in `tickets` (per tile: grid dimensions 0 and 1), taken between device-wide fences as in
// `last_group`, and put back to 0 by the last. Called by one work-item; the split GEMMs share it.
inline int split_tile_last(volatile __global int* tickets, int splits) {
    if (splits <= 1) return 1;
    volatile __global int* ticket = tickets + get_group_id(1) * get_num_groups(0) + get_group_id(0);
    device_fence();
    int last = atomic_inc(ticket) == splits - 1;
    if (last) atomic_xchg(ticket, 0);
    device_fence();
    return last;
}


#define TILED_PARAMS                                                                         \
    int k, __global const char *q, __global const float *qsc, int n_tok, int tgroups,          \
        ROW_PARAMS, int accumulate, __local uint4 *tile16, int splits, __global float *part,   \
        volatile __global int *tickets
#define TILED_ARGS k, q, qsc, n_tok, tgroups, ROW_ARGS, accumulate, tile16, splits, part, tickets

inline void tiled_body(TILED_PARAMS, const int i2s) {
    // Declared as uint4: NVIDIA aligns a local argument only to its declared type, and the
    // tile is read 16 bytes at a time.
    __local uint* tile = (__local uint*)tile16;
    int lane = get_local_id(0) % TEAM, team = get_local_id(0) / TEAM;
    int teams = get_local_size(0) / TEAM;
    int rgroups = TEAM / tgroups;
    int rg = lane % rgroups, tg = lane / rgroups;
    int tile_rows = rgroups * TT_RPT, tile_toks = tgroups * TT_TPT;
    int r_tile = get_group_id(0) * tile_rows;
    int t0 = get_group_id(1) * tile_toks;
    int nt = min(tile_toks, n_tok - t0);
    int bbytes = tblk_bytes(i2s), row_bytes = (k / 256) * bbytes;
    __global const uchar* wrow[TT_RPT];
    bool live_row[TT_RPT];
#pragma unroll
    for (int r = 0; r < TT_RPT; r++) {
        Row x = pick_row(r_tile + rg * TT_RPT + r, ROW_ARGS);
        live_row[r] = x.rr < x.n;
        wrow[r] = x.w + (size_t)(live_row[r] ? x.rr : 0) * row_bytes;
    }
    float acc[TT_RPT][TT_TPT];
#pragma unroll
    for (int r = 0; r < TT_RPT; r++) {
#pragma unroll
        for (int t = 0; t < TT_TPT; t++) acc[r][t] = 0.0f;
    }
    __local uint* acts = tile + team * tile_toks * TT_STRIDE;
    int nchunk = k / 128;
    int rounds = (nchunk + teams - 1) / teams;
    // This work-group's share of the rounds when the row length is split (dimension 2).
    int split = get_group_id(2);
    int round0 = rounds * split / splits, round1 = rounds * (split + 1) / splits;
    for (int round = round0; round < round1; round++) {
        int c = round * teams + team;
        bool live = c < nchunk;
        barrier(CLK_LOCAL_MEM_FENCE);
        if (live) {
            // Stage the chunk's activations: 8 × 16 bytes per token, global word gw (elements
            // 4gw..4gw+3 = plane gw / 8, code word gw % 8) to local word 4 · (gw % 8) + gw / 8.
            for (int u = lane; u < nt * 8; u += TEAM) {
                int t = u / 8, g = u % 8;
                uint4 v = *(const __global uint4*)(q + (size_t)(t0 + t) * k + c * 128 + g * 16);
                __local uint* dst = acts + t * TT_STRIDE;
                int gw = 4 * g;
                dst[4 * (gw % 8) + gw / 8] = v.x;
                dst[4 * ((gw + 1) % 8) + (gw + 1) / 8] = v.y;
                dst[4 * ((gw + 2) % 8) + (gw + 2) / 8] = v.z;
                dst[4 * ((gw + 3) % 8) + (gw + 3) / 8] = v.w;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (live) {
            // Loaded after the staging: loading them before it measured slower on the H100
            // (prefill 4837 / 4864 against 3791 / 3823 tok/s, one call), the codes held in
            // registers across the barrier.
            int blk = c / 2, half_off = (c % 2) * 32;
            uint cw[TT_RPT][8];
            float d[TT_RPT];
#pragma unroll
            for (int r = 0; r < TT_RPT; r++) {
                const __global uchar* b = wrow[r] + blk * bbytes;
                d[r] = live_row[r] ? tblk_scale(b, i2s) : 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    // TQ2_0 blocks are 66 bytes, so only 2-byte alignment holds.
                    ushort2 h = vload2(0, (const __global ushort*)(b + half_off + 4 * i));
                    cw[r][i] = live_row[r] ? ((uint)h.x | ((uint)h.y << 16)) : 0x55555555u;
                }
            }
            int ncnt[TT_RPT];
#pragma unroll
            for (int r = 0; r < TT_RPT; r++) {
                ncnt[r] = 0;
#pragma unroll
                for (int i = 0; i < 8; i++) ncnt[r] += tq2_neg_count(cw[r][i]);
            }
            int s[TT_RPT][TT_TPT];
#pragma unroll
            for (int r = 0; r < TT_RPT; r++) {
#pragma unroll
                for (int t = 0; t < TT_TPT; t++) s[r][t] = ncnt[r];
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                uint2 m[TT_RPT][4];
#pragma unroll
                for (int r = 0; r < TT_RPT; r++) {
#pragma unroll
                    for (int j = 0; j < 4; j++) m[r][j] = tq2_plane(cw[r][i], tplane(j, i2s));
                }
#pragma unroll
                for (int t = 0; t < TT_TPT; t++) {
                    int tl = tg + tgroups * t;
                    if (tl < nt) {
                        uint4 a = *(__local const uint4*)(acts + tl * TT_STRIDE + 4 * i);
#pragma unroll
                        for (int r = 0; r < TT_RPT; r++) {
                            int v = sum4(tq2_apply(a.x, m[r][0]), s[r][t]);
                            v = sum4(tq2_apply(a.y, m[r][1]), v);
                            v = sum4(tq2_apply(a.z, m[r][2]), v);
                            s[r][t] = sum4(tq2_apply(a.w, m[r][3]), v);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < TT_RPT; r++) {
#pragma unroll
                for (int t = 0; t < TT_TPT; t++) acc[r][t] += (float)s[r][t] * d[r];
            }
        }
    }
    // The teams' sums for the tile, token-major, then added in team order.
    barrier(CLK_LOCAL_MEM_FENCE);
    __local float* red = (__local float*)tile;
#pragma unroll
    for (int r = 0; r < TT_RPT; r++) {
#pragma unroll
        for (int t = 0; t < TT_TPT; t++) {
            int tl = tg + tgroups * t;
            red[(team * tile_toks + tl) * tile_rows + rg * TT_RPT + r] = acc[r][t];
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    int total = n0 + n1 + n2;
    // Row length split over `splits` work-groups (dimension 2): each writes its sums to `part`
    // (split-major, then token, then row of the launch) and the last of the tile's work-groups
    // to arrive (its ticket; device-wide fences as in `last_group`) adds them in split order.
    // Barriers stay at top level and every work-item passes them (PoCL).
    if (splits > 1) {
        for (int o = get_local_id(0); o < tile_rows * tile_toks; o += get_local_size(0)) {
            int rl = o % tile_rows, tl = o / tile_rows;
            if (tl < nt && r_tile + rl < total) {
                float v = 0.0f;
                for (int w = 0; w < teams; w++) v += red[(w * tile_toks + tl) * tile_rows + rl];
                part[((size_t)split * n_tok + t0 + tl) * total + r_tile + rl] = v;
            }
        }
    }
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    __local int* flag = (__local int*)(red + teams * tile_toks * tile_rows);
    if (get_local_id(0) == 0) flag[0] = split_tile_last(tickets, splits);
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    if (flag[0]) {
        for (int o = get_local_id(0); o < tile_rows * tile_toks; o += get_local_size(0)) {
            int rl = o % tile_rows, tl = o / tile_rows;
            Row x = pick_row(r_tile + rl, ROW_ARGS);
            if (tl < nt && x.rr < x.n) {
                float v = 0.0f;
                if (splits == 1) {
                    for (int w = 0; w < teams; w++) {
                        v += red[(w * tile_toks + tl) * tile_rows + rl];
                    }
                } else {
                    for (int sp = 0; sp < splits; sp++) {
                        v += part[((size_t)sp * n_tok + t0 + tl) * total + r_tile + rl];
                    }
                }
                tiled_store(x, v, qsc, t0 + tl, accumulate);
            }
        }
    }
}

__kernel void ternary_matmul_tq2_tiled(TILED_PARAMS) { tiled_body(TILED_ARGS, 0); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_matmul_i2s_tiled(TILED_PARAMS) { tiled_body(TILED_ARGS, 1); }
