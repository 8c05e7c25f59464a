/*
 * bench_gptq.c -- GPTQ int4 matmul throughput on tinyllama-1.1b shapes (group 128).
 *
 *   make build/libcoopt.a && gcc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/bench_gptq.c build/libcoopt.a -lcjson -lm -lpthread -o build/bench_gptq
 *   ./build/bench_gptq [threads=2] [prefill_rows=64]
 *   HOT=1 ./build/bench_gptq ...   one copy per shape: the kernel's in-cache (L2/L3) speed
 *
 * Decode: each shape is replicated until the copies exceed 384 MiB (12x the L3; at 96 MiB part of the set
 * stayed cached on the dev VM and the figures were inflated), and the GEMVs
 * cycle over the copies, so every call streams its weights from DRAM. GB/s counts the bytes the
 * kernel reads (4-bit weights + f16 scales + u8 zeros); "of bw" is its fraction of the machine's read
 * bandwidth as dev/membw.c measures it (BW_GBS, default 90: Zen 5 dev box, 2 threads; give ~47 for
 * 1 thread), "of read" of the plain sum below, run right before (the machine is shared, it varies).
 * Prefill: GFLOP/s = 2*rows*in*out / t.
 * Also reports the repack (load) time per matrix, with and without act-order.
 */
#include "cpu/threads.h"
#include "dtype.h"
#include "gptq.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)rng;
}

static struct coopt_gptq_weight *make(int64_t in, int64_t out, int gs, int act, double *repack_s) {
    int64_t   G = in / gs;
    int32_t  *qw = malloc((size_t)(in / 8 * out) * 4), *qz = malloc((size_t)(G * out / 8) * 4), *gi = NULL;
    uint16_t *sc = malloc((size_t)(G * out) * 2);
    for (int64_t i = 0; i < in / 8 * out; i++) qw[i] = (int32_t)rnd();
    for (int64_t i = 0; i < G * out / 8; i++) qz[i] = (int32_t)rnd();
    for (int64_t i = 0; i < G * out; i++) sc[i] = coopt_f32_to_f16(0.001f + (rnd() % 1000) * 1e-5f);
    if (act) {
        gi = malloc((size_t)in * 4);
        int32_t *p = malloc((size_t)in * 4);
        for (int64_t i = 0; i < in; i++) p[i] = (int32_t)i;
        for (int64_t i = in - 1; i > 0; i--) {
            int64_t j = rnd() % (i + 1);
            int32_t t = p[i];
            p[i] = p[j], p[j] = t;
        }
        for (int64_t j = 0; j < in; j++) gi[p[j]] = (int32_t)(j / gs);
        free(p);
    }
    struct coopt_gptq_src s = {.name = "bench", .n_in = in, .n_out = out, .bits = 4, .group_size = gs, .zeros_v1 = true,
                               .qweight = qw, .qweight_shape = {in / 8, out}, .qweight_dtype = COOPT_DTYPE_I32,
                               .qzeros = qz, .qzeros_shape = {G, out / 8}, .qzeros_dtype = COOPT_DTYPE_I32,
                               .scales = sc, .scales_shape = {G, out}, .scales_dtype = COOPT_DTYPE_F16,
                               .g_idx = gi, .g_idx_len = act ? in : 0, .g_idx_dtype = COOPT_DTYPE_I32};
    struct coopt_gptq_weight *w = NULL;
    double                    t0 = now_s();
    if (coopt_gptq_repack(&s, 1, &w) != COOPT_OK) abort();
    if (repack_s) *repack_s = now_s() - t0;
    free(qw), free(qz), free(sc), free(gi);
    return w;
}

// Plain read bandwidth with the same threads: sum a 256 MiB buffer (the reference for "of peak").
struct rd { const float *p; int64_t n; float sum[64]; };
static void read_fn(void *ctx, int32_t ith, int32_t nth) {
    struct rd *r = ctx;
    int64_t    lo, hi;
    coopt_split_range(r->n / 64, ith, nth, &lo, &hi);
    float acc[16] = {0};
    for (int64_t i = lo * 64; i < hi * 64; i += 64)
        for (int k = 0; k < 16; k++) acc[k] += r->p[i + k] + r->p[i + 16 + k] + r->p[i + 32 + k] + r->p[i + 48 + k];
    float s = 0;
    for (int k = 0; k < 16; k++) s += acc[k];
    r->sum[ith] = s;
}

static double read_bw(struct coopt_threadpool *tp) {
    int64_t n = (256ll << 20) / 4;
    float  *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = 1.0f;
    struct rd r = {p, n, {0}};
    double    best = 1e9;
    for (int pass = 0; pass < 4; pass++) {
        double t0 = now_s();
        coopt_threadpool_run(tp, read_fn, &r);
        double t = now_s() - t0;
        if (t < best) best = t;
    }
    free(p);
    return n * 4.0 / best / 1e9;
}

int main(int argc, char **argv) {
    int nth = argc > 1 ? atoi(argv[1]) : 2, prows = argc > 2 ? atoi(argv[2]) : 64;
    struct coopt_threadpool *tp = NULL;
    coopt_threadpool_init(nth, &tp);
    static const struct { int64_t in, out; const char *name; } shapes[] = {
        {2048, 2048, "q/o 2048x2048"}, {2048, 256, "k/v 2048->256"}, {2048, 5632, "gate/up 2048->5632"},
        {5632, 2048, "down 5632->2048"}};
    double peak = read_bw(tp), bw = getenv("BW_GBS") ? atof(getenv("BW_GBS")) : 90.0;
    printf("threads %d, group 128; decode GEMV from DRAM; prefill %d rows; plain read bandwidth %.1f GB/s\n", nth,
           prows, peak);
    printf("%-20s %9s %9s %8s %8s %10s %12s %12s\n", "shape", "us/call", "GB/s", "of bw", "of read", "prefill", "repack ms", "act-order ms");
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        int64_t in = shapes[si].in, out = shapes[si].out;
        double  rp, rpa;
        struct coopt_gptq_weight *w0 = make(in, out, 128, 0, &rp);
        coopt_gptq_weight_free(make(in, out, 128, 1, &rpa));
        int64_t bytes = coopt_gptq_weight_bytes(w0);
        int     nc = getenv("HOT") ? 1 : (int)((384ll << 20) / bytes) + 1; // HOT=1: cache-resident speed
        struct coopt_gptq_weight **ws = malloc(sizeof(*ws) * nc);
        ws[0] = w0;
        for (int c = 1; c < nc; c++) ws[c] = make(in, out, 128, 0, NULL);
        float *x = malloc((size_t)(in * prows) * 4), *y = malloc((size_t)(out * prows) * 4);
        for (int64_t i = 0; i < in * prows; i++) x[i] = (float)(rnd() % 2001) / 1000.0f - 1.0f;
        for (int c = 0; c < nc; c++) coopt_gptq_matmul_cpu(tp, y, x, ws[c], 1); // warm up, fault in
        double best = 1e9;
        for (int pass = 0; pass < 5; pass++) {
            double t0 = now_s();
            for (int c = 0; c < nc; c++) coopt_gptq_matmul_cpu(tp, y, x, ws[c], 1);
            double t = (now_s() - t0) / nc;
            if (t < best) best = t;
        }
        double pbest = 1e9;
        for (int pass = 0; pass < 3; pass++) {
            double t0 = now_s();
            coopt_gptq_matmul_cpu(tp, y, x, ws[pass % nc], prows);
            double t = now_s() - t0;
            if (t < pbest) pbest = t;
        }
        double gbs = bytes / best / 1e9;
        printf("%-20s %9.1f %9.2f %7.0f%% %7.0f%% %6.0f GF/s %10.2f %12.2f\n", shapes[si].name, best * 1e6, gbs,
               gbs / bw * 100, gbs / peak * 100,
               2.0 * prows * in * out / pbest / 1e9, rp * 1e3, rpa * 1e3);
        for (int c = 0; c < nc; c++) coopt_gptq_weight_free(ws[c]);
        free(ws), free(x), free(y);
    }
    coopt_threadpool_free(tp);
    return 0;
}
