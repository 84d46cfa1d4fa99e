#!/usr/bin/env bash
# The concurrency benchmark on a GPU machine (BENCHMARKS.md, issue 6): a synthetic 2B-shape
# model served by the in-process engine at concurrency 1…128, then 4 copies under a budget that
# holds two. Run from the repository root with the release binary built; results go to $OUT
# (default ./bench-out). Registers the NVIDIA OpenCL driver when there is one and no ICD entry.
set -euo pipefail
OUT=${OUT:-bench-out}
B=${B:-target/release/ternmux}
mkdir -p "$OUT"
if [ ! -e /etc/OpenCL/vendors/nvidia.icd ] && ldconfig -p | grep -q libnvidia-opencl.so.1; then
  mkdir -p /etc/OpenCL/vendors && echo libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
fi
M=${MODEL:-/tmp/ternmux-2b-tq2_0.gguf}
[ -e "$M" ] || "$B" synth --shape 2b --format tq2_0 "$M" > "$OUT/synth.txt"
"$B" devices
[ -n "${SKIP_SINGLE:-}" ] || "$B" bench -d opencl -m "$M" -p 128 -n 32 | tee "$OUT/bench_single.txt" | tail -4
"$B" bench concurrency -d opencl -m 2b="$M" --budget 8GiB --ctx-size 512 --max-output-tokens 64 \
  --concurrency-levels ${LEVELS:-1 2 4 8 16 32 64 128} --out-dir "$OUT/conc_2b" | tee "$OUT/conc_2b.txt" | tail -14
"$B" bench concurrency -d opencl -m 2b="$M" --models 4 --budget 2x --ctx-size 512 --max-output-tokens 64 \
  --concurrency-levels ${MULTI_LEVELS:-1 4 16 64} --out-dir "$OUT/conc_2b_x4" | tee "$OUT/conc_2b_x4.txt" | tail -10
