/*
 * util.h -- assertions, logging, allocation and small helpers shared by every module.
 *
 * Three kinds of errors (STYLE 2.3): broken invariants abort through COOPT_ASSERT (on in
 * release builds too); recoverable failures return enum coopt_status after printing a message
 * with coopt_log_error(); CUDA errors go through CUDA_CHECK in src/cuda/common.cuh.
 */
#ifndef COOPT_UTIL_H
#define COOPT_UTIL_H

#include "coopt.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define COOPT_ASSERT(cond)                                                                         \
    do {                                                                                           \
        if (!(cond)) coopt_abort(__FILE__, __LINE__, "COOPT_ASSERT(" #cond ") failed");            \
    } while (0)

#define COOPT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define COOPT_MAX(a, b) ((a) > (b) ? (a) : (b))
#define COOPT_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

// Prints "file:line: msg" and aborts. Only for bugs, never for bad input.
_Noreturn void coopt_abort(const char *file, int line, const char *msg);

// "coopt: <message>\n" on stderr. Silenced (except errors) by coopt_log_set_quiet(1).
void coopt_log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void coopt_log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void coopt_log_set_quiet(int quiet);
// Returns the same status after logging; lets loaders write `return coopt_fail(ERR, "...")`.
enum coopt_status coopt_fail(enum coopt_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

// Allocation that can fail: returns NULL after logging (the caller returns COOPT_ERR_NOMEM).
void *coopt_malloc(size_t n);
void *coopt_calloc(size_t n, size_t size);
void *coopt_realloc(void *p, size_t n);
// 64-byte aligned allocation; free with coopt_aligned_free().
void *coopt_aligned_alloc(size_t n);
void  coopt_aligned_free(void *p);
char *coopt_strdup(const char *s);

// Multiplication of sizes with overflow detection: returns false on overflow.
static inline int coopt_mul_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}

// Reads a whole file into a malloc'd buffer (NUL-terminated, size excludes the NUL).
enum coopt_status coopt_read_file(const char *path, char **data, size_t *size);

// Read-only mapping of a whole file.
struct coopt_mmap {
    void  *addr;
    size_t size;
};
enum coopt_status coopt_mmap_open(const char *path, struct coopt_mmap *out);
void              coopt_mmap_close(struct coopt_mmap *m);

// Path helpers: joins dir and name into out (cap bytes); returns false if truncated.
int coopt_path_join(char *out, size_t cap, const char *dir, const char *name);
int coopt_path_is_dir(const char *path);
int coopt_path_exists(const char *path);
// Returns a pointer into path after the last '/', or path.
const char *coopt_path_basename(const char *path);
// True if the string ends with suffix.
int coopt_str_ends_with(const char *s, const char *suffix);

#endif // COOPT_UTIL_H
