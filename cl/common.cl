// Shared helpers: byte-level reads of GGUF blocks and element dequantization.
// Built first: the host concatenates common.cl before every other file.
//
// Weight tensors live in one device buffer each (GGUF aligns tensors to 32 bytes, PoCL and NVIDIA
// reject sub-buffers at offsets not aligned to 128), read as bytes. Every f16 in a block sits at an
// even offset, so `vload_half` on the byte address is aligned.

// Float formats (must match FloatFmt in src/backend/opencl/exec.rs).
#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q8_0 3
#define FMT_Q4_0 4
#define FMT_Q4_1 5
#define FMT_Q4_K 6
#define FMT_Q5_K 7
#define FMT_Q6_K 8

#define QK_K 256

// Values of a row each work-item keeps in registers in the row-wise kernels (rows up to
// RQ · work-group size; longer rows take a looping path).
#define RQ 32

inline float ld_f16(const __global uchar* p) { return vload_half(0, (const __global half*)p); }

inline float ld_bf16(const __global uchar* p) {
    return as_float(((uint)p[0] | ((uint)p[1] << 8)) << 16);
}

// ggml get_scale_min_k4: 6-bit scale (sc) and minimum (m) of sub-block j (0..8).
inline void scale_min_k4(int j, const __global uchar* s, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Element j of a row of `fmt` starting at `row` (the same arithmetic as kernels/src/dequant.rs).
inline float deq(int fmt, const __global uchar* row, int j) {
    switch (fmt) {
    case FMT_F32:
        return ((const __global float*)row)[j];
    case FMT_F16:
        return vload_half(j, (const __global half*)row);
    case FMT_BF16:
        return ld_bf16(row + 2 * j);
    case FMT_Q8_0: {
        const __global uchar* b = row + (j / 32) * 34;
        return ld_f16(b) * (float)((const __global char*)b)[2 + j % 32];
    }
    case FMT_Q4_0: {
        const __global uchar* b = row + (j / 32) * 18;
        int e = j % 32;
        int nib = e < 16 ? (b[2 + e] & 15) : (b[2 + e - 16] >> 4);
        return ld_f16(b) * (float)(nib - 8);
    }
    case FMT_Q4_1: {
        const __global uchar* b = row + (j / 32) * 20;
        int e = j % 32;
        int nib = e < 16 ? (b[4 + e] & 15) : (b[4 + e - 16] >> 4);
        return (float)nib * ld_f16(b) + ld_f16(b + 2);
    }
    case FMT_Q4_K:
    case FMT_Q5_K: {
        int bb = fmt == FMT_Q4_K ? 144 : 176;
        const __global uchar* b = row + (j / QK_K) * bb;
        int e = j % QK_K, c = e / 64, hi = (e % 64) / 32, l = e % 32;
        float sc, m;
        scale_min_k4(2 * c + hi, b + 4, &sc, &m);
        const __global uchar* qs = b + (fmt == FMT_Q4_K ? 16 : 48);
        int q = hi ? (qs[32 * c + l] >> 4) : (qs[32 * c + l] & 15);
        if (fmt == FMT_Q5_K && (b[16 + l] & (1 << (2 * c + hi)))) q += 16;
        return ld_f16(b) * sc * (float)q - ld_f16(b + 2) * m;
    }
    case FMT_Q6_K: {
        const __global uchar* b = row + (j / QK_K) * 210;
        int e = j % QK_K, h = e / 128, r = e % 128, part = r / 32, l = r % 32;
        const __global uchar* ql = b + 64 * h;
        const __global uchar* qh = b + 128 + 32 * h;
        const __global char* sc = (const __global char*)(b + 192 + 8 * h);
        int lo = (part & 1) ? ql[l + 32] : ql[l];
        lo = (part & 2) ? (lo >> 4) : (lo & 15);
        int q = (lo | (((qh[l] >> (2 * part)) & 3) << 4)) - 32;
        return ld_f16(b + 208) * (float)sc[l / 16 + 2 * part] * (float)q;
    }
    }
    return 0.0f;
}

#ifdef TERNMUX_DP4A
// NVIDIA (inline PTX accepted): sums and maxima across the 32 work-items of a warp by register
// shuffles, with no local memory and no barrier. Every work-item of the warp gets the result;
// all 32 must call it.
inline float shfl_xor(float v, int lane_mask) {
    uint t;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;"
                 : "=r"(t)
                 : "r"(as_uint(v)), "r"(lane_mask));
    return as_float(t);
}
inline float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
    return v;
}
inline float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, shfl_xor(v, o));
    return v;
}
#endif

// Work-group sum / max of one float per work-item (`scratch` holds get_local_size(0) floats).
// Every work-item gets the result. On NVIDIA with work-groups of whole warps: warp shuffles,
// then one barrier over the warps' partial results (two barriers instead of log2(size) + 2).
inline float wg_sum(float v, __local float* scratch) {
    int lid = get_local_id(0), n = get_local_size(0);
#ifdef TERNMUX_DP4A
    if (n % 32 == 0) {
        v = warp_sum(v);
        if (lid % 32 == 0) scratch[lid / 32] = v;
        barrier(CLK_LOCAL_MEM_FENCE);
        float r = 0.0f;
        for (int i = 0; i < n / 32; i++) r += scratch[i];
        barrier(CLK_LOCAL_MEM_FENCE);
        return r;
    }
#endif
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] += scratch[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

inline float wg_max(float v, __local float* scratch) {
    int lid = get_local_id(0), n = get_local_size(0);
#ifdef TERNMUX_DP4A
    if (n % 32 == 0) {
        v = warp_max(v);
        if (lid % 32 == 0) scratch[lid / 32] = v;
        barrier(CLK_LOCAL_MEM_FENCE);
        float r = scratch[0];
        for (int i = 1; i < n / 32; i++) r = fmax(r, scratch[i]);
        barrier(CLK_LOCAL_MEM_FENCE);
        return r;
    }
#endif
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = fmax(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

// ---- RMSNorm + quantization of one row by one work-group, shared by `norm_quant` (norm.cl) and
// the launches that end with it (a GEMV or attention whose last work-group then norms the row it
// finished: `last_group`, whose acquire fence makes the other work-groups' writes visible).
// `*_regs`: the row in registers (n ≤ RQ · work-group size; one batch of loads; GPUs' own row
// kernels). `*_row`: loops over the row, reading it again (few registers — an epilogue must not
// lower the occupancy of the kernel it ends; CPU devices). Both give the same bits: the same
// per-work-item order of every sum. No early return inside (PoCL's barrier handling wants every
// work-item through each barrier of an inlined function).

// Every row function takes a row four values at a time: work-item lid owns the chunks
// c = lid + i · wg (values 4c .. 4c + 3, zero past n), so each keeps several 16-byte loads in
// flight (one work-group walking a row a value at a time kept too few bytes in flight to be
// anything but slow), and all of them add in the same order: chunk by chunk, x y z w within one.
#define RQ4 (RQ / 4)

// Chunk c of a row of n floats (zero past n). Rows of n % 4 == 0 start 16-byte aligned (their
// buffers are): one vector load; others go value by value.
inline float4 row_ld4(const __global float* r, int c, int n) {
    int j = 4 * c;
    if (j + 4 <= n && (n & 3) == 0) return ((const __global float4*)r)[c];
    float4 v = (float4)(0.0f);
    if (j < n) v.x = r[j];
    if (j + 1 < n) v.y = r[j + 1];
    if (j + 2 < n) v.z = r[j + 2];
    if (j + 3 < n) v.w = r[j + 3];
    return v;
}
inline void row_st4(__global float* r, int c, int n, float4 v) {
    int j = 4 * c;
    if (j + 4 <= n && (n & 3) == 0) {
        ((__global float4*)r)[c] = v;
        return;
    }
    if (j < n) r[j] = v.x;
    if (j + 1 < n) r[j + 1] = v.y;
    if (j + 2 < n) r[j + 2] = v.z;
    if (j + 3 < n) r[j + 3] = v.w;
}
inline float sumsq4(float ss, float4 v) {
    ss += v.x * v.x;
    ss += v.y * v.y;
    ss += v.z * v.z;
    ss += v.w * v.w;
    return ss;
}
inline float amax4(float m, float4 v) {
    return fmax(fmax(fmax(fmax(m, fabs(v.x)), fabs(v.y)), fabs(v.z)), fabs(v.w));
}

// bitnet.cpp's per-token int8 rule, for every row function: the scale of a row whose
// work-items' largest |value| is `amax` (s = 127 / max(absmax, 1e-5); a work-group reduction, so
// every work-item calls it), one value quantized (q = clamp(rint(v · s))), and one chunk
// quantized into a row of n bytes.
inline float quant_scale(float amax, __local float* scratch) {
    return 127.0f / fmax(wg_max(amax, scratch), 0.00001f);
}
inline char quant_one(float v, float s) { return (char)clamp(rint(v * s), -127.0f, 127.0f); }
inline void quant_st4(__global char* qr, int c, int n, float4 v, float s) {
    char4 q = (char4)(quant_one(v.x, s), quant_one(v.y, s), quant_one(v.z, s), quant_one(v.w, s));
    int j = 4 * c;
    if (j + 4 <= n && (n & 3) == 0) {
        ((__global char4*)qr)[c] = q;
        return;
    }
    if (j < n) qr[j] = q.x;
    if (j + 1 < n) qr[j + 1] = q.y;
    if (j + 2 < n) qr[j + 2] = q.z;
    if (j + 3 < n) qr[j + 3] = q.w;
}

// y = RMSNorm(row) · w (when has_norm; else y = row), written to yr when write_y; its int8
// quantization (s = 127 / max(absmax, 1e-5), q = clamp(rint(y · s))) to qr / *qs when write_q.
// xr and yr may alias (each work-item reads its values before writing them).
inline void norm_quant_row(const __global float* xr, int n, const __global float* w,
                           int has_norm, float eps, __global float* yr, int write_y,
                           __global char* qr, __global float* qs, int write_q,
                           __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    float ss = 0.0f;
#pragma unroll 4
    for (int c = lid; c < nc; c += wg) ss = sumsq4(ss, row_ld4(xr, c, n));
    ss = wg_sum(ss, scratch);
    float scale = 1.0f / sqrt(ss / (float)n + eps);
    float amax = 0.0f;
#pragma unroll 4
    for (int c = lid; c < nc; c += wg) {
        float4 v = row_ld4(xr, c, n);
        if (has_norm) v = (v * scale) * row_ld4(w, c, n);
        if (write_y) row_st4(yr, c, n, v);
        amax = amax4(amax, v);
    }
    float s = quant_scale(amax, scratch);
    if (write_q) {
#pragma unroll 4
        for (int c = lid; c < nc; c += wg) {
            float4 v;
            if (write_y) {
                v = row_ld4(yr, c, n);
            } else {
                v = row_ld4(xr, c, n);
                if (has_norm) v = (v * scale) * row_ld4(w, c, n);
            }
            quant_st4(qr, c, n, v, s);
        }
        if (lid == 0) *qs = s;
    }
}

// The norm and quantization of a row already in registers (v[i] is chunk lid + i · wg, zero
// past n), as `norm_quant_row` does them: shared by `norm_quant_regs` and the FFN activation's
// register path (norm.cl), which differ only in how the row got there.
inline void norm_quant_held(float4* v, int n, const __global float* w, int has_norm, float eps,
                            __global float* yr, int write_y, __global char* qr,
                            __global float* qs, int write_q, __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < RQ4; i++) ss = sumsq4(ss, v[i]);
    ss = wg_sum(ss, scratch);
    float scale = 1.0f / sqrt(ss / (float)n + eps);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < RQ4; i++) {
        int c = lid + i * wg;
        if (c < nc) {
            if (has_norm) v[i] = (v[i] * scale) * row_ld4(w, c, n);
            if (write_y) row_st4(yr, c, n, v[i]);
            amax = amax4(amax, v[i]);
        }
    }
    float s = quant_scale(amax, scratch);
    if (write_q) {
#pragma unroll
        for (int i = 0; i < RQ4; i++) {
            int c = lid + i * wg;
            if (c < nc) quant_st4(qr, c, n, v[i], s);
        }
        if (lid == 0) *qs = s;
    }
}

// `norm_quant_row` with the row in registers.
inline void norm_quant_regs(const __global float* xr, int n, const __global float* w,
                            int has_norm, float eps, __global float* yr, int write_y,
                            __global char* qr, __global float* qs, int write_q,
                            __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0), nc = (n + 3) / 4;
    float4 v[RQ4];
#pragma unroll
    for (int i = 0; i < RQ4; i++) {
        int c = lid + i * wg;
        v[i] = c < nc ? row_ld4(xr, c, n) : (float4)(0.0f);
    }
    norm_quant_held(v, n, w, has_norm, eps, yr, write_y, qr, qs, write_q, scratch);
}

// A device-wide memory fence (acquire and release). NVIDIA's OpenCL compiles
// mem_fence(CLK_GLOBAL_MEM_FENCE) to a work-group-scope `membar.cta` (read in the PTX), so where
// inline PTX builds it is `fence.acq_rel.gpu`; on CPU devices (PoCL) mem_fence suffices. The host
// turns the row epilogues off on other GPUs (`ClDevice::tail_fits`).
inline void device_fence(void) {
#ifdef TERNMUX_DP4A
    asm volatile("fence.acq_rel.gpu;");
#else
    mem_fence(CLK_GLOBAL_MEM_FENCE);
#endif
}

// Whether this work-group is the last of `count` to arrive at `ticket` (a counter that starts
// at 0; the last one puts it back to 0 for the next launch on the in-order queue). Every
// work-item calls it after its last global write: the fence orders those writes before the
// ticket (the barrier orders the work-group's writes before work-item 0's release fence), so the
// last work-group sees every other work-group's results. Top level only (it holds barriers).
inline int last_group(volatile __global int* ticket, int count, __local float* scratch) {
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    __local int* flag = (__local int*)scratch;
    if (get_local_id(0) == 0) {
        device_fence();
        int last = atomic_inc(ticket) == count - 1;
        if (last) atomic_xchg(ticket, 0);
        device_fence();
        flag[0] = last;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    int last = flag[0];
    // Global too: no load of the epilogue moves above it.
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    return last;
}
