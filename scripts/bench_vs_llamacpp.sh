#!/usr/bin/env bash
# ternmux vs llama.cpp on the same GGUF files: installs the pinned peer (PyPI llama-cpp-python,
# which builds llama.cpp from source — ~15 min on 2 cores, once), writes the synthetic 2B-shape
# models, builds ternmux, and runs scripts/bench_vs_llamacpp.py. Results go to stdout (Markdown).
#
# llama.cpp is built without -march=native: on these VMs CPUID reports AMX, which traps when
# executed (CRATES.md); AVX2/AVX-512/VNNI are enabled explicitly so the peer gets its best paths.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_VERSION=0.3.36
VENV=.dev/venv
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$PEER_VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==$PEER_VERSION" numpy
fi
cargo build --release --locked
mkdir -p .dev/models
for f in tq2_0 tq1_0; do
  m=.dev/models/synth-2b-bitnet-${f^^}.gguf
  [ -f "$m" ] || target/release/ternmux synth "$m" --arch bitnet --shape 2b --format "$f"
done
"$VENV/bin/python" scripts/bench_vs_llamacpp.py \
  --models models/bitllama2c-stories3M-TQ2_0.gguf .dev/models/synth-2b-bitnet-TQ2_0.gguf .dev/models/synth-2b-bitnet-TQ1_0.gguf \
  --threads 1 2 "$@"
