/*
 * run.c -- `coopt run`: generate text from a prompt (streaming), or chat interactively (-i).
 * Prompt and generation speed go to stderr so stdout carries only text.
 */
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void run_usage(void) {
    fprintf(stderr,
            "usage: coopt run -m MODEL [-p PROMPT | -f FILE] [options]\n"
            "  -p, --prompt TEXT      prompt (default: empty, just BOS)\n"
            "  -f, --file FILE        read the prompt from a file\n"
            "  -n, --n-predict N      tokens to generate (default 256; -1 = until end of text or context)\n"
            "  -i, --interactive      chat: read turns from stdin after the prompt\n"
            "  --temp T               temperature, 0 = greedy (default 0.8)\n"
            "  --top-k N              (default 40, 0 = off)\n"
            "  --top-p P              (default 0.95, 1 = off)\n"
            "  --min-p P              (default 0.05, 0 = off)\n"
            "  --repeat-penalty F     (default 1.0 = off)\n"
            "  --repeat-last-n N      (default 64)\n"
            "  -s, --seed N           RNG seed (default: random)\n"
            "  --host-sampling        copy every token's logits to the host and sample there, instead of\n"
            "                         choosing where the logits are (the default wherever the sampler\n"
            "                         allows: no repetition penalty, top-k 1..64 or greedy; same tokens)\n"
            "  --no-bos               do not prepend BOS\n");
    app_opts_usage();
}

struct gen {
    struct coopt_ctx             *ctx;
    const struct coopt_tokenizer *tok;
    struct coopt_sampler         *smpl;
    struct coopt_detok            detok;
    int32_t                       seq;
    int64_t                       t_prompt_us, t_gen_us;
    int64_t                       n_prompt, n_gen;
    bool                          chained; // the sampler's choice is made where the logits are (coopt_ctx_generate)
};

static void emit(struct gen *g, int32_t tok, bool print) {
    char   buf[256];
    size_t n = coopt_detok_push(&g->detok, g->tok, tok, buf, sizeof(buf));
    if (print && n) {
        fwrite(buf, 1, n, stdout);
        fflush(stdout);
    }
}

// Feeds tokens (a prompt or a chat turn). Returns a status.
static enum coopt_status feed(struct gen *g, const int32_t *toks, size_t n) {
    if (n == 0) return COOPT_OK;
    int32_t *seqs = malloc(n * sizeof(int32_t));
    if (!seqs) return COOPT_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) seqs[i] = g->seq;
    struct coopt_batch_input b  = {.n_tokens = (int32_t)n, .tokens = toks, .seq_ids = seqs};
    int64_t                  t0 = coopt_time_us();
    enum coopt_status        st = coopt_ctx_decode(g->ctx, &b);
    coopt_ctx_synchronize(g->ctx); // (a GPU decode returns before it finishes)
    g->t_prompt_us += coopt_time_us() - t0;
    g->n_prompt += (int64_t)n;
    free(seqs);
    for (size_t i = 0; i < n; i++) coopt_sampler_accept(g->smpl, toks[i]);
    return st;
}

static bool gen_on_token(void *ud, int32_t tok) {
    struct gen *g = ud;
    if (coopt_tokenizer_is_eog(g->tok, tok)) return false;
    coopt_sampler_accept(g->smpl, tok);
    emit(g, tok, true);
    return true;
}

// Generates up to n_predict tokens (or until end of generation). Logits of the last fed token
// must be available as batch index last_idx.
static enum coopt_status generate(struct gen *g, int64_t n_predict, int32_t last_idx) {
    if (g->chained && n_predict != 0) {
        // The first token comes from the prompt's logits; coopt_ctx_generate feeds it and then
        // every choice (argmax or draw), which it makes on the device without waiting for the host.
        int32_t tok = coopt_sampler_sample(g->smpl, coopt_ctx_logits(g->ctx, last_idx));
        if (!gen_on_token(g, tok)) return COOPT_OK;
        const int32_t     n_max = n_predict < 0 || n_predict > INT32_MAX ? INT32_MAX : (int32_t)n_predict;
        int32_t           fed   = 0;
        int64_t           t0    = coopt_time_us();
        enum coopt_status st    = coopt_ctx_generate(g->ctx, g->seq, tok, n_max, g->smpl, gen_on_token, g, &fed);
        coopt_ctx_synchronize(g->ctx);
        g->t_gen_us += coopt_time_us() - t0;
        g->n_gen += fed;
        if (st == COOPT_ERR_CTX_FULL) {
            fprintf(stderr, "\ncoopt: context full (%d tokens), stopping\n", coopt_seq_len(g->ctx, g->seq));
            return COOPT_OK;
        }
        return st;
    }
    // A decode returns before a GPU finishes: each one is timed from its call to the moment its
    // logits are there (the next coopt_ctx_logits, or the wait after the last one).
    int64_t t0 = -1; // start of the decode whose logits have not been read yet
    for (int64_t i = 0; n_predict < 0 || i < n_predict; i++) {
        const float *logits = coopt_ctx_logits(g->ctx, last_idx);
        if (t0 >= 0) g->t_gen_us += coopt_time_us() - t0, t0 = -1;
        int32_t tok = coopt_sampler_sample(g->smpl, logits);
        if (!gen_on_token(g, tok)) break;
        struct coopt_batch_input b = {.n_tokens = 1, .tokens = &tok, .seq_ids = &g->seq};
        t0                         = coopt_time_us();
        enum coopt_status st       = coopt_ctx_decode(g->ctx, &b);
        g->n_gen++;
        if (st == COOPT_ERR_CTX_FULL) {
            fprintf(stderr, "\ncoopt: context full (%d tokens), stopping\n", coopt_seq_len(g->ctx, g->seq));
            return COOPT_OK;
        }
        if (st != COOPT_OK) return st;
        last_idx = 0;
    }
    if (t0 >= 0) {
        coopt_ctx_synchronize(g->ctx);
        g->t_gen_us += coopt_time_us() - t0;
    }
    return COOPT_OK;
}

int cmd_run(int argc, char **argv) {
    struct app_opts o;
    app_opts_default(&o);
    o.n_seq_max                   = 1;
    struct coopt_sampler_params sp = coopt_sampler_default_params();
    const char                 *prompt = NULL, *prompt_file = NULL;
    int64_t                     n_predict = 256;
    bool                        interactive = false, add_bos = true, host_sampling = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int64_t     n;
        double      f;
        int         r = app_opts_parse(&o, argc, argv, &i);
        if (r < 0) return 1;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            run_usage();
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(prompt = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(prompt_file = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, -1, INT32_MAX, &n_predict)) return 1;
        } else if (!strcmp(a, "-i") || !strcmp(a, "--interactive")) {
            interactive = true;
        } else if (!strcmp(a, "--no-bos")) {
            add_bos = false;
        } else if (!strcmp(a, "--host-sampling")) {
            host_sampling = true;
        } else if (!strcmp(a, "--temp")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_float(a, v, 0, 100, &f)) return 1;
            sp.temp = (float)f;
        } else if (!strcmp(a, "--top-k")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 0, INT32_MAX, &n)) return 1;
            sp.top_k = (int32_t)n;
        } else if (!strcmp(a, "--top-p")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_float(a, v, 0, 1, &f)) return 1;
            sp.top_p = (float)f;
        } else if (!strcmp(a, "--min-p")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_float(a, v, 0, 1, &f)) return 1;
            sp.min_p = (float)f;
        } else if (!strcmp(a, "--repeat-penalty")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_float(a, v, 0.01, 100, &f)) return 1;
            sp.repeat_penalty = (float)f;
        } else if (!strcmp(a, "--repeat-last-n")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 0, 1 << 20, &n)) return 1;
            sp.repeat_last_n = (int32_t)n;
        } else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 0, INT64_MAX, &n)) return 1;
            sp.seed = (uint64_t)n;
        } else {
            fprintf(stderr, "coopt run: unknown option '%s'\n", a);
            run_usage();
            return 1;
        }
    }
    char  *file_text = NULL;
    size_t file_len  = 0;
    if (prompt_file) {
        FILE *f = fopen(prompt_file, "rb");
        if (!f) {
            perror(prompt_file);
            return 1;
        }
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        file_text = malloc((size_t)(sz > 0 ? sz : 0) + 1);
        file_len  = file_text ? fread(file_text, 1, (size_t)(sz > 0 ? sz : 0), f) : 0;
        fclose(f);
        if (!file_text) return 1;
        file_text[file_len] = 0;
        prompt              = file_text;
    }
    if (!prompt) prompt = "";

    struct coopt_model *m;
    struct coopt_ctx   *ctx;
    if (app_load(&o, &m, &ctx, 0)) {
        free(file_text);
        return 1;
    }
    int                           rc  = 1;
    struct gen                    g   = {.ctx = ctx, .tok = coopt_model_tokenizer(m)};
    int32_t                      *ids = NULL;
    size_t                        n_ids = 0;
    enum coopt_status             st;
    const struct coopt_model_info *info = coopt_model_get_info(m);
    if ((st = coopt_sampler_init(&sp, info->n_vocab, &g.smpl))) goto done;
    g.chained = !host_sampling && coopt_sampler_chainable(g.smpl);
    if ((st = coopt_seq_new(ctx, &g.seq))) goto done;
    if ((st = coopt_tokenize(g.tok, prompt, strlen(prompt), (add_bos ? COOPT_TOKENIZE_ADD_BOS : 0) | COOPT_TOKENIZE_PARSE_SPECIAL,
                             &ids, &n_ids)))
        goto done;
    if (n_ids == 0) {
        fprintf(stderr, "coopt: the prompt is empty and the model has no BOS token\n");
        goto done;
    }
    coopt_detok_reset(&g.detok);
    for (size_t i = 0; i < n_ids; i++) emit(&g, ids[i], true);
    if ((st = feed(&g, ids, n_ids))) {
        if (st == COOPT_ERR_CTX_FULL) fprintf(stderr, "coopt: the prompt has %zu tokens, more than the context\n", n_ids);
        goto done;
    }
    if ((st = generate(&g, n_predict, (int32_t)n_ids - 1))) goto done;
    while (interactive) {
        char   *line = NULL;
        size_t  cap  = 0;
        fprintf(stdout, "\n> ");
        fflush(stdout);
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) {
            free(line);
            break;
        }
        free(ids);
        ids = NULL;
        st  = coopt_tokenize(g.tok, line, (size_t)len, COOPT_TOKENIZE_PARSE_SPECIAL, &ids, &n_ids);
        free(line);
        if (st) goto done;
        if (n_ids == 0) continue;
        for (size_t i = 0; i < n_ids; i++) emit(&g, ids[i], false);
        st = feed(&g, ids, n_ids);
        if (st == COOPT_ERR_CTX_FULL) {
            fprintf(stderr, "coopt: context full, ending the chat\n");
            break;
        }
        if (st || (st = generate(&g, n_predict, (int32_t)n_ids - 1))) goto done;
    }
    char   tail[16];
    size_t nt = coopt_detok_flush(&g.detok, tail, sizeof(tail));
    fwrite(tail, 1, nt, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    fprintf(stderr, "coopt: %s\n", info->desc);
    fprintf(stderr, "coopt: prompt: %lld tokens in %.1f ms, %.1f tok/s\n", (long long)g.n_prompt,
            g.t_prompt_us / 1e3, g.t_prompt_us ? g.n_prompt * 1e6 / g.t_prompt_us : 0.0);
    fprintf(stderr, "coopt: generation: %lld tokens in %.1f ms, %.1f tok/s\n", (long long)g.n_gen, g.t_gen_us / 1e3,
            g.t_gen_us ? g.n_gen * 1e6 / g.t_gen_us : 0.0);
    rc = 0;
done:
    if (rc && st) fprintf(stderr, "coopt: %s\n", coopt_status_str(st));
    free(ids);
    free(file_text);
    coopt_sampler_free(g.smpl);
    coopt_ctx_free(ctx);
    coopt_model_free(m);
    return rc;
}
