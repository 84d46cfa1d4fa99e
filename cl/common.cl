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

// Work-group sum / max of one float per work-item (`scratch` holds get_local_size(0) floats).
// Every work-item gets the result.
inline float wg_sum(float v, __local float* scratch) {
    int lid = get_local_id(0), n = get_local_size(0);
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
