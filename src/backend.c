/*
 * backend.c -- the single place that picks a backend by name.
 */
#include "backend.h"

#include "util.h"

#include <string.h>

#ifdef COOPT_CUDA
enum coopt_status coopt_cuda_backend_init(int32_t n_threads, struct coopt_backend **out);
int               coopt_cuda_device_count(void);
#endif

const char *coopt_default_device(void) {
#ifdef COOPT_CUDA
    return coopt_cuda_device_count() > 0 ? "cuda" : "cpu";
#else
    return "cpu";
#endif
}

enum coopt_status coopt_backend_init(const char *name, int32_t n_threads, struct coopt_backend **out) {
    *out = NULL;
    if (!name || !strcmp(name, "cpu")) return coopt_cpu_backend_init(n_threads, false, out);
    if (!strcmp(name, "cpu-ref")) return coopt_cpu_backend_init(n_threads, true, out);
    if (!strcmp(name, "cuda")) {
#ifdef COOPT_CUDA
        return coopt_cuda_backend_init(n_threads, out);
#else
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "device 'cuda': this build has no CUDA support (rebuild with nvcc)");
#endif
    }
    return coopt_fail(COOPT_ERR_INVALID, "unknown device '%s' (expected cpu or cuda)", name);
}

void coopt_backend_free(struct coopt_backend *be) {
    if (be) be->ops->destroy(be);
}
