#!/usr/bin/env bash
# gpu_bench.sh -- model-level GPU benchmarks on `coopt synth` models (random weights in the exact
# shapes of real checkpoints), from the repository root on a GPU machine, after a build:
#
#   scripts/gpu_bench.sh [ARCH:DTYPE ...]     (default: llama2-7b:f16)
#       ARCH: llama2-7b llama2-13b llama3-8b tinyllama-1.1b   DTYPE: f16 bf16 gptq4
#
# Sections (SECTIONS, default "speed depth batched"), each writing Markdown rows to
# ${OUT:-out}/bench_<arch>_<dtype>.md:
#   speed     pp512 / tg128 at batch 1, f16 and fp8_e4m3 KV
#   depth     tg128 at context depth 4096 and 16384, f16 and fp8_e4m3 KV
#   batched   B = 1, 8, 32, 64, 128 sequences with 512-token prompts, tg128, total t/s
#   ablation  the paper's ablation at depth 4096 (baseline, +Opt-KV, +Opt-GQA, +Opt-Pa, all)
#   capacity  how many 4096-token sequences the card holds, FP8 vs F16 KV (coopt bench
#             --capacity: prefills sequences one after another until a KV page cannot be mapped)
#   llamacpp  the same shape converted to GGUF Q4_0, run by llama.cpp's llama-bench (LLAMA_BENCH,
#             a CUDA build) with flash attention and f16 / q8_0 KV: pp512, tg128, depth 4096/16384;
#             with LLAMA_BATCHED_BENCH (llama-batched-bench, a CUDA build) also the batched rows
#             (B = 1, 8, 32, 64, 128 sequences, 512-token prompts, 128 generated tokens each)
# Environment: SYNTH_DIR (default /tmp), KEEP=1 keeps the synthesized models, LLAMA_BENCH,
# LLAMA_BATCHED_BENCH, COMMIT (the commit named in the headers, for a copied tree whose .git is not
# current).
set -uo pipefail
OUT=${OUT:-out}
SYNTH_DIR=${SYNTH_DIR:-/tmp}
SECTIONS=${SECTIONS:-"speed depth batched"}
B=./build/coopt
mkdir -p "$OUT"
specs=("$@")
[ ${#specs[@]} -eq 0 ] && specs=(llama2-7b:f16)
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
bench() { # bench LIMIT_S ARGS... -> llama-bench style rows
    local lim=$1
    shift
    timeout "$lim" $B bench --device cuda "$@" 2>>"$OUT/bench.err" | grep -E '^\| [^-m]' || echo "| (failed or timed out: bench $*) |"
}

for spec in "${specs[@]}"; do
    arch=${spec%%:*} dtype=${spec#*:}
    [ "$dtype" = "$spec" ] && dtype=f16
    dir="$SYNTH_DIR/synth-$arch-$dtype"
    t0=$(date +%s)
    if [ ! -e "$dir/config.json" ]; then
        $B synth --arch "$arch" --dtype "$dtype" -q -o "$dir" || { echo "synth $arch $dtype failed"; continue; }
    fi
    echo "synth $arch $dtype: $(($(date +%s) - t0)) s"
    f="$OUT/bench_${arch}_${dtype}.md"
    echo "## $arch $dtype ($(date -u +%H:%M) UTC, ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo no-git)})" >>"$f"
    if has speed; then
        for kv in f16 fp8_e4m3; do
            echo "# speed kv $kv" >>"$f"
            bench 150 -m "$dir" --kv-type "$kv" -p 512 -n 128 -r 3 >>"$f"
        done
    fi
    if has depth; then
        for kv in f16 fp8_e4m3; do
            echo "# depth kv $kv" >>"$f"
            bench 200 -m "$dir" --kv-type "$kv" -c 16640 -p 0 -n 128 -d 4096,16384 -r 2 >>"$f"
        done
    fi
    if has batched; then
        for kv in f16 fp8_e4m3; do
            echo "# batched kv $kv" >>"$f"
            bench 240 -m "$dir" --kv-type "$kv" -c 1024 -p 512 -n 128 -B 1,8,32,64,128 -r 1 >>"$f"
        done
    fi
    if has ablation; then
        abl=("f16 --attn-per-head --attn-partition -1" "fp8_e4m3 --attn-per-head --attn-partition -1"
             "f16 --attn-partition -1" "f16 --attn-per-head" "f16" "fp8_e4m3")
        names=(baseline "+Opt-KV" "+Opt-GQA" "+Opt-Pa" "GQA+Pa" all)
        for i in "${!abl[@]}"; do
            set -- ${abl[$i]}
            kv=$1
            shift
            echo "# ablation ${names[$i]}: --kv-type ${abl[$i]}" >>"$f"
            bench 150 -m "$dir" --kv-type "$kv" "$@" -c 4608 -p 0 -n 64 -d 4096 -r 2 >>"$f"
        done
    fi
    if has capacity; then
        for kv in f16 fp8_e4m3; do
            echo "# capacity kv $kv" >>"$f"
            timeout 400 $B bench --device cuda -m "$dir" --kv-type "$kv" --capacity 4096 2>>"$OUT/bench.err" |
                tee -a "$f"
        done
    fi
    if has llamacpp && [ -n "${LLAMA_BENCH:-}${LLAMA_BATCHED_BENCH:-}" ]; then
        g="$SYNTH_DIR/synth-$arch-q4_0.gguf"
        [ -e "$g" ] || $B convert "$dir" "$g" --dtype q4_0 >/dev/null 2>>"$OUT/bench.err"
        if [ -n "${LLAMA_BENCH:-}" ]; then
            for ctk in f16 q8_0; do
                echo "# llama.cpp Q4_0 -fa on -ctk/-ctv $ctk" >>"$f"
                timeout 300 "$LLAMA_BENCH" -m "$g" -ngl 99 -fa on -ctk $ctk -ctv $ctk -p 512 -n 128 -r 3 \
                    2>>"$OUT/bench.err" | grep -E '^\| [^-m]' >>"$f"
                timeout 300 "$LLAMA_BENCH" -m "$g" -ngl 99 -fa on -ctk $ctk -ctv $ctk -p 0 -n 128 -d 4096,16384 -r 2 \
                    2>>"$OUT/bench.err" | grep -E '^\| [^-m]' >>"$f"
            done
        fi
        if [ -n "${LLAMA_BATCHED_BENCH:-}" ]; then # the batched rows: B sequences of 512-token prompts, tg128
            for ctk in f16 q8_0; do
                echo "# llama.cpp batched Q4_0 -fa on -ctk/-ctv $ctk (S_TG = the tg128 x B rows' total t/s)" >>"$f"
                timeout 400 "$LLAMA_BATCHED_BENCH" -m "$g" -ngl 99 -fa on -ctk $ctk -ctv $ctk -c 81920 -b 2048 -ub 512 \
                    -npp 512 -ntg 128 -npl 1,8,32,64,128 2>>"$OUT/bench.err" | grep -E '^\|' >>"$f"
            done
        fi
        [ "${KEEP:-0}" = 1 ] || rm -f "$g"
    fi
    cat "$f"
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
done
