// RoPE, the device-resident f16 KV cache, and causal grouped-query attention.
//
// A pass holds rows of one or several sequences (continuous batching): `places` gives each row
// its sequence's cache slot and its position there (int2: slot, pos). A slot is n_ctx positions
// of kv_dim halves, slot s at offset s * n_ctx * kv_dim of each layer's cache.

// Rotates q and k of n_tok rows (NEOX pairs (i, i + n_rot/2), normal pairs (2i, 2i + 1);
// dimensions past n_rot unchanged), writes rotated q to qr, and stores rotated k and v as f16
// (round to nearest even) at each row's slot and position. `rope` holds (cos, sin) per position
// and pair, computed on the host exactly as the CPU backend does.
// Grid: (head_dim, n_head + 2 · n_kv, n_tok).
__kernel void rope_store(__global const float* q, __global const float* k,
                         __global const float* v, __global float* qr, __global half* kc,
                         __global half* vc, __global const float* rope,
                         __global const int2* places, int n_ctx, int hd, int n_rot, int neox,
                         int n_head, int n_kv) {
    int d = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
    if (d >= hd) return;
    int2 place = places[t];
    int pos = place.y, kvd = n_kv * hd;
    size_t at = ((size_t)place.x * n_ctx + pos) * kvd;
    if (h >= n_head + n_kv) {
        int hv = h - n_head - n_kv;
        vstore_half(v[(size_t)t * kvd + hv * hd + d], at + hv * hd + d, vc);
        return;
    }
    const __global float* src = h < n_head ? q + ((size_t)t * n_head + h) * hd
                                           : k + (size_t)t * kvd + (h - n_head) * hd;
    float y = src[d];
    if (d < n_rot) {
        int half_rot = n_rot / 2, i, partner;
        bool first;
        if (neox) {
            first = d < half_rot;
            i = first ? d : d - half_rot;
            partner = first ? d + half_rot : d - half_rot;
        } else {
            first = (d & 1) == 0;
            i = d / 2;
            partner = first ? d + 1 : d - 1;
        }
        float c = rope[((size_t)pos * half_rot + i) * 2], s = rope[((size_t)pos * half_rot + i) * 2 + 1];
        float x0 = first ? src[d] : src[partner];
        float x1 = first ? src[partner] : src[d];
        y = first ? x0 * c - x1 * s : x0 * s + x1 * c;
    }
    if (h < n_head) {
        qr[((size_t)t * n_head + h) * hd + d] = y;
    } else {
        vstore_half(y, at + (h - n_head) * hd + d, kc);
    }
}

// Causal GQA attention for n_tok query rows, each over positions 0..=pos of its slot: one
// work-group per (head, row); query head h reads KV head h / (n_head / n_kv). Scores go through
// `scores` ([n_tok][n_head][n_ctx] floats) so any context length fits. Grid: (wg · n_head, n_tok).
//
// Decoding gives one row per sequence, so few work-groups run and each must be quick: a key row
// is read as whole 16-byte vectors with every load of a position issued before the sums, and the
// value sum is split over groups of work-items (each takes every `groups`-th position for 4
// dimensions) whose partial sums meet in local memory, instead of one work-item walking every
// position for one dimension.
__kernel void attention(__global const float* qr, __global const half* kc_all,
                        __global const half* vc_all, __global float* scores, int n_ctx,
                        __global const int2* places, int hd, int n_head, int n_kv,
                        float kq_scale, __global float* out, __local float* scratch,
                        __local float* qloc, __local float* part) {
    int head = get_group_id(0), t = get_group_id(1);
    int lid = get_local_id(0), wg = get_local_size(0);
    int2 place = places[t];
    int n_pos = place.y + 1, kvh = head / (n_head / n_kv), kvd = n_kv * hd;
    size_t slot_at = (size_t)place.x * n_ctx * kvd;
    const __global half* kc = kc_all + slot_at + kvh * hd;
    const __global half* vc = vc_all + slot_at + kvh * hd;
    const __global float* qv = qr + ((size_t)t * n_head + head) * hd;
    for (int d = lid; d < hd; d += wg) qloc[d] = qv[d];
    barrier(CLK_LOCAL_MEM_FENCE);
    __global float* sc = scores + ((size_t)t * n_head + head) * n_ctx;
    // 16-byte aligned rows (every offset above is a multiple of 8 halves).
    bool vec8 = hd % 8 == 0;
    float m = -INFINITY;
    for (int p = lid; p < n_pos; p += wg) {
        const __global half* kp = kc + (size_t)p * kvd;
        float s = 0.0f;
        if (vec8) {
#pragma unroll 16
            for (int d = 0; d < hd / 8; d++) {
                float8 kk = vloada_half8(d, kp);
                float8 qq = vload8(d, qloc);
                s += dot(kk.lo, qq.lo) + dot(kk.hi, qq.hi);
            }
        } else {
            for (int d = 0; d < hd; d++) s += vload_half(d, kp) * qloc[d];
        }
        s *= kq_scale;
        sc[p] = s;
        m = fmax(m, s);
    }
    m = wg_max(m, scratch);
    float sum = 0.0f;
    for (int p = lid; p < n_pos; p += wg) {
        float e = exp(sc[p] - m);
        sc[p] = e;
        sum += e;
    }
    sum = wg_sum(sum, scratch);
    barrier(CLK_GLOBAL_MEM_FENCE);
    float inv = 1.0f / sum;
    // The barrier stays outside any branch (PoCL miscompiles one inside a uniform branch).
    int d4 = hd / 4;
    bool split = hd % 4 == 0 && d4 <= wg;
    int groups = split ? wg / d4 : 1;
    if (split) {
        int g = lid / d4, i = lid % d4;
        float4 acc = (float4)(0.0f);
        if (g < groups) {
#pragma unroll 4
            for (int p = g; p < n_pos; p += groups) {
                acc += sc[p] * vloada_half4(i, vc + (size_t)p * kvd);
            }
        }
        // Work-item (g, i) holds dimensions 4i..4i+3 of group g: part[g · hd + 4i + c].
        vstore4(acc, lid, part);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int d = lid; d < hd; d += wg) {
        float a = 0.0f;
        if (split) {
            for (int gg = 0; gg < groups; gg++) a += part[gg * hd + d];
        } else {
            for (int p = 0; p < n_pos; p++) a += sc[p] * vload_half((size_t)p * kvd + d, vc);
        }
        out[((size_t)t * n_head + head) * hd + d] = a * inv;
    }
}
