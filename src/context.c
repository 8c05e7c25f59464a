/*
 * context.c -- a context: the backend, the paged KV cache, the live sequences, and the batch
 * driver that turns a user batch (struct coopt_batch_input) into forward steps.
 *
 * coopt_ctx_decode() is all-or-nothing with respect to the KV cache: it checks ids, context
 * length and the page budget for the whole batch first, reserves every page, and only then runs
 * the forward steps (batches longer than n_batch are split into steps of n_batch tokens: chunked
 * prefill). Sliding-window models release pages that fell out of the window afterwards.
 * On backends with fences (CUDA) the steps are only enqueued: the decode returns while the device
 * runs them, and coopt_ctx_logits / coopt_ctx_synchronize wait (run_step says what may run ahead).
 */
#include "backend.h"
#include "context.h"
#include "coopt.h"
#include "dtype.h"
#include "forward.h"
#include "kv_cache.h"
#include "model.h"
#include "pick.h"
#include "sampler.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

struct coopt_ctx {
    struct coopt_model      *model;
    struct coopt_model      *dev_model; // weights readable by the backend (== model on the CPU)
    struct coopt_ctx_params  params;
    struct coopt_backend    *be;
    struct coopt_kv_cache   *kv;
    size_t                   pool_bytes;
    float                   *inv_freq; // [head_dim/2] host
    struct coopt_rope        rope;
    struct coopt_scratch     scratch;
    struct coopt_forward_hook hook; // fn NULL = none
    int32_t                  max_blocks;
    // One step's batch arrays, packed into one block (struct step_layout) so they go up in one
    // copy: h_step in host memory (page-locked where the backend offers it), d_step its backend
    // copy. Offsets depend only on the step's token count, so a recorded step (CUDA graph) finds
    // its arrays at the same addresses whenever the count repeats.
    // Two host blocks, used in turn: the host fills one for step k+1 while the copy from the other
    // (step k's) may still be queued behind the device's work; h_fence[i] is the backend fence
    // after the last step that read h_step[i] (see run_step).
    uint8_t *h_step[2], *d_step;
    size_t   step_bytes;
    bool     h_step_backend[2]; // h_step[i] came from be->ops->host_alloc
    uint64_t h_fence[2];
    int      h_cur;
    // Work enqueued and not yet waited for (the last decode's steps and logits copy): the
    // backend may still be running it; coopt_ctx_synchronize waits.
    bool     pending;
    uint8_t *d_pick;     // sampled coopt_ctx_generate: the sample op's state (pick.h), at 64 its scratch
    float   *d_k_offset; // K smoothing offsets of FP8 caches (kv_cache.h), NULL otherwise
    size_t   k_offset_seq_bytes; // bytes of one sequence's offsets
    // per-sequence bookkeeping [n_seq_max]
    int32_t *seq_add;      // tokens of the current batch per sequence
    int32_t *seq_bidx;     // index of the sequence in the current step, -1 if absent
    int32_t *seq_step_cnt; // tokens of the sequence in the current step
    // results of the last decode
    float   *logits;       // [n_logits_cap][n_vocab] host
    int64_t  n_logits_cap;
    bool     logits_backend; // logits came from be->ops->host_alloc (see ensure_result_capacity)
    int32_t *logit_row;    // [n_index_cap] row in logits per batch token, -1 = none
    int64_t  n_index_cap;
    // Tokens drawn by the batch's samplers (coopt_batch_input.samplers, coopt_ctx_token): per
    // batch token its sampler until the token is read (NULL: none, or read), whether the sample
    // op draws it (else the host, from its logits), and its logits row until read, then the
    // token (-1: none). The op's results, PICK_RESULT_BYTES per logits row, go to tok_res (host;
    // page-locked where the backend has host_alloc, else no draw is made there); its scratch for
    // n_batch rows and its n_batch tokens are d_rows (backend memory, allocated on first use).
    struct coopt_sampler **tok_smp; // [n_index_cap]
    int32_t               *tok_val; // [n_index_cap]
    uint8_t               *tok_dev; // [n_index_cap]
    uint8_t               *tok_res; // [n_res_cap][PICK_RESULT_BYTES]
    int64_t                n_res_cap;
    bool                   tok_res_backend;
    uint8_t               *d_rows;
};

struct coopt_ctx_params coopt_ctx_default_params(void) {
    return (struct coopt_ctx_params){
        .n_ctx = 0, .n_seq_max = 16, .n_batch = 512, .page_size = 16, .n_pages = 0,
        .kv_type = COOPT_DTYPE_COUNT, .n_threads = 0,
    };
}

// Where the arrays of a step of n tokens live inside h_step / d_step: the tokens first (a
// chained step, coopt_ctx_generate, finds its token already on the device and uploads from
// `slots` on), the other per-token arrays, then the per-sequence arrays sized for min(n,
// n_seq_max) sequences, the block tables last so one copy of [0, block_tables + n_seqs *
// max_blocks) carries everything the step uses. A host block has STEP_RESULT_BYTES more after
// `end` (at the largest n): where the token of a chained step comes back.
struct step_layout {
    size_t tokens, slots, pos, tok_seq, out_rows, seq_lens, seq_ids, picks, block_tables, end;
};

#define STEP_RESULT_BYTES 64
_Static_assert(STEP_RESULT_BYTES >= PICK_RESULT_BYTES, "the result area holds a sample op's result");
#define PICK_STATE_BYTES 64 // d_pick: the state, then the scratch
_Static_assert(sizeof(struct pick_state) <= PICK_STATE_BYTES && sizeof(struct pick_state) % 8 == 0,
               "the pick state fits before the scratch; an array of them keeps 8-byte alignment");

static struct step_layout step_layout_make(int32_t n, int32_t n_seq_max, int32_t max_blocks) {
    struct step_layout L;
    size_t             nt = (size_t)n, ns = (size_t)COOPT_MIN(n, n_seq_max);
    L.tokens       = 0;
    L.slots        = (nt * sizeof(int32_t) + 7) & ~(size_t)7; // int64_t: 8-byte aligned
    L.pos          = L.slots + nt * sizeof(int64_t);
    L.tok_seq      = L.pos + nt * sizeof(int32_t);
    L.out_rows     = L.tok_seq + nt * sizeof(int32_t);
    L.seq_lens     = L.out_rows + nt * sizeof(int32_t);
    L.seq_ids      = L.seq_lens + ns * sizeof(int32_t);
    L.picks        = (L.seq_ids + ns * sizeof(int32_t) + 7) & ~(size_t)7; // [n] struct pick_state
    L.block_tables = L.picks + nt * sizeof(struct pick_state);
    L.end          = L.block_tables + ns * (size_t)max_blocks * sizeof(int32_t);
    return L;
}

static void on_page_free(void *ud, int32_t page) {
    struct coopt_ctx *c = ud;
    c->be->ops->kv_pool_release(c->be, c->kv->pool, (size_t)page * c->kv->layout.page_bytes, c->kv->layout.page_bytes);
}

// Host memory that copies to and from the backend use: page-locked where the backend offers it
// (host_alloc; *locked tells) and `lock` asks for it, else malloc'ed. NULL when out of memory.
static void *host_buf_alloc(struct coopt_backend *be, size_t n, bool lock, bool *locked) {
    void *p = NULL;
    *locked = lock && be->ops->host_alloc && be->ops->host_free && be->ops->host_alloc(be, n, &p) == COOPT_OK;
    return *locked ? p : coopt_malloc(n);
}

static void host_buf_free(struct coopt_backend *be, void *p, bool locked) {
    if (locked) be->ops->host_free(be, p);
    else free(p);
}

// Copy-on-write of a shared page (coopt_kv_seq_reserve). Where the backend commits pool memory
// explicitly the new page is committed first, so running out of device memory is a status.
static enum coopt_status copy_page(void *ud, int32_t dst, int32_t src) {
    struct coopt_ctx *c  = ud;
    size_t            pb = c->kv->layout.page_bytes;
    if (c->be->ops->kv_pool_commit) {
        enum coopt_status st = c->be->ops->kv_pool_commit(c->be, c->kv->pool, (size_t)dst * pb, pb);
        if (st != COOPT_OK) return st;
    }
    c->be->ops->kv_page_copy(c->be, c->kv->pool, pb, dst, src);
    return COOPT_OK;
}

void coopt_ctx_free(struct coopt_ctx *c) {
    if (!c) return;
    struct coopt_backend *be = c->be;
    if (be) {
        be->ops->sync(be); // the last decode may still be running
        coopt_scratch_free(be, &c->scratch);
        be->ops->free(be, c->d_step);
        be->ops->free(be, c->d_k_offset);
        be->ops->free(be, c->d_pick);
        be->ops->free(be, c->d_rows);
        host_buf_free(be, c->tok_res, c->tok_res_backend), c->tok_res = NULL;
        for (int i = 0; i < 2; i++) host_buf_free(be, c->h_step[i], c->h_step_backend[i]);
        host_buf_free(be, c->logits, c->logits_backend), c->logits = NULL;
        if (c->kv && c->kv->pool) be->ops->kv_pool_free(be, c->kv->pool, c->pool_bytes);
        if (c->dev_model && c->dev_model != c->model && be->ops->model_release) be->ops->model_release(be, c->dev_model);
    }
    if (c->kv) c->kv->pool = NULL;
    coopt_kv_cache_free(c->kv);
    coopt_backend_free(be);
    void *h[] = {c->inv_freq, c->seq_add, c->seq_bidx, c->seq_step_cnt, c->logits, c->logit_row, c->tok_smp, c->tok_val,
                 c->tok_dev};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(h); i++) free(h[i]);
    free(c);
}

enum coopt_status coopt_ctx_init(struct coopt_model *m, const struct coopt_ctx_params *params, struct coopt_ctx **out) {
    *out = NULL;
    if (!m) return coopt_fail(COOPT_ERR_INVALID, "coopt_ctx_init: no model");
    struct coopt_ctx *c = coopt_calloc(1, sizeof(*c));
    if (!c) return COOPT_ERR_NOMEM;
    const struct coopt_model_config *cfg = &m->config;
    struct coopt_ctx_params           p   = params ? *params : coopt_ctx_default_params();
    struct coopt_ctx_params           def = coopt_ctx_default_params();
    if (p.n_ctx <= 0) p.n_ctx = cfg->n_ctx_train;
    if (p.n_seq_max <= 0) p.n_seq_max = def.n_seq_max;
    if (p.n_batch <= 0) p.n_batch = def.n_batch;
    if (p.page_size <= 0) p.page_size = def.page_size;
    if (p.n_threads <= 0) p.n_threads = m->info.weight_bytes < ((uint64_t)16 << 20) ? 1 : coopt_n_cores();
    // auto KV type: FP8 E4M3 costs <= 0.08 % PPL at head dims 16 and 64 on our test models but
    // 0.5 % at head dim 8 (stories260K), where F16 is exact to 0.01 %.
    if (p.kv_type == COOPT_DTYPE_COUNT) p.kv_type = cfg->head_dim >= 16 ? COOPT_DTYPE_FP8_E4M3 : COOPT_DTYPE_F16;
    enum coopt_status st = COOPT_OK;
    if (p.n_ctx > (1 << 24) || p.n_seq_max > 4096 || p.n_batch > (1 << 20) || p.page_size > 4096) {
        st = coopt_fail(COOPT_ERR_INVALID, "context parameters out of range (n_ctx %d, n_seq_max %d, n_batch %d, page %d)",
                        p.n_ctx, p.n_seq_max, p.n_batch, p.page_size);
        goto fail;
    }
    c->model      = m;
    c->max_blocks = (p.n_ctx + p.page_size - 1) / p.page_size;
    if (p.n_pages <= 0) p.n_pages = (int64_t)c->max_blocks * p.n_seq_max;
    c->params = p;

    const char *device = m->params.device ? m->params.device : "cpu";
    if ((st = coopt_backend_init(device, p.n_threads, &c->be))) goto fail;
    c->be->attn_partition = p.attn_partition < 0 ? 0 : (p.attn_partition == 0 ? 512 : p.attn_partition);
    c->be->attn_per_head  = p.attn_per_head;
    c->dev_model = m;
    if (c->be->ops->model_upload && (st = c->be->ops->model_upload(c->be, m, &c->dev_model))) {
        c->dev_model = NULL;
        goto fail;
    }

    struct coopt_kv_layout layout;
    if ((st = coopt_kv_layout_init(&layout, p.kv_type, cfg->n_layers, cfg->n_kv_heads, cfg->head_dim, p.page_size)))
        goto fail;
    if (p.kv_scale_search == 1) layout.scale_search = 1;
    else if (p.kv_scale_search != 0 && p.kv_scale_search != COOPT_KV_SCALE_SEARCH) {
        st = coopt_fail(COOPT_ERR_INVALID, "kv_scale_search must be 1 or %d", COOPT_KV_SCALE_SEARCH);
        goto fail;
    }
    if ((st = coopt_kv_cache_init(&layout, p.n_pages, p.n_seq_max, c->max_blocks, &c->kv))) goto fail;
    if (!coopt_mul_ok((size_t)p.n_pages, layout.page_bytes, &c->pool_bytes)) {
        st = coopt_fail(COOPT_ERR_NOMEM, "KV pool size overflows");
        goto fail;
    }
    void *pool = NULL;
    if ((st = c->be->ops->kv_pool_init(c->be, c->pool_bytes, &pool))) goto fail;
    c->kv->pool            = pool;
    c->kv->on_page_free    = on_page_free;
    c->kv->on_page_free_ud = c;

    c->inv_freq = coopt_malloc((size_t)cfg->head_dim / 2 * sizeof(float));
    if (!c->inv_freq) goto nomem;
    coopt_rope_init(cfg, c->inv_freq);
    c->rope = (struct coopt_rope){.layout = cfg->rope_layout, .head_dim = cfg->head_dim, .inv_freq = c->inv_freq};

    int32_t nb = p.n_batch;
    c->seq_add        = coopt_calloc((size_t)p.n_seq_max, sizeof(int32_t));
    c->seq_bidx       = coopt_malloc((size_t)p.n_seq_max * sizeof(int32_t));
    c->seq_step_cnt   = coopt_calloc((size_t)p.n_seq_max, sizeof(int32_t));
    if (!c->seq_add || !c->seq_bidx || !c->seq_step_cnt) goto nomem;
    for (int32_t i = 0; i < p.n_seq_max; i++) c->seq_bidx[i] = -1;
    struct coopt_backend *be = c->be;
    // rounded up: the result area after it is 8-byte aligned (the sample op stores 64-bit words there)
    c->step_bytes = (step_layout_make(nb, p.n_seq_max, c->max_blocks).end + 7) & ~(size_t)7;
    for (int i = 0; i < 2; i++) {
        size_t hb = c->step_bytes + STEP_RESULT_BYTES;
        if (!(c->h_step[i] = host_buf_alloc(be, hb, true, &c->h_step_backend[i]))) goto nomem;
        memset(c->h_step[i], 0, hb); // gaps of a packed step are copied too: keep them defined
    }
    if ((st = be->ops->alloc(be, c->step_bytes, (void **)&c->d_step))) goto fail;
    if ((st = be->ops->alloc(be, PICK_STATE_BYTES + pick_scratch_bytes(cfg->n_vocab), (void **)&c->d_pick))) goto fail;
    {
        static const uint8_t zeros[PICK_STATE_BYTES + PICK_CANDS_OFF]; // the state and the segment counter
        be->ops->upload(be, c->d_pick, zeros, sizeof(zeros));
    }
    if (layout.has_scales) { // K smoothing for FP8 caches (kv_cache.h)
        c->k_offset_seq_bytes = (size_t)cfg->n_layers * (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim * sizeof(float);
        size_t bytes          = c->k_offset_seq_bytes * (size_t)p.n_seq_max;
        if ((st = be->ops->alloc(be, bytes, (void **)&c->d_k_offset))) goto fail;
        float *zeros = coopt_calloc(1, bytes);
        if (!zeros) goto nomem;
        be->ops->upload(be, c->d_k_offset, zeros, bytes);
        be->ops->sync(be);
        free(zeros);
        c->kv->k_offset = c->d_k_offset;
    }
    if ((st = coopt_scratch_init(be, cfg, nb, &c->scratch))) goto fail;
    *out = c;
    return COOPT_OK;
nomem:
    st = COOPT_ERR_NOMEM;
fail:
    coopt_ctx_free(c);
    return st;
}

enum coopt_status coopt_seq_new(struct coopt_ctx *c, int32_t *seq_id) {
    *seq_id = -1;
    for (int32_t s = 0; s < c->params.n_seq_max; s++) {
        if (!c->kv->seqs[s].live) {
            enum coopt_status st = coopt_kv_seq_init(c->kv, s);
            if (st == COOPT_OK) *seq_id = s;
            return st;
        }
    }
    return coopt_fail(COOPT_ERR_INVALID, "all %d sequences are in use (raise n_seq_max)", c->params.n_seq_max);
}

enum coopt_status coopt_seq_fork(struct coopt_ctx *c, int32_t src, int32_t *seq_id) {
    *seq_id = -1;
    if (src < 0 || src >= c->params.n_seq_max || !c->kv->seqs[src].live)
        return coopt_fail(COOPT_ERR_INVALID, "fork: unknown sequence %d", src);
    for (int32_t s = 0; s < c->params.n_seq_max; s++) {
        if (!c->kv->seqs[s].live) {
            enum coopt_status st = coopt_kv_seq_fork(c->kv, src, s);
            if (st == COOPT_OK && c->d_k_offset) { // the shared pages were quantized with src's K offsets
                float *tmp = coopt_malloc(c->k_offset_seq_bytes);
                if (!tmp) {
                    coopt_kv_seq_free(c->kv, s);
                    return COOPT_ERR_NOMEM;
                }
                size_t per = c->k_offset_seq_bytes / sizeof(float);
                c->be->ops->download(c->be, tmp, c->d_k_offset + (size_t)src * per, c->k_offset_seq_bytes);
                c->be->ops->sync(c->be);
                c->be->ops->upload(c->be, c->d_k_offset + (size_t)s * per, tmp, c->k_offset_seq_bytes);
                c->be->ops->sync(c->be);
                free(tmp);
            }
            if (st == COOPT_OK) *seq_id = s;
            return st;
        }
    }
    return coopt_fail(COOPT_ERR_INVALID, "all %d sequences are in use (raise n_seq_max)", c->params.n_seq_max);
}

void coopt_seq_free(struct coopt_ctx *c, int32_t seq_id) {
    if (seq_id < 0 || seq_id >= c->params.n_seq_max) return;
    coopt_kv_seq_free(c->kv, seq_id);
}

int32_t coopt_seq_len(const struct coopt_ctx *c, int32_t seq_id) {
    if (seq_id < 0 || seq_id >= c->params.n_seq_max || !c->kv->seqs[seq_id].live) return -1;
    return (int32_t)c->kv->seqs[seq_id].n_tokens;
}

void coopt_ctx_kv_stats(const struct coopt_ctx *c, struct coopt_kv_stats *out) {
    const struct coopt_kv_layout *l = &c->kv->layout;
    out->n_pages         = c->kv->n_pages;
    out->n_pages_used    = coopt_kv_pages_used(c->kv);
    out->page_size       = l->page_size;
    out->page_bytes      = l->page_bytes;
    out->bytes_per_token = l->page_bytes / (size_t)l->page_size;
    out->kv_type         = l->dtype;
}

int32_t coopt_ctx_n_threads(const struct coopt_ctx *c) { return c->be->n_threads; }
struct coopt_backend *coopt_ctx_backend(const struct coopt_ctx *c) { return c->be; }

void coopt_ctx_synchronize(struct coopt_ctx *c) {
    if (!c->pending) return;
    c->be->ops->sync(c->be);
    c->pending = false;
}

const float *coopt_ctx_logits(struct coopt_ctx *c, int32_t i) {
    if (i < 0 || i >= c->n_index_cap || c->logit_row[i] < 0) return NULL;
    coopt_ctx_synchronize(c);
    return c->logits + (size_t)c->logit_row[i] * (size_t)c->model->config.n_vocab;
}

int32_t coopt_ctx_token(struct coopt_ctx *c, int32_t i) {
    if (i < 0 || i >= c->n_index_cap) return -1;
    struct coopt_sampler *s = c->tok_smp[i];
    if (!s) return c->tok_val[i]; // read already, or none
    int32_t t = -1;
    if (c->tok_dev[i]) {
        coopt_ctx_synchronize(c);
        const uint8_t *r = c->tok_res + (size_t)c->tok_val[i] * PICK_RESULT_BYTES;
        uint64_t       rng[4];
        memcpy(&t, r, sizeof(t));
        memcpy(rng, r + 8, sizeof(rng));
        coopt_sampler_set_rng(s, rng);
    } else {
        const float *l = coopt_ctx_logits(c, i);
        if (l) t = coopt_sampler_sample(s, l);
    }
    c->tok_smp[i] = NULL, c->tok_val[i] = t;
    return t;
}

// Logits buffers up to this size are page-locked where the backend offers it (host_alloc): the
// copy from the device is then a direct DMA instead of one staged through the driver's buffer
// (on the H100 the GPU's idle time between replayed decode steps was 94-104 us for llama3-8b's
// 128256 logits against 60-64 us for llama2-7b's 32000, ~10 GB/s for the difference; see
// COOPT_CUDA_STEP_STATS in step.cu). Larger ones (prompts scored token by token) stay pageable:
// locking gigabytes costs more than it saves.
#define LOGITS_PIN_MAX ((size_t)64 << 20)

// Grows the per-decode result buffers (outside the forward path). The old logits are not kept:
// the decode that grows them overwrites them.
static enum coopt_status ensure_result_capacity(struct coopt_ctx *c, int64_t n_tokens, int64_t n_want) {
    if (n_tokens > c->n_index_cap) {
        int32_t               *p = coopt_realloc(c->logit_row, (size_t)n_tokens * sizeof(int32_t));
        if (p) c->logit_row = p;
        struct coopt_sampler **s = p ? coopt_realloc(c->tok_smp, (size_t)n_tokens * sizeof(*s)) : NULL;
        if (s) c->tok_smp = s;
        int32_t *v = s ? coopt_realloc(c->tok_val, (size_t)n_tokens * sizeof(int32_t)) : NULL;
        if (v) c->tok_val = v;
        uint8_t *d = v ? coopt_realloc(c->tok_dev, (size_t)n_tokens) : NULL;
        if (!d) return COOPT_ERR_NOMEM; // (the arrays grown so far stay: n_index_cap is the smallest)
        c->tok_dev     = d;
        c->n_index_cap = n_tokens;
    }
    if (n_want > c->n_logits_cap) {
        const size_t bytes  = (size_t)n_want * (size_t)c->model->config.n_vocab * sizeof(float);
        bool         locked = false;
        float       *p      = host_buf_alloc(c->be, bytes, bytes <= LOGITS_PIN_MAX, &locked);
        if (!p) return COOPT_ERR_NOMEM;
        coopt_ctx_synchronize(c); // the last decode's copy may still be writing the old buffer
        host_buf_free(c->be, c->logits, c->logits_backend);
        c->logits         = p;
        c->logits_backend = locked;
        c->n_logits_cap   = n_want;
    }
    return COOPT_OK;
}

// Room for the sample op's results of n_want logits rows (page-locked where the backend has
// host_alloc: the op writes them over the bus) and, on first use, its scratch and tokens for
// n_batch rows. Returns false when the op cannot draw for this context (no page-locked memory
// on such a backend): the host then draws from the logits. NOMEM in *st when memory ran out.
static bool ensure_token_results(struct coopt_ctx *c, int64_t n_want, enum coopt_status *st) {
    struct coopt_backend *be = c->be;
    *st                      = COOPT_OK;
    if (n_want > c->n_res_cap) {
        bool     locked = false;
        uint8_t *p      = host_buf_alloc(be, (size_t)n_want * PICK_RESULT_BYTES, true, &locked);
        if (!p) {
            *st = COOPT_ERR_NOMEM;
            return false;
        }
        coopt_ctx_synchronize(c); // the last decode's op may still be writing the old buffer
        host_buf_free(be, c->tok_res, c->tok_res_backend);
        c->tok_res = p, c->tok_res_backend = locked, c->n_res_cap = n_want;
    }
    if (be->ops->host_alloc && !c->tok_res_backend) return false;
    if (!c->d_rows) {
        const size_t nb = (size_t)c->params.n_batch, sb = pick_scratch_bytes(c->model->config.n_vocab) * nb;
        uint8_t     *z  = coopt_calloc(1, sb); // the segment counters start at zero
        if (!z || (*st = be->ops->alloc(be, sb + nb * sizeof(int32_t), (void **)&c->d_rows)) != COOPT_OK) {
            free(z);
            if (*st == COOPT_OK) *st = COOPT_ERR_NOMEM;
            return false;
        }
        be->ops->upload(be, c->d_rows, z, sb);
        be->ops->sync(be);
        free(z);
    }
    return true;
}

// Chaining (coopt_ctx_generate) of a one-token step: the argmax of its logits, or with `pick`
// the token the sample op draws from them, is written over the step's own token on the device
// (the input of the next one-token step) and into the host block's result area (the token at
// byte 0; a drawn one with the random state after it at byte 8) -- by the op itself where the
// block is page-locked (a kernel stores it over the bus: no copy in the stream between two
// steps), else by downloads; the logits stay on the device. token_on_device: the step's token is
// the one the step before left there (the upload skips it).
struct step_chain {
    bool               token_on_device;
    struct pick_state *pick; // the sample op's block (backend memory), NULL = argmax
};

// Runs one forward step over user-batch tokens [start, start + n). It returns once the step and
// its logits copy are enqueued: where the backend has fences the device may still be running the
// step (c->pending), and the host goes on to the next step or decode meanwhile. Only the host
// block of the step before last must be free (its fence); everything else the next step touches
// is either host bookkeeping or device memory used in stream order. Sets *fence to the step's
// fence (0 where the backend has none: the step has finished); with `chain` its token is then in
// the result area of the host block it used, h_step[b] + step_bytes with b = h_cur before the
// call. An op that failed (take_error: out of device memory) fails the step: its sequences are
// not advanced, the status is returned.
static enum coopt_status run_step(struct coopt_ctx *c, const struct coopt_batch_input *in, int32_t start, int32_t n,
                                  int64_t *logits_row, const struct step_chain *chain, uint64_t *fence) {
    struct coopt_backend  *be = c->be;
    struct coopt_kv_cache *kv = c->kv;
    int32_t                n_seqs = 0, n_out = 0;
    bool                   seq_start = false;
    struct step_layout     L  = step_layout_make(n, c->params.n_seq_max, c->max_blocks);
    const int              hb = c->h_cur;
    uint8_t               *h  = c->h_step[hb];
    c->h_cur                  = hb ^ 1;
    if (be->ops->fence_wait) be->ops->fence_wait(be, c->h_fence[hb]);
    int64_t               *h_slots        = (int64_t *)(h + L.slots);
    int32_t               *h_tokens       = (int32_t *)(h + L.tokens), *h_pos = (int32_t *)(h + L.pos);
    int32_t               *h_tok_seq      = (int32_t *)(h + L.tok_seq), *h_out_rows = (int32_t *)(h + L.out_rows);
    int32_t               *h_seq_lens     = (int32_t *)(h + L.seq_lens), *h_seq_ids = (int32_t *)(h + L.seq_ids);
    int32_t               *h_block_tables = (int32_t *)(h + L.block_tables);
    for (int32_t i = 0; i < n; i++) {
        int32_t t = start + i, s = in->seq_ids[t];
        if (c->seq_bidx[s] < 0) {
            h_seq_ids[n_seqs]  = s;
            c->seq_bidx[s]     = n_seqs;
            c->seq_step_cnt[s] = 0;
            int32_t *row       = h_block_tables + (size_t)n_seqs * (size_t)c->max_blocks;
            memcpy(row, kv->seqs[s].pages, (size_t)c->max_blocks * sizeof(int32_t)); // pages were reserved up front
            n_seqs++;
        }
        int64_t pos     = kv->seqs[s].n_tokens + c->seq_step_cnt[s]++;
        h_tokens[i]     = in->tokens[t];
        h_pos[i]        = (int32_t)pos;
        seq_start      |= pos == 0;
        h_tok_seq[i]    = c->seq_bidx[s];
        h_slots[i]      = coopt_kv_slot(kv, s, pos);
        h_seq_lens[c->seq_bidx[s]] = (int32_t)(pos + 1);
        if (c->logit_row[t] >= 0) h_out_rows[n_out++] = i;
    }
    // rows whose token the sample op draws (coopt_ctx_token): their sampler states; the others
    // get top_k 0 (skipped) and their logits come back
    struct pick_state *h_picks  = (struct pick_state *)(h + L.picks);
    bool               any_dev  = false, host_rows = false;
    for (int32_t j = 0; j < n_out && !chain; j++) {
        const int32_t t = start + h_out_rows[j];
        memset(&h_picks[j], 0, sizeof(h_picks[j]));
        if (c->tok_smp[t] && c->tok_dev[t]) any_dev |= coopt_sampler_pick_state(c->tok_smp[t], &h_picks[j]);
        else host_rows = true;
    }
    const size_t rows_scratch = (size_t)c->params.n_batch * pick_scratch_bytes(c->model->config.n_vocab);
    uint8_t     *d    = c->d_step;
    const size_t from = chain && chain->token_on_device ? L.slots : 0;
    COOPT_ASSERT(((uintptr_t)(h + c->step_bytes) & 7) == 0); // the result area (see coopt_ctx_init)
    be->ops->upload(be, d + from, h + from,
                    L.block_tables + (size_t)n_seqs * (size_t)c->max_blocks * sizeof(int32_t) - from); // one copy
    struct coopt_batch b = {
        .n_tokens = n, .tokens = (const int32_t *)(d + L.tokens), .pos = (const int32_t *)(d + L.pos),
        .tok_seq = (const int32_t *)(d + L.tok_seq), .slots = (const int64_t *)(d + L.slots), .n_seqs = n_seqs,
        .max_blocks = c->max_blocks, .block_tables = (const int32_t *)(d + L.block_tables),
        .seq_lens = (const int32_t *)(d + L.seq_lens), .seq_ids = (const int32_t *)(d + L.seq_ids),
        .window = c->model->config.sliding_window, .no_seq_start = !seq_start, .n_out = n_out,
        .out_rows = (const int32_t *)(d + L.out_rows),
        .next_tokens = chain ? (int32_t *)(d + L.tokens) : any_dev ? (int32_t *)(c->d_rows + rows_scratch) : NULL,
        .next_tokens_host = chain ? (c->h_step_backend[hb] ? (int32_t *)(h + c->step_bytes) : NULL)
                          : any_dev ? (int32_t *)(c->tok_res + (size_t)*logits_row * PICK_RESULT_BYTES) : NULL,
        .pick = chain ? chain->pick : any_dev ? (struct pick_state *)(d + L.picks) : NULL,
        .pick_scratch = chain && chain->pick ? (uint8_t *)chain->pick + PICK_STATE_BYTES : any_dev ? c->d_rows : NULL,
    };
    // A recorded step (CUDA graph) replaces the op-by-op forward pass where the backend has one
    // for this geometry; hooks observe ops as they run, so they force the op-by-op path.
    bool record = !c->hook.fn && !c->params.no_step_graphs && be->ops->step_begin;
    if (!record || !be->ops->step_begin(be, kv, &b)) {
        coopt_forward(c->dev_model, be, kv, &c->rope, &c->scratch, &b, c->hook.fn ? &c->hook : NULL);
        if (record && !be->ops->step_end(be)) coopt_forward(c->dev_model, be, kv, &c->rope, &c->scratch, &b, NULL);
    }
    enum coopt_status st = be->ops->take_error ? be->ops->take_error(be) : COOPT_OK;
    if (st != COOPT_OK) {
        be->ops->sync(be); // (the upload from h may still be running; the next steps find everything idle)
        c->h_fence[hb] = 0;
        for (int32_t i = 0; i < n; i++) {
            int32_t s          = in->seq_ids[start + i];
            c->seq_bidx[s]     = -1;
            c->seq_step_cnt[s] = 0;
        }
        *fence = 0;
        return st;
    }
    size_t nv = (size_t)c->model->config.n_vocab;
    if (chain) {
        if (!b.next_tokens_host) {
            be->ops->download(be, h + c->step_bytes, d + L.tokens, (size_t)n_out * sizeof(int32_t));
            if (chain->pick)
                be->ops->download(be, h + c->step_bytes + 8, chain->pick->rng, sizeof(chain->pick->rng));
        }
    } else if (n_out > 0 && (host_rows || !any_dev))
        be->ops->download(be, c->logits + (size_t)*logits_row * nv, c->scratch.logits, (size_t)n_out * nv * sizeof(float));
    *fence = 0;
    if (be->ops->fence) *fence = c->h_fence[hb] = be->ops->fence(be);
    else be->ops->sync(be);
    c->pending = true;
    *logits_row += n_out;
    for (int32_t i = 0; i < n; i++) {
        int32_t s = in->seq_ids[start + i];
        if (c->seq_bidx[s] < 0) continue;
        coopt_kv_seq_advance(kv, s, c->seq_step_cnt[s]);
        c->seq_bidx[s]     = -1;
        c->seq_step_cnt[s] = 0;
    }
    return COOPT_OK;
}

// A failed decode leaves no logits and no token to read.
static void results_forget(struct coopt_ctx *c) {
    for (int64_t i = 0; i < c->n_index_cap; i++) c->logit_row[i] = -1, c->tok_smp[i] = NULL, c->tok_val[i] = -1;
}

// coopt_ctx_decode, and with `chain` (a one-token batch) a step of coopt_ctx_generate: its logits
// stay on the device (no host rows: coopt_ctx_logits returns NULL afterwards), and a
// sliding-window model keeps one more position than it needs, since the generation may take
// the token back (the window's pages are released one step late). *fence: the last step's fence.
static enum coopt_status decode(struct coopt_ctx *c, const struct coopt_batch_input *in, const struct step_chain *chain,
                                uint64_t *fence) {
    if (!in || in->n_tokens <= 0 || !in->tokens || !in->seq_ids)
        return coopt_fail(COOPT_ERR_INVALID, "decode: empty batch");
    const struct coopt_model_config *cfg = &c->model->config;
    struct coopt_kv_cache           *kv  = c->kv;
    int32_t                          n   = in->n_tokens;
    COOPT_ASSERT(!chain || n == 1);
    // validate ids, count tokens per sequence
    enum coopt_status st = COOPT_OK;
    for (int32_t i = 0; i < n; i++) {
        int32_t s = in->seq_ids[i], tok = in->tokens[i];
        if (s < 0 || s >= c->params.n_seq_max || !kv->seqs[s].live) {
            st = coopt_fail(COOPT_ERR_INVALID, "decode: token %d names unknown sequence %d", i, s);
            break;
        }
        if (tok < 0 || tok >= cfg->n_vocab) {
            st = coopt_fail(COOPT_ERR_INVALID, "decode: token %d has id %d outside the vocabulary [0, %d)", i, tok,
                            cfg->n_vocab);
            break;
        }
        c->seq_add[s]++;
    }
    int64_t pages_needed = 0;
    for (int32_t s = 0; s < c->params.n_seq_max && st == COOPT_OK; s++) {
        if (!c->seq_add[s]) continue;
        if (kv->seqs[s].n_tokens + c->seq_add[s] > c->params.n_ctx) {
            st = coopt_fail(COOPT_ERR_CTX_FULL, "decode: sequence %d would hold %lld tokens, context is %d", s,
                            (long long)(kv->seqs[s].n_tokens + c->seq_add[s]), c->params.n_ctx);
            break;
        }
        pages_needed += coopt_kv_pages_needed(kv, s, c->seq_add[s]);
    }
    if (st == COOPT_OK && pages_needed > kv->n_free) st = COOPT_ERR_KV_FULL;
    for (int32_t s = 0; s < c->params.n_seq_max && st == COOPT_OK; s++)
        if (c->seq_add[s]) st = coopt_kv_seq_reserve(kv, s, c->seq_add[s], copy_page, c);
    // Backends that commit pool memory explicitly (CUDA VMM) do it now, where running out of
    // device memory is a status. Pages reserved stay with their sequence; a later call retries.
    if (st == COOPT_OK && c->be->ops->kv_pool_commit) {
        int32_t ps = kv->layout.page_size;
        for (int32_t s = 0; s < c->params.n_seq_max && st == COOPT_OK; s++) {
            if (!c->seq_add[s]) continue;
            int64_t first = kv->seqs[s].n_tokens / ps, last = (kv->seqs[s].n_tokens + c->seq_add[s] - 1) / ps;
            for (int64_t j = first; j <= last && st == COOPT_OK; j++) {
                int32_t page = kv->seqs[s].pages[j];
                if (page >= 0)
                    st = c->be->ops->kv_pool_commit(c->be, kv->pool, (size_t)page * kv->layout.page_bytes,
                                                    kv->layout.page_bytes);
            }
        }
    }
    // which tokens want logits: explicit, or the last token of each sequence
    int64_t n_want = 0;
    if (st == COOPT_OK) st = ensure_result_capacity(c, n, 0);
    if (st == COOPT_OK) {
        for (int32_t i = n - 1; i >= 0; i--) {
            int32_t s = in->seq_ids[i];
            bool    want;
            if (in->want_logits) want = in->want_logits[i] != 0;
            else {
                want = c->seq_add[s] > 0; // first seen from the end = last token of s
                c->seq_add[s] = 0;
            }
            c->logit_row[i] = want ? 0 : -1;
            n_want += want;
        }
        int64_t row = 0;
        for (int32_t i = 0; i < n; i++)
            if (c->logit_row[i] >= 0) c->logit_row[i] = (int32_t)row++;
        if (chain && n_want != 1) st = coopt_fail(COOPT_ERR_INVALID, "generate: the step must want its logits");
        if (st == COOPT_OK) st = ensure_result_capacity(c, n, chain ? 0 : n_want);
    }
    memset(c->seq_add, 0, (size_t)c->params.n_seq_max * sizeof(int32_t));
    // the batch's samplers: drawn by the sample op where it can (a chainable sampler, results
    // memory the op can write), else by coopt_ctx_token from the logits
    for (int64_t i = 0; i < c->n_index_cap; i++) c->tok_smp[i] = NULL, c->tok_val[i] = -1, c->tok_dev[i] = 0;
    bool any_smp = false;
    for (int32_t i = 0; i < n && st == COOPT_OK && in->samplers && !chain; i++) {
        if (c->logit_row[i] < 0 || !in->samplers[i]) continue;
        any_smp = true;
        for (int32_t j = 0; j < i && st == COOPT_OK; j++) // (each draw starts from the sampler's state)
            if (c->logit_row[j] >= 0 && in->samplers[j] == in->samplers[i])
                st = coopt_fail(COOPT_ERR_INVALID, "decode: tokens %d and %d have the same sampler", j, i);
    }
    if (any_smp && st == COOPT_OK) {
        const bool dev = ensure_token_results(c, n_want, &st);
        for (int32_t i = 0; i < n && st == COOPT_OK; i++) {
            if (c->logit_row[i] < 0 || !in->samplers[i]) continue;
            struct pick_state ps;
            c->tok_smp[i] = in->samplers[i];
            c->tok_val[i] = c->logit_row[i];
            c->tok_dev[i] = dev && coopt_sampler_pick_state(in->samplers[i], &ps);
        }
    }
    if (st != COOPT_OK) {
        results_forget(c);
        return st;
    }
    for (int64_t i = n; i < c->n_index_cap; i++) c->logit_row[i] = -1;
    int64_t logits_row = 0;
    for (int32_t start = 0; start < n; start += c->params.n_batch) {
        st = run_step(c, in, start, COOPT_MIN(c->params.n_batch, n - start), &logits_row, chain, fence);
        if (st != COOPT_OK) { // the batch fails whole: the steps before this one are taken back
            for (int32_t i = 0; i < start; i++) c->seq_add[in->seq_ids[i]]++;
            for (int32_t i = 0; i < start; i++) {
                int32_t s = in->seq_ids[i];
                if (c->seq_add[s]) coopt_kv_seq_truncate(kv, s, kv->seqs[s].n_tokens - c->seq_add[s]);
                c->seq_add[s] = 0;
            }
            results_forget(c);
            return st;
        }
    }
    if (chain) c->logit_row[0] = -1; // the logits stayed on the device
    for (int32_t i = 0; i < n; i++)
        if (c->tok_dev[i]) c->logit_row[i] = -1; // drawn by the op: coopt_ctx_token only
    if (cfg->sliding_window > 0) {
        for (int32_t i = 0; i < n; i++) {
            int32_t s = in->seq_ids[i];
            coopt_kv_seq_release_before(kv, s, kv->seqs[s].n_tokens - cfg->sliding_window + 1 - (chain ? 1 : 0));
        }
    }
    return COOPT_OK;
}

enum coopt_status coopt_ctx_decode(struct coopt_ctx *c, const struct coopt_batch_input *in) {
    uint64_t fence;
    return decode(c, in, NULL, &fence);
}

enum coopt_status coopt_ctx_generate(struct coopt_ctx *c, int32_t seq, int32_t token, int32_t n_max,
                                     struct coopt_sampler *smp, coopt_gen_token_fn *on_token, void *ud,
                                     int32_t *n_fed) {
    if (n_fed) *n_fed = 0;
    if (seq < 0 || seq >= c->params.n_seq_max || !c->kv->seqs[seq].live)
        return coopt_fail(COOPT_ERR_INVALID, "generate: unknown sequence %d", seq);
    if (n_max < 0) return coopt_fail(COOPT_ERR_INVALID, "generate: negative token limit %d", n_max);
    struct pick_state ps;
    const bool        sampled = smp && !coopt_sampler_greedy(smp);
    if (sampled && !coopt_sampler_pick_state(smp, &ps))
        return coopt_fail(COOPT_ERR_INVALID,
                          "generate: this sampler's choice needs the logits on the host (a repetition penalty, "
                          "top_k 0 or above %d, or a vocabulary of %d too large for top_k); see coopt_sampler_chainable",
                          PICK_MAX_K, c->model->config.n_vocab);
    if (n_max == 0) return COOPT_OK;
    struct coopt_backend *be   = c->be;
    struct pick_state    *pick = sampled ? (struct pick_state *)c->d_pick : NULL;
    if (pick) be->ops->upload(be, pick, &ps, sizeof(ps)); // in stream order, before the first step
    const struct step_chain first = {.token_on_device = false, .pick = pick},
                            next  = {.token_on_device = true, .pick = pick};
    uint64_t last_rng[4];
    bool     drawn = false; // a token drawn by the op was reported: last_rng is the state after it
    int32_t                  dummy = 0; // a chained step's token is on the device; this passes validation
    struct coopt_batch_input in  = {.n_tokens = 1, .tokens = &token, .seq_ids = &seq};
    uint64_t                 fence[2];
    int                      blk[2]; // the host block (result area) of step j: index j % 2
    blk[0]                       = c->h_cur;
    enum coopt_status st         = decode(c, &in, &first, &fence[0]);
    if (st != COOPT_OK) return st;
    int32_t fed = 1; // steps enqueued and not taken back
    in.tokens   = &dummy;
    for (int32_t j = 0;; j++) {
        // Step j+1 goes in before step j's token is known (it feeds that token from the device),
        // so the device runs the steps back to back; the host reads token j meanwhile.
        bool ahead = false;
        if (fed < n_max) {
            blk[(j + 1) % 2] = c->h_cur;
            st               = decode(c, &in, &next, &fence[(j + 1) % 2]);
            ahead            = st == COOPT_OK;
        }
        if (be->ops->fence_wait) be->ops->fence_wait(be, fence[j % 2]);
        int32_t t = 0;
        memcpy(&t, c->h_step[blk[j % 2]] + c->step_bytes, sizeof(t));
        if (!ahead) break; // token j is fed by no step: the limit, or the next step could not run (st)
        if (pick) memcpy(last_rng, c->h_step[blk[j % 2]] + c->step_bytes + 8, sizeof(last_rng)), drawn = true;
        if (on_token && !on_token(ud, t)) {
            coopt_kv_seq_truncate(c->kv, seq, c->kv->seqs[seq].n_tokens - 1); // take step j+1 back
            break;
        }
        fed++;
    }
    if (n_fed) *n_fed = fed;
    if (drawn) coopt_sampler_set_rng(smp, last_rng); // the sampler as after the draws reported
    return st;
}

// ---- internal accessors (context.h) ----

struct coopt_model *coopt_ctx_model(const struct coopt_ctx *c) { return c->model; }
const struct coopt_ctx_params *coopt_ctx_params(const struct coopt_ctx *c) { return &c->params; }
int64_t coopt_ctx_pages_free(const struct coopt_ctx *c) { return c->kv->n_free; }
int64_t coopt_ctx_pages_needed(const struct coopt_ctx *c, int32_t seq, int64_t n) {
    return coopt_kv_pages_needed(c->kv, seq, n);
}

enum coopt_status coopt_ctx_set_hook(struct coopt_ctx *c, const struct coopt_forward_hook *hook) {
    if (hook && hook->fn && c->be->ops->model_upload)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "forward hooks need a host-memory backend (cpu)");
    c->hook = hook ? *hook : (struct coopt_forward_hook){0};
    return COOPT_OK;
}
