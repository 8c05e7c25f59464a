/*
 * bench.c -- `coopt bench`: llama-bench-style speed tables.
 *
 *   ppN  prompt processing: N random tokens of one sequence in one decode call (chunked by -b)
 *   tgN  text generation: N tokens decoded one at a time, each depending on the one before: by
 *        default greedy generation with the choice made on the device (coopt_ctx_generate, what
 *        `coopt run --temp 0` does: a GPU runs the steps back to back and the host reads each
 *        token one step behind); with --tg host each token's logits come back to the host and the
 *        next decode waits for them, as when sampling (the test is then named tgN-host); --tg
 *        sample draws each token with the default sampler (temperature 0.8, top-k 40, top-p 0.95,
 *        min-p 0.05, a fixed seed) where the logits are (coopt_ctx_generate with a sampler, what
 *        `coopt run` does by default; tgN-sample), --tg sample-host with the host sampler on
 *        logits copied back each token (tgN-sample-host)
 *   -d   context depth: that many tokens are in the cache before the timed test (not timed)
 *
 * Each test runs once untimed (warm-up) and then -r times; t/s is mean ± sample stddev.
 * For generation the achieved memory bandwidth is reported: bytes read per token (all matmul
 * weights incl. the LM head, plus the K/V of the context) divided by the time per token.
 */
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LIST 16
#define MAX(a, b) ((a) > (b) ? (a) : (b))

static void bench_usage(void) {
    fprintf(stderr,
            "usage: coopt bench -m MODEL [options]\n"
            "  -p, --n-prompt N[,N..]  prompt lengths (default 512; 0 = skip)\n"
            "  -n, --n-gen N[,N..]     generation lengths (default 128; 0 = skip)\n"
            "  -d, --n-depth N[,N..]   context depth before the test (default 0)\n"
            "  -r, --repetitions N     (default 5)\n"
            "  --tg MODE               tgN: device: the next token chosen on the device and fed without the\n"
            "                          host (greedy, default); host: the logits of every token copied to the\n"
            "                          host and waited for before the next decode; sample / sample-host:\n"
            "                          drawn by the default sampler (fixed seed) on the device / on the host\n"
            "                          (with -B: device / host feed random tokens, sample / sample-host\n"
            "                          each sequence's own sampler's draws)\n"
            "  -o, --output md|json    (default md)\n"
            "  -B, --batch-seqs B[,B..] batched mode: B sequences, each prefilled with the first -p length,\n"
            "                          then decoded together for the first -n length; total tokens/s\n"
            "  --capacity N            how many sequences of N tokens the KV memory holds: prefill one\n"
            "                          sequence after another (up to --parallel, default 512) until the\n"
            "                          device runs out of KV memory, then print the count\n");
    app_opts_usage();
}

static int parse_list(const char *flag, const char *s, int64_t *out, int *n) {
    *n = 0;
    char *copy = strdup(s), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (*n == MAX_LIST || !app_parse_int(flag, tok, 0, 1 << 24, &out[*n])) {
            free(copy);
            return -1;
        }
        (*n)++;
    }
    free(copy);
    return *n > 0 ? 0 : -1;
}

struct bench_result {
    const char *test;
    int64_t     n_prompt, n_gen, depth;
    double      mean_tps, std_tps, gbps, frac;
};

static uint64_t g_rng = 0x1234567;
static int32_t  rand_token(int32_t n_vocab) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (int32_t)(g_rng % (uint64_t)n_vocab);
}

// Fills the sequence with `depth` random tokens (untimed).
static enum coopt_status fill_depth(struct coopt_ctx *c, int32_t seq, int64_t depth, int32_t n_vocab, int32_t *toks,
                                    int32_t *seqs) {
    for (int64_t i = 0; i < depth; i++) {
        toks[i] = rand_token(n_vocab);
        seqs[i] = seq;
    }
    if (depth == 0) return COOPT_OK;
    struct coopt_batch_input b = {.n_tokens = (int32_t)depth, .tokens = toks, .seq_ids = seqs};
    return coopt_ctx_decode(c, &b);
}

enum tg_mode { TG_DEVICE, TG_HOST, TG_SAMPLE, TG_SAMPLE_HOST };
static const char *const tg_mode_names[] = {"device", "host", "sample", "sample-host"};

// One timed run; returns seconds or a negative value on error. smp: the sampler of the sample
// modes (reset for each run, so every run draws the same tokens).
static double run_once(struct coopt_ctx *c, int64_t n_prompt, int64_t n_gen, int64_t depth, int32_t n_vocab,
                       int32_t *toks, int32_t *seqs, enum tg_mode tg, struct coopt_sampler *smp) {
    int32_t seq;
    if (coopt_seq_new(c, &seq) != COOPT_OK) return -1;
    double secs = -1;
    if (fill_depth(c, seq, depth, n_vocab, toks, seqs) != COOPT_OK) goto out;
    coopt_ctx_synchronize(c); // decodes return before a GPU finishes: each timed span ends with a wait
    int64_t t0 = coopt_time_us();
    if (n_prompt > 0) {
        for (int64_t i = 0; i < n_prompt; i++) {
            toks[i] = rand_token(n_vocab);
            seqs[i] = seq;
        }
        struct coopt_batch_input b = {.n_tokens = (int32_t)n_prompt, .tokens = toks, .seq_ids = seqs};
        if (coopt_ctx_decode(c, &b) != COOPT_OK) goto out;
    }
    if (smp) coopt_sampler_reset(smp);
    if (n_gen > 0 && (tg == TG_DEVICE || tg == TG_SAMPLE)) {
        int32_t fed = 0;
        if (coopt_ctx_generate(c, seq, rand_token(n_vocab), (int32_t)n_gen, tg == TG_SAMPLE ? smp : NULL, NULL, NULL,
                               &fed) != COOPT_OK ||
            fed != n_gen)
            goto out;
    }
    int32_t t = rand_token(n_vocab);
    for (int64_t i = 0; i < n_gen && (tg == TG_HOST || tg == TG_SAMPLE_HOST); i++) {
        struct coopt_batch_input b = {.n_tokens = 1, .tokens = &t, .seq_ids = &seq};
        if (coopt_ctx_decode(c, &b) != COOPT_OK) goto out;
        // Each token waits for the one before, as in sampling, where the next token comes from
        // these logits (and as llama-bench's tg): without it a GPU would run the steps back to back.
        const float *l = coopt_ctx_logits(c, 0);
        if (!l) goto out;
        t = tg == TG_SAMPLE_HOST ? coopt_sampler_sample(smp, l) : rand_token(n_vocab);
    }
    coopt_ctx_synchronize(c);
    secs = (coopt_time_us() - t0) / 1e6;
out:
    coopt_seq_free(c, seq);
    return secs;
}

// Batched mode: B sequences prefilled with n_prompt tokens each (one call, chunked by -b), then
// n_gen steps that decode one token of every sequence in one call. Returns 0 and the two times.
// Batched mode. Each decode step feeds every sequence a token: a random one (--tg device / host),
// or the one its own sampler (the defaults, seed 1 + b) drew from its logits -- where the logits
// are (--tg sample: coopt_batch_input.samplers, coopt_ctx_token; on a GPU only the tokens come
// back) or on the host (--tg sample-host: every row's logits copied back, coopt_sampler_sample).
static int run_batched(struct coopt_ctx *c, int64_t B, int64_t n_prompt, int64_t n_gen, int32_t n_vocab,
                       enum tg_mode tg, double *t_prompt, double *t_gen) {
    int32_t *seq  = malloc((size_t)B * sizeof(int32_t));
    int32_t *toks = malloc((size_t)(B * n_prompt + B) * sizeof(int32_t));
    int32_t *sids = malloc((size_t)(B * n_prompt + B) * sizeof(int32_t));
    const bool             sampled = tg == TG_SAMPLE || tg == TG_SAMPLE_HOST;
    struct coopt_sampler **smp     = sampled ? calloc((size_t)B, sizeof(*smp)) : NULL;
    int                    rc      = -1;
    int64_t                made    = 0;
    if (!seq || !toks || !sids || (sampled && !smp)) goto out;
    for (int64_t b = 0; b < B && sampled; b++) {
        struct coopt_sampler_params sp = coopt_sampler_default_params();
        sp.seed                        = 1 + (uint64_t)b;
        if (coopt_sampler_init(&sp, n_vocab, &smp[b]) != COOPT_OK) goto out;
    }
    for (; made < B; made++)
        if (coopt_seq_new(c, &seq[made]) != COOPT_OK) goto out;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n_prompt; i++) {
            toks[b * n_prompt + i] = rand_token(n_vocab);
            sids[b * n_prompt + i] = seq[b];
        }
    int64_t t0 = coopt_time_us();
    if (n_prompt > 0) {
        struct coopt_batch_input in = {.n_tokens = (int32_t)(B * n_prompt), .tokens = toks, .seq_ids = sids};
        if (coopt_ctx_decode(c, &in) != COOPT_OK) goto out;
    }
    coopt_ctx_synchronize(c);
    int64_t t1 = coopt_time_us();
    for (int64_t b = 0; b < B; b++) toks[b] = rand_token(n_vocab), sids[b] = seq[b];
    for (int64_t g = 0; g < n_gen; g++) {
        struct coopt_batch_input in = {
            .n_tokens = (int32_t)B, .tokens = toks, .seq_ids = sids, .samplers = tg == TG_SAMPLE ? smp : NULL};
        if (coopt_ctx_decode(c, &in) != COOPT_OK) goto out;
        coopt_ctx_synchronize(c); // (as in run_once)
        for (int64_t b = 0; b < B; b++)
            toks[b] = tg == TG_SAMPLE        ? coopt_ctx_token(c, (int32_t)b)
                      : tg == TG_SAMPLE_HOST ? coopt_sampler_sample(smp[b], coopt_ctx_logits(c, (int32_t)b))
                                             : rand_token(n_vocab);
    }
    *t_prompt = (t1 - t0) / 1e6;
    *t_gen    = (coopt_time_us() - t1) / 1e6;
    rc        = 0;
out:
    for (int64_t b = 0; b < made; b++) coopt_seq_free(c, seq[b]);
    for (int64_t b = 0; smp && b < B; b++) coopt_sampler_free(smp[b]);
    free(smp);
    free(seq);
    free(toks);
    free(sids);
    return rc;
}

// Capacity mode: sequences of n tokens are prefilled one after another into one context until a
// decode fails (the KV pool cannot commit another page: out of device or host memory). Prints
// how many fit and the KV bytes they hold.
static int run_capacity(struct coopt_ctx *c, int64_t n, int32_t n_seq_max, int32_t n_vocab) {
    int32_t              *toks = malloc((size_t)n * sizeof(int32_t)), *sids = malloc((size_t)n * sizeof(int32_t));
    int32_t               fit = 0, seq;
    enum coopt_status     st  = COOPT_OK;
    struct coopt_kv_stats kvs;
    if (!toks || !sids) {
        free(toks);
        free(sids);
        fprintf(stderr, "coopt bench: out of memory\n");
        return 1;
    }
    int64_t t0 = coopt_time_us();
    for (; fit < n_seq_max; fit++) {
        if ((st = coopt_seq_new(c, &seq)) != COOPT_OK) break;
        for (int64_t i = 0; i < n; i++) {
            toks[i] = rand_token(n_vocab);
            sids[i] = seq;
        }
        struct coopt_batch_input b = {.n_tokens = (int32_t)n, .tokens = toks, .seq_ids = sids};
        if ((st = coopt_ctx_decode(c, &b)) != COOPT_OK) break;
    }
    coopt_ctx_synchronize(c);
    coopt_ctx_kv_stats(c, &kvs);
    printf("capacity: %d sequences of %lld tokens (kv %s, %.2f GiB of KV held, %llu bytes per token; stopped by: %s) "
           "in %.1f s\n",
           fit, (long long)n, coopt_dtype_name(kvs.kv_type),
           (double)fit * (double)n * (double)kvs.bytes_per_token / (1024.0 * 1024.0 * 1024.0),
           (unsigned long long)kvs.bytes_per_token, fit == n_seq_max ? "--parallel limit" : coopt_status_str(st),
           (coopt_time_us() - t0) / 1e6);
    free(toks);
    free(sids);
    return 0;
}

int cmd_bench(int argc, char **argv) {
    struct app_opts o;
    app_opts_default(&o);
    o.n_seq_max = 1;
    int64_t pp[MAX_LIST] = {512}, tg[MAX_LIST] = {128}, dp[MAX_LIST] = {0};
    int64_t bs[MAX_LIST] = {0};
    int     n_pp = 1, n_tg = 1, n_dp = 1, n_bs = 0;
    int64_t reps = 5, capacity = 0;
    bool         json = false;
    enum tg_mode tg_m = TG_DEVICE;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int         r = app_opts_parse(&o, argc, argv, &i);
        if (r < 0) return 1;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            bench_usage();
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--n-prompt")) {
            if (!(v = app_next_arg(argc, argv, &i)) || parse_list(a, v, pp, &n_pp)) return 1;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-gen")) {
            if (!(v = app_next_arg(argc, argv, &i)) || parse_list(a, v, tg, &n_tg)) return 1;
        } else if (!strcmp(a, "-d") || !strcmp(a, "--n-depth")) {
            if (!(v = app_next_arg(argc, argv, &i)) || parse_list(a, v, dp, &n_dp)) return 1;
        } else if (!strcmp(a, "-B") || !strcmp(a, "--batch-seqs")) {
            if (!(v = app_next_arg(argc, argv, &i)) || parse_list(a, v, bs, &n_bs)) return 1;
        } else if (!strcmp(a, "--capacity")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1 << 24, &capacity)) return 1;
        } else if (!strcmp(a, "-r") || !strcmp(a, "--repetitions")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1000, &reps)) return 1;
        } else if (!strcmp(a, "--tg")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            int mode = 0;
            while (mode < 4 && strcmp(v, tg_mode_names[mode])) mode++;
            if (mode == 4) {
                fprintf(stderr, "coopt bench: --tg: expected device, host, sample or sample-host\n");
                return 1;
            }
            tg_m = (enum tg_mode)mode;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            if (!strcmp(v, "json")) json = true;
            else if (strcmp(v, "md")) {
                fprintf(stderr, "coopt bench: -o: expected md or json\n");
                return 1;
            }
        } else {
            fprintf(stderr, "coopt bench: unknown option '%s'\n", a);
            bench_usage();
            return 1;
        }
    }
    if (!o.device) o.device = coopt_default_device();
    int64_t max_tokens = 0, max_pp = 0;
    for (int d = 0; d < n_dp; d++)
        for (int i = 0; i < n_pp; i++) max_tokens = MAX(max_tokens, dp[d] + pp[i]);
    for (int d = 0; d < n_dp; d++)
        for (int i = 0; i < n_tg; i++) max_tokens = MAX(max_tokens, dp[d] + tg[i]);
    for (int d = 0; d < n_dp; d++) max_pp = MAX(max_pp, MAX(dp[d], 1));
    for (int i = 0; i < n_pp; i++) max_pp = MAX(max_pp, pp[i]);
    for (int i = 0; i < n_bs; i++) {
        max_tokens  = MAX(max_tokens, pp[0] + tg[0]);
        o.n_seq_max = (int32_t)MAX(o.n_seq_max, bs[i]);
    }
    if (capacity > 0) {
        if (strcmp(o.device, "cuda")) {
            fprintf(stderr, "coopt bench: --capacity needs --device cuda (host memory is committed on first touch, "
                            "so running out would end the process instead of failing a page commit)\n");
            return 1;
        }
        max_tokens = capacity;
        if (o.n_seq_max == 1) o.n_seq_max = 512;
    }
    if (o.n_ctx == 0) o.n_ctx = (int32_t)max_tokens;
    struct coopt_model *m;
    struct coopt_ctx   *c;
    if (app_load(&o, &m, &c, (int32_t)max_tokens)) return 1;
    if (capacity > 0) {
        int rc = run_capacity(c, capacity, o.n_seq_max, coopt_model_get_info(m)->n_vocab);
        coopt_ctx_free(c);
        coopt_model_free(m);
        return rc;
    }
    const struct coopt_model_info *info = coopt_model_get_info(m);
    struct coopt_kv_stats          kvs;
    coopt_ctx_kv_stats(c, &kvs);
    int32_t *toks = malloc((size_t)max_pp * sizeof(int32_t)), *seqs = malloc((size_t)max_pp * sizeof(int32_t));
    struct coopt_sampler       *smp = NULL;
    struct coopt_sampler_params sp  = coopt_sampler_default_params();
    sp.seed                         = 1234;
    int                         rc  = 0;
    if ((tg_m == TG_SAMPLE || tg_m == TG_SAMPLE_HOST) && coopt_sampler_init(&sp, info->n_vocab, &smp) != COOPT_OK) {
        fprintf(stderr, "coopt bench: sampler init failed\n");
        rc = 1;
    }
    struct bench_result res[MAX_LIST * MAX_LIST * 2];
    int                 n_res = 0;
    int                 n_threads = coopt_ctx_n_threads(c);
    for (int d = 0; d < n_dp && !rc; d++) {
        for (int kind = 0; kind < 2 && !rc; kind++) {
            int      n_list = kind == 0 ? n_pp : n_tg;
            int64_t *list   = kind == 0 ? pp : tg;
            for (int i = 0; i < n_list && !rc; i++) {
                int64_t np = kind == 0 ? list[i] : 0, ng = kind == 1 ? list[i] : 0;
                if (np + ng == 0) continue;
                double tps[1000], sum = 0, sq = 0;
                if (run_once(c, np, ng, dp[d], info->n_vocab, toks, seqs, tg_m, smp) < 0) rc = 1; // warm-up
                for (int r = 0; r < reps && !rc; r++) {
                    double s = run_once(c, np, ng, dp[d], info->n_vocab, toks, seqs, tg_m, smp);
                    if (s <= 0) {
                        rc = 1;
                        break;
                    }
                    tps[r] = (double)(np + ng) / s;
                    sum += tps[r];
                }
                if (rc) {
                    fprintf(stderr, "coopt bench: test failed (context or KV cache too small?)\n");
                    break;
                }
                double mean = sum / (double)reps;
                for (int r = 0; r < reps; r++) sq += (tps[r] - mean) * (tps[r] - mean);
                struct bench_result *br = &res[n_res++];
                char                *name = malloc(32);
                snprintf(name, 32, "%s%lld%s%s", kind == 0 ? "pp" : "tg", (long long)(np + ng),
                         kind == 1 && tg_m != TG_DEVICE ? "-" : "", kind == 1 && tg_m != TG_DEVICE ? tg_mode_names[tg_m] : "");
                *br = (struct bench_result){.test = name, .n_prompt = np, .n_gen = ng, .depth = dp[d], .mean_tps = mean,
                                            .std_tps = reps > 1 ? sqrt(sq / (reps - 1)) : 0};
                if (kind == 1) {
                    // bytes per generated token: weights + K/V of the average context
                    double avg_ctx = (double)dp[d] + (double)(ng - 1) / 2.0 + 1;
                    double bytes   = (double)info->weight_bytes + avg_ctx * (double)kvs.bytes_per_token;
                    br->gbps       = bytes * mean / 1e9;
                }
            }
        }
    }
    for (int i = 0; i < n_bs && !rc; i++) {
        int64_t B = bs[i];
        double  sum_p = 0, sum_g = 0, tp[1000], tgv[1000], tpp, tgg;
        if (run_batched(c, B, pp[0], tg[0], info->n_vocab, tg_m, &tpp, &tgg)) rc = 1; // warm-up
        for (int r = 0; r < reps && !rc; r++) {
            if (run_batched(c, B, pp[0], tg[0], info->n_vocab, tg_m, &tpp, &tgg)) {
                rc = 1;
                break;
            }
            tp[r]  = tpp > 0 ? (double)(B * pp[0]) / tpp : 0;
            tgv[r] = tgg > 0 ? (double)(B * tg[0]) / tgg : 0;
            sum_p += tp[r];
            sum_g += tgv[r];
        }
        if (rc) {
            fprintf(stderr, "coopt bench: batched test failed (KV cache too small for B=%lld?)\n", (long long)B);
            break;
        }
        for (int kind = 0; kind < 2; kind++) {
            double *v = kind == 0 ? tp : tgv, mean = (kind == 0 ? sum_p : sum_g) / (double)reps, sq = 0;
            if ((kind == 0 ? pp[0] : tg[0]) == 0) continue;
            for (int r = 0; r < reps; r++) sq += (v[r] - mean) * (v[r] - mean);
            struct bench_result *br   = &res[n_res++];
            char                *name = malloc(48);
            snprintf(name, 48, "%s%lld x B%lld%s%s", kind == 0 ? "pp" : "tg", (long long)(kind == 0 ? pp[0] : tg[0]),
                     (long long)B, kind == 1 && (tg_m == TG_SAMPLE || tg_m == TG_SAMPLE_HOST) ? "-" : "",
                     kind == 1 && (tg_m == TG_SAMPLE || tg_m == TG_SAMPLE_HOST) ? tg_mode_names[tg_m] : "");
            *br = (struct bench_result){.test = name, .n_prompt = kind == 0 ? pp[0] : 0, .n_gen = kind == 1 ? tg[0] : 0,
                                        .depth = 0, .mean_tps = mean, .std_tps = reps > 1 ? sqrt(sq / (reps - 1)) : 0};
            if (kind == 1) {
                // one step reads the weights once and the K/V of all B sequences
                double avg_ctx = (double)pp[0] + (double)(tg[0] - 1) / 2.0 + 1;
                double bytes   = (double)info->weight_bytes + (double)B * avg_ctx * (double)kvs.bytes_per_token;
                br->gbps       = bytes * (mean / (double)B) / 1e9;
            }
        }
    }
    if (!rc) {
        double model_gib = info->weight_bytes / (1024.0 * 1024.0 * 1024.0);
        if (json) {
            printf("[\n");
            for (int i = 0; i < n_res; i++) {
                printf("  {\"model\": \"%s\", \"model_bytes\": %llu, \"params\": %llu, \"backend\": \"%s\", "
                       "\"threads\": %d, \"kv_type\": \"%s\", \"test\": \"%s\", \"n_prompt\": %lld, \"n_gen\": %lld, "
                       "\"n_depth\": %lld, \"avg_ts\": %.3f, \"stddev_ts\": %.3f, \"gbps\": %.3f}%s\n",
                       info->desc, (unsigned long long)info->weight_bytes, (unsigned long long)info->n_params, o.device,
                       n_threads, coopt_dtype_name(kvs.kv_type), res[i].test, (long long)res[i].n_prompt,
                       (long long)res[i].n_gen, (long long)res[i].depth, res[i].mean_tps, res[i].std_tps, res[i].gbps,
                       i + 1 < n_res ? "," : "");
            }
            printf("]\n");
        } else {
            printf("| model | size | params | backend | threads | kv | test | t/s | GB/s |\n");
            printf("| ----- | ---: | -----: | ------- | ------: | -- | ---: | --: | ---: |\n");
            for (int i = 0; i < n_res; i++) {
                char test[64];
                if (res[i].depth) snprintf(test, sizeof(test), "%s @ d%lld", res[i].test, (long long)res[i].depth);
                else snprintf(test, sizeof(test), "%s", res[i].test);
                char gb[32] = "";
                if (res[i].gbps > 0) snprintf(gb, sizeof(gb), "%.2f", res[i].gbps);
                printf("| %s | %.2f MiB | %.2f M | %s | %d | %s | %s | %.2f ± %.2f | %s |\n", info->desc,
                       model_gib * 1024, info->n_params / 1e6, o.device, n_threads, coopt_dtype_name(kvs.kv_type), test,
                       res[i].mean_tps, res[i].std_tps, gb);
            }
        }
    }
    for (int i = 0; i < n_res; i++) free((void *)res[i].test);
    coopt_sampler_free(smp);
    free(toks);
    free(seqs);
    coopt_ctx_free(c);
    coopt_model_free(m);
    return rc;
}
