/*
 * lambada.c -- `coopt lambada`: LAMBADA last-word accuracy and target perplexity in
 * lm-evaluation-harness `lambada_openai` conventions.
 *
 *   - Input: JSON lines {"text": ...} (the OpenAI LAMBADA test set); --limit N takes the first N.
 *   - Per document (harness doc_to_text / doc_to_target): context = text before the last ' ',
 *     target = ' ' + last word. HFLM._encode_pair then moves trailing whitespace of the context
 *     onto the continuation, and tokenizes: context_enc = tok(context),
 *     continuation_enc = tok(context + continuation)[len(context_enc):]. An empty context is
 *     replaced by one prefix token (BOS, or EOS with --no-bos, as the harness's EOT prefix).
 *     Where that split leaves no continuation token (the harness asserts; it happens with
 *     tokenizers whose pieces end in the space, e.g. story-lmrs: "you,_" "Sara"), the split is
 *     made at the longest common prefix of the two encodings instead; such documents are counted.
 *   - BOS: by default both encodings start with BOS (as the model was trained, and as llama.cpp
 *     evaluates); --no-bos reproduces HFLM's default add_special_tokens=False.
 *   - The model sees (context_enc + continuation_enc)[-(n_ctx+1):][:-1]; the logits of the last
 *     len(continuation_enc) positions score the continuation. Per document: loglikelihood = sum of
 *     log-softmax of the target tokens (double), is_greedy = every target token is the argmax.
 *   - acc = mean(is_greedy), stderr sqrt(acc (1 - acc) / (n - 1)) (the harness's mean_stderr);
 *     ppl = exp(-mean over documents of loglikelihood) (the harness's "perplexity" aggregation);
 *     its uncertainty is given by the delta method (the harness bootstraps it).
 *   - -np N documents run per decode call, one sequence each (default 8); only the target
 *     positions ask for logits.
 */
#include "common.h"
#include "eval.h"
#include "eval_common.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void lambada_usage(void) {
    fprintf(stderr,
            "usage: coopt lambada -m MODEL -f lambada_test.jsonl [options]\n"
            "  -f, --file FILE        JSON lines with a \"text\" field; the last word is the target\n"
            "  --limit N              evaluate only the first N documents\n"
            "  --no-bos               no BOS before the context (lm-evaluation-harness HF default)\n"
            "  -np, --parallel N      documents per decode call (default 8)\n");
    app_opts_usage();
}

struct doc {
    char *text;
    int   line;
};

// Reads the documents; prints "FILE:LINE: ..." and returns -1 on bad input.
static int read_docs(const char *path, int64_t limit, struct doc **out, int *n_out) {
    *out   = NULL;
    *n_out = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    struct doc *docs = NULL;
    int         n = 0, cap = 0, line = 0, rc = 0;
    char       *buf = NULL;
    size_t      bcap = 0;
    ssize_t     len;
    while ((limit < 0 || n < limit) && (len = getline(&buf, &bcap, f)) >= 0) {
        line++;
        size_t k = 0;
        while (k < (size_t)len && (buf[k] == ' ' || buf[k] == '\t' || buf[k] == '\r' || buf[k] == '\n')) k++;
        if (k == (size_t)len) continue; // blank line
        cJSON *j = cJSON_ParseWithLength(buf, (size_t)len);
        if (!j) {
            fprintf(stderr, "coopt lambada: %s:%d: not valid JSON\n", path, line);
            rc = -1;
            break;
        }
        const cJSON *t = cJSON_IsObject(j) ? cJSON_GetObjectItemCaseSensitive(j, "text") : NULL;
        if (!cJSON_IsString(t) || !t->valuestring) {
            fprintf(stderr, "coopt lambada: %s:%d: expected an object with a string field \"text\"\n", path, line);
            cJSON_Delete(j);
            rc = -1;
            break;
        }
        if (n == cap) {
            cap          = cap ? cap * 2 : 1024;
            struct doc *p = realloc(docs, (size_t)cap * sizeof(*docs));
            if (!p) {
                cJSON_Delete(j);
                rc = -1;
                break;
            }
            docs = p;
        }
        docs[n].text = strdup(t->valuestring);
        docs[n].line = line;
        cJSON_Delete(j);
        if (!docs[n].text) {
            rc = -1;
            break;
        }
        n++;
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, "coopt lambada: %s: read error\n", path);
        rc = -1;
    }
    if (rc == 0 && n == 0) {
        fprintf(stderr, "coopt lambada: %s: no documents\n", path);
        rc = -1;
    }
    free(buf);
    fclose(f);
    if (rc) {
        for (int i = 0; i < n; i++) free(docs[i].text);
        free(docs);
        return -1;
    }
    *out   = docs;
    *n_out = n;
    return 0;
}

// One document's model input: inp = (context_enc + continuation_enc)[-(max_len+1):][:-1].
struct doc_input {
    int32_t *all;      // context_enc + continuation_enc (malloc'd)
    int32_t  n_all;
    int32_t  inp_off;  // inp = all[inp_off .. n_all-1)
    int32_t  n_cont;
    bool     not_prefix; // tok(context) is not a prefix of tok(context + continuation)
    bool     fallback;   // the harness split gave no continuation tokens; split at the common prefix
};

// Encodes a document as HFLM.loglikelihood does. Returns 0, or -1 after printing an error.
static int encode_doc(const struct coopt_tokenizer *tok, const struct doc *d, bool bos, int32_t max_len,
                      struct doc_input *out) {
    *out               = (struct doc_input){0};
    const char *text   = d->text;
    size_t      len    = strlen(text);
    unsigned    flags  = bos ? COOPT_TOKENIZE_ADD_BOS : 0;
    int32_t     prefix = bos && coopt_tokenizer_bos(tok) >= 0 ? coopt_tokenizer_bos(tok) : coopt_tokenizer_eos(tok);
    size_t      word_off, ctx_len = coopt_eval_lambada_split(text, len, &word_off);
    size_t      ctx_kept = word_off ? coopt_eval_rstrip_len(text, ctx_len) : 0;
    int32_t    *ctx_enc = NULL, *cont_enc = NULL, *whole = NULL;
    size_t      n_ctx = 0, n_cont = 0, n_whole = 0;
    int         rc    = -1;
    if (ctx_kept == 0) {
        // empty context: [prefix token] + tok(continuation), the continuation being ' ' + text
        // when the text has no ' ' at all, else the text itself (all of it moved by _encode_pair)
        if (prefix < 0) {
            fprintf(stderr, "coopt lambada: line %d: empty context and the tokenizer has no BOS/EOS\n", d->line);
            return -1;
        }
        char *cont = malloc(len + 2);
        if (!cont) return -1;
        size_t n_c = 0;
        if (!word_off) cont[n_c++] = ' ';
        memcpy(cont + n_c, text, len);
        n_c += len;
        enum coopt_status st = coopt_tokenize(tok, cont, n_c, 0, &cont_enc, &n_cont);
        free(cont);
        if (st != COOPT_OK) goto tok_fail;
        ctx_enc = malloc(sizeof(int32_t));
        if (!ctx_enc) goto out;
        ctx_enc[0] = prefix;
        n_ctx      = 1;
    } else {
        // context + continuation == text: _encode_pair only moves the split point
        if (coopt_tokenize(tok, text, ctx_kept, flags, &ctx_enc, &n_ctx) != COOPT_OK) goto tok_fail;
        if (coopt_tokenize(tok, text, len, flags, &whole, &n_whole) != COOPT_OK) goto tok_fail;
        size_t lcp = 0;
        while (lcp < n_ctx && lcp < n_whole && ctx_enc[lcp] == whole[lcp]) lcp++;
        out->not_prefix = lcp < n_ctx;
        if (n_whole <= n_ctx) {
            // The harness would assert here (empty continuation_enc). This happens with tokenizers
            // whose pieces carry the space at their end ("you,▁" + "Sara" vs "you" + ","): then
            // the context is whole[:lcp] and the continuation whole[lcp:] (longest common prefix).
            out->fallback = true;
            n_ctx         = lcp;
            memcpy(ctx_enc, whole, n_ctx * sizeof(int32_t));
        }
        n_cont = n_whole > n_ctx ? n_whole - n_ctx : 0;
        if (n_cont) {
            cont_enc = malloc(n_cont * sizeof(int32_t));
            if (!cont_enc) goto out;
            memcpy(cont_enc, whole + n_ctx, n_cont * sizeof(int32_t));
        }
    }
    if (n_cont == 0) {
        fprintf(stderr, "coopt lambada: line %d: the target tokenizes to no tokens\n", d->line);
        goto out;
    }
    if (n_cont > (size_t)max_len) {
        fprintf(stderr, "coopt lambada: line %d: the target (%zu tokens) is longer than the context (%d)\n", d->line,
                n_cont, max_len);
        goto out;
    }
    out->all = malloc((n_ctx + n_cont) * sizeof(int32_t));
    if (!out->all) goto out;
    memcpy(out->all, ctx_enc, n_ctx * sizeof(int32_t));
    memcpy(out->all + n_ctx, cont_enc, n_cont * sizeof(int32_t));
    out->n_all   = (int32_t)(n_ctx + n_cont);
    out->n_cont  = (int32_t)n_cont;
    out->inp_off = out->n_all - 1 > max_len ? out->n_all - 1 - max_len : 0; // left truncation
    rc           = 0;
    goto out;
tok_fail:
    fprintf(stderr, "coopt lambada: line %d: tokenization failed\n", d->line);
out:
    free(ctx_enc);
    free(cont_enc);
    free(whole);
    return rc;
}

int cmd_lambada(int argc, char **argv) {
    struct app_opts o;
    app_opts_default(&o);
    o.n_seq_max      = 8;
    const char *file = NULL;
    int64_t     limit = -1;
    bool        bos   = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int         r = app_opts_parse(&o, argc, argv, &i);
        if (r < 0) return 1;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            lambada_usage();
            return 0;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(file = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--limit")) {
            const char *v = app_next_arg(argc, argv, &i);
            if (!v || !app_parse_int(a, v, 1, INT32_MAX, &limit)) return 1;
        } else if (!strcmp(a, "--no-bos")) {
            bos = false;
        } else {
            fprintf(stderr, "coopt lambada: unknown option '%s'\n", a);
            lambada_usage();
            return 1;
        }
    }
    if (!file) {
        fprintf(stderr, "coopt lambada: no input given (-f lambada_test.jsonl)\n");
        lambada_usage();
        return 1;
    }
    struct doc *docs;
    int         n_docs;
    if (read_docs(file, limit, &docs, &n_docs)) return 1;

    int                 rc = 1;
    struct coopt_model *m  = NULL;
    struct coopt_ctx   *c  = NULL;
    int32_t            *b_tok = NULL, *b_seq = NULL, *seqs = NULL;
    uint8_t            *b_want = NULL;
    struct doc_input   *in     = NULL;
    if (app_load(&o, &m, &c, 0)) goto out;
    const struct coopt_model_info *info    = coopt_model_get_info(m);
    const struct coopt_tokenizer  *tok     = coopt_model_tokenizer(m);
    int32_t                        max_len = o.n_ctx > 0 ? o.n_ctx : info->n_ctx_train;
    int32_t                        n_par   = o.n_seq_max < n_docs ? o.n_seq_max : n_docs;
    size_t                         nb      = (size_t)n_par * (size_t)max_len;
    b_tok                                  = malloc(nb * sizeof(int32_t));
    b_seq                                  = malloc(nb * sizeof(int32_t));
    b_want                                 = malloc(nb);
    seqs                                   = malloc((size_t)n_par * sizeof(int32_t));
    in                                     = calloc((size_t)n_par, sizeof(*in));
    if (!b_tok || !b_seq || !b_want || !seqs || !in) {
        fprintf(stderr, "coopt lambada: out of memory\n");
        goto out;
    }
    fprintf(stderr, "lambada: %d documents from %s, context %d, BOS %s, %d per decode call\n", n_docs, file, max_len,
            bos ? "on" : "off", n_par);

    int64_t              n_correct = 0, n_target_tokens = 0, n_not_prefix = 0, n_fallback = 0;
    double               sum_ll = 0, sum_ll2 = 0;
    struct eval_progress prog;
    eval_progress_init(&prog, "lambada", "docs", n_docs);
    for (int d0 = 0; d0 < n_docs; d0 += n_par) {
        int     n = n_docs - d0 < n_par ? n_docs - d0 : n_par, n_live = 0;
        int32_t nt = 0;
        bool    ok = true;
        for (int j = 0; j < n && ok; j++) {
            if (encode_doc(tok, &docs[d0 + j], bos, max_len, &in[j])) {
                ok = false;
                break;
            }
            enum coopt_status st = coopt_seq_new(c, &seqs[j]);
            if (st != COOPT_OK) {
                fprintf(stderr, "coopt lambada: cannot create sequence: %s\n", coopt_status_str(st));
                ok = false;
                break;
            }
            n_live++;
            int32_t n_inp = in[j].n_all - 1 - in[j].inp_off, first_scored = n_inp - in[j].n_cont;
            for (int32_t p = 0; p < n_inp; p++, nt++) {
                b_tok[nt]  = in[j].all[in[j].inp_off + p];
                b_seq[nt]  = seqs[j];
                b_want[nt] = p >= first_scored;
            }
        }
        if (ok) {
            struct coopt_batch_input b  = {.n_tokens = nt, .tokens = b_tok, .seq_ids = b_seq, .want_logits = b_want};
            enum coopt_status        st = coopt_ctx_decode(c, &b);
            if (st != COOPT_OK) {
                fprintf(stderr, "coopt lambada: decode of documents %d-%d failed: %s%s\n", d0 + 1, d0 + n,
                        coopt_status_str(st), st == COOPT_ERR_KV_FULL ? " (try a smaller -np)" : "");
                ok = false;
            }
        }
        int32_t off = 0;
        for (int j = 0; j < n && ok; j++) {
            int32_t n_inp = in[j].n_all - 1 - in[j].inp_off;
            double  ll    = 0;
            bool    greedy = true;
            for (int32_t k = 0; k < in[j].n_cont; k++) {
                const float *logits = coopt_ctx_logits(c, off + n_inp - in[j].n_cont + k);
                int32_t      target = in[j].all[in[j].n_all - in[j].n_cont + k], am;
                if (!logits) {
                    fprintf(stderr, "coopt lambada: no logits for document %d\n", d0 + j + 1);
                    ok = false;
                    break;
                }
                ll -= coopt_eval_logsumexp(logits, info->n_vocab, &am) - (double)logits[target];
                greedy = greedy && am == target;
            }
            off += n_inp;
            n_correct += greedy;
            n_not_prefix += in[j].not_prefix;
            n_fallback += in[j].fallback;
            n_target_tokens += in[j].n_cont;
            sum_ll += ll;
            sum_ll2 += ll * ll;
        }
        for (int j = 0; j < n_live; j++) coopt_seq_free(c, seqs[j]);
        for (int j = 0; j < n; j++) {
            free(in[j].all);
            in[j].all = NULL;
        }
        if (!ok) goto out;
        char extra[64];
        snprintf(extra, sizeof(extra), "acc %.4f", (double)n_correct / (double)(d0 + n));
        eval_progress_update(&prog, d0 + n, extra);
    }
    eval_progress_end(&prog);

    double acc = (double)n_correct / n_docs, mean_ll = sum_ll / n_docs, ppl = exp(-mean_ll);
    double var_ll = n_docs > 1 ? (sum_ll2 - sum_ll * mean_ll) / (n_docs - 1) : 0;
    printf("acc = %.4f ± %.4f, ppl = %.2f\n", acc, coopt_eval_binomial_stderr(acc, n_docs), ppl);
    printf("lambada_openai: %d documents, %lld correct, %lld target tokens, ppl = %.4f ± %.4f (delta method), BOS %s\n",
           n_docs, (long long)n_correct, (long long)n_target_tokens, ppl,
           var_ll > 0 ? ppl * sqrt(var_ll / n_docs) : 0.0, bos ? "on" : "off");
    if (n_not_prefix)
        printf("note: for %lld documents tok(context) is not a prefix of tok(context + target) (harness split kept "
               "for %lld, common-prefix split for %lld whose harness split was empty)\n",
               (long long)n_not_prefix, (long long)(n_not_prefix - n_fallback), (long long)n_fallback);
    rc = 0;
out:
    free(b_tok);
    free(b_seq);
    free(b_want);
    free(seqs);
    free(in);
    for (int i = 0; i < n_docs; i++) free(docs[i].text);
    free(docs);
    coopt_ctx_free(c);
    coopt_model_free(m);
    return rc;
}
