/*
 * test_threads.c -- the CPU thread pool: every thread runs every job exactly once with the right
 * ith/nth, across many back-to-back runs (spinning) and runs after a pause (sleeping workers).
 */
#include "cpu/threads.h"
#include "test.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

struct count_ctx {
    atomic_int hits[8];   // per ith
    atomic_int bad_nth;
    int32_t    nth_want;
    int64_t    data[4096];
    int64_t    gen;
};

static void count_task(void *ctx, int32_t ith, int32_t nth) {
    struct count_ctx *c = ctx;
    if (nth != c->nth_want || ith < 0 || ith >= nth) atomic_fetch_add(&c->bad_nth, 1);
    else atomic_fetch_add(&c->hits[ith], 1);
    int64_t lo, hi;
    coopt_split_range(4096, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) c->data[i] += c->gen; // each element written by one thread
}

static void sleep_us(long us) {
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

TEST(threads_run_many) {
    for (int32_t n = 1; n <= 4; n++) {
        struct coopt_threadpool *tp;
        CHECK(t, coopt_threadpool_init(n, &tp) == COOPT_OK);
        CHECK(t, coopt_threadpool_n_threads(tp) == n);
        static struct count_ctx c;
        memset(&c, 0, sizeof(c));
        c.nth_want   = n;
        int64_t want = 0;
        int     runs = 2000;
        for (int r = 0; r < runs; r++) {
            c.gen = r + 1;
            want += r + 1;
            coopt_threadpool_run(tp, count_task, &c);
            if (r % 500 == 499) sleep_us(2000); // let workers fall asleep, then wake them
        }
        coopt_threadpool_free(tp);
        CHECK(t, atomic_load(&c.bad_nth) == 0);
        for (int32_t i = 0; i < n; i++) CHECKF(t, atomic_load(&c.hits[i]) == runs, "n=%d ith=%d hits=%d", n, i,
                                               atomic_load(&c.hits[i]));
        for (int i = 0; i < 4096; i++) CHECKF(t, c.data[i] == want, "n=%d i=%d", n, i);
    }
}

TEST(threads_split_range) {
    for (int64_t n = 0; n < 50; n++)
        for (int32_t nth = 1; nth <= 7; nth++) {
            int64_t next = 0;
            for (int32_t i = 0; i < nth; i++) {
                int64_t lo, hi;
                coopt_split_range(n, i, nth, &lo, &hi);
                CHECK(t, lo == next && hi >= lo && hi - lo <= n / nth + 1);
                next = hi;
            }
            CHECK(t, next == n);
        }
}

static void nop_task(void *ctx, int32_t ith, int32_t nth) { atomic_fetch_add_explicit((atomic_int *)ctx, 1, memory_order_relaxed); }

// Prints the cost of one run() of an empty job (no assertion on time: ASan and a loaded
// machine make it meaningless).
TEST(threads_run_overhead) {
    int32_t                  n = 2;
    struct coopt_threadpool *tp;
    CHECK(t, coopt_threadpool_init(n, &tp) == COOPT_OK);
    int        runs = 20000;
    atomic_int calls;
    atomic_init(&calls, 0);
    for (int r = 0; r < 100; r++) coopt_threadpool_run(tp, nop_task, &calls);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < runs; r++) coopt_threadpool_run(tp, nop_task, &calls);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((double)(b.tv_sec - a.tv_sec) * 1e6 + (double)(b.tv_nsec - a.tv_nsec) / 1e3) / runs;
    printf("     threads: run() overhead %.2f us with %d threads\n", us, n);
    coopt_threadpool_free(tp);
    CHECK(t, atomic_load(&calls) == (runs + 100) * n);
}
