#!/usr/bin/env bash
# gpu_bench.sh -- model-level GPU benchmarks on `coopt synth` models (random weights in the exact
# shapes of real checkpoints), from the repository root on a GPU machine, after a build:
#
#   scripts/gpu_bench.sh [ARCH ...]      (default: llama2-7b)  ARCH: llama2-7b llama2-13b llama3-8b ...
#
# For each architecture: synth an f16 checkpoint into $SYNTH_DIR (default /tmp), then
#   pp512 / tg128 with f16 and fp8_e4m3 KV (batch 1),
#   batched generation B = 1, 8, 32, 64, 128 at 512-token prompts,
# writing Markdown tables to ${OUT:-out}/bench_<arch>.md. DTYPE=gptq4 synthesizes GPTQ instead.
set -uo pipefail
OUT=${OUT:-out}
SYNTH_DIR=${SYNTH_DIR:-/tmp}
DTYPE=${DTYPE:-f16}
B=./build/coopt
mkdir -p "$OUT"
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(llama2-7b)
for arch in "${archs[@]}"; do
    dir="$SYNTH_DIR/synth-$arch-$DTYPE"
    t0=$(date +%s)
    $B synth --arch "$arch" --dtype "$DTYPE" -q -o "$dir" || { echo "synth $arch failed"; continue; }
    echo "synth $arch $DTYPE: $(($(date +%s) - t0)) s"
    f="$OUT/bench_$arch.md"
    : >"$f"
    for kv in f16 fp8_e4m3; do
        timeout 150 $B bench -m "$dir" --device cuda --kv-type "$kv" -p 512 -n 128 -r 3 2>>"$OUT/bench.err" | grep -E '^\|' >>"$f"
    done
    for kv in f16 fp8_e4m3; do
        timeout 200 $B bench -m "$dir" --device cuda --kv-type "$kv" -p 512 -n 128 -B 1,8,32,64,128 -r 1 \
            2>>"$OUT/bench.err" | grep -E ' x B' >>"$f"
    done
    cat "$f"
    rm -rf "$dir"
done
