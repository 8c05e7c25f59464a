/*
 * bench_threads.c -- the cost of one thread-pool dispatch (coopt_threadpool_run) with an empty
 * job and with a job of fixed length, as a distribution (each run timed on its own): what every
 * op of a decode step pays on top of its work. "spaced" runs leave a gap of work on the calling
 * thread between dispatches (the forward pass's serial ops), during which the workers spin.
 *
 *   make CUDA=0 build/libcoopt.a && cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/bench_threads.c build/libcoopt.a -lm -lpthread -o build/bench_threads
 *   ./build/bench_threads [threads=2] [runs=100000]
 */
#include "cpu/threads.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static volatile double g_sink;

// Busy work of about `ns` nanoseconds on the calling thread.
static void spin_ns(double ns) {
    double t0 = now_ns(), x = 1.0;
    while (now_ns() - t0 < ns) x = x * 1.0000001 + 1e-9;
    g_sink = x;
}

struct job {
    double     ns; // work per thread
    atomic_int calls;
};

static void job_fn(void *ctx, int32_t ith, int32_t nth) {
    struct job *j = ctx;
    if (j->ns > 0) spin_ns(j->ns);
    atomic_fetch_add_explicit(&j->calls, 1, memory_order_relaxed);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void run(struct coopt_threadpool *tp, const char *name, double work_ns, double gap_ns, int runs) {
    double    *t = malloc(sizeof(double) * (size_t)runs);
    struct job j = {.ns = work_ns};
    atomic_init(&j.calls, 0);
    for (int r = 0; r < 1000; r++) coopt_threadpool_run(tp, job_fn, &j);
    double sum = 0;
    for (int r = 0; r < runs; r++) {
        if (gap_ns > 0) spin_ns(gap_ns);
        double t0 = now_ns();
        coopt_threadpool_run(tp, job_fn, &j);
        t[r] = now_ns() - t0 - work_ns;
        sum += t[r];
    }
    qsort(t, (size_t)runs, sizeof(double), cmp);
    printf("%-26s %8.0f %8.0f %8.0f %8.0f %8.0f\n", name, t[runs / 10], t[runs / 2], t[runs * 9 / 10],
           t[runs * 99 / 100], sum / runs);
    free(t);
}

int main(int argc, char **argv) {
    int32_t                  nth  = argc > 1 ? atoi(argv[1]) : 2;
    int                      runs = argc > 2 ? atoi(argv[2]) : 100000;
    struct coopt_threadpool *tp;
    if (coopt_threadpool_init(nth, &tp) != COOPT_OK) return 1;
    printf("coopt_threadpool_run, %d threads, %d runs: ns over the job's own time\n", nth, runs);
    printf("%-26s %8s %8s %8s %8s %8s\n", "job", "p10", "median", "p90", "p99", "mean");
    run(tp, "empty, back to back", 0, 0, runs);
    run(tp, "empty, 2 us gap", 0, 2000, runs / 4);
    run(tp, "5 us each, back to back", 5000, 0, runs / 4);
    run(tp, "5 us each, 2 us gap", 5000, 2000, runs / 4);
    coopt_threadpool_free(tp);
    return 0;
}
