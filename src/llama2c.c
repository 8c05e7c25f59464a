/*
 * llama2c.c -- loader for karpathy/llama2.c checkpoints.
 *
 * Two fp32 layouts are read in place from the mmap (no copies except the norm vectors):
 *   legacy (export.py legacy_export, "v0"): 7 x int32 header
 *       {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}
 *     (vocab_size < 0 means an unshared classifier), then
 *       tok_embeddings [vocab][dim], rms_att [L][dim], wq [L][dim][dim], wk [L][kv_dim][dim],
 *       wv [L][kv_dim][dim], wo [L][dim][dim], rms_ffn [L][dim], w1 [L][hidden][dim],
 *       w2 [L][dim][hidden], w3 [L][hidden][dim], rms_final [dim],
 *       freq_cis_real [seq_len][head_size/2], freq_cis_imag [same], (wcls [vocab][dim])
 *   version 1 (export.py version1_export): 256-byte header
 *       {u32 magic 0x616b3432 "ak42", i32 version = 1, the 7 ints, u8 shared_classifier, zeros},
 *     then attention_norm [L][dim], ffn_norm [L][dim], norm [dim], tok_embeddings, wq[L], wk[L],
 *     wv[L], wo[L], w1[L], w2[L], w3[L], (output [vocab][dim]).
 * Version 2 (int8 groups with separate fp32 scales) is rejected as unsupported.
 * The file size must match the header exactly. Matrices are nn.Linear weights [out][in], the
 * same row order as GGUF: stories260K.bin and stories260K.gguf hold bit-identical tensors
 * (Q/K rows are not permuted; both are in the interleaved-pair RoPE layout).
 */
#include "model.h"
#include "tokenizer.h"
#include "util.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AK42_MAGIC 0x616b3432u
#define V1_HEADER_BYTES 256

struct l2c_hdr {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

// Cursor over the fp32 payload: hands out consecutive tensors.
struct l2c_cur {
    const float *p;
};

static const float *take(struct l2c_cur *c, size_t n) {
    const float *r = c->p;
    c->p += n;
    return r;
}

static void set_w(struct coopt_weight *w, const float *data, int64_t n_out, int64_t n_in) {
    w->dtype = COOPT_DTYPE_F32;
    w->n_in  = n_in;
    w->n_out = n_out;
    w->data  = data;
}

// Tokenizer search: $COOPT_TOKENIZER, then tokenizer.bin and tok<vocab>.bin beside the checkpoint.
static enum coopt_status find_tokenizer(struct coopt_model *m, const char *path) {
    int32_t     n_vocab = m->config.n_vocab;
    const char *env     = getenv("COOPT_TOKENIZER");
    if (env && *env) {
        if (!coopt_path_exists(env))
            return coopt_fail(COOPT_ERR_IO, "%s: tokenizer '%s' (from COOPT_TOKENIZER) does not exist", path, env);
        return coopt_tokenizer_load_llama2c(env, n_vocab, &m->tokenizer);
    }
    char        dir[4096];
    const char *base = coopt_path_basename(path);
    size_t      dl   = (size_t)(base - path);
    if (dl >= sizeof(dir)) return coopt_fail(COOPT_ERR_IO, "%s: path too long", path);
    memcpy(dir, path, dl);
    dir[dl] = '\0';
    if (dl == 0) strcpy(dir, ".");
    char tokname[32], cand[2][4200];
    snprintf(tokname, sizeof(tokname), "tok%d.bin", (int)n_vocab);
    if (!coopt_path_join(cand[0], sizeof(cand[0]), dir, "tokenizer.bin") ||
        !coopt_path_join(cand[1], sizeof(cand[1]), dir, tokname))
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", path);
    for (int i = 0; i < 2; i++)
        if (coopt_path_exists(cand[i])) return coopt_tokenizer_load_llama2c(cand[i], n_vocab, &m->tokenizer);
    return coopt_fail(COOPT_ERR_IO, "%s: no tokenizer found (tried %s and %s); set COOPT_TOKENIZER to a llama2.c tokenizer file",
                      path, cand[0], cand[1]);
}

enum coopt_status coopt_llama2c_load_model(struct coopt_model *m, const char *path) {
    struct coopt_mmap *mm;
    enum coopt_status  st = coopt_model_map_file(m, path, &mm);
    if (st != COOPT_OK) return st;
    const uint8_t *b    = mm->addr;
    size_t         size = mm->size;

    struct l2c_hdr h;
    size_t         hdr_bytes;
    bool           shared;
    uint32_t       magic = 0;
    if (size >= 4) memcpy(&magic, b, 4);
    if (magic == AK42_MAGIC) {
        int32_t version = 0;
        if (size < V1_HEADER_BYTES)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: llama2.c file too short for its 256-byte header (%zu bytes)", path,
                              size);
        memcpy(&version, b + 4, 4);
        if (version != 1)
            return coopt_fail(COOPT_ERR_UNSUPPORTED,
                              "%s: llama2.c export version %d is not supported (supported: legacy and version 1 "
                              "fp32; version 2 is int8-quantized: re-export with --version 1 or convert to GGUF)",
                              path, (int)version);
        memcpy(&h, b + 8, sizeof(h));
        shared    = b[8 + sizeof(h)] != 0;
        hdr_bytes = V1_HEADER_BYTES;
    } else {
        if (size < sizeof(h))
            return coopt_fail(COOPT_ERR_FORMAT, "%s: file too short for a llama2.c header (%zu bytes)", path, size);
        memcpy(&h, b, sizeof(h));
        shared = h.vocab_size > 0;
        if (h.vocab_size < 0 && h.vocab_size != INT32_MIN) h.vocab_size = -h.vocab_size;
        hdr_bytes = sizeof(h);
    }

    // The legacy format has no magic: a wrong file shows up as a nonsensical header.
    if (h.dim <= 0 || h.hidden_dim <= 0 || h.n_layers <= 0 || h.n_heads <= 0 || h.n_kv_heads <= 0 ||
        h.vocab_size <= 0 || h.seq_len <= 0 || h.dim % h.n_heads != 0 || h.n_heads % h.n_kv_heads != 0 ||
        (h.dim / h.n_heads) % 2 != 0 || h.n_layers > 4096 || h.dim > (1 << 20) || h.hidden_dim > (1 << 22)) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: not a llama2.c checkpoint (header dim %d, hidden_dim %d, n_layers %d, n_heads %d, "
                          "n_kv_heads %d, vocab_size %d, seq_len %d)",
                          path, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len);
    }
    // sizes in 64-bit; the bounds above keep every product below 2^62
    uint64_t L = (uint64_t)h.n_layers, dim = (uint64_t)h.dim, hid = (uint64_t)h.hidden_dim;
    uint64_t V = (uint64_t)h.vocab_size, hs = dim / (uint64_t)h.n_heads, kv_dim = hs * (uint64_t)h.n_kv_heads;
    uint64_t n_floats = V * dim + L * dim * 2 + dim + L * dim * (dim * 2 + kv_dim * 2) + L * hid * dim * 3;
    if (magic != AK42_MAGIC) n_floats += (uint64_t)h.seq_len * hs; // freq_cis real + imag
    if (!shared) n_floats += V * dim;
    uint64_t want = hdr_bytes + n_floats * 4;
    if (want != size) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: file is %zu bytes but its llama2.c header (dim %d, hidden %d, %d layers, %d/%d heads, "
                          "vocab %d%s, seq_len %d) needs %llu",
                          path, size, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size,
                          shared ? "" : " + classifier", h.seq_len, (unsigned long long)want);
    }

    struct coopt_model_config *c = &m->config;
    memset(c, 0, sizeof(*c));
    c->n_vocab         = h.vocab_size;
    c->dim             = h.dim;
    c->n_layers        = h.n_layers;
    c->n_heads         = h.n_heads;
    c->n_kv_heads      = h.n_kv_heads;
    c->head_dim        = (int32_t)hs;
    c->ffn_dim         = h.hidden_dim;
    c->n_ctx_train     = h.seq_len;
    c->norm_eps        = 1e-5f; // llama2.c model.py default; not stored in the file
    c->rope_theta      = 10000;
    c->rope_layout     = COOPT_ROPE_INTERLEAVED;
    c->rope_scaling    = COOPT_ROPE_SCALING_NONE;
    c->rope_factor     = 1;
    c->tied_embeddings = shared;

    m->layers = coopt_calloc(L, sizeof(*m->layers)); // freed by coopt_model_free
    if (!m->layers) return COOPT_ERR_NOMEM;
    struct l2c_cur cur = {(const float *)(b + hdr_bytes)}; // 28 or 256: 4-byte aligned
    const float   *emb, *rms_att, *rms_ffn, *rms_final, *wq, *wk, *wv, *wo, *w1, *w2, *w3;
    if (magic != AK42_MAGIC) {
        emb     = take(&cur, V * dim);
        rms_att = take(&cur, L * dim);
        wq      = take(&cur, L * dim * dim);
        wk      = take(&cur, L * kv_dim * dim);
        wv      = take(&cur, L * kv_dim * dim);
        wo      = take(&cur, L * dim * dim);
        rms_ffn = take(&cur, L * dim);
        w1      = take(&cur, L * hid * dim);
        w2      = take(&cur, L * dim * hid);
        w3      = take(&cur, L * hid * dim);
        rms_final = take(&cur, dim);
        take(&cur, (uint64_t)h.seq_len * hs); // freq_cis_real, freq_cis_imag: recomputed at run time
    } else {
        rms_att   = take(&cur, L * dim);
        rms_ffn   = take(&cur, L * dim);
        rms_final = take(&cur, dim);
        emb       = take(&cur, V * dim);
        wq        = take(&cur, L * dim * dim);
        wk        = take(&cur, L * kv_dim * dim);
        wv        = take(&cur, L * kv_dim * dim);
        wo        = take(&cur, L * dim * dim);
        w1        = take(&cur, L * hid * dim);
        w2        = take(&cur, L * dim * hid);
        w3        = take(&cur, L * hid * dim);
    }
    const float *wcls = shared ? emb : take(&cur, V * dim);
    COOPT_ASSERT((const uint8_t *)cur.p == b + size);

    set_w(&m->tok_embd, emb, h.vocab_size, h.dim);
    set_w(&m->output, wcls, h.vocab_size, h.dim);
    if ((st = coopt_model_f32_vector(m, COOPT_DTYPE_F32, rms_final, h.dim, &m->out_norm)) != COOPT_OK) return st;
    for (uint64_t l = 0; l < L; l++) {
        struct coopt_layer *ly = &m->layers[l];
        if ((st = coopt_model_f32_vector(m, COOPT_DTYPE_F32, rms_att + l * dim, h.dim, &ly->attn_norm)) != COOPT_OK ||
            (st = coopt_model_f32_vector(m, COOPT_DTYPE_F32, rms_ffn + l * dim, h.dim, &ly->ffn_norm)) != COOPT_OK)
            return st;
        set_w(&ly->wq, wq + l * dim * dim, h.dim, h.dim);
        set_w(&ly->wk, wk + l * kv_dim * dim, (int64_t)kv_dim, h.dim);
        set_w(&ly->wv, wv + l * kv_dim * dim, (int64_t)kv_dim, h.dim);
        set_w(&ly->wo, wo + l * dim * dim, h.dim, h.dim);
        set_w(&ly->w_gate, w1 + l * hid * dim, h.hidden_dim, h.dim);
        set_w(&ly->w_down, w2 + l * dim * hid, h.dim, h.hidden_dim);
        set_w(&ly->w_up, w3 + l * hid * dim, h.hidden_dim, h.dim);
    }
    return find_tokenizer(m, path);
}
