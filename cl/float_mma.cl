// F16 rows × f32 activations on NVIDIA's tensor cores (sm_80 and later; built only with
// -DTERNMUX_MMA_F16, which the host adds where the driver takes the inline PTX below) — the
// output head of batched decoding and prefill.
//
// Precision: the weights are f16 already (exact). Each activation chunk of 64 per token is
// scaled by a power of two (its largest magnitude lands in [2^14, 2^15): exact, no f16 overflow,
// no subnormals for the large values) and split into two f16 parts, hi = f16(x) and lo = f16(x −
// hi), so x = hi + lo to about 2^-22 relative; `mma.sync.m16n8k16` (f32 accumulation) takes both
// parts, and the chunk's sums are scaled back by the exact power of two. The result is as close
// to an f32 dot as the f32 kernels' (the tests hold it to the same f64 bound).
//
// Work split: a work-group of MF_WARPS warps owns MF_WARPS · 16 rows × up to MF_TOKS tokens;
// each warp 16 rows (lanes g = lane / 4 and g + 8) × the tile's tokens (eight mma n-tiles). The k
// order inside each 32-element piece is permuted the same way for weights and activations, so
// that a work-item's fragments are 16 contiguous bytes of its row and of its token: lane tq
// takes elements 8·tq..8·tq + 7 of a piece, which fill mma columns 2·tq, 2·tq + 1, 8 + 2·tq,
// 9 + 2·tq of two k16 steps. Activations are staged per 64-element chunk in local memory (hi
// and lo halves, token stride ≡ 16 words mod 32 so the 16-byte loads meet no bank conflict), two
// buffers: the next chunk's loads are in flight while this one is summed.
//
// Grid: (row tiles · MF_WARPS · 32, token tiles); local: 2 · tile tokens · (MF_STRIDE + 1) words
// (tile tokens: MF_TOKS, or 8 for `float_matmul_f16_mma8`).

#ifdef TERNMUX_MMA_F16
#define MF_WARPS 8
#define MF_TOKS 64
#define MF_CHUNK 64
#define MF_STRIDE 80
// Float4 activation pieces each work-item stages per chunk: MF_TOKS · 16 / (MF_WARPS · 32).
#define MF_STAGE 4

// Two floats as f16 (round to nearest even), a in the low half.
inline uint f16x2_rn(float a, float b) {
    uint d;
    asm("{.reg .f32 a_, b_; mov.b32 a_, %1; mov.b32 b_, %2; cvt.rn.f16x2.f32 %0, b_, a_;}"
        : "=r"(d)
        : "r"(as_uint(a)), "r"(as_uint(b)));
    return d;
}

// The two f16 halves of p as floats (low half first).
inline float2 f16x2_to_f32(uint p) {
    uint a, b;
    asm("{.reg .b16 l_, h_; .reg .f32 a_, b_; mov.b32 {l_, h_}, %2; cvt.f32.f16 a_, l_; "
        "cvt.f32.f16 b_, h_; mov.b32 %0, a_; mov.b32 %1, b_;}"
        : "=r"(a), "=r"(b)
        : "r"(p));
    return (float2)(as_float(a), as_float(b));
}

// Largest of v over the 16 lanes of this half-warp (every lane gets it; all 32 lanes call it).
inline float half_warp_max(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmax(v, shfl_xor(v, o));
    return v;
}

// c += A · B for a 16 × 16 f16 A (fragment a0..a3) and a 16 × 8 f16 B (b0, b1), f32 sums.
#define MMA_F16(c, a0, a1, a2, a3, b0, b1)                                                   \
    asm volatile("{.reg .f32 c0_, c1_, c2_, c3_; mov.b32 c0_, %4; mov.b32 c1_, %5; "          \
                 "mov.b32 c2_, %6; mov.b32 c3_, %7; "                                         \
                 "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {c0_,c1_,c2_,c3_}, "      \
                 "{%8,%9,%10,%11}, {%12,%13}, {c0_,c1_,c2_,c3_}; "                            \
                 "mov.b32 %0, c0_; mov.b32 %1, c1_; mov.b32 %2, c2_; mov.b32 %3, c3_;}"       \
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])                             \
                 : "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(a0), "r"(a1), "r"(a2),     \
                   "r"(a3), "r"(b0), "r"(b1))

// This work-item's share of chunk `ch` of the tile's activations (float4 pieces lid, lid + 256,
// …; 16 per token, so a token's pieces are 16 consecutive lanes), all loads issued first.
inline void mf_load(__global const float* x, int k, int t0, int nt, int n_piece, int ch, int lid,
                    float4 stage[MF_STAGE], const int tiles) {
#pragma unroll
    for (int i = 0; i < MF_STAGE; i++) {
        int u = lid + i * MF_WARPS * 32;
        int t = u / 16, v = u % 16;
        stage[i] = (float4)(0.0f);
        if (i * MF_WARPS * 32 < tiles * 128 && u < n_piece && t < nt) {
            stage[i] = *(const __global float4*)(x + (size_t)(t0 + t) * k + ch * MF_CHUNK + 4 * v);
        }
    }
}

// The pieces of `mf_load` into a staging buffer: each token's chunk scaled by its power of two
// (kept in `ex`, after the MF_TOKS token rows), split into f16 hi (words 0..31 of the token's
// row) and lo (words 32..63). Pieces past `n_piece` are skipped by whole warps (n_piece is a
// multiple of 128), so the shuffles see all 32 lanes.
inline void mf_store(__local uint* buf, int n_piece, int lid, float4 stage[MF_STAGE],
                     const int tiles) {
    __local int* ex = (__local int*)(buf + tiles * 8 * MF_STRIDE);
#pragma unroll
    for (int i = 0; i < MF_STAGE; i++) {
        int u = lid + i * MF_WARPS * 32;
        if (i * MF_WARPS * 32 < tiles * 128 && u < n_piece) {
            int t = u / 16, v = u % 16;
            float4 a = stage[i];
            float m = half_warp_max(fmax(fmax(fabs(a.x), fabs(a.y)), fmax(fabs(a.z), fabs(a.w))));
            // Largest magnitude into [2^14, 2^15); a zero (or non-finite) chunk keeps scale 1.
            int e = (m > 0.0f && isfinite(m)) ? clamp(ilogb(m) - 14, -140, 140) : 0;
            a = (float4)(ldexp(a.x, -e), ldexp(a.y, -e), ldexp(a.z, -e), ldexp(a.w, -e));
            uint h0 = f16x2_rn(a.x, a.y), h1 = f16x2_rn(a.z, a.w);
            float2 b0 = f16x2_to_f32(h0), b1 = f16x2_to_f32(h1);
            uint l0 = f16x2_rn(a.x - b0.x, a.y - b0.y), l1 = f16x2_rn(a.z - b1.x, a.w - b1.y);
            __local uint* row = buf + t * MF_STRIDE;
            *(__local uint2*)(row + 2 * v) = (uint2)(h0, h1);
            *(__local uint2*)(row + 32 + 2 * v) = (uint2)(l0, l1);
            if (v == 0) ex[t] = e;
        }
    }
}

inline void mf_body(int k, int row_bytes, __global const float* x, int n_tok,
                    __global const uchar* w, int n, __global float* o, float s, int accumulate,
                    __local uint4* tile16, const int tiles) {
    // Declared as uint4: NVIDIA aligns a local argument only to its declared type.
    __local uint* tile = (__local uint*)tile16;
    int lid = get_local_id(0);
    int lane = lid % 32, warp = lid / 32;
    int g = lane / 4, tq = lane % 4;
    int r_base = get_group_id(0) * MF_WARPS * 16 + warp * 16;
    int t0 = get_group_id(1) * tiles * 8;
    int nt = min(tiles * 8, n_tok - t0);
    int ntiles = (nt + 7) / 8;
    int n_piece = ntiles * 8 * 16;
    int buf_words = tiles * 8 * (MF_STRIDE + 1);
    // This work-item's rows g and g + 8 of its warp's sixteen; rows past the end read the last
    // row and store nothing.
    const __global uint4* wr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        wr[r] = (const __global uint4*)(w + (size_t)min(r_base + g + 8 * r, n - 1) * row_bytes);
    }
    float acc[8][4];
#pragma unroll
    for (int nn = 0; nn < 8; nn++) {
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nn][i] = 0.0f;
    }
    int nch = k / MF_CHUNK;
    float4 stage[MF_STAGE];
    // wv[row][piece]: elements 32·piece + 8·tq..+7 of the chunk (uint4 index 4·piece + tq).
    uint4 wv[2][2], wn[2][2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
#pragma unroll
        for (int p = 0; p < 2; p++) wv[r][p] = wr[r][4 * p + tq];
    }
    mf_load(x, k, t0, nt, n_piece, 0, lid, stage, tiles);
    mf_store(tile, n_piece, lid, stage, tiles);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int ch = 0; ch < nch; ch++) {
        __local const uint* cur = tile + (ch & 1) * buf_words;
        __local uint* next = tile + ((ch & 1) ^ 1) * buf_words;
        bool more = ch + 1 < nch;
        if (more) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
#pragma unroll
                for (int p = 0; p < 2; p++) wn[r][p] = wr[r][(ch + 1) * (MF_CHUNK / 8) + 4 * p + tq];
            }
            mf_load(x, k, t0, nt, n_piece, ch + 1, lid, stage, tiles);
        }
        uint c[8][4];
#pragma unroll
        for (int nn = 0; nn < 8; nn++) {
#pragma unroll
            for (int i = 0; i < 4; i++) c[nn][i] = 0u;  // 0.0f
        }
#pragma unroll
        for (int p = 0; p < 2; p++) {
#pragma unroll
            for (int nn = 0; nn < 8; nn++) {
                if (nn < tiles && nn < ntiles) {
                    __local const uint* row = cur + (nn * 8 + g) * MF_STRIDE + 16 * p + 4 * tq;
                    uint4 hi = *(__local const uint4*)row;
                    uint4 lo = *(__local const uint4*)(row + 32);
                    // k16 step st: A columns 2·tq.. ← elements 8·tq + 4·st + 0, 1 (word 2·st),
                    // columns 8 + 2·tq.. ← + 2, 3 (word 2·st + 1); B rows the same.
                    MMA_F16(c[nn], wv[0][p].x, wv[1][p].x, wv[0][p].y, wv[1][p].y, hi.x, hi.y);
                    MMA_F16(c[nn], wv[0][p].z, wv[1][p].z, wv[0][p].w, wv[1][p].w, hi.z, hi.w);
                    MMA_F16(c[nn], wv[0][p].x, wv[1][p].x, wv[0][p].y, wv[1][p].y, lo.x, lo.y);
                    MMA_F16(c[nn], wv[0][p].z, wv[1][p].z, wv[0][p].w, wv[1][p].w, lo.z, lo.w);
                }
            }
        }
        // c[nn]: rows g (0, 1) and g + 8 (2, 3), tokens 8·nn + 2·tq (0, 2) and + 1 (1, 3); each
        // token's chunk scale undone exactly.
        __local const int* ex = (__local const int*)(cur + tiles * 8 * MF_STRIDE);
#pragma unroll
        for (int nn = 0; nn < 8; nn++) {
            if (nn < tiles && nn < ntiles) {
                int2 e = *(__local const int2*)(ex + 8 * nn + 2 * tq);
                acc[nn][0] += ldexp(as_float(c[nn][0]), e.x);
                acc[nn][1] += ldexp(as_float(c[nn][1]), e.y);
                acc[nn][2] += ldexp(as_float(c[nn][2]), e.x);
                acc[nn][3] += ldexp(as_float(c[nn][3]), e.y);
            }
        }
        if (more) {
            mf_store(next, n_piece, lid, stage, tiles);
#pragma unroll
            for (int r = 0; r < 2; r++) {
#pragma unroll
                for (int p = 0; p < 2; p++) wv[r][p] = wn[r][p];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
#pragma unroll
    for (int nn = 0; nn < 8; nn++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int tl = 8 * nn + 2 * tq + (i & 1);
            int row = r_base + g + 8 * (i / 2);
            if (nn < tiles && tl < nt && row < n) {
                size_t at = (size_t)(t0 + tl) * n + row;
                float v = acc[nn][i] * s;
                o[at] = accumulate ? o[at] + v : v;
            }
        }
    }
}

#define MF_PARAMS                                                                             \
    int k, int row_bytes, __global const float *x, int n_tok, __global const uchar *w, int n,  \
        __global float *o, float s, int accumulate, __local uint4 *tile16
#define MF_ARGS k, row_bytes, x, n_tok, w, n, o, s, accumulate, tile16
// Tiles of MF_TOKS tokens (batches of 9 and more).
__kernel void float_matmul_f16_mma(MF_PARAMS) { mf_body(MF_ARGS, MF_TOKS / 8); }
// One tile of 8 (batches of 2–8): an eighth of the registers and staging, so more work-groups
// share each SM and more weight loads are in flight.
__kernel void float_matmul_f16_mma8(MF_PARAMS) { mf_body(MF_ARGS, 1); }
#endif
