#!/usr/bin/env bash
# Decode and prefill of the synthetic 2B-shape model on a GPU (BENCHMARKS.md, issue 4): end to
# end (best of 3), what each fusion and the argument cache save (turned off one at a time), the
# per-kernel device-time profile (profiling events), and the kernel table of bench-device with
# device times. Run from the repository root with the release binary built; results go to $OUT
# (default ./bench-out). Registers the NVIDIA OpenCL driver when there is one and no ICD entry.
set -euo pipefail
OUT=${OUT:-bench-out}
B=${B:-target/release/ternmux}
M=${MODEL:-/tmp/ternmux-2b-tq2_0.gguf}
mkdir -p "$OUT"
if [ ! -e /etc/OpenCL/vendors/nvidia.icd ] && ldconfig -p | grep -q libnvidia-opencl.so.1; then
  mkdir -p /etc/OpenCL/vendors && echo libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
fi
[ -e "$M" ] || "$B" synth --shape 2b --format tq2_0 "$M" > "$OUT/synth.txt"
run() { "$B" bench -d opencl -m "$M" -p 128 -n 128 -r 3 2>&1 | tail -3; }
{
  echo "== default"; run
  echo "== TERNMUX_CL_FUSE_ROPE=0 (RoPE + KV store and attention as two launches)"; TERNMUX_CL_FUSE_ROPE=0 run
  echo "== TERNMUX_CL_ARG_CACHE=0 (every argument set on every launch)"; TERNMUX_CL_ARG_CACHE=0 run
} | tee "$OUT/decode.txt"
TERNMUX_CL_PROFILE=1 "$B" bench -d opencl -m "$M" -p 128 -n 64 -r 2 > "$OUT/profile.txt" 2>&1
tail -22 "$OUT/profile.txt"
[ -n "${SKIP_KERNELS:-}" ] || TERNMUX_CL_PROFILE=1 "$B" bench-device -d opencl > "$OUT/bench_device.txt" 2>&1
