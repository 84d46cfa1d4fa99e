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

// bitnet.cpp's per-token int8 rule, for every row function: the scale of a row whose
// work-items' largest |value| is `amax` (s = 127 / max(absmax, 1e-5); a work-group reduction, so
// every work-item calls it), one value quantized (q = clamp(rint(v · s))), and a row held in
// registers (v[i] is value lid + i · wg) quantized into qr, its scale into *qs.
inline float quant_scale(float amax, __local float* scratch) {
    return 127.0f / fmax(wg_max(amax, scratch), 0.00001f);
}
inline char quant_one(float v, float s) { return (char)clamp(rint(v * s), -127.0f, 127.0f); }
inline void quant_regs(const float* v, int n, float s, __global char* qr, __global float* qs) {
    int lid = get_local_id(0), wg = get_local_size(0);
#pragma unroll
    for (int i = 0; i < RQ; i++) {
        int j = lid + i * wg;
        if (j < n) qr[j] = quant_one(v[i], s);
    }
    if (lid == 0) *qs = s;
}

// y = RMSNorm(row) · w (when has_norm; else y = row), written to yr when write_y; its int8
// quantization (s = 127 / max(absmax, 1e-5), q = clamp(rint(y · s))) to qr / *qs when write_q.
// xr and yr may alias (each work-item reads its values before writing them).
inline void norm_quant_row(const __global float* xr, int n, const __global float* w,
                           int has_norm, float eps, __global float* yr, int write_y,
                           __global char* qr, __global float* qs, int write_q,
                           __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0);
    float ss = 0.0f;
#pragma unroll 4
    for (int j = lid; j < n; j += wg) ss += xr[j] * xr[j];
    ss = wg_sum(ss, scratch);
    float scale = 1.0f / sqrt(ss / (float)n + eps);
    float amax = 0.0f;
#pragma unroll 4
    for (int j = lid; j < n; j += wg) {
        float v = has_norm ? (xr[j] * scale) * w[j] : xr[j];
        if (write_y) yr[j] = v;
        amax = fmax(amax, fabs(v));
    }
    float s = quant_scale(amax, scratch);
    if (write_q) {
#pragma unroll 4
        for (int j = lid; j < n; j += wg) {
            qr[j] = quant_one(write_y ? yr[j] : (has_norm ? (xr[j] * scale) * w[j] : xr[j]), s);
        }
        if (lid == 0) *qs = s;
    }
}

// The norm and quantization of a row already in registers (v[i] is value lid + i · wg, zero
// past n), as `norm_quant_row` does them: shared by `norm_quant_regs` and the FFN activation's
// register path (norm.cl), which differ only in how the row got there.
inline void norm_quant_held(float* v, int n, const __global float* w, int has_norm, float eps,
                            __global float* yr, int write_y, __global char* qr,
                            __global float* qs, int write_q, __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0);
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < RQ; i++) ss += v[i] * v[i];
    ss = wg_sum(ss, scratch);
    float scale = 1.0f / sqrt(ss / (float)n + eps);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < RQ; i++) {
        int j = lid + i * wg;
        if (j < n) {
            if (has_norm) v[i] = (v[i] * scale) * w[j];
            if (write_y) yr[j] = v[i];
            amax = fmax(amax, fabs(v[i]));
        }
    }
    float s = quant_scale(amax, scratch);
    if (write_q) quant_regs(v, n, s, qr, qs);
}

// `norm_quant_row` with the row in registers.
inline void norm_quant_regs(const __global float* xr, int n, const __global float* w,
                            int has_norm, float eps, __global float* yr, int write_y,
                            __global char* qr, __global float* qs, int write_q,
                            __local float* scratch) {
    int lid = get_local_id(0), wg = get_local_size(0);
    float v[RQ];
#pragma unroll
    for (int i = 0; i < RQ; i++) {
        int j = lid + i * wg;
        v[i] = j < n ? xr[j] : 0.0f;
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
