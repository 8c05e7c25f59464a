/*
 * test_cuda_util.h -- helpers shared by the CUDA test files: a CUDA backend with the CPU scalar
 * reference beside it, and device copies. Include inside #ifdef COOPT_CUDA after test.h.
 */
#ifndef COOPT_TEST_CUDA_UTIL_H
#define COOPT_TEST_CUDA_UTIL_H

#include "backend.h"
#include "cuda/cuda.h"
#include "test.h"

struct cu_pair {
    struct coopt_backend *cu, *ref;
};

// Creates both backends; returns false after SKIP (no GPU) or FAIL.
static inline bool cu_pair_init(struct test_ctx *t, struct cu_pair *p) {
    p->cu = p->ref = NULL;
    if (coopt_cuda_device_count() <= 0) {
        test_skip(t, "no CUDA device");
        return false;
    }
    coopt_log_set_quiet(1);
    if (coopt_cuda_backend_init(0, &p->cu) != COOPT_OK || coopt_cpu_backend_init(1, true, &p->ref) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "backend init failed");
        if (p->cu) p->cu->ops->destroy(p->cu);
        return false;
    }
    return true;
}

static inline void cu_pair_free(struct cu_pair *p) {
    if (p->cu) p->cu->ops->destroy(p->cu);
    if (p->ref) p->ref->ops->destroy(p->ref);
}

// Device copy of n bytes of host memory (aborts the test binary on allocation failure: a GPU
// that cannot hold a few MiB is broken).
static inline void *dev_copy(struct coopt_backend *be, const void *src, size_t n) {
    void *d = NULL;
    COOPT_ASSERT(be->ops->alloc(be, n, &d) == COOPT_OK);
    if (src) be->ops->upload(be, d, src, n);
    return d;
}

static inline void dev_read(struct coopt_backend *be, void *dst, const void *src, size_t n) {
    be->ops->download(be, dst, src, n);
    be->ops->sync(be);
}

#endif // COOPT_TEST_CUDA_UTIL_H
