#!/usr/bin/env bash
# gpu_check.sh -- the whole GPU check in one go, from the repository root on a machine with an
# NVIDIA GPU and nvcc: build, every test (CPU and CUDA), compute-sanitizer on the CUDA tests,
# kernel timings, `coopt bench --device cuda` on the given models, and the GPU's idle time between
# decode steps on the first. Results go to ${OUT:-out}/.
#
#   scripts/gpu_check.sh [MODEL ...]        (default: the test models in $COOPT_MODELS)
#
# Environment: OUT (result folder), COOPT_MODELS (test models, default ../shared/models),
# JOBS (build parallelism), SANITIZE=0 to skip compute-sanitizer, BENCH_ARGS (extra options for
# coopt bench, default "-p 512 -n 128 -r 3"), KV_TYPES (default "f16 fp8_e4m3"), MAKE_ARGS (extra
# make arguments, e.g. OPT="-O3 -march=native -Ideps/include" LDFLAGS=-Ldeps/lib where libcjson
# is not installed), COMMIT (the commit named in summary.txt, for a copied tree whose .git is not
# current), PREBUILT (a folder holding coopt and coopt-test built elsewhere for this GPU with the
# same CUDA major version, used instead of building: e.g. on a machine without the GPU,
# `make BUILD=build-gpu OPT="-O3 -march=x86-64-v4" CUARCH="-gencode arch=compute_90,code=sm_90"
# build-gpu/coopt build-gpu/coopt-test`, where -march names what both hosts' CPUs have).
# Exit status: nonzero if the build or any test failed (benchmarks do not decide it).
set -uo pipefail

OUT=${OUT:-out}
JOBS=${JOBS:-$(nproc)}
SANITIZE=${SANITIZE:-1}
BENCH_ARGS=${BENCH_ARGS:-"-p 512 -n 128 -r 3"}
KV_TYPES=${KV_TYPES:-"f16 fp8_e4m3"}
export COOPT_MODELS=${COOPT_MODELS:-../shared/models}
mkdir -p "$OUT"
status=0

log() { echo "gpu_check: $*" | tee -a "$OUT/summary.txt"; }

: >"$OUT/summary.txt"
log "$(date -u +%Y-%m-%dT%H:%M:%SZ) ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo no-git)}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
else
    log "nvidia-smi not found"
fi

# ---- build ----
t0=$(date +%s)
if [ -n "${PREBUILT:-}" ]; then
    mkdir -p build
    if ! cp "$PREBUILT/coopt" "$PREBUILT/coopt-test" build/ || ! ./build/coopt --help >/dev/null 2>&1; then
        log "PREBUILT=$PREBUILT: coopt and coopt-test missing or not runnable here"
        exit 1
    fi
    log "prebuilt binaries from $PREBUILT"
else
    # shellcheck disable=SC2086
    if ! eval make -j"$JOBS" ${MAKE_ARGS:-} build/coopt-test build/coopt >"$OUT/build.log" 2>&1; then
        tail -30 "$OUT/build.log"
        log "BUILD FAILED (see build.log)"
        exit 1
    fi
    log "build ok in $(($(date +%s) - t0)) s"
fi

# ---- tests ----
t0=$(date +%s)
./build/coopt-test >"$OUT/tests.log" 2>&1 || status=1
grep -E '^(FAIL|skip)' "$OUT/tests.log" | tee -a "$OUT/summary.txt"
log "tests: $(grep -E '^test:' "$OUT/tests.log" || echo 'no summary (crashed?)') in $(($(date +%s) - t0)) s"

if [ "$SANITIZE" = 1 ] && command -v compute-sanitizer >/dev/null; then
    t0=$(date +%s)
    # the op tests (real models and timings are left out: slow under the sanitizer, same kernels);
    # API errors are not reported: the tests provoke failed allocations on purpose
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 \
        ./build/coopt-test cuda_memory cuda_embed cuda_rmsnorm cuda_elementwise cuda_matmul cuda_rope \
        cuda_rope_store cuda_rope_store_attention cuda_kv_offsets cuda_attention cuda_attention_prefill cuda_kv_pool cuda_forward \
        cuda_fused_ops cuda_step_graphs cuda_gptq_matmul cuda_gptq_multi cuda_gptq_fused cuda_gptq_fixtures cuda_gptq_cpu_match \
        cuda_gptq_hgemv_settings cuda_gptq_xstage cuda_head_dim_limit cuda_decode_async cuda_argmax cuda_sample cuda_generate \
        cuda_workspace_oom \
        >"$OUT/memcheck.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    log "compute-sanitizer memcheck: exit $rc, $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) in $(($(date +%s) - t0)) s"
fi

# ---- kernel timings ----
COOPT_CUDA_BENCH=1 ./build/coopt-test cuda_bench cuda_attn_bench cuda_decode_bench cuda_gptq_bench >"$OUT/kernels.txt" 2>&1
grep '^bench:' "$OUT/kernels.txt" | sed 's/^bench: //' | tee -a "$OUT/summary.txt"

# ---- coopt bench on models ----
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    for m in stories260K.gguf story-lmrs tinystories-mha-25m; do
        [ -e "$COOPT_MODELS/$m" ] && models+=("$COOPT_MODELS/$m")
    done
fi
for m in "${models[@]}"; do
    for kv in $KV_TYPES; do
        # shellcheck disable=SC2086
        if ./build/coopt bench -m "$m" --device cuda --kv-type "$kv" $BENCH_ARGS >>"$OUT/bench.md" 2>>"$OUT/bench.err"; then
            log "bench $(basename "$m") kv $kv: ok"
        else
            log "bench $(basename "$m") kv $kv: FAILED (see bench.err)"
        fi
    done
done
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
# the GPU's time per replayed decode step against the time from one step's start to the next's
# (the difference: the GPU waiting for the host; step.cu COOPT_CUDA_STEP_STATS), first model
if [ ${#models[@]} -gt 0 ]; then
    COOPT_CUDA_STEP_STATS=1 ./build/coopt bench -m "${models[0]}" --device cuda -p 0 -n 128 -r 1 2>&1 |
        grep '^cuda steps:' | sed "s|^|$(basename "${models[0]}"): |" | tee -a "$OUT/summary.txt"
fi
log "status $status"
exit $status
