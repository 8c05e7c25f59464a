/*
 * common.c -- shared option parsing and model/context setup for the subcommands.
 */
#include "common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void app_opts_default(struct app_opts *o) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    *o = (struct app_opts){
        .model = NULL, .device = NULL, .n_threads = 0, .n_ctx = 0, .n_batch = cp.n_batch,
        .page_size = cp.page_size, .n_seq_max = 4, .kv_type = cp.kv_type,
    };
}

const char *app_models_dir(void) {
    const char *d = getenv("COOPT_MODELS");
    return (d && *d) ? d : "../shared/models";
}

const char *app_next_arg(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "coopt: %s needs a value\n", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

bool app_parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno       = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "coopt: %s: '%s' is not an integer in [%lld, %lld]\n", flag, s, (long long)lo, (long long)hi);
        return false;
    }
    *out = v;
    return true;
}

bool app_parse_float(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno    = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "coopt: %s: '%s' is not a number in [%g, %g]\n", flag, s, lo, hi);
        return false;
    }
    *out = v;
    return true;
}

int app_opts_parse(struct app_opts *o, int argc, char **argv, int *i) {
    const char *a = argv[*i];
    const char *v;
    int64_t     n;
#define INT_OPT(field, lo, hi)                                                                                         \
    do {                                                                                                               \
        if (!(v = app_next_arg(argc, argv, i)) || !app_parse_int(a, v, lo, hi, &n)) return -1;                         \
        o->field = (int32_t)n;                                                                                         \
        return 1;                                                                                                      \
    } while (0)
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (!(o->model = app_next_arg(argc, argv, i))) return -1;
        return 1;
    }
    if (!strcmp(a, "-t") || !strcmp(a, "--threads")) INT_OPT(n_threads, 1, 1024);
    if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) INT_OPT(n_ctx, 0, 1 << 24);
    if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) INT_OPT(n_batch, 1, 1 << 20);
    if (!strcmp(a, "--page-size")) INT_OPT(page_size, 1, 4096);
    if (!strcmp(a, "--parallel") || !strcmp(a, "-np")) INT_OPT(n_seq_max, 1, 4096);
#undef INT_OPT
    if (!strcmp(a, "--kv-type") || !strcmp(a, "-ctk")) {
        if (!(v = app_next_arg(argc, argv, i))) return -1;
        if (!coopt_dtype_parse(v, &o->kv_type)) {
            fprintf(stderr, "coopt: --kv-type: unknown type '%s' (f32, f16, bf16, fp8_e4m3, fp8_e5m2)\n", v);
            return -1;
        }
        o->kv_type_set = true;
        return 1;
    }
    if (!strcmp(a, "--device") || !strcmp(a, "-dev")) {
        if (!(o->device = app_next_arg(argc, argv, i))) return -1;
        return 1;
    }
    if (!strcmp(a, "--attn-partition")) {
        if (!(v = app_next_arg(argc, argv, i)) || !app_parse_int(a, v, -1, 1 << 24, &n)) return -1;
        o->attn_partition = (int32_t)n;
        return 1;
    }
    if (!strcmp(a, "--kv-scale-search")) {
        if (!(v = app_next_arg(argc, argv, i)) || !app_parse_int(a, v, 1, 16, &n) || (n != 1 && n != 16)) {
            if (v) fprintf(stderr, "coopt: --kv-scale-search: expected 1 (plain amax scale) or 16\n");
            return -1;
        }
        o->kv_scale_search = (int32_t)n;
        return 1;
    }
    if (!strcmp(a, "--attn-per-head")) {
        o->attn_per_head = true;
        return 1;
    }
    if (!strcmp(a, "--no-graphs")) {
        o->no_graphs = true;
        return 1;
    }
    if (!strcmp(a, "--prefetch")) {
        o->prefetch = true;
        return 1;
    }
    return 0;
}

void app_opts_usage(void) {
    fprintf(stderr,
            "model options:\n"
            "  -m, --model PATH       model: .gguf file, Hugging Face directory, or llama2.c .bin\n"
            "  -t, --threads N        CPU threads (default: all cores; 1 for models under 16 MiB)\n"
            "  -c, --ctx-size N       max tokens per sequence (default: the model's context)\n"
            "  -b, --batch-size N     max tokens per forward step; longer prompts are chunked (default 512)\n"
            "  --kv-type T            KV cache type: f32, f16, bf16, fp8_e4m3, fp8_e5m2\n"
            "                         (default: fp8_e4m3 for head dims >= 16, else f16)\n"
            "  --page-size N          tokens per KV page (default 16)\n"
            "  --device D             cpu or cuda (default: cuda when a GPU is present, else cpu)\n"
            "  --prefetch             read all weights at load instead of on first use\n"
            "  --attn-partition N     split-K partition of long contexts in tokens (default 512, -1 = off)\n"
            "  --attn-per-head        ablation: read K/V once per query head, not once per KV group\n"
            "  --no-graphs            ablation: run decode steps op by op (no CUDA graph replay)\n"
            "  --kv-scale-search N    FP8 KV: scale candidates per row, 16 (default) or 1 (plain amax)\n");
}

int app_load(const struct app_opts *o, struct coopt_model **m, struct coopt_ctx **c, int32_t n_ctx_min) {
    *m = NULL;
    *c = NULL;
    if (!o->model) {
        fprintf(stderr, "coopt: no model given (-m PATH)\n");
        return 1;
    }
    struct coopt_model_params mp = coopt_model_default_params();
    mp.prefetch                  = o->prefetch;
    mp.device                    = o->device ? o->device : coopt_default_device();
    mp.n_threads                 = o->n_threads;
    enum coopt_status st         = coopt_model_load(o->model, &mp, m);
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt: failed to load model '%s': %s\n", o->model, coopt_status_str(st));
        return 1;
    }
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx                   = o->n_ctx;
    if (cp.n_ctx == 0 && n_ctx_min > coopt_model_get_info(*m)->n_ctx_train) cp.n_ctx = n_ctx_min;
    cp.n_batch   = o->n_batch;
    cp.page_size = o->page_size;
    cp.n_seq_max = o->n_seq_max;
    cp.n_threads = o->n_threads;
    if (o->kv_type_set) cp.kv_type = o->kv_type;
    cp.attn_partition = o->attn_partition;
    cp.attn_per_head  = o->attn_per_head;
    cp.no_step_graphs = o->no_graphs;
    cp.kv_scale_search = o->kv_scale_search;
    st = coopt_ctx_init(*m, &cp, c);
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt: failed to create context: %s\n", coopt_status_str(st));
        coopt_model_free(*m);
        *m = NULL;
        return 1;
    }
    return 0;
}
