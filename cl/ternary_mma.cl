// TQ2_0 (and I2_S, whose rows are TQ2_0 code bytes with the planes reversed: ternary.cl; and
// TQ1_0, whose base-3 codes are unpacked into the same fragments) × int8 activations on NVIDIA's int8 tensor cores (sm_80 and later; built only with
// -DTERNMUX_MMA, which the host adds where the driver takes the inline PTX below).
//
// Each weight code becomes a signed byte −1 / 0 / +1 in registers (two byte permutes and one
// logic op per four weights; a corrupt code 3 counts as +1, as everywhere else), and
// `mma.sync.m16n8k32` sums 16 rows × 8 tokens × 32 weights per instruction, exactly in int32
// per 256-weight block; then one float scale per block and row, one per token. The integer
// arithmetic is the same as the other kernels' (exact sums), only the unit that adds is new.
//
// Work split: a work-group of MM_WARPS warps owns MM_WARPS · 16 rows × up to MM_TOKS tokens;
// each warp 16 rows (work-item lanes g = lane / 4 and g + 8) × all the tile's tokens (eight mma
// n-tiles). Per 256-weight block the work-group stages the tile's activations in local memory
// (two buffers: the next block's loads are in flight while this one is summed), each token's
// 32-weight slices reordered (words 0 4 1 5 2 6 3 7) so that a work-item's B
// fragment (k = 4·tq..+3 and 16 + 4·tq..+3) is one 8-byte load; the weights' A fragments come
// straight from global memory (a block's 32-byte half holds four 32-weight slices, plane j of
// each byte). Where the tiles alone would not fill the GPU, `splits` work-groups share a tile,
// each a contiguous share of its blocks, and the last to arrive adds their sums in split order
// (a per-tile ticket, as in `ternary_matmul_tq2_tiled`).
//
// Grid: (row tiles · MM_WARPS · 32, token tiles, splits); local: 2 · MM_TOKS · MM_STRIDE + 4
// words (the last ones a flag).

#ifdef TERNMUX_MMA
#define MM_WARPS 4
#define MM_TOKS 64
#define MM_STRIDE 72
// 16-byte activation pieces each work-item stages per block: MM_TOKS · 16 / (MM_WARPS · 32).
#define MM_STAGE 8

// Four TQ2_0 codes (plane j of the four bytes of c) as signed bytes: code 0 → −1 (0xFF),
// 1 → 0, 2 (and a corrupt 3) → +1.
inline uint tq2_values(uint c, int j) {
    uint m1 = bit_bytes(c, 2 * j + 1), m0 = bit_bytes(c, 2 * j);
    return (m1 & 0x01010101u) | ~(m1 | m0);
}

// Trit n (pow3 = 3^n) of each byte of w as signed bytes −1 / 0 / +1 (TQ1_0's unpacking step,
// `trit` in ternary.cl, on two bytes at a time in 16-bit lanes: b · 3^n < 2^16 and its low byte
// · 3 < 2^16, so no lane carries into the next; then t − 1 per byte by (t + 0x7F) ^ 0x80).
inline uint tq1_trits(uint w, uint pow3) {
    uint ev = (((w & 0x00FF00FFu) * pow3) & 0x00FF00FFu) * 3u;
    uint od = ((((w >> 8) & 0x00FF00FFu) * pow3) & 0x00FF00FFu) * 3u;
    uint t = ((ev >> 8) & 0x00030003u) | (od & 0x03000300u);
    return (t + 0x7F7F7F7Fu) ^ 0x80808080u;
}

// The A-fragment word of TQ1_0 slice s (weights 32·s..+31 of the block), half hh (columns
// 4·tq.. or 16 + 4·tq..) from one row's words of `mma_load_codes`: weights 0..159 are trits
// 0..4 of qs[0..32), 160..239 trits 0..4 of qs[32..48), 240..255 trits 0..3 of qh[0..4).
inline uint tq1_slice(uint w[2][2], int s, int hh, int tq) {
    if (s < 5) return tq1_trits(w[0][hh], s == 0 ? 1u : s == 1 ? 3u : s == 2 ? 9u : s == 3 ? 27u : 81u);
    if (s == 5) return tq1_trits(w[1][0], hh ? 3u : 1u);
    if (s == 6) return tq1_trits(w[1][0], hh ? 27u : 9u);
    if (hh == 0) return tq1_trits(w[1][0], 81u);
    // Weights 240 + 4·tq + i sit in qh byte i, trit tq.
    return tq1_trits(w[1][1], tq == 0 ? 1u : tq == 1 ? 3u : tq == 2 ? 9u : 27u);
}

// c += A · B for a 16 × 32 int8 A (this work-item's fragment a0..a3: rows g and g + 8, columns
// 4·tq..+3 and 16 + 4·tq..+3) and a 32 × 8 int8 B (b0, b1: column g, the same k), exact int32.
#define MMA_S8(c, a0, a1, a2, a3, b0, b1)                                                    \
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "           \
                 "{%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"                                 \
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])                             \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), \
                   "r"(c[2]), "r"(c[3]))

// Four code bytes of a TQ2_0 block at byte offset `at` (blocks are 66 bytes: 2-byte aligned).
inline uint code_word(const __global uchar* b, int at) {
    ushort2 h = vload2(0, (const __global ushort*)(b + at));
    return (uint)h.x | ((uint)h.y << 16);
}

// This work-item's code words of block `blk` for its two rows: [row][half][lo, hi] = bytes
// 32·half + 4·tq and + 16 (columns 4·tq.. and 16 + 4·tq.. of each slice), and the rows' block
// scales. A row past the launch's rows gets codes 1 (weight 0) and scale 0.
//
// TQ1_0 (`fmt`): the row's words of the block instead — [row][0][0..1] = qs bytes 4·tq.. and
// 16 + 4·tq.., [row][1][0] = qs bytes 32 + 4·tq.., [row][1][1] = the four qh bytes (54-byte
// blocks, scale at 52); `tq1_slice` makes the fragments from them.
inline void mma_load_codes(__global const uchar* wrow[2], bool live[2], int blk, int tq,
                           uint cw[2][2][2], float d[2], const int fmt) {
    if (fmt == TFMT_TQ1_0) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const __global uchar* b = wrow[r] + (size_t)blk * 54;
            d[r] = live[r] ? ld_f16(b + 52) : 0.0f;
            // A dead row: every trit 1 (weight 0) — byte 0x80, TQ1_0's packing of 11111 in
            // base 3 ((128 · 3^n mod 256) · 3 >> 8 = 1 for n = 0..4).
            cw[r][0][0] = live[r] ? code_word(b, 4 * tq) : 0x80808080u;
            cw[r][0][1] = live[r] ? code_word(b, 16 + 4 * tq) : 0x80808080u;
            cw[r][1][0] = live[r] ? code_word(b, 32 + 4 * tq) : 0x80808080u;
            cw[r][1][1] = live[r] ? code_word(b, 48) : 0x80808080u;
        }
        return;
    }
    const int i2s = fmt == TFMT_I2_S;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const __global uchar* b = wrow[r] + (size_t)blk * tblk_bytes(i2s);
        d[r] = live[r] ? tblk_scale(b, i2s) : 0.0f;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            cw[r][h][0] = live[r] ? code_word(b, 32 * h + 4 * tq) : 0x55555555u;
            cw[r][h][1] = live[r] ? code_word(b, 32 * h + 16 + 4 * tq) : 0x55555555u;
        }
    }
}

// This work-item's share of block `blk`'s activations for the tile's tokens: 16-byte pieces
// lid, lid + 128, … of the first `n_piece` (16 per token; zeros past the last token, up to the
// n-tile edge), all loads issued before any is used.
inline void mma_load_acts(__global const char* q, int k, int t0, int nt, int n_piece, int blk,
                          int lid, uint4 stage[MM_STAGE]) {
#pragma unroll
    for (int i = 0; i < MM_STAGE; i++) {
        int u = lid + i * MM_WARPS * 32;
        int t = u / 16, v = u % 16;
        stage[i] = (uint4)(0u);
        if (u < n_piece && t < nt) {
            stage[i] = *(const __global uint4*)(q + (size_t)(t0 + t) * k + blk * 256 + v * 16);
        }
    }
}

// The pieces of `mma_load_acts` into a staging buffer: piece v of a token holds words 4·(v % 2)
// .. + 3 of slice v / 2, which go to positions v % 2 + 0, 2, 4, 6 of the slice's eight.
inline void mma_store_acts(__local uint* buf, int n_piece, int lid, uint4 stage[MM_STAGE]) {
#pragma unroll
    for (int i = 0; i < MM_STAGE; i++) {
        int u = lid + i * MM_WARPS * 32;
        if (u < n_piece) {
            int t = u / 16, v = u % 16;
            __local uint* dst = buf + t * MM_STRIDE + (v / 2) * 8 + (v % 2);
            dst[0] = stage[i].x;
            dst[2] = stage[i].y;
            dst[4] = stage[i].z;
            dst[6] = stage[i].w;
        }
    }
}

#define MMA_PARAMS                                                                           \
    int k, __global const char *q, __global const float *qsc, int n_tok, ROW_PARAMS,           \
        int accumulate, __local uint4 *tile16, int splits, __global float *part,               \
        volatile __global int *tickets
#define MMA_ARGS k, q, qsc, n_tok, ROW_ARGS, accumulate, tile16, splits, part, tickets

inline void mma_body(MMA_PARAMS, const int fmt) {
    const int i2s = fmt == TFMT_I2_S;
    // Declared as uint4: NVIDIA aligns a local argument only to its declared type.
    __local uint* acts = (__local uint*)tile16;
    int lid = get_local_id(0);
    int lane = lid % 32, warp = lid / 32;
    int g = lane / 4, tq = lane % 4;
    int tile_rows = MM_WARPS * 16;
    int r_tile = get_group_id(0) * tile_rows;
    int t0 = get_group_id(1) * MM_TOKS;
    int nt = min(MM_TOKS, n_tok - t0);
    int ntiles = (nt + 7) / 8;
    int row_bytes = (k / 256) * (fmt == TFMT_TQ1_0 ? 54 : tblk_bytes(i2s));
    int total = n0 + n1 + n2;
    // This work-item's two rows: g and g + 8 of its warp's sixteen. A row past the launch's
    // rows reads row 0 with all codes 0 (weight 0) and stores nothing.
    Row xr[2];
    bool live[2];
    __global const uchar* wrow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        xr[r] = pick_row(r_tile + warp * 16 + g + 8 * r, ROW_ARGS);
        live[r] = xr[r].rr < xr[r].n;
        wrow[r] = xr[r].w + (size_t)(live[r] ? xr[r].rr : 0) * row_bytes;
    }
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
    }
    int nblk = k / 256;
    int split = get_group_id(2);
    int blk0 = nblk * split / splits, blk1 = nblk * (split + 1) / splits;
    // Software pipeline over the blocks: while block b is summed from one staging buffer, the
    // loads of block b + 1 (this work-item's code words, its share of the activations) are in
    // flight, and land in the other buffer afterwards; one barrier per block.
    int n_piece = ntiles * 8 * 16;
    uint cw[2][2][2], cn[2][2][2];
    float d[2], dn[2];
    uint4 stage[MM_STAGE];
    if (blk0 < blk1) {
        mma_load_codes(wrow, live, blk0, tq, cw, d, fmt);
        mma_load_acts(q, k, t0, nt, n_piece, blk0, lid, stage);
        mma_store_acts(acts, n_piece, lid, stage);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int blk = blk0; blk < blk1; blk++) {
        __local const uint* cur = acts + ((blk - blk0) & 1) * MM_TOKS * MM_STRIDE;
        __local uint* next = acts + (((blk - blk0) & 1) ^ 1) * MM_TOKS * MM_STRIDE;
        bool more = blk + 1 < blk1;
        if (more) {
            mma_load_codes(wrow, live, blk + 1, tq, cn, dn, fmt);
            mma_load_acts(q, k, t0, nt, n_piece, blk + 1, lid, stage);
        }
        int c[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) c[n][i] = 0;
        }
        // Slice s of the block (weights 32·s..32·s + 31) is plane s % 4 of half s / 4 (TQ2_0;
        // I2_S's planes run the other way).
#pragma unroll
        for (int s = 0; s < 8; s++) {
            int h = s / 4, j = tplane(s % 4, i2s);
            uint a0, a1, a2, a3;
            if (fmt == TFMT_TQ1_0) {
                a0 = tq1_slice(cw[0], s, 0, tq);
                a1 = tq1_slice(cw[1], s, 0, tq);
                a2 = tq1_slice(cw[0], s, 1, tq);
                a3 = tq1_slice(cw[1], s, 1, tq);
            } else {
                a0 = tq2_values(cw[0][h][0], j);
                a1 = tq2_values(cw[1][h][0], j);
                a2 = tq2_values(cw[0][h][1], j);
                a3 = tq2_values(cw[1][h][1], j);
            }
#pragma unroll
            for (int n = 0; n < 8; n++) {
                if (n < ntiles) {
                    uint2 b = *(__local const uint2*)(cur + (n * 8 + g) * MM_STRIDE + s * 8 + 2 * tq);
                    MMA_S8(c[n], a0, a1, a2, a3, b.x, b.y);
                }
            }
        }
        // c[n]: rows g (0, 1) and g + 8 (2, 3), tokens 8·n + 2·tq (0, 2) and + 1 (1, 3).
#pragma unroll
        for (int n = 0; n < 8; n++) {
            acc[n][0] += (float)c[n][0] * d[0];
            acc[n][1] += (float)c[n][1] * d[0];
            acc[n][2] += (float)c[n][2] * d[1];
            acc[n][3] += (float)c[n][3] * d[1];
        }
        if (more) {
            mma_store_acts(next, n_piece, lid, stage);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                d[r] = dn[r];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    cw[r][h][0] = cn[r][h][0];
                    cw[r][h][1] = cn[r][h][1];
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    // Split row lengths: every work-group writes its sums to `part` (split-major, then token,
    // then row of the launch); the last of the tile's work-groups adds them in split order.
    // (The ticket is written out rather than through `last_group` with an early return: that
    // form measured slower on the H100 — batch-8 / 64 decode passes 7.0–7.2 / 12.9–13.9 ms
    // against 6.3–6.4 / 11.3–11.8 ms, alternated, three rounds.)
    if (splits > 1) {
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int tl = 8 * n + 2 * tq + (i & 1);
                int rl = warp * 16 + g + 8 * (i / 2);
                if (tl < nt && r_tile + rl < total) {
                    part[((size_t)split * n_tok + t0 + tl) * total + r_tile + rl] = acc[n][i];
                }
            }
        }
    }
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    __local int* flag = (__local int*)(acts + 2 * MM_TOKS * MM_STRIDE);
    if (lid == 0) flag[0] = split_tile_last(tickets, splits);
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    if (flag[0]) {
        // With splits, every split's sums of this work-item's outputs are loaded split by split,
        // all 32 of a split at once (the sums' order stays the split order).
        if (splits > 1) {
#pragma unroll
            for (int n = 0; n < 8; n++) {
#pragma unroll
                for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
            }
            for (int sp = 0; sp < splits; sp++) {
#pragma unroll
                for (int n = 0; n < 8; n++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int tl = 8 * n + 2 * tq + (i & 1);
                        int rl = warp * 16 + g + 8 * (i / 2);
                        if (tl < nt && r_tile + rl < total) {
                            acc[n][i] += part[((size_t)sp * n_tok + t0 + tl) * total + r_tile + rl];
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int tl = 8 * n + 2 * tq + (i & 1);
                int r = i / 2;
                if (tl < nt && live[r]) tiled_store(xr[r], acc[n][i], qsc, t0 + tl, accumulate);
            }
        }
    }
}

// 1..8 · NT8 tokens (the small batched steps of a few sequences decoding) on the int8 tensor
// cores: a work-group of ks warps (the host's choice: a power of two, at most 8, each warp with
// about MF_U / 2 blocks) owns 16 rows, each warp a share of their blocks (blocks w, w + ks, …),
// the codes of MF_U of its blocks loaded before any is summed; the tokens are NT8 mma n-tiles of
// 8 (each entry point built for a fixed NT8: 1 or 2; four tiles lost to the tiled GEMM at 24
// and 32 tokens on the H100), their activations read straight from
// global memory (B fragments: token 8·n + g, k = 4·tq..+3 and 16 + 4·tq..+3 of each 32-weight
// slice; zeros past the last token). The A fragments of a block are made once and used for
// every n-tile. Per block the int32 sums are exact, then the row's block scale; the warps' sums
// are added in warp order by warp 0, so a token's outputs do not depend on how many tokens
// share the launch, nor on which of the entry points runs it. Against the team-per-row kernel
// (`ternary_few*`), whose cost grew with the tokens (a mask, a dp4a and a load per four weights
// and token), the tensor core sums eight tokens of 16 rows × 32 weights at once.
// Grid: ⌈rows / 16⌉ · ks · 32 work-items, ks · 32 a work-group; local `red`: ks · 32 · 4 · NT8
// floats.
#define MF_U 4

#define MMA_FEW_PARAMS                                                                      \
    int k, __global const char *q, __global const float *qsc, int n_tok, ROW_PARAMS,           \
        int accumulate, __local float *red
#define MMA_FEW_ARGS k, q, qsc, n_tok, ROW_ARGS, accumulate, red

// The body. With `from_local` (a constant of the caller, so one of the two loads is compiled
// out) the activations come from local memory instead of `q` / `qsc`: token t's row at
// ql + t · lstride bytes, its scale lsc[t] (`mma_few_norm`, whose work-group normed and
// quantized them itself).
inline void mma_few_core(MMA_FEW_PARAMS, const int fmt, const int NT8, const int from_local,
                         __local const char* ql, int lstride, __local const float* lsc) {
    const int i2s = fmt == TFMT_I2_S;
    int lid = get_local_id(0);
    int lane = lid % 32, warp = lid / 32, ks = get_local_size(0) / 32;
    int g = lane / 4, tq = lane % 4;
    int r0 = get_group_id(0) * 16;
    int row_bytes = (k / 256) * tblk_bytes(i2s);
    Row xr[2];
    bool live[2];
    __global const uchar* wrow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        xr[r] = pick_row(r0 + g + 8 * r, ROW_ARGS);
        live[r] = xr[r].rr < xr[r].n;
        wrow[r] = xr[r].w + (size_t)(live[r] ? xr[r].rr : 0) * row_bytes;
    }
    // This work-item's token of each n-tile (B fragment column g), and whether it is real.
    bool tok[2];
    const __global uint* qa[2];
    __local const uint* qla[2];
#pragma unroll
    for (int n = 0; n < NT8; n++) {
        tok[n] = 8 * n + g < n_tok;
        int t = min(8 * n + g, n_tok - 1);
        if (from_local) {
            qla[n] = (__local const uint*)(ql + t * lstride);
        } else {
            qa[n] = (const __global uint*)(q + (size_t)t * k);
        }
    }
    float acc[2][4];
#pragma unroll
    for (int n = 0; n < NT8; n++) {
#pragma unroll
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
    }
    int nblk = k / 256;
    for (int b0 = warp; b0 < nblk; b0 += ks * MF_U) {
        uint cw[MF_U][2][2][2];
        float d[MF_U][2];
#pragma unroll
        for (int u = 0; u < MF_U; u++) {
            int blk = b0 + u * ks;
            if (blk < nblk) mma_load_codes(wrow, live, blk, tq, cw[u], d[u], fmt);
        }
#pragma unroll
        for (int u = 0; u < MF_U; u++) {
            int blk = b0 + u * ks;
            if (blk < nblk) {
                int c[2][4];
#pragma unroll
                for (int n = 0; n < NT8; n++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) c[n][i] = 0;
                }
#pragma unroll
                for (int s = 0; s < 8; s++) {
                    int h = s / 4, j = tplane(s % 4, i2s);
                    uint a0 = tq2_values(cw[u][0][h][0], j);
                    uint a1 = tq2_values(cw[u][1][h][0], j);
                    uint a2 = tq2_values(cw[u][0][h][1], j);
                    uint a3 = tq2_values(cw[u][1][h][1], j);
                    int at = blk * 64 + s * 8 + tq;
#pragma unroll
                    for (int n = 0; n < NT8; n++) {
                        uint bx = 0u, by = 0u;
                        if (tok[n] && from_local) {
                            bx = qla[n][at];
                            by = qla[n][at + 4];
                        } else if (tok[n]) {
                            bx = qa[n][at];
                            by = qa[n][at + 4];
                        }
                        MMA_S8(c[n], a0, a1, a2, a3, bx, by);
                    }
                }
                // c[n]: rows g (0, 1) and g + 8 (2, 3), tokens 8·n + 2·tq (0, 2) and + 1 (1, 3).
#pragma unroll
                for (int n = 0; n < NT8; n++) {
                    acc[n][0] += (float)c[n][0] * d[u][0];
                    acc[n][1] += (float)c[n][1] * d[u][0];
                    acc[n][2] += (float)c[n][2] * d[u][1];
                    acc[n][3] += (float)c[n][3] * d[u][1];
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NT8; n++) {
#pragma unroll
        for (int i = 0; i < 4; i++) red[((warp * 32 + lane) * NT8 + n) * 4 + i] = acc[n][i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (warp == 0) {
#pragma unroll
        for (int n = 0; n < NT8; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = 0.0f;
                for (int w = 0; w < ks; w++) v += red[((w * 32 + lane) * NT8 + n) * 4 + i];
                int t = 8 * n + 2 * tq + (i & 1), r = i / 2;
                if (t < n_tok && live[r])
                    tiled_store_s(xr[r], v, from_local ? lsc[t] : qsc[t], t, accumulate);
            }
        }
    }
}

inline void mma_few_body(MMA_FEW_PARAMS, const int fmt, const int NT8) {
    mma_few_core(MMA_FEW_ARGS, fmt, NT8, 0, (__local const char*)red, 0, red);
}

__kernel void ternary_few_tq2_mma(MMA_FEW_PARAMS) { mma_few_body(MMA_FEW_ARGS, TFMT_TQ2_0, 1); }
__kernel void ternary_few16_tq2_mma(MMA_FEW_PARAMS) { mma_few_body(MMA_FEW_ARGS, TFMT_TQ2_0, 2); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_few_i2s_mma(MMA_FEW_PARAMS) { mma_few_body(MMA_FEW_ARGS, TFMT_I2_S, 1); }
__kernel void ternary_few16_i2s_mma(MMA_FEW_PARAMS) { mma_few_body(MMA_FEW_ARGS, TFMT_I2_S, 2); }

// RMSNorm · w and int8 quantization of up to 8 token rows of x (f32, row t at x + t · n) into
// local rows (`ql`, `lstride` bytes apart; scales to `lsc`), as `norm_quant` does each row
// alone: every work-item's chunks c = lid + i · wg in the same order, then each token's warp
// shuffles and the warps in order (`wg_sum` / `wg_max` on NVIDIA), so the same bits where the
// work-group has the row kernels' size (the host checks). All rows' loads are in flight together
// and one pair of barriers serves every token. `scratch`: 8 · wg / 32 floats.
inline void norm_quant_to_local(const __global float* x, int n, int n_tok,
                                const __global float* w, float eps, __local char* ql,
                                int lstride, __local float* lsc, __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    int lane = lid % 32, warp = lid / 32, nw = wg / 32;
    float acc[8];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t] = 0.0f;
    for (int c = lid; c < nc; c += wg) {
#pragma unroll
        for (int t = 0; t < 8; t++)
            if (t < n_tok) acc[t] = sumsq4(acc[t], row_ld4(x + (size_t)t * n, c, n));
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float v = warp_sum(acc[t]);
        if (lane == 0) scratch[t * nw + warp] = v;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float scale[8];
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float r = 0.0f;
        for (int i = 0; i < nw; i++) r += scratch[t * nw + i];
        scale[t] = 1.0f / sqrt(r / (float)n + eps);
        acc[t] = 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int c = lid; c < nc; c += wg) {
        float4 wv = row_ld4(w, c, n);
#pragma unroll
        for (int t = 0; t < 8; t++)
            if (t < n_tok) acc[t] = amax4(acc[t], (row_ld4(x + (size_t)t * n, c, n) * scale[t]) * wv);
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float v = warp_max(acc[t]);
        if (lane == 0) scratch[t * nw + warp] = v;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float s[8];
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float r = scratch[t * nw];
        for (int i = 1; i < nw; i++) r = fmax(r, scratch[t * nw + i]);
        s[t] = 127.0f / fmax(r, 0.00001f);
        if (lid == t && t < n_tok) lsc[t] = s[t];
    }
    for (int c = lid; c < nc; c += wg) {
        float4 wv = row_ld4(w, c, n);
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < n_tok) {
                float4 v = (row_ld4(x + (size_t)t * n, c, n) * scale[t]) * wv;
                *(__local char4*)(ql + t * lstride + 4 * c) =
                    (char4)(quant_one(v.x, s[t]), quant_one(v.y, s[t]), quant_one(v.z, s[t]),
                            quant_one(v.w, s[t]));
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}

// The few-token product (up to 8 tokens) of RMSNorm(x) · nw, quantized by the work-group itself
// (`norm_quant_to_local`) instead of by a `norm_quant` launch before it: a pass's QKV and
// gate/up projections norm their own input, two launches a block fewer, with the bits of the
// two launches. Rows in `ql` are k + 16 bytes apart (so the eight tokens' B-fragment loads
// fall in different banks), after the eight scales; `red` as in `mma_few_body`, at least
// 8 · work-group / 32 floats.
#define MMA_FEW_NORM_PARAMS                                                                  \
    int k, __global const float *x, __global const float *nw, float eps, int n_tok,          \
        ROW_PARAMS, int accumulate, __local float *red, __local char *ql
#define MMA_FEW_NORM_ARGS k, x, nw, eps, n_tok, ROW_ARGS, accumulate, red, ql

inline void mma_few_norm(MMA_FEW_NORM_PARAMS, const int fmt) {
    __local float* lsc = (__local float*)ql;
    __local char* rows = ql + 32;
    norm_quant_to_local(x, k, n_tok, nw, eps, rows, k + 16, lsc, red);
    mma_few_core(k, 0, 0, n_tok, ROW_ARGS, accumulate, red, fmt, 1, 1, rows, k + 16, lsc);
}

__kernel void ternary_few_tq2_mma_norm(MMA_FEW_NORM_PARAMS) { mma_few_norm(MMA_FEW_NORM_ARGS, TFMT_TQ2_0); }
__kernel void ternary_few_i2s_mma_norm(MMA_FEW_NORM_PARAMS) { mma_few_norm(MMA_FEW_NORM_ARGS, TFMT_I2_S); }

__kernel void ternary_matmul_tq2_mma(MMA_PARAMS) { mma_body(MMA_ARGS, TFMT_TQ2_0); }

// The same over I2_S rows (a multiple of 256 long).
__kernel void ternary_matmul_i2s_mma(MMA_PARAMS) { mma_body(MMA_ARGS, TFMT_I2_S); }

// The same over TQ1_0 rows (base-3 codes unpacked into the fragments: `tq1_slice`).
__kernel void ternary_matmul_tq1_mma(MMA_PARAMS) { mma_body(MMA_ARGS, TFMT_TQ1_0); }
#endif
