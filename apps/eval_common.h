/*
 * eval_common.h -- what `coopt perplexity` and `coopt lambada` share besides the arithmetic in
 * src/eval.h: reading a text file and a progress line with an ETA on stderr.
 */
#ifndef COOPT_APP_EVAL_COMMON_H
#define COOPT_APP_EVAL_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// Reads a whole file (NUL-terminated; *len excludes the NUL). Prints "coopt <cmd>: <path>: <why>"
// and returns NULL on failure. Free with free().
char *eval_read_file(const char *cmd, const char *path, size_t *len);

// Progress on stderr. When stderr is a terminal and stdout is not, one line is redrawn in place
// (at most 4 times a second); otherwise a line is printed after the first item, at every 10% and
// at the end, so logs stay short and never overwrite results on a shared terminal.
struct eval_progress {
    const char *what;  // "perplexity"
    const char *unit;  // "chunks"
    int64_t     total;
    int64_t     t0_us, last_us;
    int         last_decile;
    bool        live;
};
void eval_progress_init(struct eval_progress *p, const char *what, const char *unit, int64_t total);
// done items of total; extra (may be NULL) is appended, e.g. "ppl 12.34".
void eval_progress_update(struct eval_progress *p, int64_t done, const char *extra);
// Ends a live line.
void eval_progress_end(struct eval_progress *p);

#endif
