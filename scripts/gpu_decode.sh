#!/usr/bin/env bash
# gpu_decode.sh -- batch-1 decode measurements on the GPU, from the repository root after a build:
#
#   scripts/gpu_decode.sh ARCH [ARCH ...]      ARCH: llama2-7b llama3-8b llama2-13b ...
#
# For each architecture: synth f16 weights into $SYNTH_DIR (default /tmp), then
#   - the per-op GPU time profile of 32 decode steps (COOPT_CUDA_PROFILE=1, op by op),
#   - pp512 / tg128 with f16 KV: default (CUDA graphs + fused ops), --no-graphs, and
#     --no-graphs with COOPT_CUDA_FUSED=0 (the forward pass composes the fused ops), and (mode
#     no-pdl) graphs with COOPT_CUDA_PDL=0,
# writing ${OUT:-out}/decode_<arch>.md and profile_<arch>.txt. REPS (default 2), KV (default f16),
# MODES (default "graphs no-graphs unfused"), PROFILE=0 skips the profile.
set -uo pipefail
OUT=${OUT:-out}
SYNTH_DIR=${SYNTH_DIR:-/tmp}
REPS=${REPS:-2}
KV=${KV:-f16}
MODES=${MODES:-graphs no-graphs unfused}
PROFILE=${PROFILE:-1}
B=./build/coopt
mkdir -p "$OUT"
for arch in "$@"; do
    dir="$SYNTH_DIR/synth-$arch-f16"
    t0=$(date +%s)
    $B synth --arch "$arch" --dtype f16 -q -o "$dir" || { echo "synth $arch failed"; continue; }
    echo "synth $arch: $(($(date +%s) - t0)) s"
    if [ "$PROFILE" = 1 ]; then
        COOPT_CUDA_PROFILE=1 timeout 120 $B bench -m "$dir" --device cuda --kv-type "$KV" -p 0 -n 32 -r 1 \
            >"$OUT/profile_$arch.txt" 2>&1
        grep -E "cuda profile" "$OUT/profile_$arch.txt" | head -24
    fi
    f="$OUT/decode_$arch.md"
    : >"$f"
    for mode in $MODES; do
        args=""
        envs=""
        [ "$mode" = no-graphs ] || [ "$mode" = unfused ] && args="--no-graphs"
        [ "$mode" = unfused ] && envs="COOPT_CUDA_FUSED=0"
        [ "$mode" = no-pdl ] && envs="COOPT_CUDA_PDL=0"
        env $envs COOPT_CUDA_STEP_STATS=1 timeout 150 $B bench -m "$dir" --device cuda --kv-type "$KV" -p 512 -n 128 \
            -r "$REPS" $args 2>>"$OUT/bench.err" | grep -E '^\| llama' | sed "s/^/$mode /" >>"$f"
    done
    cat "$f"
    rm -rf "$dir"
done
