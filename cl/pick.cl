// Greedy decoding on the device. The token of the largest logit is written where the next
// pass's embedding lookup reads its token (`ids[0]`), and the row's place moves to the next
// position, so the host can queue the next pass before this one has run: it reads the token
// back in the background instead of reading the logits and choosing on the host.

// Whether candidate (v, i) beats (bv, bi): larger value, lower index on ties; an index < 0 is
// no candidate.
inline bool pick_beats(float v, int i, float bv, int bi) {
    return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

// Folds (v, i) into the running best (bv, bi) of one work-item, whose indices rise: NaN never,
// and a strict `>` keeps the first maximum.
inline void pick_fold(float v, int i, float* bv, int* bi) {
    if (!isnan(v) && (*bi < 0 || v > *bv)) {
        *bv = v;
        *bi = i;
    }
}

// The work-group's best of its work-items' (v, i), in sv[0] / si[0].
inline void pick_reduce(float v, int i, __local float* sv, __local int* si) {
    int lid = get_local_id(0), wg = get_local_size(0);
    sv[lid] = v;
    si[lid] = i;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = wg / 2; s > 0; s >>= 1) {
        if (lid < s && pick_beats(sv[lid + s], si[lid + s], sv[lid], si[lid])) {
            sv[lid] = sv[lid + s];
            si[lid] = si[lid + s];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

// For each row of `n` logits from row `row0` on (one per work-group column: get_group_id(1)), the index of the
// largest, lowest index on ties, as `sampling::argmax` chooses on the host: NaN never wins,
// except that a NaN first logit makes the answer 0 (the host scan compares every value with its
// best so far, and nothing compares greater than NaN), into `ids[row]`; with `advance` (one row:
// a sequence decoding alone), `places[0].y` (its position) += 1 too.
//
// `groups` work-groups (a power-of-two size each) share a row four logits at a time; with more
// than one, each writes its best to `part` (value, index bits; `2 · groups` floats per row), and
// the last to finish (`ticket[row]`, with device-wide fences: only where the host allows row
// epilogues) reduces those. `sv` / `si` hold one value / index per work-item.
__kernel void greedy_pick(__global const float* logits, int row0, int n, __global int* ids,
                          __global int2* places, int advance, int groups, __global float* part,
                          volatile __global int* ticket, __local float* sv, __local int* si) {
    int row = get_group_id(1);
    logits += (size_t)(row0 + row) * n;
    part += (size_t)row * 2 * groups;
    ticket += row;
    int lid = get_local_id(0), wg = get_local_size(0), g = get_group_id(0);
    int gid = g * wg + lid, all = wg * groups, n4 = n / 4;
    float best = 0.0f;
    int at = -1;
#pragma unroll 4
    for (int j = gid; j < n4; j += all) {
        float4 v = vload4(j, logits);
        pick_fold(v.x, 4 * j, &best, &at);
        pick_fold(v.y, 4 * j + 1, &best, &at);
        pick_fold(v.z, 4 * j + 2, &best, &at);
        pick_fold(v.w, 4 * j + 3, &best, &at);
    }
    for (int i = 4 * n4 + gid; i < n; i += all) pick_fold(logits[i], i, &best, &at);
    pick_reduce(best, at, sv, si);
    if (groups > 1) {
        if (lid == 0) {
            part[2 * g] = sv[0];
            part[2 * g + 1] = as_float(si[0]);
        }
        if (!last_group(ticket, groups, sv)) return;
        best = 0.0f;
        at = -1;
        for (int i = lid; i < groups; i += wg) {
            float v = part[2 * i];
            int vi = as_int(part[2 * i + 1]);
            if (pick_beats(v, vi, best, at)) {
                best = v;
                at = vi;
            }
        }
        pick_reduce(best, at, sv, si);
    }
    if (lid == 0) {
        int tok = si[0];
        if (tok < 0 || isnan(logits[0])) tok = 0;
        ids[row] = tok;
        if (advance) places[0].y += 1;
    }
}
