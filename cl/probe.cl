// Launch-cost probes for `ternmux bench-device` (`bench::launch_arg_costs`): kernels that do
// next to nothing, with one buffer parameter, twelve, or one and twelve ints, to price what a
// buffer argument adds to the driver's queueing of a launch. `k` is never negative in the
// probes; the stores keep every parameter live.
__kernel void probe_buffers1(__global int* a0, int k) {
    if (get_global_id(0) == 0 && k < 0) a0[0] = k;
}

__kernel void probe_buffers12(__global int* a0, __global int* a1, __global int* a2,
                              __global int* a3, __global int* a4, __global int* a5,
                              __global int* a6, __global int* a7, __global int* a8,
                              __global int* a9, __global int* a10, __global int* a11, int k) {
    if (get_global_id(0) == 0 && k < 0) {
        a0[0] = k; a1[0] = k; a2[0] = k; a3[0] = k; a4[0] = k; a5[0] = k;
        a6[0] = k; a7[0] = k; a8[0] = k; a9[0] = k; a10[0] = k; a11[0] = k;
    }
}

__kernel void probe_scalars12(__global int* a0, int k, int k1, int k2, int k3, int k4, int k5,
                              int k6, int k7, int k8, int k9, int k10, int k11) {
    if (get_global_id(0) == 0 && k < 0) a0[0] = k + k1 + k2 + k3 + k4 + k5 + k6 + k7 + k8 + k9 + k10 + k11;
}

// Copies `n` ints (`bench::svm_arg_costs` reads an SVM launch's outputs through it).
__kernel void probe_copy_svm(__global const int* src, __global int* dst, int n) {
    int i = get_global_id(0);
    if (i < n) dst[i] = src[i];
}
