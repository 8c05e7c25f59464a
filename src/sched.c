/*
 * sched.c -- continuous batching over one context (see the scheduler section of coopt.h).
 *
 * A request holds its whole token list (prompt + generated); n_computed of them are in its KV
 * sequence. Each step assembles one ragged batch: first one decode token per running request
 * (oldest first), preempting the newest running requests if pages run out, then prefill chunks
 * of the remaining requests in arrival order while the token budget and free pages last.
 * Preemption frees the victim's pages and resets n_computed to 0: it is recomputed later
 * (vLLM's "recompute" policy), so nothing is ever lost and nothing crashes under page pressure.
 */
#include "coopt.h"
#include "context.h"
#include "model.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

enum req_state { REQ_ACTIVE, REQ_DONE };

struct req {
    int32_t               id;
    enum req_state        state;
    int32_t              *tokens; // [cap] prompt then generated tokens
    int32_t               n_tokens, cap;
    int32_t               n_prompt, n_gen, max_new;
    int32_t               n_computed; // tokens held in the KV sequence
    int32_t               seq;        // -1 when holding no sequence
    int64_t               admit;      // admission order (preemption picks the largest)
    struct coopt_sampler *smpl;
};

struct coopt_sched {
    struct coopt_ctx         *ctx;
    struct coopt_sched_params p;
    struct req              **reqs; // [n_reqs] by id; NULL once finished and released
    int32_t                   n_reqs, cap_reqs;
    int64_t                   next_admit;
    // step staging [max_step_tokens]
    int32_t                  *b_tokens, *b_seqs;
    uint8_t                  *b_want;
    struct req              **b_req;   // request of each logits-producing token (by batch index)
    struct coopt_sampler    **b_smp;   // the sampler drawing each token's successor (NULL: none)
    struct coopt_sched_stats  stats;
};

void coopt_sched_free(struct coopt_sched *s) {
    if (!s) return;
    for (int32_t i = 0; i < s->n_reqs; i++) {
        struct req *r = s->reqs[i];
        if (!r) continue;
        if (r->seq >= 0) coopt_seq_free(s->ctx, r->seq);
        coopt_sampler_free(r->smpl);
        free(r->tokens);
        free(r);
    }
    free(s->reqs);
    free(s->b_tokens);
    free(s->b_seqs);
    free(s->b_want);
    free(s->b_req);
    free(s->b_smp);
    free(s);
}

enum coopt_status coopt_sched_init(struct coopt_ctx *c, const struct coopt_sched_params *p, struct coopt_sched **out) {
    *out = NULL;
    struct coopt_sched *s = coopt_calloc(1, sizeof(*s));
    if (!s) return COOPT_ERR_NOMEM;
    s->ctx = c;
    s->p   = *p;
    int32_t n_batch = coopt_ctx_params(c)->n_batch;
    if (s->p.max_step_tokens <= 0 || s->p.max_step_tokens > n_batch * 64) s->p.max_step_tokens = n_batch;
    if (s->p.chunk_size <= 0) s->p.chunk_size = 512;
    size_t n   = (size_t)s->p.max_step_tokens;
    s->b_tokens = coopt_malloc(n * sizeof(int32_t));
    s->b_seqs   = coopt_malloc(n * sizeof(int32_t));
    s->b_want   = coopt_malloc(n);
    s->b_req    = coopt_malloc(n * sizeof(struct req *));
    s->b_smp    = coopt_malloc(n * sizeof(struct coopt_sampler *));
    if (!s->b_tokens || !s->b_seqs || !s->b_want || !s->b_req || !s->b_smp) {
        coopt_sched_free(s);
        return COOPT_ERR_NOMEM;
    }
    *out = s;
    return COOPT_OK;
}

static enum coopt_status push_token(struct req *r, int32_t tok) {
    if (r->n_tokens == r->cap) {
        int32_t  cap = r->cap ? r->cap * 2 : 64;
        int32_t *t   = coopt_realloc(r->tokens, (size_t)cap * sizeof(int32_t));
        if (!t) return COOPT_ERR_NOMEM;
        r->tokens = t;
        r->cap    = cap;
    }
    r->tokens[r->n_tokens++] = tok;
    return COOPT_OK;
}

enum coopt_status coopt_sched_add(struct coopt_sched *s, const int32_t *prompt, int32_t n_prompt, int32_t max_new,
                                  const struct coopt_sampler_params *sp, int32_t *req_id) {
    *req_id                          = -1;
    const struct coopt_model_config *cfg = &coopt_ctx_model(s->ctx)->config;
    int32_t                          n_ctx = coopt_ctx_params(s->ctx)->n_ctx;
    if (n_prompt <= 0) return coopt_fail(COOPT_ERR_INVALID, "request has an empty prompt");
    if (n_prompt >= n_ctx)
        return coopt_fail(COOPT_ERR_CTX_FULL, "prompt has %d tokens; the context holds %d", n_prompt, n_ctx);
    for (int32_t i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= cfg->n_vocab)
            return coopt_fail(COOPT_ERR_INVALID, "prompt token %d has id %d outside [0, %d)", i, prompt[i], cfg->n_vocab);
    if (s->n_reqs == s->cap_reqs) {
        int32_t      cap = s->cap_reqs ? s->cap_reqs * 2 : 16;
        struct req **a   = coopt_realloc(s->reqs, (size_t)cap * sizeof(*a));
        if (!a) return COOPT_ERR_NOMEM;
        s->reqs     = a;
        s->cap_reqs = cap;
    }
    struct req *r = coopt_calloc(1, sizeof(*r));
    if (!r) return COOPT_ERR_NOMEM;
    r->seq                = -1;
    r->max_new            = max_new;
    r->admit              = s->next_admit++;
    enum coopt_status st  = coopt_sampler_init(sp, cfg->n_vocab, &r->smpl);
    for (int32_t i = 0; i < n_prompt && st == COOPT_OK; i++) {
        st = push_token(r, prompt[i]);
        if (st == COOPT_OK) coopt_sampler_accept(r->smpl, prompt[i]);
    }
    if (st != COOPT_OK) {
        coopt_sampler_free(r->smpl);
        free(r->tokens);
        free(r);
        return st;
    }
    r->n_prompt          = n_prompt;
    r->id                = s->n_reqs;
    s->reqs[s->n_reqs++] = r;
    *req_id              = r->id;
    return COOPT_OK;
}

static void finish(struct coopt_sched *s, struct req *r, const char *reason) {
    if (r->state == REQ_DONE) return;
    r->state = REQ_DONE;
    if (r->seq >= 0) coopt_seq_free(s->ctx, r->seq);
    r->seq = -1;
    if (s->p.on_token) s->p.on_token(s->p.ud, r->id, -1, true, reason);
    s->reqs[r->id] = NULL;
    coopt_sampler_free(r->smpl);
    free(r->tokens);
    free(r);
}

void coopt_sched_cancel(struct coopt_sched *s, int32_t req_id) {
    if (req_id < 0 || req_id >= s->n_reqs || !s->reqs[req_id]) return;
    finish(s, s->reqs[req_id], "cancelled");
}

static void preempt(struct coopt_sched *s, struct req *r) {
    coopt_seq_free(s->ctx, r->seq);
    s->stats.n_recomputed_tokens += r->n_computed;
    r->seq        = -1;
    r->n_computed = 0;
    s->stats.n_preemptions++;
}

// The running request (holding a sequence) admitted last, other than `not`; NULL if none.
static struct req *newest_running(struct coopt_sched *s, const struct req *not) {
    struct req *best = NULL;
    for (int32_t i = 0; i < s->n_reqs; i++) {
        struct req *r = s->reqs[i];
        if (r && r != not && r->seq >= 0 && (!best || r->admit > best->admit)) best = r;
    }
    return best;
}

// Largest n <= max with pages_needed(seq, n) <= free (pages_needed is monotone in n).
static int32_t fit_chunk(struct coopt_sched *s, int32_t seq, int32_t max, int64_t free_pages) {
    int32_t lo = 0, hi = max;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo + 1) / 2;
        if (coopt_ctx_pages_needed(s->ctx, seq, mid) <= free_pages) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static int cmp_admit(const void *a, const void *b) {
    const struct req *x = *(struct req *const *)a, *y = *(struct req *const *)b;
    return (x->admit > y->admit) - (x->admit < y->admit);
}

enum coopt_status coopt_sched_step(struct coopt_sched *s, int32_t *n_active) {
    *n_active = 0;
    // active requests in admission order
    struct req **order = coopt_malloc((size_t)(s->n_reqs ? s->n_reqs : 1) * sizeof(*order));
    if (!order) return COOPT_ERR_NOMEM;
    int32_t n_order = 0;
    for (int32_t i = 0; i < s->n_reqs; i++)
        if (s->reqs[i]) order[n_order++] = s->reqs[i];
    qsort(order, (size_t)n_order, sizeof(*order), cmp_admit);

    int32_t n = 0, budget = s->p.max_step_tokens;
    int64_t free_pages = coopt_ctx_pages_free(s->ctx);
    int32_t n_ctx      = coopt_ctx_params(s->ctx)->n_ctx;
    // phase 1: one decode token per running request whose prompt is computed
    for (int32_t i = 0; i < n_order && budget > 0; i++) {
        struct req *r = order[i];
        if (r->seq < 0 || r->n_tokens - r->n_computed != 1) continue;
        int64_t need = coopt_ctx_pages_needed(s->ctx, r->seq, 1);
        while (need > free_pages) {
            struct req *victim = newest_running(s, r);
            if (!victim || victim->admit < r->admit) victim = r;
            preempt(s, victim);
            free_pages = coopt_ctx_pages_free(s->ctx);
            if (victim == r) break;
            need = coopt_ctx_pages_needed(s->ctx, r->seq, 1);
        }
        if (r->seq < 0) continue; // preempted itself; it waits
        s->b_tokens[n] = r->tokens[r->n_computed];
        s->b_seqs[n]   = r->seq;
        s->b_want[n]   = 1;
        s->b_smp[n]    = r->smpl;
        s->b_req[n]    = r;
        n++;
        budget--;
        free_pages -= need;
    }
    // phase 2: prefill (or recompute) chunks in arrival order
    for (int32_t i = 0; i < n_order && budget > 0; i++) {
        struct req *r = order[i];
        int32_t     remaining = r->n_tokens - r->n_computed;
        if (r->seq >= 0 && remaining <= 1) continue; // decoding (handled above) or nothing to do
        bool fresh = false;
        if (r->seq < 0) {
            if (coopt_seq_new(s->ctx, &r->seq) != COOPT_OK) break; // all sequence slots busy
            fresh = true;
        }
        int32_t chunk = COOPT_MIN(remaining, COOPT_MIN(s->p.chunk_size, budget));
        chunk         = fit_chunk(s, r->seq, chunk, free_pages);
        if (chunk == 0) {
            if (fresh) {
                coopt_seq_free(s->ctx, r->seq);
                r->seq = -1;
            }
            break; // first come, first served: later requests wait too
        }
        free_pages -= coopt_ctx_pages_needed(s->ctx, r->seq, chunk);
        for (int32_t j = 0; j < chunk; j++) {
            s->b_tokens[n] = r->tokens[r->n_computed + j];
            s->b_seqs[n]   = r->seq;
            s->b_want[n]   = (r->n_computed + j == r->n_tokens - 1);
            s->b_smp[n]    = s->b_want[n] ? r->smpl : NULL;
            s->b_req[n]    = r;
            n++;
        }
        budget -= chunk;
    }
    enum coopt_status st = COOPT_OK;
    if (n == 0) {
        // Nothing fits although requests wait and none runs: a request needs more pages than the
        // whole pool. Fail it rather than spin forever.
        if (n_order > 0 && !newest_running(s, NULL)) finish(s, order[0], "kv");
        goto out;
    }
    // the samplers draw where the logits are (coopt_ctx_token): on a GPU only the tokens come back
    struct coopt_batch_input b = {
        .n_tokens = n, .tokens = s->b_tokens, .seq_ids = s->b_seqs, .want_logits = s->b_want, .samplers = s->b_smp};
    st                         = coopt_ctx_decode(s->ctx, &b);
    if (st != COOPT_OK) goto out;
    s->stats.n_steps++;
    for (int32_t t = 0; t < n; t++) s->b_req[t]->n_computed++;
    for (int32_t t = 0; t < n; t++) {
        if (!s->b_want[t]) continue;
        struct req *r = s->b_req[t];
        if (r->n_gen == 0 && r->n_computed == r->n_prompt) s->stats.n_prompt_tokens += r->n_prompt;
        if (r->n_computed != r->n_tokens) continue; // recompute in progress
        int32_t tok = coopt_ctx_token(s->ctx, t);
        const struct coopt_tokenizer *tk = coopt_model_tokenizer(coopt_ctx_model(s->ctx));
        if (coopt_tokenizer_is_eog(tk, tok)) {
            finish(s, r, "eos");
            continue;
        }
        coopt_sampler_accept(r->smpl, tok);
        if ((st = push_token(r, tok))) goto out;
        r->n_gen++;
        s->stats.n_gen_tokens++;
        if (s->p.on_token) s->p.on_token(s->p.ud, r->id, tok, false, NULL);
        if (r->max_new >= 0 && r->n_gen >= r->max_new) finish(s, r, "length");
        else if (r->n_tokens >= n_ctx) finish(s, r, "context");
    }
out:
    for (int32_t i = 0; i < s->n_reqs; i++) *n_active += s->reqs[i] != NULL;
    free(order);
    return st;
}

void coopt_sched_get_stats(const struct coopt_sched *s, struct coopt_sched_stats *out) { *out = s->stats; }
