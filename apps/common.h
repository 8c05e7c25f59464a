/*
 * common.h -- option parsing and setup shared by the coopt subcommands. Apps may exit; the
 * library never does.
 */
#ifndef COOPT_APP_COMMON_H
#define COOPT_APP_COMMON_H

#include "coopt.h"

#include <stdbool.h>
#include <stdint.h>

// Options every model-running subcommand accepts.
struct app_opts {
    const char      *model;
    const char      *device;
    int32_t          n_threads;
    int32_t          n_ctx;
    int32_t          n_batch;
    int32_t          page_size;
    int32_t          n_seq_max;
    enum coopt_dtype kv_type;
    bool             kv_type_set;
    bool             prefetch;
    int32_t          attn_partition; // 0 = default (512), -1 = off
    bool             attn_per_head;
    bool             no_graphs;      // ablation: no CUDA graph replay of decode steps
    int32_t          kv_scale_search;
};

void app_opts_default(struct app_opts *o);
// If argv[*i] is a common option, consumes it (and its value) and returns 1; 0 if not common;
// -1 after printing an error (missing/bad value).
int app_opts_parse(struct app_opts *o, int argc, char **argv, int *i);
// Help text for the common options.
void app_opts_usage(void);

// Loads the model and creates a context from the options; prints errors. Returns 0 on success.
int app_load(const struct app_opts *o, struct coopt_model **m, struct coopt_ctx **c, int32_t n_ctx_min);

// Value parsing with range checks; print "coopt: <flag>: ..." and return false on error.
bool app_parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);
bool app_parse_float(const char *flag, const char *s, double lo, double hi, double *out);
// Returns argv[++*i] or prints "<flag> needs a value" and returns NULL.
const char *app_next_arg(int argc, char **argv, int *i);

// Default model directory: $COOPT_MODELS or ../shared/models.
const char *app_models_dir(void);

int cmd_run(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_perplexity(int argc, char **argv);
int cmd_lambada(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_synth(int argc, char **argv);
int cmd_quantize(int argc, char **argv);

#endif
