/*
 * step.cu -- whole decode steps as CUDA graphs, the per-op GPU time profile, page-locked host
 * memory, and a memory bandwidth probe.
 *
 * Step recording (backend.h step_begin / step_end). A batch-1 decode step of a 7B model is ~300
 * kernel launches of a few microseconds each; launched one by one from the host, the gaps between
 * them cost a large share of the step. So each step of a small batch (n_tokens <= graph_max_tokens,
 * 128 by default) is looked up by its launch geometry:
 *   key = (n_tokens, n_seqs, n_out, attention key-range bucket (cuda_attn_bound), max_blocks,
 *          window, KV type, KV pool and batch-array addresses)
 * Everything else a kernel of the step receives by value is fixed for a context (weights,
 * scratch, cache layout, RoPE table) or is read from device memory at run time (tokens,
 * positions, slots, block tables, sequence lengths). The first step with a new key runs op by op
 * (that also grows the workspaces to the size this geometry needs); the second is captured into a
 * graph (stream capture, thread-local mode) and launched; later ones launch the graph. A graph is
 * re-recorded when a workspace moved since it was captured (cb->work_epoch). Nothing host-side
 * runs at replay: rope_store's cuda_kv_pool_prepare finds every page committed because the
 * context commits them (kv_pool_commit) before the step; cuBLAS (batches above 2 rows) runs
 * inside the capture with a fixed workspace (ops_cuda.cu). Up to STEP_MAX_GRAPHS graphs are kept,
 * the least recently used is dropped first. COOPT_CUDA_GRAPHS=0 (or the context's
 * no_step_graphs) turns this off; COOPT_CUDA_GRAPH_MAX_TOKENS changes the batch limit.
 *
 * Other switches read here: COOPT_CUDA_FUSED=0 (no fused ops: the forward pass composes them),
 * COOPT_CUDA_FUSED_NORM=0 (no RMS norm inside the GEMVs), COOPT_CUDA_XSTAGE=0 (decode GEMVs and the
 * decode attention do not stage the next GEMV's input: matmul_add_then_norm, norm_matmul_swiglu_then_add,
 * rope_store_attention_then_matmul; COOPT_CUDA_XSTAGE_ATTN=0: the attention only),
 * COOPT_CUDA_FUSED_ATTN_FP8=0 (FP8 caches run rope_store and the decode attention as two kernels instead of
 * the attention with the KV write fused in), COOPT_CUDA_ATTN_STORE_CTA=1|0 (the fused write from two CTAs
 * of their own always, or never; by default for FP8 caches below CUDA_ATTN_STORE_CTA_BOUND),
 * COOPT_CUDA_ATTN_STORE_WAIT=0 (over one partition the store CTAs' partial goes through the merge kernel
 * instead of the partition's CTA waiting for it), COOPT_CUDA_PDL=0 (GEMVs launch without
 * programmatic dependent launch), COOPT_CUDA_ATTN_PDL=0 (rope_store and the decode attention neither),
 * COOPT_CUDA_ATTN_TRIGGER=0 (the attention's merge kernel does not let the
 * o projection launch at its start), COOPT_CUDA_GEMV_ROWS=1|2 (weight rows per GEMV warp instead of
 * the automatic choice).
 *
 * COOPT_CUDA_STEP_STATS=1 prints, when the backend is destroyed, how many steps ran op by op, were
 * recorded and were replayed, and the replays' mean GPU span (events around each launch) against
 * the GPU time from one replay's start to the next's: the difference is the time the GPU waits
 * between consecutive replays (the logits copy, the host's turn, the next step's upload).
 *
 * Profile (COOPT_CUDA_PROFILE=1, implies no graphs): every op of the table is wrapped; after each
 * op an event is recorded, and at each sync the time between consecutive events is charged to
 * the op that ended it (op name with weight type and shape for the matmuls). Since the host
 * enqueues ahead of the GPU in a decode step, that is GPU time including the gaps between
 * kernels. The table (total, per call, share, GB/s of weights) goes to stderr when the backend
 * is destroyed.
 */
#include "cuda/common.cuh"
#include "cuda/gptq_dev.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STEP_MAX_GRAPHS  64
#define PROF_MAX_ENTRIES 256
#define PROF_MAX_PENDING 4096
#define STEP_TIMING_RING 4

struct step_key {
    const void *pool, *tokens, *next_tokens, *next_tokens_host, *pick;
    int64_t     attn_bound;
    int32_t     n_tokens, n_seqs, n_out, max_blocks, window, kv_dtype, no_seq_start;
    uint32_t    kernels; // cuda_gptq_config_epoch(): a process-wide kernel choice changed since
};

struct step_graph {
    struct step_key key;
    bool            used;     // the slot holds a key
    cudaGraphExec_t exec;     // NULL until recorded
    bool            eager;    // recording failed (out of memory for the graph): runs op by op
    uint64_t        epoch;    // cb->work_epoch at recording
    int64_t         last_use;
};

struct prof_entry {
    char    name[96];
    int64_t calls;
    double  ms, bytes; // GPU time; weight bytes read (matmuls)
};

struct cuda_step {
    const struct coopt_ops *base; // the unwrapped ops
    bool                    graphs, profile;
    int32_t                 graph_max_tokens;
    struct step_graph       g[STEP_MAX_GRAPHS];
    struct step_graph      *recording;
    struct step_graph      *fresh; // the key first seen by the step running op by op (forgotten if an op fails)
    int64_t                 tick, n_eager, n_captures, n_replays;
    bool                    fail_next_graph; // tests (cuda_step_fail_next_graph)
    // COOPT_CUDA_STEP_STATS: events around each replay (ring of STEP_TIMING_RING; slot n_replays %
    // STEP_TIMING_RING), the sums of the replays' GPU spans and of the GPU time from one replay's
    // start to the next's (consecutive replays only: the period includes the logits copy, whatever
    // the GPU waits for from the host, and the next step's upload)
    bool        timing;
    cudaEvent_t ev_t0[STEP_TIMING_RING], ev_t1[STEP_TIMING_RING];
    double      span_ms, period_ms;
    int64_t     n_span, n_period;
    int64_t     chain_len; // replays in a row up to the last step (0: it was not a replay)
    // profile
    cudaEvent_t       ev_start, ev[PROF_MAX_PENDING];
    int32_t           pend[PROF_MAX_PENDING]; // entry of each pending event
    int32_t           n_pend;
    bool              started;
    struct prof_entry ent[PROF_MAX_ENTRIES];
    int32_t           n_ent;
    int64_t           n_syncs;
#ifdef COOPT_TRACE
    unsigned long long *trace;      // device buffer of the timeline trace (common.cuh), NULL = off
    const char         *trace_file; // $COOPT_TRACE_FILE
    int64_t             trace_step; // the replay it keeps ($COOPT_TRACE_STEP, default 8)
#endif
};

#ifdef COOPT_TRACE
// Timeline trace (trace builds, -DCOOPT_TRACE): with COOPT_TRACE_FILE set, the kernels of the
// replay number COOPT_TRACE_STEP append their CTAs' records (common.cuh) and the records are
// written to that file (the count, then 4 words each) before the next step; dev/trace.py reads it.
extern "C" {
void cuda_trace_bind_gptq(void *p);
void cuda_trace_bind_paged_attn(void *p);
void cuda_trace_bind_rope_store(void *p);
void cuda_trace_bind_ops_cuda(void *p);
void cuda_trace_bind_matmul(void *p);
}
static void trace_bind(void *p) {
    cuda_trace_bind_gptq(p), cuda_trace_bind_paged_attn(p), cuda_trace_bind_rope_store(p);
    cuda_trace_bind_ops_cuda(p), cuda_trace_bind_matmul(p);
}
static void trace_init(struct cuda_step *S) {
    const char *f = getenv("COOPT_TRACE_FILE"), *n = getenv("COOPT_TRACE_STEP");
    if (!f || !*f) return;
    S->trace_file = f;
    S->trace_step = n && *n ? atoll(n) : 8;
    const cudaError_t e = cudaMalloc(&S->trace, (1 + 4 * (size_t)TRACE_CAP) * sizeof(unsigned long long));
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        coopt_log_error("trace: no device memory for the records (%s); not tracing", cudaGetErrorName(e));
        S->trace = NULL;
        return;
    }
    CUDA_CHECK(cudaMemset(S->trace, 0, sizeof(unsigned long long)));
    trace_bind(S->trace);
}
// Before each step: restart the record (the kept replay not reached yet), or write it out.
static void trace_step(struct cuda_step *S, cudaStream_t st) {
    if (!S->trace) return;
    if (S->n_replays <= S->trace_step) {
        CUDA_CHECK(cudaMemsetAsync(S->trace, 0, sizeof(unsigned long long), st));
        return;
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    trace_bind(NULL);
    unsigned long long n = 0;
    CUDA_CHECK(cudaMemcpy(&n, S->trace, sizeof(n), cudaMemcpyDeviceToHost));
    if (n > TRACE_CAP) n = TRACE_CAP;
    unsigned long long *h = (unsigned long long *)malloc((1 + 4 * n) * sizeof(*h));
    FILE               *fp = h ? fopen(S->trace_file, "wb") : NULL;
    if (!h) coopt_log_error("trace: no host memory for %llu records; %s not written", n, S->trace_file);
    else if (!fp) coopt_log_error("trace: cannot open %s for writing", S->trace_file);
    if (h && fp) {
        CUDA_CHECK(cudaMemcpy(h, S->trace, (1 + 4 * n) * sizeof(*h), cudaMemcpyDeviceToHost));
        h[0] = n;
        if (fwrite(h, sizeof(*h), 1 + 4 * n, fp) == 1 + 4 * n)
            fprintf(stderr, "trace: %llu CTA records of replay %lld written\n", n, (long long)S->trace_step);
        else coopt_log_error("trace: short write to %s", S->trace_file);
    }
    if (fp) fclose(fp);
    free(h);
    CUDA_CHECK(cudaFree(S->trace));
    S->trace = NULL;
}
#endif

static bool env_flag(const char *name, bool dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    return strcmp(v, "0") != 0;
}

// ---- step recording ----

static struct step_key step_key_make(const struct coopt_kv_cache *kv, const struct coopt_batch *b) {
    struct step_key k;
    memset(&k, 0, sizeof(k)); // compared with memcmp: no padding garbage
    k.pool       = kv->pool;
    k.tokens     = b->tokens;
    k.next_tokens = b->next_tokens;
    k.next_tokens_host = b->next_tokens_host;
    k.pick       = b->pick;
    k.attn_bound = cuda_attn_bound(kv, b);
    k.n_tokens   = b->n_tokens;
    k.n_seqs     = b->n_seqs;
    k.n_out      = b->n_out;
    k.max_blocks = b->max_blocks;
    k.window     = b->window;
    k.kv_dtype   = (int32_t)kv->layout.dtype;
    k.no_seq_start = b->no_seq_start;
    k.kernels      = cuda_gptq_config_epoch();
    return k;
}

static void graph_drop(struct step_graph *g) {
    if (g->exec) CUDA_CHECK(cudaGraphExecDestroy(g->exec));
    g->exec = NULL;
}

// Launches a replay between two events (S->timing) and adds up what the events of the replays
// two and three before it show, if they are part of the `chain` of replays just before it. The
// context has waited for the step before last (its fence) before it enqueues a step, so those
// events are complete and the waits below return at once: the timing does not stall the host.
static void replay_timing(struct cuda_step *S, cudaStream_t st, cudaGraphExec_t exec, int64_t chain) {
    const int R = STEP_TIMING_RING, cur = (int)(S->n_replays % R), k2 = (cur + R - 2) % R, k3 = (cur + R - 3) % R;
    float     ms = 0.0f;
    if (chain >= 2) {
        CUDA_CHECK(cudaEventSynchronize(S->ev_t1[k2]));
        CUDA_CHECK(cudaEventElapsedTime(&ms, S->ev_t0[k2], S->ev_t1[k2]));
        S->span_ms += ms, S->n_span++;
    }
    if (chain >= 3) {
        CUDA_CHECK(cudaEventElapsedTime(&ms, S->ev_t0[k3], S->ev_t0[k2]));
        S->period_ms += ms, S->n_period++;
    }
    CUDA_CHECK(cudaEventRecord(S->ev_t0[cur], st));
    CUDA_CHECK(cudaGraphLaunch(exec, st));
    CUDA_CHECK(cudaEventRecord(S->ev_t1[cur], st));
}

bool cuda_step_begin(struct coopt_backend *be, const struct coopt_kv_cache *kv, const struct coopt_batch *b) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_step    *S  = cb->step;
    COOPT_ASSERT(S && !S->recording);
#ifdef COOPT_TRACE
    trace_step(S, cb->stream);
#endif
    S->fresh = NULL;
    const int64_t chain = S->chain_len;
    S->chain_len        = 0;
    if (!S->graphs || b->n_tokens > S->graph_max_tokens) {
        S->n_eager++;
        return false;
    }
    struct step_key key = step_key_make(kv, b);
    S->tick++;
    struct step_graph *g = NULL;
    for (int i = 0; i < STEP_MAX_GRAPHS && !g; i++)
        if (S->g[i].used && !memcmp(&S->g[i].key, &key, sizeof(key))) g = &S->g[i];
    if (!g) { // first sight: op by op (sizes the workspaces); recorded the next time
        struct step_graph *victim = &S->g[0]; // a free slot, else the least recently used
        for (int i = 1; i < STEP_MAX_GRAPHS && victim->used; i++)
            if (!S->g[i].used || S->g[i].last_use < victim->last_use) victim = &S->g[i];
        graph_drop(victim);
        victim->key      = key;
        victim->used     = true;
        victim->eager    = false;
        victim->last_use = S->tick;
        S->fresh         = victim;
        S->n_eager++;
        return false;
    }
    g->last_use = S->tick;
    if (g->eager) {
        S->n_eager++;
        return false;
    }
    if (g->exec && g->epoch == cb->work_epoch) {
        if (S->timing) replay_timing(S, cb->stream, g->exec, chain);
        else CUDA_CHECK(cudaGraphLaunch(g->exec, cb->stream));
        S->n_replays++;
        S->chain_len = chain + 1;
        return true;
    }
    graph_drop(g); // a workspace moved since it was recorded
    CUDA_CHECK(cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal));
    S->recording = g;
    return false;
}

bool cuda_step_end(struct coopt_backend *be) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_step    *S  = cb->step;
    struct step_graph   *g  = S->recording;
    // A step whose op failed (out of memory) did not size the workspaces: record its geometry
    // only after a first sight that succeeds (growth inside a capture is not allowed).
    if (S->fresh && cb->op_error != COOPT_OK) S->fresh->used = false;
    S->fresh = NULL;
    if (!g) return true;
    S->recording      = NULL;
    cudaGraph_t graph = NULL;
    cudaError_t e     = cudaStreamEndCapture(cb->stream, &graph);
    if (e == cudaSuccess && S->fail_next_graph) e = cudaErrorMemoryAllocation;
    S->fail_next_graph = false;
    if (e == cudaSuccess) e = cudaGraphInstantiate(&g->exec, graph, 0);
    if (graph) CUDA_CHECK(cudaGraphDestroy(graph));
    if (e != cudaSuccess) {
        // Nothing of the step ran (it was recorded, not launched): the caller runs it op by op,
        // and so will every later step of this geometry.
        (void)cudaGetLastError(); // (not a sticky error: the context stays usable)
        coopt_log_error("CUDA graph of a decode step: %s; steps of this shape run op by op", cudaGetErrorName(e));
        g->exec  = NULL;
        g->eager = true;
        S->n_eager++; // (the caller's run)
        return false;
    }
    g->epoch = cb->work_epoch;
    CUDA_CHECK(cudaGraphLaunch(g->exec, cb->stream));
    S->n_captures++;
    return true;
}

extern "C" void cuda_step_fail_next_graph(struct coopt_backend *be) { cuda_impl(be)->step->fail_next_graph = true; }

extern "C" int coopt_cuda_step_stats(struct coopt_backend *be, int64_t *eager, int64_t *captures, int64_t *replays) {
    *eager = *captures = *replays = 0;
    if (!be || strcmp(be->ops->name, "cuda") != 0) return -1;
    struct cuda_step *S = cuda_impl(be)->step;
    *eager              = S->n_eager;
    *captures           = S->n_captures;
    *replays            = S->n_replays;
    return 0;
}

// ---- profile ----

static struct cuda_step *prof_state(struct coopt_backend *be) { return cuda_impl(be)->step; }

static void prof_resolve(struct cuda_step *S) {
    if (!S->n_pend) return;
    CUDA_CHECK(cudaEventSynchronize(S->ev[S->n_pend - 1]));
    cudaEvent_t prev = S->ev_start;
    for (int32_t i = 0; i < S->n_pend; i++) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, prev, S->ev[i]));
        S->ent[S->pend[i]].ms += ms;
        prev = S->ev[i];
    }
    S->n_pend  = 0;
    S->started = false;
}

static void prof_pre(struct coopt_backend *be) {
    struct cuda_step *S = prof_state(be);
    if (!S->started) {
        CUDA_CHECK(cudaEventRecord(S->ev_start, cuda_impl(be)->stream));
        S->started = true;
    }
}

static void prof_post(struct coopt_backend *be, double bytes, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void prof_post(struct coopt_backend *be, double bytes, const char *fmt, ...) {
    struct cuda_step *S = prof_state(be);
    char              name[96];
    va_list           ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    int32_t e = 0;
    while (e < S->n_ent && strcmp(S->ent[e].name, name)) e++;
    if (e == S->n_ent) {
        if (S->n_ent == PROF_MAX_ENTRIES) e = PROF_MAX_ENTRIES - 1; // table full: the last row takes the rest
        else {
            snprintf(S->ent[e].name, sizeof(S->ent[e].name), "%s", name);
            S->n_ent++;
        }
    }
    S->ent[e].calls++;
    S->ent[e].bytes += bytes;
    CUDA_CHECK(cudaEventRecord(S->ev[S->n_pend], cuda_impl(be)->stream));
    S->pend[S->n_pend++] = e;
    if (S->n_pend == PROF_MAX_PENDING) prof_resolve(S);
}

static double wbytes(const struct coopt_weight *w) {
    size_t rb = coopt_dtype_row_bytes(w->dtype, w->n_in);
    return (double)rb * (double)w->n_out;
}

#define BASE(be) (prof_state(be)->base)

static void p_upload(struct coopt_backend *be, void *dst, const void *src, size_t n) {
    prof_pre(be);
    BASE(be)->upload(be, dst, src, n);
    prof_post(be, 0, "upload");
}
static void p_download(struct coopt_backend *be, void *dst, const void *src, size_t n) {
    prof_pre(be);
    BASE(be)->download(be, dst, src, n);
    prof_post(be, 0, "download");
}
static void p_sync(struct coopt_backend *be) {
    BASE(be)->sync(be);
    prof_state(be)->n_syncs++;
    prof_resolve(prof_state(be));
}
static void p_embed(struct coopt_backend *be, float *out, const struct coopt_weight *t, const int32_t *tok, int32_t n) {
    prof_pre(be);
    BASE(be)->embed(be, out, t, tok, n);
    prof_post(be, 0, "embed");
}
static void p_rmsnorm(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t n, int32_t dim,
                      float eps) {
    prof_pre(be);
    BASE(be)->rmsnorm(be, out, x, w, n, dim, eps);
    prof_post(be, 0, "rmsnorm r%d", n);
}
static void p_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n) {
    prof_pre(be);
    BASE(be)->matmul(be, out, x, w, n);
    prof_post(be, wbytes(w), "matmul %s %lldx%lld r%d", coopt_dtype_name(w->dtype), (long long)w->n_out,
              (long long)w->n_in, n);
}
static void p_rope(struct coopt_backend *be, float *q, int32_t nh, const int32_t *pos, int32_t n,
                   const struct coopt_rope *r) {
    prof_pre(be);
    BASE(be)->rope(be, q, nh, pos, n, r);
    prof_post(be, 0, "rope");
}
static void p_rope_store(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t nh,
                         struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, const struct coopt_rope *r) {
    prof_pre(be);
    BASE(be)->rope_store(be, q, k, v, nh, kv, layer, b, r);
    prof_post(be, 0, "rope_store r%d", b->n_tokens);
}
static void p_attention(struct coopt_backend *be, float *out, const float *q, int32_t nh, const struct coopt_kv_cache *kv,
                        int32_t layer, const struct coopt_batch *b, float scale) {
    prof_pre(be);
    BASE(be)->attention(be, out, q, nh, kv, layer, b, scale);
    prof_post(be, 0, "attention r%d bound %lld", b->n_tokens, (long long)cuda_attn_bound(kv, b));
}
static void p_rope_store_attention(struct coopt_backend *be, float *out, float *q, const float *k, const float *v,
                                   int32_t nh, struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                                   const struct coopt_rope *r, float scale) {
    prof_pre(be);
    BASE(be)->rope_store_attention(be, out, q, k, v, nh, kv, layer, b, r, scale);
    prof_post(be, 0, "rope_store+attention r%d bound %lld", b->n_tokens, (long long)cuda_attn_bound(kv, b));
}
static void p_rope_store_attention_then_matmul(struct coopt_backend *be, float *out, float *q, const float *k,
                                               const float *v, int32_t nh, struct coopt_kv_cache *kv, int32_t layer,
                                               const struct coopt_batch *b, const struct coopt_rope *r, float scale) {
    prof_pre(be);
    BASE(be)->rope_store_attention_then_matmul(be, out, q, k, v, nh, kv, layer, b, r, scale);
    prof_post(be, 0, "rope_store+attention r%d bound %lld", b->n_tokens, (long long)cuda_attn_bound(kv, b));
}
static void p_silu_mul(struct coopt_backend *be, float *out, const float *g, const float *u, int64_t n) {
    prof_pre(be);
    BASE(be)->silu_mul(be, out, g, u, n);
    prof_post(be, 0, "silu_mul");
}
static void p_add(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n) {
    prof_pre(be);
    BASE(be)->add(be, out, a, b, n);
    prof_post(be, 0, "add");
}
static void p_get_rows(struct coopt_backend *be, float *out, const float *x, const int32_t *rows, int32_t n, int32_t dim) {
    prof_pre(be);
    BASE(be)->get_rows(be, out, x, rows, n, dim);
    prof_post(be, 0, "get_rows");
}
static void p_argmax(struct coopt_backend *be, int32_t *out, int32_t *oh, const float *x, int32_t rows, int32_t n) {
    prof_pre(be);
    BASE(be)->argmax(be, out, oh, x, rows, n);
    prof_post(be, 0, "argmax r%d", rows);
}
static void p_sample(struct coopt_backend *be, int32_t *out, void *oh, const float *x, int32_t rows, int32_t n,
                     struct pick_state *ps, uint8_t *scratch) {
    prof_pre(be);
    BASE(be)->sample(be, out, oh, x, rows, n, ps, scratch);
    prof_post(be, 0, "sample");
}
static void p_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                           const struct coopt_weight *const *ws, int32_t rows) {
    prof_pre(be);
    BASE(be)->matmul_multi(be, n, outs, x, ws, rows);
    double  bytes = 0;
    int64_t n_out = 0;
    for (int32_t i = 0; i < n; i++) bytes += wbytes(ws[i]), n_out += ws[i]->n_out;
    prof_post(be, bytes, "matmul_multi%d %s %lldx%lld r%d", n, coopt_dtype_name(ws[0]->dtype), (long long)n_out,
              (long long)ws[0]->n_in, rows);
}
static void p_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                            const struct coopt_weight *wu, int32_t rows) {
    prof_pre(be);
    BASE(be)->matmul_swiglu(be, out, tmp, x, wg, wu, rows);
    prof_post(be, wbytes(wg) + wbytes(wu), "matmul_swiglu %s 2x%lldx%lld r%d", coopt_dtype_name(wg->dtype),
              (long long)wg->n_out, (long long)wg->n_in, rows);
}
static void p_matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t rows) {
    prof_pre(be);
    BASE(be)->matmul_add(be, out, x, w, rows);
    prof_post(be, wbytes(w), "matmul_add %s %lldx%lld r%d", coopt_dtype_name(w->dtype), (long long)w->n_out,
              (long long)w->n_in, rows);
}

static void p_norm_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x, const float *norm,
                                float eps, const struct coopt_weight *const *ws, int32_t rows) {
    prof_pre(be);
    BASE(be)->norm_matmul_multi(be, n, outs, x, norm, eps, ws, rows);
    double  bytes = 0;
    int64_t n_out = 0;
    for (int32_t i = 0; i < n; i++) bytes += wbytes(ws[i]), n_out += ws[i]->n_out;
    prof_post(be, bytes, "norm_matmul_multi%d %s %lldx%lld r%d", n, coopt_dtype_name(ws[0]->dtype), (long long)n_out,
              (long long)ws[0]->n_in, rows);
}
static void p_norm_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                                 float eps, const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t rows) {
    prof_pre(be);
    BASE(be)->norm_matmul_swiglu(be, out, tmp, x, norm, eps, wg, wu, rows);
    prof_post(be, wbytes(wg) + wbytes(wu), "norm_matmul_swiglu %s 2x%lldx%lld r%d", coopt_dtype_name(wg->dtype),
              (long long)wg->n_out, (long long)wg->n_in, rows);
}

static void p_matmul_add_then_norm(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                                   int32_t rows, const float *next_norm) {
    prof_pre(be);
    BASE(be)->matmul_add_then_norm(be, out, x, w, rows, next_norm);
    prof_post(be, wbytes(w), "matmul_add_then_norm %s %lldx%lld r%d", coopt_dtype_name(w->dtype), (long long)w->n_out,
              (long long)w->n_in, rows);
}
static void p_norm_matmul_swiglu_then_add(struct coopt_backend *be, float *out, float *tmp, const float *x,
                                          const float *norm, float eps, const struct coopt_weight *wg,
                                          const struct coopt_weight *wu, int32_t rows) {
    prof_pre(be);
    BASE(be)->norm_matmul_swiglu_then_add(be, out, tmp, x, norm, eps, wg, wu, rows);
    prof_post(be, wbytes(wg) + wbytes(wu), "norm_matmul_swiglu_then_add %s 2x%lldx%lld r%d", coopt_dtype_name(wg->dtype),
              (long long)wg->n_out, (long long)wg->n_in, rows);
}

static int prof_cmp(const void *a, const void *b) {
    double x = ((const struct prof_entry *)a)->ms, y = ((const struct prof_entry *)b)->ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void prof_print(struct cuda_step *S) {
    prof_resolve(S);
    double total = 0;
    for (int32_t i = 0; i < S->n_ent; i++) total += S->ent[i].ms;
    qsort(S->ent, (size_t)S->n_ent, sizeof(S->ent[0]), prof_cmp);
    fprintf(stderr, "cuda profile: %lld syncs, %.3f ms of GPU time between op boundaries\n", (long long)S->n_syncs, total);
    fprintf(stderr, "cuda profile: %-48s %8s %10s %9s %6s %8s\n", "op", "calls", "total ms", "us/call", "share", "GB/s");
    for (int32_t i = 0; i < S->n_ent; i++) {
        const struct prof_entry *e = &S->ent[i];
        char                     bw[16] = "";
        if (e->bytes > 0 && e->ms > 0) snprintf(bw, sizeof(bw), "%.0f", e->bytes / (e->ms * 1e-3) / 1e9);
        fprintf(stderr, "cuda profile: %-48s %8lld %10.3f %9.2f %5.1f%% %8s\n", e->name, (long long)e->calls, e->ms,
                e->ms * 1e3 / (double)e->calls, total > 0 ? 100 * e->ms / total : 0, bw);
    }
}

// ---- setup ----

enum coopt_status cuda_step_init(struct coopt_backend *be, const struct coopt_ops *base) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_step    *S  = (struct cuda_step *)coopt_calloc(1, sizeof(*S));
    if (!S) return COOPT_ERR_NOMEM;
    cb->step            = S;
    S->base             = base;
    S->profile          = env_flag("COOPT_CUDA_PROFILE", false);
    S->graphs           = env_flag("COOPT_CUDA_GRAPHS", true) && !S->profile;
    S->graph_max_tokens = 128;
    const char *mt      = getenv("COOPT_CUDA_GRAPH_MAX_TOKENS");
    if (mt && *mt) S->graph_max_tokens = atoi(mt);
    S->timing           = S->graphs && getenv("COOPT_CUDA_STEP_STATS");
    for (int i = 0; i < STEP_TIMING_RING && S->timing; i++) {
        CUDA_TRY(cudaEventCreate(&S->ev_t0[i]), COOPT_ERR_NOMEM);
        CUDA_TRY(cudaEventCreate(&S->ev_t1[i]), COOPT_ERR_NOMEM);
    }
    cb->ops = *base;
    if (!env_flag("COOPT_CUDA_FUSED", true)) { // ablation: the forward pass composes the fused ops
        cb->ops.matmul_multi  = NULL;
        cb->ops.matmul_swiglu = NULL;
        cb->ops.matmul_add    = NULL;
    }
    // the decode attention with the Opt-KV write fused in (paged_attn.cu); 0: the two kernels
    if (!env_flag("COOPT_CUDA_FUSED", true) || !env_flag("COOPT_CUDA_FUSED_ATTN", true)) cb->ops.rope_store_attention = NULL;
    // FP8 caches too (paged_attn.cu: rope_store_attention says when each is faster)
    const char *f8 = getenv("COOPT_CUDA_FUSED_ATTN_FP8");
    cb->attn_unfused_fp8 = f8 && strcmp(f8, "0") == 0;
    const char *sc = getenv("COOPT_CUDA_ATTN_STORE_CTA");
    if (sc && *sc) cb->attn_store_cta = strcmp(sc, "0") != 0 ? 1 : -1;
    cb->attn_store_nowait = !env_flag("COOPT_CUDA_ATTN_STORE_WAIT", true);
    cb->attn_no_pre       = !env_flag("COOPT_CUDA_ATTN_PREFETCH", true);
    if (!env_flag("COOPT_CUDA_FUSED", true) || !env_flag("COOPT_CUDA_FUSED_NORM", true)) {
        cb->ops.norm_matmul_multi  = NULL;
        cb->ops.norm_matmul_swiglu = NULL;
    }
    // the decode GEMVs stage the next one's input (matmul.cu); 0: each converts its own
    if (!cb->ops.norm_matmul_multi || !cb->ops.matmul_add || !env_flag("COOPT_CUDA_XSTAGE", true)) {
        cb->ops.matmul_add_then_norm        = NULL;
        cb->ops.norm_matmul_swiglu_then_add = NULL;
    }
    // and the decode attention stages the o projection's input (COOPT_CUDA_XSTAGE=0 or
    // COOPT_CUDA_XSTAGE_ATTN=0: it does not)
    if (!cb->ops.rope_store_attention || !cb->ops.matmul_add_then_norm || !env_flag("COOPT_CUDA_XSTAGE_ATTN", true))
        cb->ops.rope_store_attention_then_matmul = NULL;
    int cc = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, cb->device), COOPT_ERR_UNSUPPORTED);
    cb->cc_major = cc;
    cb->pdl      = cc >= 9 && env_flag("COOPT_CUDA_PDL", true);
    cb->attn_trigger = cb->pdl && env_flag("COOPT_CUDA_ATTN_TRIGGER", true);
    cb->attn_pdl     = cb->pdl && env_flag("COOPT_CUDA_ATTN_PDL", true);
    // the split-K merge kernel as a programmatic dependent launch (it waits for the decode kernel
    // first): llama3-8b gptq4 tg128 +0.2-1.3 % at depths 1024-16384 (docs/BENCHMARKS.md)
    cb->attn_merge_pdl = cb->attn_pdl && env_flag("COOPT_CUDA_ATTN_MERGE_PDL", true);
    cb->attn_cluster = cb->cc_major >= 9 && env_flag("COOPT_CUDA_ATTN_CLUSTER", true);
    // the decode attention's tensor-core walk: auto (default), all (every query group), 0 (never);
    // COOPT_CUDA_ATTN_TC_OCC: CTAs per SM its partition sizing aims at
    const char *atc = getenv("COOPT_CUDA_ATTN_TC");
    if (atc && *atc) cb->attn_tc_decode = !strcmp(atc, "0") ? -1 : !strcmp(atc, "all") ? 1 : 0;
    const char *occ = getenv("COOPT_CUDA_ATTN_TC_OCC");
    if (occ && atof(occ) > 0.0) cb->attn_tc_occ = (float)atof(occ);
    const char *rows = getenv("COOPT_CUDA_GEMV_ROWS");
    if (rows && (!strcmp(rows, "1") || !strcmp(rows, "2"))) cb->gemv_rows_per_task = atoi(rows);
    if (S->profile) {
        CUDA_TRY(cudaEventCreate(&S->ev_start), COOPT_ERR_NOMEM);
        for (int i = 0; i < PROF_MAX_PENDING; i++) CUDA_TRY(cudaEventCreate(&S->ev[i]), COOPT_ERR_NOMEM);
        struct coopt_ops *o = &cb->ops;
        o->upload = p_upload, o->download = p_download, o->sync = p_sync, o->embed = p_embed;
        o->rmsnorm = p_rmsnorm, o->matmul = p_matmul, o->rope = p_rope, o->rope_store = p_rope_store;
        o->attention = p_attention, o->silu_mul = p_silu_mul, o->add = p_add, o->get_rows = p_get_rows;
        o->argmax = p_argmax, o->sample = p_sample;
        if (o->matmul_multi) o->matmul_multi = p_matmul_multi;
        if (o->matmul_swiglu) o->matmul_swiglu = p_matmul_swiglu;
        if (o->matmul_add) o->matmul_add = p_matmul_add;
        if (o->norm_matmul_multi) o->norm_matmul_multi = p_norm_matmul_multi;
        if (o->norm_matmul_swiglu) o->norm_matmul_swiglu = p_norm_matmul_swiglu;
        if (o->matmul_add_then_norm) o->matmul_add_then_norm = p_matmul_add_then_norm;
        if (o->norm_matmul_swiglu_then_add) o->norm_matmul_swiglu_then_add = p_norm_matmul_swiglu_then_add;
        if (o->rope_store_attention) o->rope_store_attention = p_rope_store_attention;
        if (o->rope_store_attention_then_matmul) o->rope_store_attention_then_matmul = p_rope_store_attention_then_matmul;
    }
    be->ops = &cb->ops;
#ifdef COOPT_TRACE
    trace_init(S);
#endif
    return COOPT_OK;
}

void cuda_step_free(struct cuda_backend *cb) {
    struct cuda_step *S = cb->step;
    if (!S) return;
    if (S->recording) { // a step was abandoned mid-recording: discard it
        cudaGraph_t graph = NULL;
        if (cudaStreamEndCapture(cb->stream, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
        S->recording = NULL;
    }
    for (int i = 0; i < STEP_MAX_GRAPHS; i++)
        if (S->g[i].exec) cudaGraphExecDestroy(S->g[i].exec);
    if (S->profile && S->ev_start) {
        prof_print(S);
        cudaEventDestroy(S->ev_start);
        for (int i = 0; i < PROF_MAX_PENDING; i++)
            if (S->ev[i]) cudaEventDestroy(S->ev[i]);
    }
    if (getenv("COOPT_CUDA_STEP_STATS")) {
        fprintf(stderr, "cuda steps: %lld op by op, %lld recorded, %lld replayed\n", (long long)S->n_eager,
                (long long)S->n_captures, (long long)S->n_replays);
        if (S->n_span > 0 && S->n_period > 0)
            fprintf(stderr,
                    "cuda steps: replays on the GPU %.1f us each (%lld), start to next start %.1f us (%lld): %.1f us "
                    "between replays (logits copy, host, next upload)\n",
                    1e3 * S->span_ms / (double)S->n_span, (long long)S->n_span, 1e3 * S->period_ms / (double)S->n_period,
                    (long long)S->n_period, 1e3 * (S->period_ms / (double)S->n_period - S->span_ms / (double)S->n_span));
    }
#ifdef COOPT_TRACE
    if (S->trace) trace_bind(NULL), cudaFree(S->trace);
#endif
    for (int i = 0; i < STEP_TIMING_RING; i++) {
        if (S->ev_t0[i]) cudaEventDestroy(S->ev_t0[i]);
        if (S->ev_t1[i]) cudaEventDestroy(S->ev_t1[i]);
    }
    free(S);
    cb->step = NULL;
}

// ---- page-locked host memory ----

enum coopt_status cuda_host_alloc(struct coopt_backend *be, size_t n_bytes, void **out) {
    *out          = NULL;
    cudaError_t e = cudaMallocHost(out, n_bytes ? n_bytes : 1);
    if (e != cudaSuccess) {
        *out = NULL;
        (void)cudaGetLastError();
        return coopt_fail(COOPT_ERR_NOMEM, "cannot allocate %.1f MiB of page-locked host memory (%s)", n_bytes / 1048576.0,
                          cudaGetErrorName(e));
    }
    return COOPT_OK;
}

void cuda_host_free(struct coopt_backend *be, void *p) {
    if (p) CUDA_CHECK(cudaFreeHost(p));
}

// ---- bandwidth probe ----
//
// read_kernel: Grid (n_sm * 4); Block 512 threads; a grid-stride loop of 16-byte loads, four in
// flight per thread, folded into one xor that is stored only if it equals an impossible value
// (so the loads are not optimized away).
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n, unsigned *sink) {
    unsigned acc    = 0;
    size_t   stride = (size_t)gridDim.x * blockDim.x;
    size_t   i      = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        uint4 a = __ldg(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9e3779b9u) *sink = acc;
}

extern "C" int coopt_cuda_membw(size_t n_bytes, int reps, double *copy_gbs, double *read_gbs) {
    *copy_gbs = *read_gbs = 0;
    n_bytes               = n_bytes / 16 * 16;
    void        *a = NULL, *b = NULL;
    unsigned    *sink = NULL;
    cudaEvent_t  e0 = NULL, e1 = NULL;
    cudaStream_t st = NULL;
    int          n_sm = 0, rc = -1;
    if (cudaMalloc(&a, n_bytes) != cudaSuccess || cudaMalloc(&b, n_bytes) != cudaSuccess ||
        cudaMalloc((void **)&sink, 4) != cudaSuccess || cudaEventCreate(&e0) != cudaSuccess ||
        cudaEventCreate(&e1) != cudaSuccess || cudaStreamCreate(&st) != cudaSuccess ||
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess)
        goto out;
    CUDA_CHECK(cudaMemsetAsync(a, 0x5a, n_bytes, st));
    CUDA_CHECK(cudaMemsetAsync(b, 0x33, n_bytes, st));
    for (int pass = 0; pass < 2; pass++) {
        float best = 1e30f;
        for (int r = 0; r < reps + 1; r++) { // the first is a warm-up
            CUDA_CHECK(cudaEventRecord(e0, st));
            if (pass == 0) {
                CUDA_CHECK(cudaMemcpyAsync(b, a, n_bytes, cudaMemcpyDeviceToDevice, st));
            } else {
                read_kernel<<<n_sm * 4, 512, 0, st>>>((const uint4 *)a, n_bytes / 16, sink);
                CUDA_CHECK_LAUNCH();
            }
            CUDA_CHECK(cudaEventRecord(e1, st));
            CUDA_CHECK(cudaEventSynchronize(e1));
            float ms = 0;
            CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
            if (r > 0 && ms < best) best = ms;
        }
        if (pass == 0) *copy_gbs = 2.0 * (double)n_bytes / (best * 1e-3) / 1e9; // read + write
        else *read_gbs = (double)n_bytes / (best * 1e-3) / 1e9;
    }
    rc = 0;
out:
    if (rc) (void)cudaGetLastError();
    if (st) cudaStreamDestroy(st);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    cudaFree(sink);
    return rc;
}
