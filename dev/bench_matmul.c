/*
 * bench_matmul.c -- CPU matmul throughput: decode (n_rows = 1) in GB/s of weights streamed, as a
 * fraction of the machine's measured read bandwidth (37 GB/s, DESIGN.md), and prefill
 * (n_rows = 64) in GFLOP/s. Several distinct 4096x4096 matrices (>= 256 MiB in all) are cycled
 * so that decode numbers come from memory, not the L3.
 *
 *   make build/libcoopt.a && cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/bench_matmul.c build/libcoopt.a -lm -lpthread -o build/bench_matmul && ./build/bench_matmul [threads]
 *
 * Other processes on the machine lower the numbers; report what you measure.
 */
#include "backend.h"
#include "dtype.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N        4096
#define BW_GBS   37.0

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int n_threads = argc > 1 ? atoi(argv[1]) : 0;
    struct coopt_backend *be;
    if (coopt_cpu_backend_init(n_threads, false, &be) != COOPT_OK) return 1;
    printf("threads %d, %dx%d weights\n", be->n_threads, N, N);
    const enum coopt_dtype types[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_Q8_0,
                                      COOPT_DTYPE_Q4_0};
    float *x   = malloc(sizeof(float) * N * 64);
    float *out = malloc(sizeof(float) * N * 64);
    float *row = malloc(sizeof(float) * N);
    for (int i = 0; i < N * 64; i++) x[i] = (float)((i * 7919) % 2001 - 1000) / 1000.0f;
    printf("%-5s %10s %10s %8s %12s\n", "type", "MB/matrix", "GB/s", "of 37", "GFLOP/s@64");
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        enum coopt_dtype dt = types[ti];
        size_t rb = coopt_dtype_row_bytes(dt, N), mb = rb * N;
        int    n_mat = (int)((256u << 20) / mb) + 1;
        struct coopt_weight *w = calloc(n_mat, sizeof(*w));
        for (int m = 0; m < n_mat; m++) {
            uint8_t *d = malloc(mb);
            for (int o = 0; o < N; o++) {
                for (int i = 0; i < N; i++) row[i] = (float)(((o + m) * 31 + i * 17) % 255 - 127) / 127.0f;
                coopt_quant_row(dt, row, d + (size_t)o * rb, N);
            }
            w[m] = (struct coopt_weight){.dtype = dt, .n_in = N, .n_out = N, .data = d};
        }
        // decode
        int    iters = 3 * n_mat;
        be->ops->matmul(be, out, x, &w[0], 1);
        double t0 = now_s();
        for (int it = 0; it < iters; it++) be->ops->matmul(be, out, x, &w[it % n_mat], 1);
        double dt_s = now_s() - t0;
        double gbs  = (double)mb * iters / dt_s / 1e9;
        // prefill
        int pre = 3;
        t0      = now_s();
        for (int it = 0; it < pre; it++) be->ops->matmul(be, out, x, &w[it % n_mat], 64);
        double gflops = 2.0 * N * N * 64 * pre / (now_s() - t0) / 1e9;
        printf("%-5s %10.1f %10.1f %7.0f%% %12.1f\n", coopt_dtype_name(dt), mb / 1e6, gbs, 100 * gbs / BW_GBS, gflops);
        for (int m = 0; m < n_mat; m++) free((void *)w[m].data);
        free(w);
    }
    free(x), free(out), free(row);
    be->ops->destroy(be);
    return 0;
}
