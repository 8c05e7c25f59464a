/*
 * convert.c -- coopt convert: format conversion and Opt-GQA KV-head pooling (see convert.h).
 *
 * A conversion is a list of output tensors (struct cv_tensor), each a recipe over the loaded
 * model's weights: which source rows make output row r (identity, RoPE permutation within a
 * head, mean of `pool` KV heads) and the output type. The writers pull rows through callbacks,
 * one row at a time, so memory stays at one row per tensor (plus one dequantized GPTQ matrix).
 *
 * Opt-GQA pooling: the n_kv/G KV heads of group g are replaced by their mean, row by row (each
 * KV head is head_dim consecutive rows of k_proj / v_proj), biases likewise; query heads are
 * unchanged and query head h reads KV head h / (n_heads / G), which is what every GQA kernel
 * does with n_kv = G. For K the mean is taken in the RoPE layout of the weights we hold. That
 * is sound because the mean is row-wise and every head uses the same row layout: permuting rows
 * within each head and averaging heads commute, so pooling before or after the HF <-> GGUF
 * permutation gives the same numbers.
 *
 * Tokenizers: HF -> HF copies the tokenizer files; GGUF -> GGUF copies the tokenizer.* keys;
 * otherwise the loaded vocabulary is written as tokenizer.ggml.* keys (plus the input's
 * tokenizer.json verbatim as tokenizer.huggingface.json) or as a SentencePiece tokenizer.model
 * (or tokenizer.json again when the GGUF carries tokenizer.huggingface.json).
 */
#include "convert.h"

#include "dtype.h"
#include "gguf.h"
#include "gptq.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct coopt_convert_params coopt_convert_default_params(void) {
    return (struct coopt_convert_params){.to = COOPT_CONVERT_AUTO, .kv_heads = 0, .dtype = -1};
}

bool coopt_convert_format_parse(const char *s, enum coopt_convert_format *out) {
    if (!strcmp(s, "gguf")) *out = COOPT_CONVERT_GGUF;
    else if (!strcmp(s, "hf")) *out = COOPT_CONVERT_HF;
    else return false;
    return true;
}

int32_t coopt_convert_rope_src_row(int32_t row, int32_t head_dim, enum coopt_rope_layout from,
                                   enum coopt_rope_layout to) {
    int32_t half = head_dim / 2;
    if (from == to) return row;
    if (to == COOPT_ROPE_INTERLEAVED) return (row % 2) * half + row / 2; // row 2i+s <- s*d/2 + i
    return 2 * (row % half) + row / half;                                // row s*d/2+i <- 2i+s
}

// ---- output tensors ----

struct cv_tensor {
    char                       name[96];
    const struct coopt_weight *w;       // matrix source, or NULL
    const float               *vec;     // vector source (norm, bias, rope_freqs) in f32, or NULL
    int64_t                    n_in;    // output row length (vector: 1)
    int64_t                    n_out;   // output rows (vector: its length)
    bool                       is_vec;  // written as a 1-D tensor
    enum coopt_dtype           dtype;   // output type
    int32_t                    head_dim;   // > 0: rows are heads of head_dim rows
    enum coopt_rope_layout     rope_from;  // RoPE row permutation within heads (from -> to)
    enum coopt_rope_layout     rope_to;
    int32_t                    pool;       // source heads averaged into one output head (>= 1)
    // streaming state
    float                     *dense; // GPTQ source dequantized [src rows][n_in]
    float                     *f32;   // [n_in] (vector: [n_out]) one output row in f32
    double                    *acc;   // [n_in] pooling accumulator
    uint8_t                   *buf;   // the current output row (vector: the whole vector) in dtype
    int64_t                    cur;   // row held in buf, -1 = none
    size_t                     row_bytes;
    bool                       verbose;
};

static void cv_tensor_release(struct cv_tensor *t) {
    free(t->dense);
    free(t->f32);
    free(t->acc);
    free(t->buf);
    t->dense = NULL;
    t->f32   = NULL;
    t->acc   = NULL;
    t->buf   = NULL;
    t->cur   = -1;
}

// Source row index for output row r and pooled head p.
static int64_t cv_src_row(const struct cv_tensor *t, int64_t r, int32_t p) {
    if (t->head_dim <= 0) return r;
    int64_t h = r / t->head_dim;
    int32_t i = coopt_convert_rope_src_row((int32_t)(r % t->head_dim), t->head_dim, t->rope_from, t->rope_to);
    return (h * t->pool + p) * t->head_dim + i;
}

static enum coopt_status cv_tensor_prepare(struct cv_tensor *t) {
    if (t->buf) return COOPT_OK;
    int64_t n = t->is_vec ? t->n_out : t->n_in;
    t->row_bytes = coopt_dtype_row_bytes(t->dtype, n);
    t->f32       = coopt_malloc((size_t)n * sizeof(float));
    t->acc       = coopt_malloc((size_t)n * sizeof(double));
    t->buf       = coopt_malloc(t->row_bytes);
    if (!t->f32 || !t->acc || !t->buf) return COOPT_ERR_NOMEM;
    if (t->w && t->w->dtype == COOPT_DTYPE_Q4_GPTQ) {
        const struct coopt_gptq_weight *g = t->w->gptq;
        size_t                          sz;
        if (!coopt_mul_ok((size_t)g->n_out, (size_t)g->n_in, &sz) || !coopt_mul_ok(sz, sizeof(float), &sz) ||
            !(t->dense = coopt_malloc(sz)))
            return COOPT_ERR_NOMEM;
        coopt_gptq_dequant_ref(g, t->dense);
    }
    if (t->verbose) {
        coopt_log_info("convert: %-32s %s [%lld x %lld]%s%s", t->name, coopt_dtype_name(t->dtype),
                       (long long)t->n_out, (long long)t->n_in, t->pool > 1 ? " (KV heads pooled)" : "",
                       t->rope_from != t->rope_to ? " (RoPE rows permuted)" : "");
    }
    return COOPT_OK;
}

// Source row s of a matrix in f32.
static void cv_src_f32(const struct cv_tensor *t, int64_t s, float *dst) {
    if (t->dense) {
        memcpy(dst, t->dense + s * t->n_in, (size_t)t->n_in * sizeof(float));
        return;
    }
    size_t rb = coopt_dtype_row_bytes(t->w->dtype, t->n_in);
    coopt_dequant_row(t->w->dtype, (const uint8_t *)t->w->data + (size_t)s * rb, dst, t->n_in);
}

// Fills t->buf with output row r (vector: the whole vector).
static void cv_produce(struct cv_tensor *t, int64_t r) {
    if (t->cur == r) return;
    t->cur = r;
    if (t->is_vec) {
        for (int64_t i = 0; i < t->n_out; i++) {
            double s = 0;
            for (int32_t p = 0; p < t->pool; p++) s += t->vec[cv_src_row(t, i, p)];
            t->f32[i] = (float)(s / t->pool);
        }
        coopt_quant_row(t->dtype, t->f32, t->buf, t->n_out);
        return;
    }
    if (t->pool == 1 && !t->dense && t->w->dtype == t->dtype) { // byte-exact copy
        size_t rb = coopt_dtype_row_bytes(t->w->dtype, t->n_in);
        memcpy(t->buf, (const uint8_t *)t->w->data + (size_t)cv_src_row(t, r, 0) * rb, rb);
        return;
    }
    if (t->pool == 1) {
        cv_src_f32(t, cv_src_row(t, r, 0), t->f32);
    } else {
        // mean in double over the group's heads, then one rounding to f32
        memset(t->acc, 0, (size_t)t->n_in * sizeof(double));
        for (int32_t p = 0; p < t->pool; p++) {
            cv_src_f32(t, cv_src_row(t, r, p), t->f32);
            for (int64_t i = 0; i < t->n_in; i++) t->acc[i] += t->f32[i];
        }
        for (int64_t i = 0; i < t->n_in; i++) t->f32[i] = (float)(t->acc[i] / t->pool);
    }
    coopt_quant_row(t->dtype, t->f32, t->buf, t->n_in);
}

// GGUF writer callback: every row in order.
static enum coopt_status cv_fill_gguf(void *user, struct coopt_gguf_sink *sink) {
    struct cv_tensor *t  = user;
    enum coopt_status st = cv_tensor_prepare(t);
    int64_t           n  = t->is_vec ? 1 : t->n_out;
    for (int64_t r = 0; st == COOPT_OK && r < n; r++) {
        cv_produce(t, r);
        st = coopt_gguf_sink_write(sink, t->buf, t->row_bytes);
    }
    cv_tensor_release(t);
    return st;
}

// Safetensors writer callback: bytes [offset, offset + n), increasing.
static enum coopt_status cv_fill_st(void *user, void *dst, size_t offset, size_t n) {
    struct cv_tensor *t  = user;
    enum coopt_status st = cv_tensor_prepare(t);
    if (st != COOPT_OK) return st;
    size_t total = t->row_bytes * (size_t)(t->is_vec ? 1 : t->n_out);
    for (size_t done = 0; done < n;) {
        size_t  pos = offset + done;
        int64_t r   = (int64_t)(pos / t->row_bytes);
        size_t  in  = pos % t->row_bytes;
        size_t  k   = COOPT_MIN(n - done, t->row_bytes - in);
        cv_produce(t, r);
        memcpy((uint8_t *)dst + done, t->buf + in, k);
        done += k;
    }
    if (offset + n >= total) cv_tensor_release(t);
    return COOPT_OK;
}

// ---- the job ----

enum cv_fmt { FMT_GGUF = 1, FMT_HF, FMT_LLAMA2C };

struct cv {
    struct coopt_model         *m;
    const struct coopt_convert_params *p;
    const char                 *in, *out;
    enum cv_fmt                 in_fmt, out_fmt;
    struct coopt_gguf          *gin;       // GGUF input metadata (own mapping), or NULL
    int32_t                     kv_out;    // KV heads written
    int32_t                     pool;      // n_kv_in / kv_out
    enum coopt_rope_layout      layout;    // of the output
    enum coopt_dtype            norm_type; // HF norms/biases
    struct cv_tensor           *t;
    int                         n_t, cap_t;
    float                      *rope_freqs; // [head_dim/2] llama3 scaling divisors (GGUF out)
};

static bool dtype_fits(enum coopt_dtype t, enum cv_fmt f) {
    if (t == COOPT_DTYPE_F32 || t == COOPT_DTYPE_F16 || t == COOPT_DTYPE_BF16) return true;
    return f == FMT_GGUF && (t == COOPT_DTYPE_Q8_0 || t == COOPT_DTYPE_Q4_0);
}

// Output type of a matrix whose source has type `src` and rows of n_in.
static enum coopt_dtype cv_matrix_type(const struct cv *cv, enum coopt_dtype src, int64_t n_in) {
    enum coopt_dtype t = cv->p->dtype >= 0 ? (enum coopt_dtype)cv->p->dtype : src;
    if (!dtype_fits(t, cv->out_fmt)) t = COOPT_DTYPE_F16;
    if (coopt_dtype_row_bytes(t, n_in) == 0) t = COOPT_DTYPE_F16; // Q8_0/Q4_0 need rows of 32k
    return t;
}

static struct cv_tensor *cv_add(struct cv *cv, const char *name) {
    if (cv->n_t == cv->cap_t) {
        int   cap = cv->cap_t ? cv->cap_t * 2 : 64;
        void *p   = coopt_realloc(cv->t, (size_t)cap * sizeof(*cv->t));
        if (!p) return NULL;
        cv->t     = p;
        cv->cap_t = cap;
    }
    struct cv_tensor *t = &cv->t[cv->n_t++];
    *t                  = (struct cv_tensor){.pool = 1, .cur = -1, .verbose = cv->p->verbose};
    t->rope_from = t->rope_to = cv->layout;
    snprintf(t->name, sizeof(t->name), "%s", name);
    return t;
}

// kind: 0 plain, 'q' query rows (permute), 'k' key rows (permute + pool), 'v' value rows (pool)
static enum coopt_status cv_add_matrix(struct cv *cv, const char *name, const struct coopt_weight *w, int kind) {
    struct cv_tensor *t = cv_add(cv, name);
    if (!t) return COOPT_ERR_NOMEM;
    const struct coopt_model_config *c = &cv->m->config;
    t->w     = w;
    t->n_in  = w->n_in;
    t->n_out = w->n_out;
    t->dtype = cv_matrix_type(cv, w->dtype, w->n_in);
    if (kind) t->head_dim = c->head_dim;
    if (kind == 'q' || kind == 'k') t->rope_from = c->rope_layout;
    if (kind == 'k' || kind == 'v') {
        t->pool  = cv->pool;
        t->n_out = (int64_t)cv->kv_out * c->head_dim;
    }
    return COOPT_OK;
}

static enum coopt_status cv_add_vector(struct cv *cv, const char *name, const float *v, int64_t n, int kind,
                                       enum coopt_dtype dt) {
    struct cv_tensor *t = cv_add(cv, name);
    if (!t) return COOPT_ERR_NOMEM;
    const struct coopt_model_config *c = &cv->m->config;
    t->vec    = v;
    t->is_vec = true;
    t->n_in   = 1;
    t->n_out  = n;
    t->dtype  = dt;
    if (kind) t->head_dim = c->head_dim;
    if (kind == 'q' || kind == 'k') t->rope_from = c->rope_layout;
    if (kind == 'k' || kind == 'v') {
        t->pool  = cv->pool;
        t->n_out = (int64_t)cv->kv_out * c->head_dim;
    }
    return COOPT_OK;
}

// True if every value of v survives a round trip through dtype t.
static bool exact_in(const float *v, int64_t n, enum coopt_dtype t) {
    for (int64_t i = 0; i < n; i++) {
        float    x = v[i], y;
        uint16_t h;
        if (t == COOPT_DTYPE_BF16) h = coopt_f32_to_bf16(x), y = coopt_bf16_to_f32(h);
        else if (t == COOPT_DTYPE_F16) h = coopt_f32_to_f16(x), y = coopt_f16_to_f32(h);
        else y = x;
        if (memcmp(&x, &y, 4) != 0) return false;
    }
    return true;
}

// Builds the tensor list in the output format's names.
static enum coopt_status cv_plan(struct cv *cv) {
    struct coopt_model              *m    = cv->m;
    const struct coopt_model_config *c    = &m->config;
    bool                             gguf = cv->out_fmt == FMT_GGUF;
    enum coopt_status                st;
    char                             name[96];

    // HF norms and biases: the weights' float type when every value is exact in it, else f32
    enum coopt_dtype wt = cv_matrix_type(cv, m->layers[0].wq.dtype, c->dim);
    if (wt != COOPT_DTYPE_F16 && wt != COOPT_DTYPE_BF16) wt = COOPT_DTYPE_F32;
    bool exact = exact_in(m->out_norm, c->dim, wt);
    for (int32_t l = 0; exact && l < c->n_layers; l++) {
        const struct coopt_layer  *L    = &m->layers[l];
        const struct coopt_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        exact = exact_in(L->attn_norm, c->dim, wt) && exact_in(L->ffn_norm, c->dim, wt);
        for (size_t i = 0; exact && i < COOPT_ARRAY_LEN(ws); i++)
            if (ws[i]->bias) exact = exact_in(ws[i]->bias, ws[i]->n_out, wt);
    }
    cv->norm_type       = gguf || !exact ? COOPT_DTYPE_F32 : wt;
    enum coopt_dtype nt = cv->norm_type;

    if ((st = cv_add_matrix(cv, gguf ? "token_embd.weight" : "model.embed_tokens.weight", &m->tok_embd, 0)) ||
        (st = cv_add_vector(cv, gguf ? "output_norm.weight" : "model.norm.weight", m->out_norm, c->dim, 0, nt)))
        return st;
    if (!c->tied_embeddings &&
        (st = cv_add_matrix(cv, gguf ? "output.weight" : "lm_head.weight", &m->output, 0)) != COOPT_OK)
        return st;
    if (gguf && cv->rope_freqs &&
        (st = cv_add_vector(cv, "rope_freqs.weight", cv->rope_freqs, c->head_dim / 2, 0, COOPT_DTYPE_F32)))
        return st;

    static const struct {
        const char *gguf, *hf;
        size_t      off;
        int         kind;
    } lin[] = {
        {"attn_q", "self_attn.q_proj", offsetof(struct coopt_layer, wq), 'q'},
        {"attn_k", "self_attn.k_proj", offsetof(struct coopt_layer, wk), 'k'},
        {"attn_v", "self_attn.v_proj", offsetof(struct coopt_layer, wv), 'v'},
        {"attn_output", "self_attn.o_proj", offsetof(struct coopt_layer, wo), 0},
        {"ffn_gate", "mlp.gate_proj", offsetof(struct coopt_layer, w_gate), 0},
        {"ffn_up", "mlp.up_proj", offsetof(struct coopt_layer, w_up), 0},
        {"ffn_down", "mlp.down_proj", offsetof(struct coopt_layer, w_down), 0},
    };
    for (int32_t l = 0; l < c->n_layers; l++) {
        const struct coopt_layer *L = &m->layers[l];
        if (gguf) snprintf(name, sizeof(name), "blk.%d.attn_norm.weight", l);
        else snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
        if ((st = cv_add_vector(cv, name, L->attn_norm, c->dim, 0, nt))) return st;
        if (gguf) snprintf(name, sizeof(name), "blk.%d.ffn_norm.weight", l);
        else snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
        if ((st = cv_add_vector(cv, name, L->ffn_norm, c->dim, 0, nt))) return st;
        for (size_t i = 0; i < COOPT_ARRAY_LEN(lin); i++) {
            const struct coopt_weight *w = (const struct coopt_weight *)((const char *)L + lin[i].off);
            if (gguf) snprintf(name, sizeof(name), "blk.%d.%s.weight", l, lin[i].gguf);
            else snprintf(name, sizeof(name), "model.layers.%d.%s.weight", l, lin[i].hf);
            if ((st = cv_add_matrix(cv, name, w, lin[i].kind))) return st;
            if (!w->bias) continue;
            if (gguf) snprintf(name, sizeof(name), "blk.%d.%s.bias", l, lin[i].gguf);
            else snprintf(name, sizeof(name), "model.layers.%d.%s.bias", l, lin[i].hf);
            if ((st = cv_add_vector(cv, name, w->bias, w->n_out, lin[i].kind, nt))) return st;
        }
    }
    return COOPT_OK;
}

// ---- vocabulary export ----

struct cv_vocab {
    struct coopt_vocab_info info;
    const char            **pieces; // [n] borrowed from the tokenizer
    uint32_t               *lens;   // [n]
    float                  *scores; // [n] (merge-derived for merge-based SPM vocabularies)
    int32_t                *types;  // [n]
    char                  **merges; // [n_merges] "a b" (byte-level BPE only)
    int32_t                 n_merges;
    int32_t                 n;        // entries: info.n_tokens, or more after cv_vocab_pad
    char                   *pad_text; // the "[PADi]" pieces cv_vocab_pad added
};

static void cv_vocab_free(struct cv_vocab *v) {
    for (int32_t i = 0; v->merges && i < v->n_merges; i++) free(v->merges[i]);
    free(v->merges);
    free(v->pieces);
    free(v->lens);
    free(v->scores);
    free(v->types);
    free(v->pad_text);
}

// Pads the vocabulary to n_vocab entries when the model's embedding has more rows than its
// tokenizer has pieces (checkpoints with a padded vocab_size, `coopt synth --arch llama3-8b`):
// GGUF readers such as llama.cpp require one token per embedding row. The added rows are
// "[PAD<id>]" pieces of type UNUSED with the lowest score, so no tokenizer ever produces them.
static enum coopt_status cv_vocab_pad(struct cv_vocab *v, int32_t n_vocab) {
    if (n_vocab <= v->n) return COOPT_OK;
    int32_t     n0 = v->n;
    size_t      per = 24, cap = (size_t)(n_vocab - n0) * per;
    const char **pieces = realloc(v->pieces, (size_t)n_vocab * sizeof(*pieces));
    if (pieces) v->pieces = pieces;
    uint32_t *lens = realloc(v->lens, (size_t)n_vocab * sizeof(*lens));
    if (lens) v->lens = lens;
    float *scores = realloc(v->scores, (size_t)n_vocab * sizeof(*scores));
    if (scores) v->scores = scores;
    int32_t *types = realloc(v->types, (size_t)n_vocab * sizeof(*types));
    if (types) v->types = types;
    v->pad_text = coopt_malloc(cap);
    if (!pieces || !lens || !scores || !types || !v->pad_text) return COOPT_ERR_NOMEM;
    float lowest = 0.0f;
    for (int32_t i = 0; i < n0; i++) lowest = i == 0 || v->scores[i] < lowest ? v->scores[i] : lowest;
    for (int32_t i = n0; i < n_vocab; i++) {
        char *t      = v->pad_text + (size_t)(i - n0) * per;
        int   len    = snprintf(t, per, "[PAD%d]", (int)i);
        v->pieces[i] = t;
        v->lens[i]   = (uint32_t)len;
        v->scores[i] = lowest - 1.0f;
        v->types[i]  = COOPT_TOKEN_UNUSED;
    }
    v->n = n_vocab;
    return COOPT_OK;
}

// A merge-based SPM vocabulary (HF tokenizer.json) goes where only scores are read (GGUF
// "llama", tokenizer.model): the piece a merge of rank r produces gets score -r, so "highest
// score first" merges in rank order; pieces no merge produces rank below all of them.
static enum coopt_status cv_vocab_init(const struct coopt_tokenizer *tok, struct cv_vocab *v) {
    memset(v, 0, sizeof(*v));
    coopt_tokenizer_get_vocab(tok, &v->info);
    int32_t n  = v->info.n_tokens, nm = v->info.n_merges;
    v->n       = n;
    v->pieces  = coopt_calloc((size_t)n, sizeof(*v->pieces));
    v->lens    = coopt_calloc((size_t)n, sizeof(*v->lens));
    v->scores  = coopt_calloc((size_t)n, sizeof(*v->scores));
    v->types   = coopt_calloc((size_t)n, sizeof(*v->types));
    int32_t *l = coopt_calloc((size_t)nm + 1, 3 * sizeof(int32_t));
    if (!v->pieces || !v->lens || !v->scores || !v->types || !l) {
        free(l);
        return COOPT_ERR_NOMEM;
    }
    for (int32_t i = 0; i < n; i++) {
        size_t len;
        v->pieces[i] = coopt_tokenizer_piece(tok, i, &len);
        v->lens[i]   = (uint32_t)len;
        v->scores[i] = v->info.scores[i];
        v->types[i]  = v->info.attrs[i];
    }
    enum coopt_status st = coopt_tokenizer_get_merges(tok, l, l + nm, l + 2 * nm);
    if (st == COOPT_OK && nm > 0 && v->info.type == COOPT_TOK_SPM) {
        for (int32_t i = 0; i < n; i++) v->scores[i] = -(float)nm - (float)i;
        for (int32_t r = nm - 1; r >= 0; r--) v->scores[l[2 * nm + r]] = -(float)r;
    } else if (st == COOPT_OK && nm > 0) {
        v->merges = coopt_calloc((size_t)nm, sizeof(char *));
        if (!v->merges) st = COOPT_ERR_NOMEM;
        for (int32_t r = 0; st == COOPT_OK && r < nm; r++, v->n_merges++) {
            uint32_t la = v->lens[l[r]], lb = v->lens[l[nm + r]];
            char    *s  = coopt_malloc(la + lb + 2);
            if (!s) {
                st = COOPT_ERR_NOMEM;
                break;
            }
            memcpy(s, v->pieces[l[r]], la);
            s[la] = ' ';
            memcpy(s + la + 1, v->pieces[l[nm + r]], lb);
            s[la + lb + 1] = 0;
            v->merges[r]   = s;
        }
    }
    free(l);
    return st;
}

static enum coopt_status gguf_set_token_id(struct coopt_gguf_writer *w, const char *key, int32_t id) {
    return id >= 0 ? coopt_gguf_writer_set_u32(w, key, (uint32_t)id) : COOPT_OK;
}

static enum coopt_status cv_gguf_vocab(struct cv *cv, struct coopt_gguf_writer *w) {
    struct cv_vocab   v;
    enum coopt_status st = cv_vocab_init(cv->m->tokenizer, &v);
    if (st == COOPT_OK) st = cv_vocab_pad(&v, cv->m->config.n_vocab);
    bool              bpe = v.info.type == COOPT_TOK_BPE_BYTES;
    const char       *pre = v.info.pretok == COOPT_PRETOK_LLAMA3 ? "llama-bpe"
                            : v.info.pretok == COOPT_PRETOK_GPT2 ? "gpt2"
                                                                 : "default";
    uint64_t          n   = (uint64_t)v.n;
    if (st || (st = coopt_gguf_writer_set_str(w, "tokenizer.ggml.model", bpe ? "gpt2" : "llama")) ||
        (st = coopt_gguf_writer_set_str(w, "tokenizer.ggml.pre", pre)) ||
        (st = coopt_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", v.pieces, v.lens, n)) ||
        (st = coopt_gguf_writer_set_arr(w, "tokenizer.ggml.scores", COOPT_GGUF_F32, v.scores, n)) ||
        (st = coopt_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", COOPT_GGUF_I32, v.types, n)) ||
        (bpe && (st = coopt_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v.merges,
                                                    NULL, (uint64_t)v.n_merges))) ||
        (st = gguf_set_token_id(w, "tokenizer.ggml.bos_token_id", v.info.bos_id)) ||
        (st = gguf_set_token_id(w, "tokenizer.ggml.eos_token_id", v.info.eos_id)) ||
        (st = gguf_set_token_id(w, "tokenizer.ggml.unknown_token_id", v.info.unk_id)) ||
        (st = gguf_set_token_id(w, "tokenizer.ggml.padding_token_id", v.info.pad_id)) ||
        (st = coopt_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", v.info.add_bos)) ||
        (st = coopt_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", v.info.add_eos)) ||
        (st = coopt_gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", v.info.add_space_prefix))) {
        cv_vocab_free(&v);
        return st;
    }
    cv_vocab_free(&v);
    // the original tokenizer.json travels along, so GGUF -> HF gives it back verbatim
    char path[4096];
    if (cv->in_fmt == FMT_HF && coopt_path_join(path, sizeof(path), cv->in, "tokenizer.json") &&
        coopt_path_exists(path)) {
        char  *text = NULL;
        size_t len  = 0;
        if ((st = coopt_read_file(path, &text, &len)) != COOPT_OK) return st;
        if (strlen(text) == len) st = coopt_gguf_writer_set_str(w, "tokenizer.huggingface.json", text);
        free(text);
    }
    return st;
}

// ---- SentencePiece tokenizer.model (protobuf) writer ----

struct pbw {
    uint8_t *p;
    size_t   n, cap;
    bool     oom;
};

static void pb_bytes(struct pbw *b, const void *d, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = COOPT_MAX(b->cap * 2, b->n + n + 256);
        void  *q   = coopt_realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p   = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void pb_varint(struct pbw *b, uint64_t v) {
    uint8_t t[10];
    int     k = 0;
    do {
        t[k++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    pb_bytes(b, t, (size_t)k);
}
static void pb_key(struct pbw *b, uint32_t field, uint32_t wire) { pb_varint(b, (uint64_t)field << 3 | wire); }
static void pb_int(struct pbw *b, uint32_t field, int64_t v) {
    pb_key(b, field, 0);
    pb_varint(b, (uint64_t)v); // negative int32 as 10-byte two's complement, as protobuf does
}
static void pb_len(struct pbw *b, uint32_t field, const void *d, size_t n) {
    pb_key(b, field, 2);
    pb_varint(b, n);
    pb_bytes(b, d, n);
}

static enum coopt_status cv_write_spm(struct cv *cv, const char *path) {
    struct cv_vocab   v;
    enum coopt_status st = cv_vocab_init(cv->m->tokenizer, &v);
    struct pbw        b = {0}, s = {0};
    if (st != COOPT_OK) goto done;
    for (int32_t i = 0; i < v.info.n_tokens; i++) {
        s.n = 0;
        pb_len(&s, 1, v.pieces[i], v.lens[i]);
        pb_key(&s, 2, 5);
        pb_bytes(&s, &v.scores[i], 4); // little-endian float
        pb_int(&s, 3, v.types[i]);
        pb_len(&b, 1, s.p, s.n);
    }
    s.n = 0; // trainer_spec: model_type BPE, byte_fallback, special ids
    pb_int(&s, 3, 2);
    pb_int(&s, 35, 1);
    pb_int(&s, 40, v.info.unk_id);
    pb_int(&s, 41, v.info.bos_id);
    pb_int(&s, 42, v.info.eos_id);
    pb_int(&s, 43, v.info.pad_id);
    pb_len(&b, 2, s.p, s.n);
    s.n = 0; // normalizer_spec: identity, dummy prefix as the vocabulary says, whitespace kept
    pb_len(&s, 1, "identity", 8);
    pb_int(&s, 3, v.info.add_space_prefix);
    pb_int(&s, 4, 0);
    pb_len(&b, 3, s.p, s.n);
    if (b.oom || s.oom) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b.p, 1, b.n, f) != b.n) st = coopt_fail(COOPT_ERR_IO, "%s: cannot write", path);
    if (f && fclose(f) != 0 && st == COOPT_OK) st = coopt_fail(COOPT_ERR_IO, "%s: cannot write", path);
done:
    free(b.p);
    free(s.p);
    cv_vocab_free(&v);
    return st;
}

// ---- GGUF output ----

static enum coopt_status cv_write_gguf(struct cv *cv) {
    const struct coopt_model_config *c = &cv->m->config;
    struct coopt_gguf_writer        *w;
    enum coopt_status                st = coopt_gguf_writer_init(&w);
    if (st != COOPT_OK) return st;
    // general.* and tokenizer.* of a GGUF input are kept; llama.* is written from the config
    bool have_name = false;
    for (int64_t i = 0; cv->gin && i < cv->gin->n_kv; i++) {
        const char *k = cv->gin->kv[i].key;
        if (strncmp(k, "tokenizer.", 10) != 0 && strncmp(k, "general.", 8) != 0) continue;
        if (!strcmp(k, "general.alignment") || !strcmp(k, "general.file_type") ||
            !strcmp(k, "general.quantization_version") || !strcmp(k, "general.architecture"))
            continue;
        have_name |= !strcmp(k, "general.name");
        if ((st = coopt_gguf_writer_copy_kv(w, &cv->gin->kv[i])) != COOPT_OK) goto done;
    }
    char name[256];
    snprintf(name, sizeof(name), "%s", coopt_path_basename(cv->in));
    if ((st = coopt_gguf_writer_set_str(w, "general.architecture", "llama")) ||
        (!have_name && (st = coopt_gguf_writer_set_str(w, "general.name", name))) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.context_length", (uint32_t)c->n_ctx_train)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.embedding_length", (uint32_t)c->dim)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.block_count", (uint32_t)c->n_layers)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.feed_forward_length", (uint32_t)c->ffn_dim)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.rope.dimension_count", (uint32_t)c->head_dim)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.attention.head_count", (uint32_t)c->n_heads)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.attention.head_count_kv", (uint32_t)cv->kv_out)) ||
        (st = coopt_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", c->norm_eps)) ||
        (st = coopt_gguf_writer_set_f32(w, "llama.rope.freq_base", c->rope_theta)) ||
        (st = coopt_gguf_writer_set_u32(w, "llama.vocab_size", (uint32_t)c->n_vocab)))
        goto done;
    if (c->head_dim * c->n_heads != c->dim &&
        ((st = coopt_gguf_writer_set_u32(w, "llama.attention.key_length", (uint32_t)c->head_dim)) ||
         (st = coopt_gguf_writer_set_u32(w, "llama.attention.value_length", (uint32_t)c->head_dim))))
        goto done;
    if (c->sliding_window > 0 &&
        (st = coopt_gguf_writer_set_u32(w, "llama.attention.sliding_window", (uint32_t)c->sliding_window)))
        goto done;
    if (c->rope_scaling == COOPT_ROPE_SCALING_LINEAR &&
        ((st = coopt_gguf_writer_set_str(w, "llama.rope.scaling.type", "linear")) ||
         (st = coopt_gguf_writer_set_f32(w, "llama.rope.scaling.factor", c->rope_factor))))
        goto done;
    if (c->rope_scaling == COOPT_ROPE_SCALING_LLAMA3 && c->rope_orig_ctx > 0 &&
        (st = coopt_gguf_writer_set_u32(w, "llama.rope.scaling.original_context_length", (uint32_t)c->rope_orig_ctx)))
        goto done;
    if (!cv->gin && (st = cv_gguf_vocab(cv, w)) != COOPT_OK) goto done;

    for (int i = 0; i < cv->n_t; i++) {
        struct cv_tensor *t = &cv->t[i];
        uint32_t          gt;
        if (!coopt_dtype_to_ggml(t->dtype, &gt)) {
            st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: GGUF cannot hold %s", t->name, coopt_dtype_name(t->dtype));
            goto done;
        }
        int64_t ne[2] = {t->is_vec ? t->n_out : t->n_in, t->n_out};
        if ((st = coopt_gguf_writer_add_tensor(w, t->name, gt, t->is_vec ? 1 : 2, ne, NULL, cv_fill_gguf, t)))
            goto done;
    }
    st = coopt_gguf_writer_write(w, cv->out);
done:
    coopt_gguf_writer_free(w);
    return st;
}

// ---- Hugging Face output ----

// The shortest decimal that reads back as f (so config.json says 1e-05, not 9.99999975e-06).

static void json_set(cJSON *o, const char *key, cJSON *v) {
    if (cJSON_GetObjectItemCaseSensitive(o, key)) cJSON_ReplaceItemInObjectCaseSensitive(o, key, v);
    else cJSON_AddItemToObject(o, key, v);
}

static enum coopt_status write_text(const char *path, const char *text, size_t len) {
    FILE             *f  = fopen(path, "wb");
    enum coopt_status st = COOPT_OK;
    if (!f || fwrite(text, 1, len, f) != len) st = coopt_fail(COOPT_ERR_IO, "%s: cannot write", path);
    if (f && fclose(f) != 0 && st == COOPT_OK) st = coopt_fail(COOPT_ERR_IO, "%s: cannot write", path);
    return st;
}

static enum coopt_status cv_write_config(struct cv *cv, enum coopt_dtype wt) {
    cJSON            *root = NULL;
    char              path[4096];
    enum coopt_status st;
    if (cv->in_fmt == FMT_HF) { // keep every field we do not change
        char  *text = NULL;
        size_t len  = 0;
        if (!coopt_path_join(path, sizeof(path), cv->in, "config.json")) return COOPT_ERR_IO;
        if ((st = coopt_read_file(path, &text, &len)) != COOPT_OK) return st;
        root = cJSON_ParseWithLength(text, len);
        free(text);
        if (!cJSON_IsObject(root)) {
            cJSON_Delete(root);
            return coopt_fail(COOPT_ERR_FORMAT, "%s: not a JSON object", path);
        }
        cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config"); // weights are dequantized
    } else {
        if (!(root = coopt_hf_config_from_model(cv->m))) return COOPT_ERR_NOMEM;
    }
    json_set(root, "num_key_value_heads", cJSON_CreateNumber(cv->kv_out));
    json_set(root, "torch_dtype", cJSON_CreateString(wt == COOPT_DTYPE_BF16  ? "bfloat16"
                                                     : wt == COOPT_DTYPE_F16 ? "float16"
                                                                             : "float32"));
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return COOPT_ERR_NOMEM;
    if (!coopt_path_join(path, sizeof(path), cv->out, "config.json")) {
        free(text);
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", cv->out);
    }
    st = write_text(path, text, strlen(text));
    free(text);
    return st;
}

static enum coopt_status copy_file(const char *from, const char *to) {
    char             *text = NULL;
    size_t            len  = 0;
    enum coopt_status st   = coopt_read_file(from, &text, &len);
    if (st == COOPT_OK) st = write_text(to, text, len);
    free(text);
    return st;
}

static enum coopt_status cv_write_tokenizer(struct cv *cv) {
    char              src[4096], dst[4096];
    enum coopt_status st = COOPT_OK;
    if (cv->in_fmt == FMT_HF) {
        static const char *const files[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                            "special_tokens_map.json", "generation_config.json"};
        for (size_t i = 0; st == COOPT_OK && i < COOPT_ARRAY_LEN(files); i++) {
            if (!coopt_path_join(src, sizeof(src), cv->in, files[i]) ||
                !coopt_path_join(dst, sizeof(dst), cv->out, files[i]))
                return coopt_fail(COOPT_ERR_IO, "%s: path too long", cv->out);
            if (coopt_path_exists(src)) st = copy_file(src, dst);
        }
        return st;
    }
    const char *hf_json = NULL;
    size_t      hf_len  = 0;
    if (cv->gin && (st = coopt_gguf_get_str(cv->gin, "tokenizer.huggingface.json", false, &hf_json, &hf_len)))
        return st;
    if (hf_json) {
        if (!coopt_path_join(dst, sizeof(dst), cv->out, "tokenizer.json")) return COOPT_ERR_IO;
        return write_text(dst, hf_json, hf_len);
    }
    struct coopt_vocab_info vi;
    coopt_tokenizer_get_vocab(cv->m->tokenizer, &vi);
    if (vi.type != COOPT_TOK_SPM)
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s: a byte-level BPE vocabulary can go to a Hugging Face directory only from a GGUF "
                          "that carries tokenizer.huggingface.json",
                          cv->in);
    if (!coopt_path_join(dst, sizeof(dst), cv->out, "tokenizer.model")) return COOPT_ERR_IO;
    return cv_write_spm(cv, dst);
}

static enum coopt_status cv_write_hf(struct cv *cv) {
    if (mkdir(cv->out, 0777) != 0 && errno != EEXIST)
        return coopt_fail(COOPT_ERR_IO, "%s: cannot create the output directory: %s", cv->out, strerror(errno));
    if (!coopt_path_is_dir(cv->out))
        return coopt_fail(COOPT_ERR_IO, "%s: exists and is not a directory (a Hugging Face model is a directory)",
                          cv->out);
    for (int i = 0; i < cv->n_t; i++) {
        if (!coopt_st_dtype_name(cv->t[i].dtype))
            return coopt_fail(COOPT_ERR_INVALID, "%s: safetensors cannot hold %s (use --dtype f32, f16 or bf16)",
                              cv->t[i].name, coopt_dtype_name(cv->t[i].dtype));
    }
    struct coopt_st_writer *w;
    enum coopt_status       st = coopt_st_writer_init(&w);
    char                    path[4096];
    if (st != COOPT_OK) return st;
    if ((st = coopt_st_writer_meta(w, "format", "pt")) != COOPT_OK) goto done;
    for (int i = 0; i < cv->n_t; i++) {
        struct cv_tensor *t        = &cv->t[i];
        int64_t           shape[2] = {t->n_out, t->n_in};
        if ((st = coopt_st_writer_add_fn(w, t->name, t->dtype, t->is_vec ? 1 : 2, shape, cv_fill_st, t))) goto done;
    }
    if (!coopt_path_join(path, sizeof(path), cv->out, COOPT_ST_SINGLE_NAME)) {
        st = coopt_fail(COOPT_ERR_IO, "%s: path too long", cv->out);
        goto done;
    }
    if ((st = coopt_st_writer_write(w, path)) != COOPT_OK) goto done;
    // a stale index from an earlier sharded model in this directory would win over our file
    if (coopt_path_join(path, sizeof(path), cv->out, COOPT_ST_INDEX_NAME) && coopt_path_exists(path)) remove(path);
    if ((st = cv_write_config(cv, cv_matrix_type(cv, cv->m->layers[0].wq.dtype, cv->m->config.dim))) != COOPT_OK)
        goto done;
    st = cv_write_tokenizer(cv);
done:
    coopt_st_writer_free(w);
    return st;
}

// ---- entry point ----

static enum cv_fmt detect_format(const char *path) {
    if (coopt_path_is_dir(path)) return FMT_HF;
    FILE *f = fopen(path, "rb");
    char  h[4] = {0};
    if (f) {
        size_t n = fread(h, 1, 4, f);
        (void)n;
        fclose(f);
    }
    return memcmp(h, "GGUF", 4) == 0 ? FMT_GGUF : FMT_LLAMA2C;
}

// llama3 RoPE scaling goes into GGUF as rope_freqs.weight (what llama.cpp's converter writes).
static enum coopt_status cv_rope_freqs(struct cv *cv) {
    const struct coopt_model_config *c = &cv->m->config;
    if (c->rope_scaling != COOPT_ROPE_SCALING_LLAMA3) return COOPT_OK;
    int32_t half = c->head_dim / 2;
    if (!(cv->rope_freqs = coopt_malloc((size_t)half * sizeof(float)))) return COOPT_ERR_NOMEM;
    double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor, orig = c->rope_orig_ctx;
    for (int32_t i = 0; i < half; i++) {
        double freq = pow(c->rope_theta, -2.0 * i / c->head_dim), wl = 2 * M_PI / freq, f;
        if (wl < orig / hi) f = 1;
        else if (wl > orig / lo) f = c->rope_factor;
        else {
            double smooth = (orig / wl - lo) / (hi - lo);
            f             = 1 / ((1 - smooth) / c->rope_factor + smooth);
        }
        cv->rope_freqs[i] = (float)f;
    }
    return COOPT_OK;
}

enum coopt_status coopt_convert(const char *in, const char *out, const struct coopt_convert_params *p) {
    struct coopt_convert_params def = coopt_convert_default_params();
    if (!p) p = &def;
    if (!in || !out) return coopt_fail(COOPT_ERR_INVALID, "convert: input and output paths are required");
    if (p->dtype >= 0 && !dtype_fits((enum coopt_dtype)p->dtype, FMT_GGUF))
        return coopt_fail(COOPT_ERR_INVALID, "convert: --dtype %s is not a weight type (f32 f16 bf16 q8_0 q4_0)",
                          coopt_dtype_name((enum coopt_dtype)p->dtype));
    char rin[PATH_MAX], rout[PATH_MAX];
    if (realpath(in, rin) && realpath(out, rout) && !strcmp(rin, rout))
        return coopt_fail(COOPT_ERR_INVALID, "convert: output %s is the input", out);

    struct cv cv = {.p = p, .in = in, .out = out, .in_fmt = detect_format(in)};
    if (p->to == COOPT_CONVERT_GGUF) cv.out_fmt = FMT_GGUF;
    else if (p->to == COOPT_CONVERT_HF) cv.out_fmt = FMT_HF;
    else if (coopt_str_ends_with(out, ".gguf")) cv.out_fmt = FMT_GGUF;
    else cv.out_fmt = cv.in_fmt == FMT_HF ? FMT_HF : FMT_GGUF;
    if (cv.out_fmt == FMT_HF && p->dtype >= 0 && !dtype_fits((enum coopt_dtype)p->dtype, FMT_HF)) {
        if (p->to == COOPT_CONVERT_HF)
            return coopt_fail(COOPT_ERR_INVALID, "convert: a Hugging Face directory cannot hold %s weights (f32 f16 bf16)",
                              coopt_dtype_name((enum coopt_dtype)p->dtype));
        // chosen from the names: say why, and how to get a GGUF file instead
        return coopt_fail(COOPT_ERR_INVALID,
                          "convert: output %s does not end in .gguf, so it would be a Hugging Face directory (as the "
                          "input), which cannot hold %s weights (f32 f16 bf16); name it *.gguf or pass --to gguf",
                          out, coopt_dtype_name((enum coopt_dtype)p->dtype));
    }

    struct coopt_model_params mp = coopt_model_default_params();
    enum coopt_status         st = coopt_model_load(in, &mp, &cv.m);
    if (st != COOPT_OK) return st;
    const struct coopt_model_config *c = &cv.m->config;
    int32_t                          g = p->kv_heads ? p->kv_heads : c->n_kv_heads;
    if (g <= 0 || g > c->n_kv_heads) {
        st = coopt_fail(COOPT_ERR_INVALID, "convert: --kv-heads %d: %s has %d KV heads; G must be in [1, %d]", g, in,
                        c->n_kv_heads, c->n_kv_heads);
        goto done;
    }
    if (c->n_kv_heads % g != 0) {
        st = coopt_fail(COOPT_ERR_INVALID, "convert: --kv-heads %d does not divide the %d KV heads of %s", g,
                        c->n_kv_heads, in);
        goto done;
    }
    cv.kv_out = g;
    cv.pool   = c->n_kv_heads / g;
    cv.layout = cv.out_fmt == FMT_GGUF ? COOPT_ROPE_INTERLEAVED : COOPT_ROPE_HALF;
    if (cv.in_fmt == FMT_GGUF && (st = coopt_gguf_open(in, &cv.gin)) != COOPT_OK) goto done;
    if ((st = cv_rope_freqs(&cv)) != COOPT_OK || (st = cv_plan(&cv)) != COOPT_OK) goto done;
    if (cv.out_fmt == FMT_GGUF && cv.m->layers[0].wq.bias)
        coopt_log_info("convert: %s: the model has attention biases; they are written as blk.N.*.bias", out);
    st = cv.out_fmt == FMT_GGUF ? cv_write_gguf(&cv) : cv_write_hf(&cv);
    if (st == COOPT_OK)
        coopt_log_info("convert: wrote %s (%s, %d tensors, %d KV heads%s)", out,
                       cv.out_fmt == FMT_GGUF ? "GGUF" : "Hugging Face", cv.n_t, cv.kv_out,
                       cv.pool > 1 ? ", mean-pooled" : "");
done:
    for (int i = 0; i < cv.n_t; i++) cv_tensor_release(&cv.t[i]);
    free(cv.t);
    free(cv.rope_freqs);
    coopt_gguf_close(cv.gin);
    coopt_model_free(cv.m);
    return st;
}
