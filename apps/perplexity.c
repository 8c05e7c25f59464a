/*
 * perplexity.c -- `coopt perplexity`: perplexity of a text file in llama.cpp's llama-perplexity
 * conventions, and KL divergence against a saved baseline (llama.cpp's --kl-divergence).
 *
 *   - The whole file is tokenized once, with BOS if the tokenizer adds one.
 *   - It is cut into n_tokens / n_ctx non-overlapping windows of n_ctx tokens (-c, default 512);
 *     at least 2 * n_ctx tokens are required. --chunks N keeps the first N windows.
 *   - Each window runs on a fresh sequence, its first token replaced by BOS (when the tokenizer
 *     adds BOS); only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict
 *     tokens n_ctx/2+1 .. n_ctx-1 (n_ctx - 1 - n_ctx/2 tokens per window). Only those positions ask
 *     for logits. -np N puts N windows into one decode call (one sequence each).
 *   - stdout: "[1]12.3456,[2]13.0123,..." (running PPL after each window), then
 *     "Final estimate: PPL = 12.3456 +/- 0.12345", err = PPL * sqrt((E[nll^2] - E[nll]^2) / (count-1)).
 *   - --save-logits FILE writes llama.cpp's --kl-divergence-base file (see src/eval.h: uint16
 *     log-probs of every scored token, ~2 bytes x n_vocab each); --kl-divergence FILE re-runs the
 *     baseline's tokens and prints llama.cpp's per-chunk table and final statistics (PPL of both,
 *     ln ratio, PPL difference, mean/percentile KLD, Delta p, "Same top p").
 * Log-softmax is computed in double, the rows of a window on -t threads (default: every core; the
 * result does not depend on the count: each row is scored alone and the sums are taken in row
 * order). Progress goes to stderr, results to stdout.
 */
#include "common.h"
#include "cpu/threads.h"
#include "eval.h"
#include "eval_common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PPL_DEFAULT_CTX 512 // llama-perplexity's default -c

static void ppl_usage(void) {
    fprintf(stderr,
            "usage: coopt perplexity -m MODEL -f FILE [options]\n"
            "       coopt perplexity -m MODEL --kl-divergence BASE [-f FILE] [options]\n"
            "  -f, --file FILE            text to score\n"
            "  -c, --ctx-size N           window length (default %d); the second half of each window is scored\n"
            "  --chunks N                 score only the first N windows (default: all)\n"
            "  -np, --parallel N          windows per decode call (default 1)\n"
            "  --save-logits FILE         save the log-probs of every scored token as a KL-divergence baseline\n"
            "                             (llama.cpp --kl-divergence-base format; ~2 x n_vocab bytes per token)\n"
            "  --kl-divergence FILE       compare against a baseline: KLD, top-1 agreement, PPL of both\n"
            "  --kl-divergence-base FILE  llama.cpp spelling: saves FILE, or reads it with a bare --kl-divergence\n"
            "  (the scored rows' log-softmax runs on -t threads; default: every core)\n",
            PPL_DEFAULT_CTX);
    app_opts_usage();
}

struct ppl_run {
    struct coopt_ctx   *ctx;
    int32_t             n_ctx, n_vocab, bos, n_chunk, n_par;
    bool                add_bos;
    const int32_t      *tokens;
    // batch of n_par windows
    int32_t            *b_tok, *b_seq; // [n_par * n_ctx]
    uint8_t            *b_want;        // [n_par * n_ctx]
    int32_t            *seqs;          // [n_par]
    // results
    struct coopt_eval_ppl  ppl;
    struct coopt_eval_kld  kld;
    float                 *kld_values, *p_diff_values; // [n_chunk * n_scored] (KLD mode)
    struct coopt_eval_base base;
    uint16_t              *recs; // [n_scored * rec_len] one chunk of records (save / KLD modes)
    // one window's rows, scored in parallel (score_rows)
    struct coopt_threadpool     *pool;
    const int32_t               *w_src;    // the window's tokens
    const float                **w_logits; // [n_scored]
    double                      *w_nll;    // [n_scored]
    struct coopt_eval_kld_token *w_kt;     // [n_scored] (KLD mode)
    bool                   save, compare;
    bool                   created; // save_path was created by this run
};

static void print_mean_unc(const char *fmt, double sum, double sum2, int64_t count) {
    double m, u;
    coopt_eval_mean_unc(sum, sum2, count, &m, &u);
    printf(fmt, m, u);
}

// Per-chunk line of the KLD table (llama.cpp's columns).
static void kld_chunk_line(int32_t chunk, const struct coopt_eval_kld *k) {
    double lp, lp_unc, lb, lb_unc, kl, kl_unc, mse, mse_unc;
    coopt_eval_mean_unc(k->sum_nll, k->sum_nll2, k->count, &lp, &lp_unc);
    coopt_eval_mean_unc(k->sum_nll_base, k->sum_nll_base2, k->count, &lb, &lb_unc);
    coopt_eval_mean_unc(k->sum_kld, k->sum_kld2, k->count, &kl, &kl_unc);
    coopt_eval_mean_unc(k->sum_p_diff2, k->sum_p_diff4, k->count, &mse, &mse_unc);
    double cov   = coopt_eval_cov(k->sum_nll, k->sum_nll_base, k->sum_nll_nll_base, k->count);
    double r_unc = sqrt(fmax(0, lp_unc * lp_unc + lb_unc * lb_unc - 2 * cov));
    double rms   = sqrt(mse), rms_unc = rms > 0 ? 0.5 / rms * mse_unc : 0;
    double top   = (double)k->n_same_top / (double)k->count;
    printf("%4d    %9.4f ± %9.4f    %10.5f ± %10.5f    %10.5f ± %10.5f    %6.3f ± %6.3f %%    %6.3f ± %6.3f %%\n",
           chunk, exp(lp), exp(lp) * lp_unc, lp - lb, r_unc, kl, kl_unc, 100 * rms, 100 * rms_unc, 100 * top,
           100 * coopt_eval_binomial_stderr(top, k->count));
    fflush(stdout);
}

static void kld_final(struct ppl_run *r) {
    const struct coopt_eval_kld *k = &r->kld;
    size_t                       n = (size_t)k->count;
    coopt_eval_sort(r->kld_values, n);
    coopt_eval_sort(r->p_diff_values, n);
    double lp, lp_unc, lb, lb_unc;
    coopt_eval_mean_unc(k->sum_nll, k->sum_nll2, k->count, &lp, &lp_unc);
    coopt_eval_mean_unc(k->sum_nll_base, k->sum_nll_base2, k->count, &lb, &lb_unc);
    double ppl = exp(lp), ppl_unc = ppl * lp_unc, ppl_b = exp(lb), ppl_b_unc = ppl_b * lb_unc;
    double cov   = coopt_eval_cov(k->sum_nll, k->sum_nll_base, k->sum_nll_nll_base, k->count);
    double r_val = lp - lb, r_unc = sqrt(fmax(0, lp_unc * lp_unc + lb_unc * lb_unc - 2 * cov));
    double d_unc = sqrt(fmax(0, ppl_unc * ppl_unc + ppl_b_unc * ppl_b_unc - 2 * ppl * ppl_b * cov));
    printf("\n====== Perplexity statistics ======\n");
    printf("Mean PPL(Q)                   : %10.6f ± %10.6f\n", ppl, ppl_unc);
    printf("Mean PPL(base)                : %10.6f ± %10.6f\n", ppl_b, ppl_b_unc);
    if (lp_unc > 0 && lb_unc > 0) printf("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%\n", 100 * cov / (lp_unc * lb_unc));
    printf("Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f\n", r_val, r_unc);
    printf("Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f\n", exp(r_val), exp(r_val) * r_unc);
    printf("Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f\n", ppl - ppl_b, d_unc);
    printf("Relative ΔPPL                 : %10.6f ± %10.6f %%\n", 100 * (exp(r_val) - 1), 100 * exp(r_val) * r_unc);

    static const double fr[] = {0.999, 0.99, 0.95, 0.90};
    static const char  *fn[] = {"99.9%", "99.0%", "95.0%", "90.0%"};
    static const double lo[] = {0.10, 0.05, 0.01, 0.001};
    static const char  *ln[] = {"10.0%", " 5.0%", " 1.0%", " 0.1%"};
    printf("\n====== KL divergence statistics ======\n");
    print_mean_unc("Mean    KLD: %10.6f ± %10.6f\n", k->sum_kld, k->sum_kld2, k->count);
    printf("Maximum KLD: %10.6f\n", (double)r->kld_values[n - 1]);
    for (int i = 0; i < 4; i++) printf("%s   KLD: %10.6f\n", fn[i], coopt_eval_percentile(r->kld_values, n, fr[i]));
    printf("Median  KLD: %10.6f\n", coopt_eval_median(r->kld_values, n));
    for (int i = 0; i < 4; i++) printf("%s   KLD: %10.6f\n", ln[i], coopt_eval_percentile(r->kld_values, n, lo[i]));
    printf("Minimum KLD: %10.6f\n", (double)r->kld_values[0]);

    printf("\n====== Token probability statistics ======\n");
    double m, u;
    coopt_eval_mean_unc(k->sum_p_diff, k->sum_p_diff2, k->count, &m, &u);
    printf("Mean    Δp: %6.3f ± %5.3f %%\n", 100 * m, 100 * u);
    printf("Maximum Δp: %6.3f%%\n", 100.0 * r->p_diff_values[n - 1]);
    for (int i = 0; i < 4; i++)
        printf("%s   Δp: %6.3f%%\n", fn[i], 100 * coopt_eval_percentile(r->p_diff_values, n, fr[i]));
    printf("75.0%%   Δp: %6.3f%%\n", 100 * coopt_eval_percentile(r->p_diff_values, n, 0.75));
    printf("Median  Δp: %6.3f%%\n", 100 * coopt_eval_median(r->p_diff_values, n));
    printf("25.0%%   Δp: %6.3f%%\n", 100 * coopt_eval_percentile(r->p_diff_values, n, 0.25));
    for (int i = 0; i < 4; i++)
        printf("%s   Δp: %6.3f%%\n", ln[i], 100 * coopt_eval_percentile(r->p_diff_values, n, lo[i]));
    printf("Minimum Δp: %6.3f%%\n", 100.0 * r->p_diff_values[0]);
    double mse, mse_unc;
    coopt_eval_mean_unc(k->sum_p_diff2, k->sum_p_diff4, k->count, &mse, &mse_unc);
    double rms = sqrt(mse);
    printf("RMS Δp    : %6.3f ± %5.3f %%\n", 100 * rms, rms > 0 ? 100 * 0.5 / rms * mse_unc : 0.0);
    double top = (double)k->n_same_top / (double)k->count;
    printf("Same top p: %6.3f ± %5.3f %%\n", 100 * top, 100 * coopt_eval_binomial_stderr(top, k->count));
    if (k->count < 100) printf("(note: only %lld scored tokens; statistics are rough)\n", (long long)k->count);
}

// Scores windows [w0, w0 + n) in one decode call. Returns 0 or 1 after printing an error.
// Thread ith of nth scores its share of the current window's rows: row j (its logits in
// w_logits[j]) into w_nll[j] / w_kt[j], and in save mode its record; nothing shared is written.
static void score_rows(void *ud, int32_t ith, int32_t nth) {
    struct ppl_run *r = ud;
    int64_t         j0, j1;
    coopt_split_range(coopt_eval_ppl_n_scored(r->n_ctx), ith, nth, &j0, &j1);
    for (int64_t j = j0; j < j1; j++) {
        const int32_t pos    = coopt_eval_ppl_first(r->n_ctx) + (int32_t)j, target = r->w_src[pos + 1];
        const float  *logits = r->w_logits[j];
        if (r->compare) {
            coopt_eval_kld_token(logits, r->recs + (size_t)j * r->base.rec_len, r->n_vocab, target, &r->w_kt[j]);
            r->w_nll[j] = r->w_kt[j].nll;
        } else if (r->save) {
            r->w_nll[j] = coopt_eval_lp_encode(logits, r->n_vocab, target, r->recs + (size_t)j * r->base.rec_len);
        } else {
            r->w_nll[j] = coopt_eval_nll(logits, r->n_vocab, target);
        }
    }
}

static int run_windows(struct ppl_run *r, int32_t w0, int32_t n) {
    const int32_t first = coopt_eval_ppl_first(r->n_ctx), n_scored = coopt_eval_ppl_n_scored(r->n_ctx);
    int32_t      *seqs = r->seqs;
    int           rc = 0;
    int32_t       n_live = 0;
    for (int32_t w = 0; w < n; w++) {
        enum coopt_status st = coopt_seq_new(r->ctx, &seqs[w]);
        if (st != COOPT_OK) {
            fprintf(stderr, "coopt perplexity: cannot create sequence: %s\n", coopt_status_str(st));
            rc = 1;
            goto out;
        }
        n_live++;
        const int32_t *src = r->tokens + (size_t)(w0 + w) * (size_t)r->n_ctx;
        for (int32_t p = 0; p < r->n_ctx; p++) {
            size_t i     = (size_t)w * (size_t)r->n_ctx + (size_t)p;
            r->b_tok[i]  = (p == 0 && r->add_bos) ? r->bos : src[p];
            r->b_seq[i]  = seqs[w];
            r->b_want[i] = p >= first && p < r->n_ctx - 1;
        }
    }
    struct coopt_batch_input b = {
        .n_tokens = n * r->n_ctx, .tokens = r->b_tok, .seq_ids = r->b_seq, .want_logits = r->b_want};
    enum coopt_status st = coopt_ctx_decode(r->ctx, &b);
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt perplexity: decode of chunks %d-%d failed: %s%s\n", w0 + 1, w0 + n,
                coopt_status_str(st), st == COOPT_ERR_KV_FULL ? " (try a smaller -np)" : "");
        rc = 1;
        goto out;
    }
    for (int32_t w = 0; w < n; w++) {
        const int32_t *src   = r->tokens + (size_t)(w0 + w) * (size_t)r->n_ctx;
        int32_t        chunk = w0 + w;
        if (r->compare && coopt_eval_base_read_chunk(&r->base, r->recs) != COOPT_OK) {
            rc = 1;
            goto out;
        }
        // the logits first (the first call waits for the decode), then the rows in parallel, then
        // the sums in row order
        for (int32_t j = 0; j < n_scored; j++) {
            int32_t pos = first + j;
            if (!(r->w_logits[j] = coopt_ctx_logits(r->ctx, w * r->n_ctx + pos))) {
                fprintf(stderr, "coopt perplexity: no logits for chunk %d position %d\n", chunk + 1, pos);
                rc = 1;
                goto out;
            }
        }
        r->w_src = src;
        coopt_threadpool_run(r->pool, score_rows, r);
        for (int32_t j = 0; j < n_scored; j++) {
            if (r->compare) {
                size_t at            = (size_t)r->kld.count;
                r->kld_values[at]    = (float)r->w_kt[j].kld;
                r->p_diff_values[at] = (float)r->w_kt[j].p_diff;
                coopt_eval_kld_add(&r->kld, &r->w_kt[j]);
            }
            coopt_eval_ppl_add(&r->ppl, r->w_nll[j]);
        }
        if (r->save && coopt_eval_base_write_chunk(&r->base, r->recs) != COOPT_OK) {
            rc = 1;
            goto out;
        }
        if (r->compare) {
            kld_chunk_line(chunk + 1, &r->kld);
        } else {
            printf("[%d]%.4f,", chunk + 1, coopt_eval_ppl_value(&r->ppl));
            fflush(stdout);
        }
    }
out:
    for (int32_t w = 0; w < n_live; w++) coopt_seq_free(r->ctx, seqs[w]);
    return rc;
}

// Does the tokenizer prepend BOS? (llama_vocab_get_add_bos): tokenize a one-byte text with the flag.
static bool tokenizer_adds_bos(const struct coopt_tokenizer *tok) {
    int32_t bos = coopt_tokenizer_bos(tok);
    if (bos < 0) return false;
    int32_t *t = NULL;
    size_t   n = 0;
    bool     r = coopt_tokenize(tok, "\n", 1, COOPT_TOKENIZE_ADD_BOS, &t, &n) == COOPT_OK && n > 0 && t[0] == bos;
    free(t);
    return r;
}

int cmd_perplexity(int argc, char **argv) {
    struct app_opts o;
    app_opts_default(&o);
    o.n_seq_max           = 1;
    const char *file      = NULL, *save_path = NULL, *kld_path = NULL, *base_llama = NULL;
    bool        kld_flag  = false;
    int64_t     n_chunks  = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int         r = app_opts_parse(&o, argc, argv, &i);
        if (r < 0) return 1;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            ppl_usage();
            return 0;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(file = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--chunks")) {
            const char *v = app_next_arg(argc, argv, &i);
            if (!v || !app_parse_int(a, v, 1, 1 << 30, &n_chunks)) return 1;
        } else if (!strcmp(a, "--save-logits")) {
            if (!(save_path = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--kl-divergence-base")) {
            if (!(base_llama = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--kl-divergence")) {
            // "--kl-divergence FILE", or llama.cpp's bare flag next to --kl-divergence-base FILE
            if (i + 1 < argc && argv[i + 1][0] != '-') kld_path = argv[++i];
            else kld_flag = true;
        } else {
            fprintf(stderr, "coopt perplexity: unknown option '%s'\n", a);
            ppl_usage();
            return 1;
        }
    }
    if (base_llama) {
        if (kld_flag && !kld_path) kld_path = base_llama;
        else if (!save_path && !kld_path) save_path = base_llama;
        else {
            fprintf(stderr, "coopt perplexity: --kl-divergence-base conflicts with --save-logits/--kl-divergence FILE\n");
            return 1;
        }
    } else if (kld_flag && !kld_path) {
        fprintf(stderr, "coopt perplexity: --kl-divergence needs a baseline file\n");
        return 1;
    }
    if (save_path && kld_path) {
        fprintf(stderr, "coopt perplexity: --save-logits and --kl-divergence cannot be used together\n");
        return 1;
    }
    if (!file && !kld_path) {
        fprintf(stderr, "coopt perplexity: no text given (-f FILE)\n");
        ppl_usage();
        return 1;
    }
    if (o.n_ctx != 0 && o.n_ctx < 4) {
        fprintf(stderr, "coopt perplexity: -c must be at least 4\n");
        return 1;
    }

    struct ppl_run r = {.save = save_path != NULL, .compare = kld_path != NULL, .n_par = o.n_seq_max};
    int            rc = 1;
    char          *text = NULL;
    int32_t       *toks = NULL;
    size_t         n_tok = 0;
    struct coopt_model *m = NULL;
    struct coopt_ctx   *c = NULL;
    if (r.compare) {
        if (coopt_eval_base_open(kld_path, &r.base) != COOPT_OK) return 1;
        if (o.n_ctx != 0 && o.n_ctx != r.base.n_ctx) {
            fprintf(stderr, "coopt perplexity: %s was computed with -c %d, not -c %d\n", kld_path, r.base.n_ctx, o.n_ctx);
            goto out;
        }
        o.n_ctx = r.base.n_ctx;
    }
    r.n_ctx = o.n_ctx ? o.n_ctx : PPL_DEFAULT_CTX;
    o.n_ctx = r.n_ctx; // the context holds exactly one window per sequence
    if (app_load(&o, &m, &c, r.n_ctx)) goto out;
    const struct coopt_model_info *info = coopt_model_get_info(m);
    const struct coopt_tokenizer  *tok  = coopt_model_tokenizer(m);
    r.ctx     = c;
    r.n_vocab = info->n_vocab;
    r.bos     = coopt_tokenizer_bos(tok);
    r.add_bos = tokenizer_adds_bos(tok);
    if (r.n_ctx > info->n_ctx_train)
        fprintf(stderr, "coopt perplexity: warning: model was trained on only %d context tokens (%d specified)\n",
                info->n_ctx_train, r.n_ctx);
    if (r.compare && r.base.n_vocab != r.n_vocab) {
        fprintf(stderr, "coopt perplexity: %s has a vocabulary of %d tokens, the model %d: not the same tokenizer\n",
                kld_path, r.base.n_vocab, r.n_vocab);
        goto out;
    }

    if (file) {
        size_t len;
        if (!(text = eval_read_file("perplexity", file, &len))) goto out;
        int64_t           t0 = coopt_time_us();
        enum coopt_status st = coopt_tokenize(tok, text, len, COOPT_TOKENIZE_ADD_BOS, &toks, &n_tok);
        if (st != COOPT_OK) {
            fprintf(stderr, "coopt perplexity: tokenizing %s failed: %s\n", file, coopt_status_str(st));
            goto out;
        }
        fprintf(stderr, "perplexity: %s: %zu bytes -> %zu tokens in %.2f s\n", file, len, n_tok,
                (coopt_time_us() - t0) / 1e6);
    }
    if (r.compare) {
        size_t n_base = (size_t)r.base.n_chunk * (size_t)r.base.n_ctx;
        if (file) {
            if (n_tok < n_base) {
                fprintf(stderr, "coopt perplexity: %s tokenizes to %zu tokens but the baseline %s holds %zu\n", file,
                        n_tok, kld_path, n_base);
                goto out;
            }
            for (size_t i = 0; i < n_base; i++) {
                if (toks[i] != r.base.tokens[i]) {
                    fprintf(stderr,
                            "coopt perplexity: token %zu of %s is %d but %d in the baseline %s "
                            "(different text or tokenizer)\n",
                            i, file, toks[i], r.base.tokens[i], kld_path);
                    goto out;
                }
            }
        }
        r.tokens  = r.base.tokens;
        r.n_chunk = r.base.n_chunk;
        if (n_chunks > 0 && n_chunks < r.n_chunk) r.n_chunk = (int32_t)n_chunks;
    } else {
        if (n_tok < 2 * (size_t)r.n_ctx) {
            fprintf(stderr,
                    "coopt perplexity: you need at least %d tokens to evaluate perplexity with a context of %d; "
                    "%s tokenizes to only %zu tokens\n",
                    2 * r.n_ctx, r.n_ctx, file, n_tok);
            goto out;
        }
        r.tokens  = toks;
        r.n_chunk = (int32_t)(n_tok / (size_t)r.n_ctx);
        if (n_chunks > 0 && n_chunks < r.n_chunk) r.n_chunk = (int32_t)n_chunks;
    }

    const int32_t n_scored = coopt_eval_ppl_n_scored(r.n_ctx);
    if (r.save) {
        double mib = (2.0 * (double)r.n_chunk * n_scored * (double)coopt_eval_lp_record_len(r.n_vocab) +
                      4.0 * r.n_chunk * r.n_ctx) / (1024.0 * 1024.0);
        fprintf(stderr, "perplexity: saving log-probs to %s (%.1f MiB)\n", save_path, mib);
        if (coopt_eval_base_create(save_path, r.n_ctx, r.n_vocab, r.n_chunk, r.tokens, &r.base) != COOPT_OK) goto out;
        r.created = true;
    }
    if (r.save || r.compare) {
        r.recs = malloc((size_t)n_scored * r.base.rec_len * sizeof(uint16_t));
        if (!r.recs) goto nomem;
    }
    if (r.compare) {
        r.kld_values    = malloc((size_t)r.n_chunk * (size_t)n_scored * sizeof(float));
        r.p_diff_values = malloc((size_t)r.n_chunk * (size_t)n_scored * sizeof(float));
        if (!r.kld_values || !r.p_diff_values) goto nomem;
    }
    if (coopt_threadpool_init(o.n_threads, &r.pool) != COOPT_OK) goto nomem; // -t, else every core
    r.w_logits  = malloc((size_t)n_scored * sizeof(*r.w_logits));
    r.w_nll     = malloc((size_t)n_scored * sizeof(*r.w_nll));
    r.w_kt      = malloc((size_t)n_scored * sizeof(*r.w_kt));
    if (!r.w_logits || !r.w_nll || !r.w_kt) goto nomem;
    if (r.n_par > r.n_chunk) r.n_par = r.n_chunk;
    size_t nb = (size_t)r.n_par * (size_t)r.n_ctx;
    r.b_tok   = malloc(nb * sizeof(int32_t));
    r.b_seq   = malloc(nb * sizeof(int32_t));
    r.b_want  = malloc(nb);
    r.seqs    = malloc((size_t)r.n_par * sizeof(int32_t));
    if (!r.b_tok || !r.b_seq || !r.b_want || !r.seqs) goto nomem;

    struct coopt_kv_stats kv_stats;
    coopt_ctx_kv_stats(c, &kv_stats);
    fprintf(stderr,
            "perplexity: %d chunks of %d tokens, scoring the last %d of each, %d per decode call, BOS %s, kv %s%s%s\n",
            r.n_chunk, r.n_ctx, n_scored, r.n_par, r.add_bos ? "on" : "off",
            coopt_dtype_name(kv_stats.kv_type),
            r.compare ? ", baseline " : "", r.compare ? kld_path : "");
    if (r.compare)
        printf("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS  "
               "          Same top p\n");

    struct eval_progress prog;
    eval_progress_init(&prog, "perplexity", "chunks", r.n_chunk);
    for (int32_t w0 = 0; w0 < r.n_chunk; w0 += r.n_par) {
        int32_t n = r.n_chunk - w0 < r.n_par ? r.n_chunk - w0 : r.n_par;
        if (run_windows(&r, w0, n)) goto out;
        char extra[64];
        snprintf(extra, sizeof(extra), "PPL %.4f", coopt_eval_ppl_value(&r.ppl));
        eval_progress_update(&prog, w0 + n, extra);
    }
    eval_progress_end(&prog);

    if (r.compare) {
        kld_final(&r);
    } else {
        printf("\n");
        double ppl = coopt_eval_ppl_value(&r.ppl), err = coopt_eval_ppl_error(&r.ppl);
        if (err >= 0) printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl, err);
        else printf("Final estimate: PPL = %.4f (uncertainty undefined: zero variance of log(prob))\n", ppl);
    }
    if (r.save && coopt_eval_base_close(&r.base) != COOPT_OK) goto out;
    rc = 0;
    goto out;
nomem:
    fprintf(stderr, "coopt perplexity: out of memory\n");
out:
    coopt_eval_base_close(&r.base);
    if (rc && r.created) remove(save_path); // never leave a half-written baseline
    free(r.seqs);
    free(r.b_tok);
    free(r.b_seq);
    free(r.b_want);
    free(r.recs);
    coopt_threadpool_free(r.pool);
    free((void *)r.w_logits);
    free(r.w_nll);
    free(r.w_kt);
    free(r.kld_values);
    free(r.p_diff_values);
    free(toks);
    free(text);
    coopt_ctx_free(c);
    coopt_model_free(m);
    return rc;
}
