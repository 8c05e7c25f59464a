/*
 * threads.h -- a persistent thread pool for the CPU backend. coopt_threadpool_run() executes
 * fn(ctx, ith, nth) on nth threads (the caller is thread 0) and returns when all are done.
 * Workers spin briefly between jobs (decode issues hundreds of small jobs per token), then
 * sleep on a condition variable so an idle process does not burn CPU.
 */
#ifndef COOPT_THREADS_H
#define COOPT_THREADS_H

#include "coopt.h"

#include <stdint.h>

struct coopt_threadpool;

typedef void coopt_task_fn(void *ctx, int32_t ith, int32_t nth);

// Starts n_threads - 1 workers (n_threads <= 0: all cores). Returns NOMEM on failure.
enum coopt_status coopt_threadpool_init(int32_t n_threads, struct coopt_threadpool **out);
void coopt_threadpool_free(struct coopt_threadpool *tp);
int32_t coopt_threadpool_n_threads(const struct coopt_threadpool *tp);
// Runs fn on every thread and waits. Not reentrant: fn must not call run on the same pool.
void coopt_threadpool_run(struct coopt_threadpool *tp, coopt_task_fn *fn, void *ctx);

// Splits [0, n) into nth nearly equal ranges; thread ith gets [*lo, *hi).
static inline void coopt_split_range(int64_t n, int32_t ith, int32_t nth, int64_t *lo, int64_t *hi) {
    int64_t per = n / nth, rem = n % nth;
    *lo = ith * per + (ith < rem ? ith : rem);
    *hi = *lo + per + (ith < rem ? 1 : 0);
}

#endif // COOPT_THREADS_H
