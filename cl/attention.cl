// RoPE, the device-resident f16 KV cache, and causal grouped-query attention.
//
// A pass holds rows of one or several sequences (continuous batching): `places` gives each row
// its sequence's cache slot and its position there (int2: slot, pos). A slot is n_ctx positions
// of kv_dim halves, slot s at offset s * n_ctx * kv_dim of each layer's cache.

// Value `d` of a head's vector `src` rotated for position `pos` (NEOX pairs (i, i + n_rot/2),
// normal pairs (2i, 2i + 1); dimensions past n_rot unchanged). `rope` holds (cos, sin) per
// position and pair, computed on the host exactly as the CPU backend does. One helper for both
// kernels that rotate, so they round alike.
inline float rope_rot(const __global float* src, int d, int pos, const __global float* rope,
                      int n_rot, int neox) {
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
    return y;
}

// Rotates q and k of n_tok rows, writes rotated q to qr, and stores rotated k and v as f16
// (round to nearest even) at each row's slot and position. Grid: (head_dim, n_head + 2 · n_kv,
// n_tok).
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
    if (h < n_head) {
        qr[((size_t)t * n_head + h) * hd + d] =
            rope_rot(q + ((size_t)t * n_head + h) * hd, d, pos, rope, n_rot, neox);
    } else {
        int hk = h - n_head;
        vstore_half(rope_rot(k + (size_t)t * kvd + hk * hd, d, pos, rope, n_rot, neox),
                    at + hk * hd + d, kc);
    }
}

// Scores go to local memory when the launch has room for n_ctx of them (`use_lsc`), else to
// the global scratch.
inline float sc_get(int use_lsc, __local float* lsc, __global float* sc, int p) {
    return use_lsc ? lsc[p] : sc[p];
}
inline void sc_set(int use_lsc, __local float* lsc, __global float* sc, int p, float v) {
    if (use_lsc) {
        lsc[p] = v;
    } else {
        sc[p] = v;
    }
}

// The attention of one query head of one row, by its work-group: scores against positions
// 0..n_pos-1 of the slot's cache (`kc` / `vc` already at the slot and KV head), softmax, and
// the value sum into `out`. Position `cur` (when ≥ 0) is taken from `kcur` / `vcur` in local
// memory (f16 values as floats) instead of the cache. A key row is read as whole 16-byte vectors
// with every load of a position issued before the sums; the value sum is split over groups of
// work-items (each takes every `groups`-th position for 8 dimensions) whose partial sums meet
// in local memory. Decoding gives one row per sequence, so few work-groups run and each must be
// quick.
inline void attend(const __local float* qloc, const __global half* kc, const __global half* vc,
                   int kvd, int hd, int n_pos, int cur, const __local float* kcur,
                   const __local float* vcur, float kq_scale, int use_lsc, __local float* lsc,
                   __global float* sc, __local float* scratch, __local float* part,
                   __global float* out, int gpu) {
    int lid = get_local_id(0), wg = get_local_size(0);
    // Rows of hd % 8 == 0 halves are 16-byte aligned (every offset is a multiple of 8 halves).
    bool vec8 = hd % 8 == 0;
    float m = -INFINITY;
    for (int p = lid; p < n_pos; p += wg) {
        float s = 0.0f;
        if (vec8) {
            const __global half* kp = kc + (size_t)p * kvd;
            if (p == cur) {
                for (int d = 0; d < hd / 8; d++) {
                    float8 kk = vload8(d, kcur), qq = vload8(d, qloc);
                    s += dot(kk.lo, qq.lo) + dot(kk.hi, qq.hi);
                }
            } else {
#pragma unroll 16
                for (int d = 0; d < hd / 8; d++) {
                    float8 kk = vloada_half8(d, kp), qq = vload8(d, qloc);
                    s += dot(kk.lo, qq.lo) + dot(kk.hi, qq.hi);
                }
            }
        } else {
            for (int d = 0; d < hd; d++) {
                s += (p == cur ? kcur[d] : vload_half((size_t)p * kvd + d, kc)) * qloc[d];
            }
        }
        s *= kq_scale;
        sc_set(use_lsc, lsc, sc, p, s);
        m = fmax(m, s);
    }
    m = wg_max(m, scratch);
    float sum = 0.0f;
    for (int p = lid; p < n_pos; p += wg) {
        float e = exp(sc_get(use_lsc, lsc, sc, p) - m);
        sc_set(use_lsc, lsc, sc, p, e);
        sum += e;
    }
    sum = wg_sum(sum, scratch);
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    float inv = 1.0f / sum;
    // The barrier stays outside any branch (PoCL miscompiles one inside a uniform branch).
    int d8 = hd / 8;
    // Split value sums on GPUs; CPU devices (work-item loops) do better with the plain loop.
    bool split = gpu && vec8 && d8 <= wg;
    int groups = split ? wg / d8 : 1;
    if (split) {
        int g = lid / d8, i = lid % d8;
        float8 acc = (float8)(0.0f);
        if (g < groups) {
#pragma unroll 8
            for (int p = g; p < n_pos; p += groups) {
                float8 vv = p == cur ? vload8(i, vcur) : vloada_half8(i, vc + (size_t)p * kvd);
                acc += sc_get(use_lsc, lsc, sc, p) * vv;
            }
        }
        // Work-item (g, i) holds dimensions 8i..8i+7 of group g: part[g · hd + 8i + c].
        vstore8(acc, lid, part);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int d = lid; d < hd; d += wg) {
        float a = 0.0f;
        if (split) {
            for (int gg = 0; gg < groups; gg++) a += part[gg * hd + d];
        } else {
            for (int p = 0; p < n_pos; p++) {
                float vv = p == cur ? vcur[d] : vload_half((size_t)p * kvd + d, vc);
                a += sc_get(use_lsc, lsc, sc, p) * vv;
            }
        }
        out[d] = a * inv;
    }
}

// Causal GQA attention for n_tok query rows (rotated queries `qr`, keys and values already in the
// cache), each over positions 0..=pos of its slot: one work-group per (head, row); query head h
// reads KV head h / (n_head / n_kv). Grid: (wg · n_head, n_tok).
__kernel void attention(__global const float* qr, __global const half* kc_all,
                        __global const half* vc_all, __global float* scores, int n_ctx,
                        __global const int2* places, int hd, int n_head, int n_kv,
                        float kq_scale, __global float* out, int use_lsc, int gpu,
                        __local float* scratch, __local float* qloc, __local float* part,
                        __local float* lsc) {
    int head = get_group_id(0), t = get_group_id(1);
    int lid = get_local_id(0), wg = get_local_size(0);
    int2 place = places[t];
    int kvh = head / (n_head / n_kv), kvd = n_kv * hd;
    size_t slot_at = (size_t)place.x * n_ctx * kvd + kvh * hd;
    const __global float* qv = qr + ((size_t)t * n_head + head) * hd;
    for (int d = lid; d < hd; d += wg) qloc[d] = qv[d];
    barrier(CLK_LOCAL_MEM_FENCE);
    attend(qloc, kc_all + slot_at, vc_all + slot_at, kvd, hd, place.y + 1, -1, qloc, qloc,
           kq_scale, use_lsc, lsc, scores + ((size_t)t * n_head + head) * n_ctx, scratch, part,
           out + ((size_t)t * n_head + head) * hd, gpu);
}

// RoPE, the KV store and attention in one launch, for passes where every row is the only row of
// its slot (decoding): each work-group rotates its query and its KV head's key for the row's
// position, the first query head of each KV group stores the key and value in the cache, and
// every work-group takes its own row's key and value from local memory (no other work-group of
// the launch reads that position). Earlier positions were stored by earlier passes. Same
// arithmetic as `rope_store` then `attention`. Grid: (wg · n_head, n_tok).
inline void rope_attend(__global const float* q, __global const float* k,
                        __global const float* v, __global half* kc_all, __global half* vc_all,
                        __global const float* rope, __global float* scores, int n_ctx,
                        __global const int2* places, int hd, int n_rot, int neox, int n_head,
                        int n_kv, float kq_scale, __global float* out, int use_lsc, int gpu,
                        __local float* scratch, __local float* qloc, __local float* part,
                        __local float* lsc, __local float* cur, __local half* cur_h) {
    int head = get_group_id(0), t = get_group_id(1);
    int lid = get_local_id(0), wg = get_local_size(0);
    int2 place = places[t];
    int pos = place.y, group = n_head / n_kv, kvh = head / group, kvd = n_kv * hd;
    size_t slot_at = (size_t)place.x * n_ctx * kvd + kvh * hd;
    const __global float* kr = k + (size_t)t * kvd + kvh * hd;
    const __global float* vr = v + (size_t)t * kvd + kvh * hd;
    __global half* kdst = kc_all + slot_at + (size_t)pos * kvd;
    __global half* vdst = vc_all + slot_at + (size_t)pos * kvd;
    for (int d = lid; d < hd; d += wg) {
        qloc[d] = rope_rot(q + ((size_t)t * n_head + head) * hd, d, pos, rope, n_rot, neox);
        float kd = rope_rot(kr, d, pos, rope, n_rot, neox);
        if (head % group == 0) {
            vstore_half(kd, d, kdst);
            vstore_half(vr[d], d, vdst);
        }
        vstore_half(kd, d, cur_h);
        vstore_half(vr[d], hd + d, cur_h);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int d = lid; d < 2 * hd; d += wg) cur[d] = vload_half(d, cur_h);
    barrier(CLK_LOCAL_MEM_FENCE);
    attend(qloc, kc_all + slot_at, vc_all + slot_at, kvd, hd, pos + 1, pos, cur, cur + hd,
           kq_scale, use_lsc, lsc, scores + ((size_t)t * n_head + head) * n_ctx, scratch, part,
           out + ((size_t)t * n_head + head) * hd, gpu);
}

#define ROPE_ATTEND_PARAMS                                                                     \
    __global const float *q, __global const float *k, __global const float *v,                 \
        __global half *kc_all, __global half *vc_all, __global const float *rope,              \
        __global float *scores, int n_ctx, __global const int2 *places, int hd, int n_rot,     \
        int neox, int n_head, int n_kv, float kq_scale, __global float *out, int use_lsc,      \
        int gpu, __local float *scratch, __local float *qloc, __local float *part,             \
        __local float *lsc, __local float *cur, __local half *cur_h
#define ROPE_ATTEND_ARGS                                                                       \
    q, k, v, kc_all, vc_all, rope, scores, n_ctx, places, hd, n_rot, neox, n_head, n_kv,        \
        kq_scale, out, use_lsc, gpu, scratch, qloc, part, lsc, cur, cur_h

__kernel void attention_rope(ROPE_ATTEND_PARAMS) { rope_attend(ROPE_ATTEND_ARGS); }

// `attention_rope`, then the sub-norm of each row's attention output (RMSNorm · nw in place and
// its int8 quantization to tq / tqs[t], as `norm_quant`), done by the last of the row's head
// work-groups to finish (`ticket[t]`).
__kernel void attention_rope_norm(ROPE_ATTEND_PARAMS, volatile __global int* ticket,
                                  __global const float* nw, float eps, __global char* tq,
                                  __global float* tqs) {
    rope_attend(ROPE_ATTEND_ARGS);
    int t = get_group_id(1), qd = n_head * hd;
    if (!last_group(ticket + t, n_head, scratch)) return;
    __global float* row = out + (size_t)t * qd;
    norm_quant_row(row, qd, nw, 1, eps, row, 1, tq + (size_t)t * qd, tqs + t, 1, scratch);
}
