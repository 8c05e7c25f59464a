/*
 * eval_common.c -- file reading and progress output for the evaluation subcommands.
 */
#include "eval_common.h"

#include "coopt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *eval_read_file(const char *cmd, const char *path, size_t *len) {
    *len    = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "coopt %s: %s: %s\n", cmd, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char  *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        char *p = realloc(buf, cap * 2);
        if (!p) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = p;
        cap *= 2;
    }
    if (!buf || ferror(f)) {
        fprintf(stderr, "coopt %s: %s: %s\n", cmd, path, buf ? "read error" : "out of memory");
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len   = n;
    return buf;
}

void eval_progress_init(struct eval_progress *p, const char *what, const char *unit, int64_t total) {
    *p = (struct eval_progress){.what = what, .unit = unit, .total = total, .t0_us = coopt_time_us(), .last_decile = 0};
    p->live = isatty(fileno(stderr)) && !isatty(fileno(stdout));
}

void eval_progress_update(struct eval_progress *p, int64_t done, const char *extra) {
    int64_t now    = coopt_time_us();
    int     decile = p->total > 0 ? (int)(done * 10 / p->total) : 10;
    if (p->live) {
        if (done < p->total && now - p->last_us < 250000) return;
    } else if (!(done == 1 || decile > p->last_decile || done == p->total)) {
        return;
    }
    p->last_us     = now;
    p->last_decile = decile;
    double secs    = (now - p->t0_us) / 1e6;
    double per     = done > 0 ? secs / (double)done : 0;
    double eta     = per * (double)(p->total - done);
    fprintf(stderr, "%s%s: %lld/%lld %s, %.3f s each, %.0f s elapsed, ETA %.0f s%s%s%s", p->live ? "\r" : "", p->what,
            (long long)done, (long long)p->total, p->unit, per, secs, eta, extra ? ", " : "", extra ? extra : "",
            p->live ? "\033[K" : "\n");
    fflush(stderr);
}

void eval_progress_end(struct eval_progress *p) {
    if (p->live) fputc('\n', stderr);
}
