/*
 * test.h -- the test runner (after redis testhelp.h). Tests register themselves with TEST(name)
 * (a constructor adds them to the registry, so test files never edit a shared table), run in
 * name order, and the binary prints one line per test and a summary:
 *
 *   ok   kv_cache_alloc_free
 *   FAIL ops_matmul_q4[cpu]  tests/test_ops.c:88: max_abs_err 3.1e-02 > ...
 *   skip ops_attention[cuda]  no CUDA device
 *   test: 41 passed, 1 failed, 2 skipped
 *
 * Exit status is nonzero iff a test failed. Arguments filter tests by substring.
 */
#ifndef COOPT_TEST_H
#define COOPT_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct test_ctx {
    const char *name;
    bool        failed, skipped;
    char        msg[1024];
};

typedef void test_fn(struct test_ctx *t);
void test_register(const char *name, test_fn *fn);

#define TEST(name)                                                                                 \
    static void test_##name(struct test_ctx *t);                                                   \
    __attribute__((constructor)) static void test_reg_##name(void) { test_register(#name, test_##name); } \
    static void test_##name(struct test_ctx *t)

void test_fail(struct test_ctx *t, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void test_skip(struct test_ctx *t, const char *why);
// |got[i]-ref[i]| <= atol + rtol*|ref[i]| for all i; on failure records the worst element.
bool test_near(struct test_ctx *t, const char *file, int line, const float *got, const float *ref, size_t n,
               double atol, double rtol);

#define CHECK(t, c)                                                                                \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            test_fail((t), __FILE__, __LINE__, "%s", #c);                                          \
            return;                                                                                \
        }                                                                                          \
    } while (0)
// CHECK with a printf-style explanation.
#define CHECKF(t, c, ...)                                                                          \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            test_fail((t), __FILE__, __LINE__, __VA_ARGS__);                                       \
            return;                                                                                \
        }                                                                                          \
    } while (0)
#define CHECK_NEAR(t, got, ref, n, atol, rtol)                                                     \
    do {                                                                                           \
        if (!test_near((t), __FILE__, __LINE__, (got), (ref), (n), (atol), (rtol))) return;        \
    } while (0)
#define SKIP(t, why)                                                                               \
    do {                                                                                           \
        test_skip((t), (why));                                                                     \
        return;                                                                                    \
    } while (0)

// $COOPT_MODELS (default ../shared/models) and $COOPT_DATA (default ../shared/data).
const char *test_models_dir(void);
const char *test_data_dir(void);
// Writes dir/name into a static rotating buffer and returns it (valid for 8 more calls).
const char *test_model_path(const char *name);
const char *test_data_path(const char *name);
// Directory of committed golden files (tests/golden, relative to the repo root).
const char *test_golden_path(const char *name);

// Sends stderr to /dev/null while a test provokes expected error messages; returns the saved
// descriptor for test_quiet_end. COOPT_TEST_VERBOSE=1 keeps stderr.
int  test_quiet_begin(void);
void test_quiet_end(int saved);

// Skips the test (returning from it) when a model or data file is absent.
bool test_have_file(const char *path);
#define NEED_FILE(t, path)                                                                         \
    do {                                                                                           \
        if (!test_have_file(path)) SKIP(t, "model/data file not found (set COOPT_MODELS / COOPT_DATA)"); \
    } while (0)

// Deterministic random numbers for tests.
uint64_t test_rand_u64(uint64_t *state);
float    test_rand_uniform(uint64_t *state, float lo, float hi);
float    test_rand_normal(uint64_t *state);
void     test_fill_uniform(uint64_t *state, float *x, size_t n, float lo, float hi);
// malloc'd array of n uniform values in [lo, hi) (free with free()); aborts the binary if out of memory.
float   *test_rand_array(uint64_t *state, size_t n, float lo, float hi);

#endif // COOPT_TEST_H
