/*
 * model.c -- model lifecycle: picks the loader for a path, owns mappings and allocations,
 * validates every weight against the configuration, and fills the public model info.
 */
#include "model.h"

#include "dtype.h"
#include "gptq.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct coopt_model_params coopt_model_default_params(void) {
    return (struct coopt_model_params){.prefetch = false, .mlock = false, .n_threads = 0, .device = "cpu"};
}

void *coopt_model_alloc(struct coopt_model *m, size_t n) {
    if (m->n_allocs == m->cap_allocs) {
        int    cap = m->cap_allocs ? m->cap_allocs * 2 : 64;
        void **a   = coopt_realloc(m->allocs, (size_t)cap * sizeof(void *));
        if (!a) return NULL;
        m->allocs     = a;
        m->cap_allocs = cap;
    }
    void *p = coopt_aligned_alloc(n);
    if (p) m->allocs[m->n_allocs++] = p;
    return p;
}

enum coopt_status coopt_model_own_gptq(struct coopt_model *m, struct coopt_gptq_weight *w) {
    if (m->n_gptq == m->cap_gptq) {
        int                        cap = m->cap_gptq ? m->cap_gptq * 2 : 64;
        struct coopt_gptq_weight **a   = coopt_realloc(m->gptq, (size_t)cap * sizeof(*a));
        if (!a) {
            coopt_gptq_weight_free(w);
            return COOPT_ERR_NOMEM;
        }
        m->gptq     = a;
        m->cap_gptq = cap;
    }
    m->gptq[m->n_gptq++] = w;
    return COOPT_OK;
}

enum coopt_status coopt_model_map_file(struct coopt_model *m, const char *path, struct coopt_mmap **out) {
    *out = NULL;
    if (m->n_files >= COOPT_MAX_FILES)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: too many model files (max %d)", path, COOPT_MAX_FILES);
    struct coopt_mmap *f  = &m->files[m->n_files];
    enum coopt_status  st = coopt_mmap_open(path, f);
    if (st != COOPT_OK) return st;
    m->n_files++;
    if (m->params.mlock && mlock(f->addr, f->size) != 0)
        coopt_log_info("%s: mlock failed (continuing without it)", path);
    *out = f;
    return COOPT_OK;
}

enum coopt_status coopt_model_f32_vector(struct coopt_model *m, enum coopt_dtype t, const void *src, int64_t n,
                                         const float **out) {
    *out = NULL;
    if (t != COOPT_DTYPE_F32 && t != COOPT_DTYPE_F16 && t != COOPT_DTYPE_BF16)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "norm/bias vector of type %s is not supported", coopt_dtype_name(t));
    float *v = coopt_model_alloc(m, (size_t)n * sizeof(float));
    if (!v) return COOPT_ERR_NOMEM;
    coopt_dequant_row(t, src, v, n);
    *out = v;
    return COOPT_OK;
}

void coopt_model_free(struct coopt_model *m) {
    if (!m) return;
    coopt_tokenizer_free(m->tokenizer);
    for (int i = 0; i < m->n_files; i++) coopt_mmap_close(&m->files[i]);
    for (int i = 0; i < m->n_allocs; i++) coopt_aligned_free(m->allocs[i]);
    for (int i = 0; i < m->n_gptq; i++) coopt_gptq_weight_free(m->gptq[i]);
    free(m->gptq);
    free(m->allocs);
    free(m->layers);
    free(m);
}

// ---- validation ----

static bool matmul_dtype_ok(enum coopt_dtype t) {
    return t == COOPT_DTYPE_F32 || t == COOPT_DTYPE_F16 || t == COOPT_DTYPE_BF16 || t == COOPT_DTYPE_Q8_0 ||
           t == COOPT_DTYPE_Q4_0 || t == COOPT_DTYPE_Q4_GPTQ;
}

static enum coopt_status check_weight(const char *file, const char *what, const struct coopt_weight *w,
                                      int64_t n_out, int64_t n_in) {
    if (!w->data && !w->gptq) return coopt_fail(COOPT_ERR_FORMAT, "%s: weight %s is missing", file, what);
    if (!matmul_dtype_ok(w->dtype))
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: weight %s has unsupported type %s", file, what,
                          coopt_dtype_name(w->dtype));
    if (w->n_out != n_out || w->n_in != n_in)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: weight %s has shape [%lld, %lld], expected [%lld, %lld]", file, what,
                          (long long)w->n_out, (long long)w->n_in, (long long)n_out, (long long)n_in);
    int bl = coopt_dtype_block_len(w->dtype);
    if (n_in % bl != 0)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: weight %s: row length %lld is not a multiple of the %s block (%d)",
                          file, what, (long long)n_in, coopt_dtype_name(w->dtype), bl);
    return COOPT_OK;
}

static uint64_t weight_bytes(const struct coopt_weight *w) {
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) return (uint64_t)coopt_gptq_weight_bytes(w->gptq);
    return (uint64_t)coopt_dtype_row_bytes(w->dtype, w->n_in) * (uint64_t)w->n_out;
}

enum coopt_status coopt_model_finish(struct coopt_model *m, const char *file) {
    struct coopt_model_config *c = &m->config;
    if (!file) file = "model";
    if (c->n_layers <= 0 || c->n_layers > 1024 || c->dim <= 0 || c->n_heads <= 0 || c->n_vocab <= 0 || c->ffn_dim <= 0)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: invalid config (layers %d, dim %d, heads %d, vocab %d, ffn %d)", file,
                          c->n_layers, c->dim, c->n_heads, c->n_vocab, c->ffn_dim);
    if (c->n_kv_heads <= 0) c->n_kv_heads = c->n_heads;
    if (c->head_dim <= 0) c->head_dim = c->dim / c->n_heads;
    if (c->n_heads % c->n_kv_heads != 0)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: %d attention heads are not a multiple of %d KV heads", file, c->n_heads,
                          c->n_kv_heads);
    if (c->head_dim <= 0 || c->head_dim % 2 != 0 || c->head_dim > 512)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: head dim %d is not supported (even, <= 512)", file, c->head_dim);
    if (!(c->norm_eps > 0)) c->norm_eps = 1e-5f;
    if (!(c->rope_theta > 0)) c->rope_theta = 10000.0f;
    if (c->n_ctx_train <= 0) c->n_ctx_train = 2048;
    if (c->sliding_window < 0) c->sliding_window = 0;
    if (!m->layers) return coopt_fail(COOPT_ERR_FORMAT, "%s: no layers bound", file);

    enum coopt_status st;
    int64_t           q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    if ((st = check_weight(file, "token_embd", &m->tok_embd, c->n_vocab, c->dim))) return st;
    if (m->tok_embd.dtype == COOPT_DTYPE_Q4_GPTQ)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: quantized token embedding (GPTQ) is not supported", file);
    if (!m->output.data && !m->output.gptq) {
        m->output               = m->tok_embd;
        c->tied_embeddings = true;
    }
    if ((st = check_weight(file, "output", &m->output, c->n_vocab, c->dim))) return st;
    if (!m->out_norm) return coopt_fail(COOPT_ERR_FORMAT, "%s: output norm is missing", file);
    for (int l = 0; l < c->n_layers; l++) {
        struct coopt_layer *L = &m->layers[l];
        char                name[64];
#define CHECK_W(field, o, i)                                                                                           \
    snprintf(name, sizeof(name), "layer %d " #field, l);                                                               \
    if ((st = check_weight(file, name, &L->field, (o), (i)))) return st;
        CHECK_W(wq, q_dim, c->dim);
        CHECK_W(wk, kv_dim, c->dim);
        CHECK_W(wv, kv_dim, c->dim);
        CHECK_W(wo, c->dim, q_dim);
        CHECK_W(w_gate, c->ffn_dim, c->dim);
        CHECK_W(w_up, c->ffn_dim, c->dim);
        CHECK_W(w_down, c->dim, c->ffn_dim);
#undef CHECK_W
        if (!L->attn_norm || !L->ffn_norm) return coopt_fail(COOPT_ERR_FORMAT, "%s: layer %d norm is missing", file, l);
    }
    if (!m->tokenizer) return coopt_fail(COOPT_ERR_FORMAT, "%s: no tokenizer", file);
    int32_t tv = coopt_tokenizer_n_vocab(m->tokenizer);
    if (tv > c->n_vocab)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tokenizer has %d tokens but the model's vocabulary is %d", file, tv,
                          c->n_vocab);

    // info
    struct coopt_model_info *in = &m->info;
    snprintf(in->arch, sizeof(in->arch), "llama");
    in->n_vocab        = c->n_vocab;
    in->dim            = c->dim;
    in->n_layers       = c->n_layers;
    in->n_heads        = c->n_heads;
    in->n_kv_heads     = c->n_kv_heads;
    in->head_dim       = c->head_dim;
    in->ffn_dim        = c->ffn_dim;
    in->n_ctx_train    = c->n_ctx_train;
    in->sliding_window = c->sliding_window;
    in->weight_dtype   = m->layers[0].wq.dtype;
    uint64_t n_params = 0, bytes = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const struct coopt_weight *ws[] = {&m->layers[l].wq,     &m->layers[l].wk,   &m->layers[l].wv,
                                           &m->layers[l].wo,     &m->layers[l].w_gate, &m->layers[l].w_up,
                                           &m->layers[l].w_down};
        for (size_t i = 0; i < COOPT_ARRAY_LEN(ws); i++) {
            n_params += (uint64_t)ws[i]->n_in * (uint64_t)ws[i]->n_out;
            bytes += weight_bytes(ws[i]);
        }
        n_params += 2 * (uint64_t)c->dim;
    }
    n_params += (uint64_t)c->n_vocab * (uint64_t)c->dim * (c->tied_embeddings ? 1 : 2) + (uint64_t)c->dim;
    bytes += weight_bytes(&m->output);
    in->n_params     = n_params;
    in->weight_bytes = bytes;
    snprintf(in->desc, sizeof(in->desc), "llama %dL %dd %dh/%dkv hd%d ffn%d vocab%d %s", c->n_layers, c->dim,
             c->n_heads, c->n_kv_heads, c->head_dim, c->ffn_dim, c->n_vocab, coopt_dtype_name(in->weight_dtype));
    return COOPT_OK;
}

// ---- load ----

static void prefetch(struct coopt_model *m) {
    for (int i = 0; i < m->n_files; i++) {
        madvise(m->files[i].addr, m->files[i].size, MADV_WILLNEED);
        volatile uint8_t sink = 0;
        const uint8_t   *p    = m->files[i].addr;
        for (size_t o = 0; o < m->files[i].size; o += 4096) sink ^= p[o];
        (void)sink;
    }
}

enum coopt_status coopt_model_load(const char *path, const struct coopt_model_params *params,
                                   struct coopt_model **out) {
    *out = NULL;
    if (!path || !*path) return coopt_fail(COOPT_ERR_INVALID, "no model path given");
    struct coopt_model *m = coopt_calloc(1, sizeof(*m));
    if (!m) return COOPT_ERR_NOMEM;
    m->params    = params ? *params : coopt_model_default_params();
    m->gen_temp  = NAN;
    m->gen_top_p = NAN;
    m->gen_top_k = -1;
    enum coopt_status st;
    if (coopt_path_is_dir(path)) {
        st = coopt_hf_load_model(m, path);
    } else if (!coopt_path_exists(path)) {
        st = coopt_fail(COOPT_ERR_IO, "%s: no such file or directory", path);
    } else {
        // sniff the magic
        uint8_t head[4] = {0};
        FILE   *f       = fopen(path, "rb");
        size_t  n       = f ? fread(head, 1, 4, f) : 0;
        if (f) fclose(f);
        if (n == 4 && memcmp(head, "GGUF", 4) == 0) st = coopt_gguf_load_model(m, path);
        else if (coopt_str_ends_with(path, ".json"))
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: pass the model directory, not its config file", path);
        else if (coopt_str_ends_with(path, ".safetensors"))
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: pass the model directory containing config.json", path);
        else st = coopt_llama2c_load_model(m, path);
    }
    if (st == COOPT_OK) st = coopt_model_finish(m, path);
    if (st != COOPT_OK) {
        coopt_model_free(m);
        return st;
    }
    if (m->params.prefetch) prefetch(m);
    *out = m;
    return COOPT_OK;
}

const struct coopt_model_info *coopt_model_get_info(const struct coopt_model *m) { return &m->info; }
const struct coopt_tokenizer  *coopt_model_tokenizer(const struct coopt_model *m) { return m->tokenizer; }
