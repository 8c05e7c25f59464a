/*
 * test_main.c -- runs the registered tests in name order; prints the summary line CI parses.
 */
#include "test.h"

#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct test_entry {
    const char *name;
    test_fn    *fn;
};

static struct test_entry g_tests[1024];
static int               g_n_tests;

void test_register(const char *name, test_fn *fn) {
    if (g_n_tests >= (int)(sizeof(g_tests) / sizeof(g_tests[0]))) {
        fprintf(stderr, "too many tests\n");
        abort();
    }
    g_tests[g_n_tests++] = (struct test_entry){name, fn};
}

void test_fail(struct test_ctx *t, const char *file, int line, const char *fmt, ...) {
    if (t->failed) return;
    t->failed = true;
    int     n = snprintf(t->msg, sizeof(t->msg), "%s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(t->msg)) vsnprintf(t->msg + n, sizeof(t->msg) - (size_t)n, fmt, ap);
    va_end(ap);
}

void test_skip(struct test_ctx *t, const char *why) {
    t->skipped = true;
    snprintf(t->msg, sizeof(t->msg), "%s", why);
}

bool test_near(struct test_ctx *t, const char *file, int line, const float *got, const float *ref, size_t n,
               double atol, double rtol) {
    size_t worst = 0;
    double worst_excess = 0, worst_err = 0;
    bool   bad = false;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)ref[i]);
        double tol = atol + rtol * fabs((double)ref[i]);
        if (!(err <= tol)) { // also catches NaN
            double excess = isnan(err) ? INFINITY : err - tol;
            if (!bad || excess > worst_excess) {
                worst        = i;
                worst_excess = excess;
                worst_err    = err;
            }
            bad = true;
        }
    }
    if (bad) {
        test_fail(t, file, line, "max_abs_err %.3e > atol %.1e + rtol %.1e*|ref| (i=%zu got=%.6g ref=%.6g, n=%zu)",
                  worst_err, atol, rtol, worst, (double)got[worst], (double)ref[worst], n);
    }
    return !bad;
}

static const char *env_or(const char *var, const char *def) {
    const char *v = getenv(var);
    return (v && *v) ? v : def;
}

const char *test_models_dir(void) { return env_or("COOPT_MODELS", "../shared/models"); }
const char *test_data_dir(void) { return env_or("COOPT_DATA", "../shared/data"); }

static const char *rot_path(const char *dir, const char *name) {
    static char buf[8][1024];
    static int  i;
    char       *b = buf[i++ % 8];
    snprintf(b, sizeof(buf[0]), "%s/%s", dir, name);
    return b;
}

const char *test_model_path(const char *name) { return rot_path(test_models_dir(), name); }
const char *test_data_path(const char *name) { return rot_path(test_data_dir(), name); }
const char *test_golden_path(const char *name) { return rot_path("tests/golden", name); }

int test_quiet_begin(void) {
    if (getenv("COOPT_TEST_VERBOSE")) return -1;
    fflush(stderr);
    int saved = dup(2);
    int null  = open("/dev/null", O_WRONLY);
    if (null >= 0) {
        dup2(null, 2);
        close(null);
    }
    return saved;
}

void test_quiet_end(int saved) {
    fflush(stderr);
    if (saved >= 0) {
        dup2(saved, 2);
        close(saved);
    }
}

bool test_have_file(const char *path) { return access(path, R_OK) == 0; }

uint64_t test_rand_u64(uint64_t *s) {
    // splitmix64
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float test_rand_uniform(uint64_t *s, float lo, float hi) {
    return lo + (hi - lo) * (float)((test_rand_u64(s) >> 40) * (1.0 / 16777216.0));
}

float test_rand_normal(uint64_t *s) {
    double u1 = ((test_rand_u64(s) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (test_rand_u64(s) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void test_fill_uniform(uint64_t *s, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = test_rand_uniform(s, lo, hi);
}

float *test_rand_array(uint64_t *s, size_t n, float lo, float hi) {
    float *x = malloc(n * sizeof(float) + 4);
    if (!x) {
        fprintf(stderr, "test_rand_array: out of memory (%zu floats)\n", n);
        abort();
    }
    test_fill_uniform(s, x, n, lo, hi);
    return x;
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const struct test_entry *)a)->name, ((const struct test_entry *)b)->name);
}

int main(int argc, char **argv) {
    // one line at a time even into a file or pipe: a run killed by a time limit keeps its results
    setvbuf(stdout, NULL, _IOLBF, 0);
    qsort(g_tests, (size_t)g_n_tests, sizeof(g_tests[0]), cmp_entry);
    int passed = 0, failed = 0, skipped = 0;
    for (int i = 0; i < g_n_tests; i++) {
        bool match = argc < 2;
        for (int a = 1; a < argc; a++) match |= strstr(g_tests[i].name, argv[a]) != NULL;
        if (!match) continue;
        struct test_ctx t = {.name = g_tests[i].name};
        g_tests[i].fn(&t);
        if (t.failed) {
            printf("FAIL %s  %s\n", t.name, t.msg);
            failed++;
        } else if (t.skipped) {
            printf("skip %s  %s\n", t.name, t.msg);
            skipped++;
        } else {
            printf("ok   %s\n", t.name);
            passed++;
        }
        fflush(stdout);
    }
    printf("test: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
