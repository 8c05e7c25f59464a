/*
 * util.c -- status strings, logging, checked allocation, file reading and mmap.
 */
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int g_quiet;

const char *coopt_status_str(enum coopt_status s) {
    switch (s) {
    case COOPT_OK: return "ok";
    case COOPT_ERR_IO: return "i/o error";
    case COOPT_ERR_FORMAT: return "invalid format";
    case COOPT_ERR_NOMEM: return "out of memory";
    case COOPT_ERR_UNSUPPORTED: return "unsupported";
    case COOPT_ERR_KV_FULL: return "KV cache full";
    case COOPT_ERR_INVALID: return "invalid argument";
    case COOPT_ERR_CTX_FULL: return "context full";
    }
    return "unknown status";
}

_Noreturn void coopt_abort(const char *file, int line, const char *msg) {
    fflush(stdout);
    fprintf(stderr, "%s:%d: %s\n", file, line, msg);
    abort();
}

void coopt_log_set_quiet(int quiet) { g_quiet = quiet; }

void coopt_log_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("coopt: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void coopt_log_info(const char *fmt, ...) {
    if (g_quiet) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("coopt: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

enum coopt_status coopt_fail(enum coopt_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("coopt: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return st;
}

void *coopt_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) coopt_log_error("out of memory allocating %zu bytes", n);
    return p;
}

void *coopt_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) coopt_log_error("out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void *coopt_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) coopt_log_error("out of memory reallocating %zu bytes", n);
    return q;
}

void *coopt_aligned_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        coopt_log_error("out of memory allocating %zu bytes", n);
        return NULL;
    }
    return p;
}

void coopt_aligned_free(void *p) { free(p); }

char *coopt_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char  *p = coopt_malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

int64_t coopt_time_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int coopt_n_cores(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

enum coopt_status coopt_read_file(const char *path, char **data, size_t *size) {
    *data = NULL;
    *size = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return coopt_fail(COOPT_ERR_IO, "%s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) goto io_fail;
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0) goto io_fail;
    char *buf = coopt_malloc((size_t)n + 1);
    if (!buf) {
        fclose(f);
        return COOPT_ERR_NOMEM;
    }
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        goto io_fail;
    }
    buf[n] = '\0';
    fclose(f);
    *data = buf;
    *size = (size_t)n;
    return COOPT_OK;
io_fail:
    fclose(f);
    return coopt_fail(COOPT_ERR_IO, "%s: read failed", path);
}

enum coopt_status coopt_mmap_open(const char *path, struct coopt_mmap *out) {
    out->addr = NULL;
    out->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return coopt_fail(COOPT_ERR_IO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return coopt_fail(COOPT_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return coopt_fail(COOPT_ERR_FORMAT, "%s: file is empty", path);
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return coopt_fail(COOPT_ERR_NOMEM, "%s: mmap failed: %s", path, strerror(errno));
    out->addr = p;
    out->size = (size_t)st.st_size;
    return COOPT_OK;
}

void coopt_mmap_close(struct coopt_mmap *m) {
    if (!m || !m->addr) return;
    munmap(m->addr, m->size);
    m->addr = NULL;
    m->size = 0;
}

int coopt_path_join(char *out, size_t cap, const char *dir, const char *name) {
    size_t dl = strlen(dir);
    int    n  = (dl > 0 && dir[dl - 1] == '/') ? snprintf(out, cap, "%s%s", dir, name)
                                               : snprintf(out, cap, "%s/%s", dir, name);
    return n >= 0 && (size_t)n < cap;
}

int coopt_path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int coopt_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

const char *coopt_path_basename(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

int coopt_str_ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && memcmp(s + a - b, suffix, b) == 0;
}
