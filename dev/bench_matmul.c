/*
 * bench_matmul.c -- CPU matmul throughput. Decode (n_rows = 1, 2, 4) in GB/s of weights streamed
 * and as a fraction of the machine's measured read bandwidth (dev/membw.c: ~94 GB/s with 2
 * threads, ~48 GB/s with 1 on the Zen 5 dev box; override with BW_GBS=...); "hot" is the same
 * kernel on 4096-column matrices that stay in L2 (the slope between two sizes, so the per-call cost
 * drops out), i.e. its compute speed per thread (bytes per ns ~ bytes per cycle * GHz); prefill
 * (n_rows = 64) in GFLOP/s; "live" is a plain sum over the same matrices on the same number of
 * threads, run right after, i.e. the bandwidth the machine gives now (the machine is shared).
 * Distinct matrices (>= 256 MiB in all) are cycled so that decode numbers come from memory, not
 * the L3. Every number is the best of several repeats.
 *
 *   make CUDA=0 build/libcoopt.a && cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/bench_matmul.c build/libcoopt.a -lm -lpthread -o build/bench_matmul && ./build/bench_matmul [threads] [reps] [type]
 *
 * [type] (e.g. q4_0) limits the run to one weight type; HOT_ONLY=1 prints only the in-cache speed;
 * ROWS=1,2,4 sets the three decode row counts (the column titles keep saying @1 @2 @4).
 */
#include "backend.h"
#include "cpu/threads.h"
#include "dtype.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct mats {
    struct coopt_weight *w;
    int                  n;
    size_t               bytes; // of one matrix
};

// n_mat copies of one n_out x n_in matrix (content is irrelevant to speed: quantize once, copy).
static struct mats make_mats(enum coopt_dtype dt, int64_t n_in, int64_t n_out, size_t min_total) {
    size_t   rb = coopt_dtype_row_bytes(dt, n_in), mb = rb * (size_t)n_out;
    int      n  = (int)(min_total / mb) + 1;
    float   *row = malloc(sizeof(float) * (size_t)n_in);
    uint8_t *d0  = malloc(mb);
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t i = 0; i < n_in; i++) row[i] = (float)((o * 31 + i * 17) % 255 - 127) / 127.0f;
        coopt_quant_row(dt, row, d0 + (size_t)o * rb, n_in);
    }
    struct mats m = {.w = calloc((size_t)n, sizeof(struct coopt_weight)), .n = n, .bytes = mb};
    for (int k = 0; k < n; k++) {
        uint8_t *d = k ? malloc(mb) : d0;
        if (k) memcpy(d, d0, mb);
        m.w[k] = (struct coopt_weight){.dtype = dt, .n_in = n_in, .n_out = n_out, .data = d};
    }
    free(row);
    return m;
}

static void free_mats(struct mats *m) {
    for (int k = 0; k < m->n; k++) free((void *)m->w[k].data);
    free(m->w);
}

// Best seconds per matmul over `reps` repeats of cycling through all matrices (at least min_iters calls).
static double time_mm(struct coopt_backend *be, float *out, const float *x, struct mats *m, int n_rows, int reps,
                      int min_iters) {
    int iters = m->n < min_iters ? min_iters : m->n;
    be->ops->matmul(be, out, x, &m->w[0], n_rows);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (int it = 0; it < iters; it++) be->ops->matmul(be, out, x, &m->w[it % m->n], n_rows);
        double t = (now_s() - t0) / iters;
        if (t < best) best = t;
    }
    return best;
}

// Live reference: the same bytes streamed by a plain sum on the same number of threads (what
// dev/membw.c measures, but now, under whatever else the machine is running).
struct sum_ctx {
    const uint8_t *p;
    size_t         n;
    float          sink[64];
};

static void sum_task(void *ctx, int32_t ith, int32_t nth) {
    struct sum_ctx *c = ctx;
    int64_t         lo, hi;
    coopt_split_range((int64_t)(c->n / 256), ith, nth, &lo, &hi);
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = lo; i < hi; i++) {
        const float *q = (const float *)(c->p + i * 256);
        a0             = _mm512_add_ps(a0, _mm512_loadu_ps(q));
        a1             = _mm512_add_ps(a1, _mm512_loadu_ps(q + 16));
        a2             = _mm512_add_ps(a2, _mm512_loadu_ps(q + 32));
        a3             = _mm512_add_ps(a3, _mm512_loadu_ps(q + 48));
    }
    c->sink[ith] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float a = 0;
    for (int64_t i = lo * 64; i < hi * 64; i++) a += ((const float *)c->p)[i];
    c->sink[ith] = a;
#endif
}

static double time_stream(struct coopt_threadpool *tp, struct mats *m, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (int k = 0; k < m->n; k++) {
            struct sum_ctx c = {.p = m->w[k].data, .n = m->bytes};
            coopt_threadpool_run(tp, sum_task, &c);
        }
        double t = (now_s() - t0) / m->n;
        if (t < best) best = t;
    }
    return (double)m->bytes / best / 1e9;
}

int main(int argc, char **argv) {
    int                   n_threads = argc > 1 ? atoi(argv[1]) : 0;
    int                   reps      = argc > 2 ? atoi(argv[2]) : 5;
    struct coopt_backend *be;
    if (coopt_cpu_backend_init(n_threads, false, &be) != COOPT_OK) return 1;
    double bw = getenv("BW_GBS") ? atof(getenv("BW_GBS")) : be->n_threads >= 2 ? 94.0 : 48.0;
    struct coopt_threadpool *tp;
    if (coopt_threadpool_init(be->n_threads, &tp) != COOPT_OK) return 1;
    printf("threads %d, roofline %.0f GB/s, best of %d\n", be->n_threads, bw, reps);
    const enum coopt_dtype types[]     = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_Q8_0,
                                          COOPT_DTYPE_Q4_0};
    const int64_t          shapes[][2] = {{4096, 4096}, {2048, 5632}, {5632, 2048}, {2048, 32000}}; // n_in, n_out (the last: tinyllama LM head)
    int                    rowss[3]    = {1, 2, 4}; // ROWS=a,b,c overrides (each <= 64)
    if (getenv("ROWS")) sscanf(getenv("ROWS"), "%d,%d,%d", &rowss[0], &rowss[1], &rowss[2]);
    const int64_t          max_in = 5632, max_rows = 64;
    float                 *x   = malloc(sizeof(float) * max_in * max_rows);
    float                 *out = malloc(sizeof(float) * 32000 * max_rows);
    for (int64_t i = 0; i < max_in * max_rows; i++) x[i] = (float)((i * 7919) % 2001 - 1000) / 1000.0f;
    printf("%-5s %-10s %7s %7s %7s %7s %7s %7s %8s %10s %9s\n", "type", "in x out", "GB/s@1", "%bw", "GB/s@2", "%bw",
           "GB/s@4", "%bw", "hot GB/s", "GFLOP/s@64", "live GB/s");
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        enum coopt_dtype dt = types[ti];
        if (argc > 3 && strcmp(argv[3], coopt_dtype_name(dt)) != 0) continue;
        // in-L2 speed: two sizes, so that the per-call cost (x preparation, threads) drops out
        struct mats hs = make_mats(dt, 4096, (int64_t)((128u << 10) / coopt_dtype_row_bytes(dt, 4096)), 0);
        struct mats hl = make_mats(dt, 4096, (int64_t)((640u << 10) / coopt_dtype_row_bytes(dt, 4096)), 0);
        double      ts = time_mm(be, out, x, &hs, 1, reps, 500), tl = time_mm(be, out, x, &hl, 1, reps, 500);
        double      per_byte = (tl - ts) / (double)(hl.bytes - hs.bytes), call = ts - per_byte * (double)hs.bytes;
        double      hot_gbs  = 1e-9 / per_byte;
        if (getenv("HOT_ONLY")) {
            printf("%-5s in L2, n_rows 1: kernel %.1f GB/s = %.3f ns per 32 weights, per-call cost %.2f us\n",
                   coopt_dtype_name(dt), hot_gbs, per_byte * 1e9 * (double)coopt_dtype_row_bytes(dt, 32), call * 1e6);
            free_mats(&hs), free_mats(&hl);
            continue;
        }
        free_mats(&hs), free_mats(&hl);
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            int64_t     n_in = shapes[si][0], n_out = shapes[si][1];
            struct mats m = make_mats(dt, n_in, n_out, 256u << 20);
            char        shape[32];
            snprintf(shape, sizeof(shape), "%lldx%lld", (long long)n_in, (long long)n_out);
            printf("%-5s %-10s", coopt_dtype_name(dt), shape);
            for (size_t ri = 0; ri < sizeof(rowss) / sizeof(rowss[0]); ri++) {
                double t   = time_mm(be, out, x, &m, rowss[ri], reps, 8);
                double gbs = (double)m.bytes / t / 1e9;
                printf(" %7.1f %6.0f%%", gbs, 100 * gbs / bw);
            }
            double tpre = time_mm(be, out, x, &m, 64, 2, 2);
            if (si == 0) printf(" %8.1f", hot_gbs);
            else printf(" %8s", "");
            printf(" %10.1f %9.1f\n", 2.0 * (double)n_in * (double)n_out * 64 / tpre / 1e9, time_stream(tp, &m, reps));
            fflush(stdout);
            free_mats(&m);
        }
    }
    free(x), free(out);
    coopt_threadpool_free(tp);
    be->ops->destroy(be);
    return 0;
}
