/*
 * test_hf.c -- Hugging Face directories: config.json parsing (literal texts), the two real
 * models in $COOPT_MODELS (config and spot-checked weights; the reference values were read
 * once with Python's safetensors), and synthetic directories built with the safetensors
 * writer, broken one way at a time.
 */
#include "dtype.h"
#include "model.h"
#include "safetensors.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// helpers defined in test_safetensors.c
bool        st_test_mkdtemp(char *buf, size_t cap);
void        st_test_rmtree(const char *dir);
void        st_test_capture_begin(void);
const char *st_test_capture_end(void);
bool        st_test_write_file(const char *dir, const char *name, const void *data, size_t n);

// Loads dir into a fresh model (stderr captured into *msg if msg). Caller frees *out.
static enum coopt_status load(const char *dir, struct coopt_model **out, const char **msg) {
    struct coopt_model *m = calloc(1, sizeof(*m));
    if (msg) st_test_capture_begin();
    enum coopt_status rc = coopt_hf_load_model(m, dir);
    if (msg) *msg = st_test_capture_end();
    *out = m;
    return rc;
}

static float weight_at(const struct coopt_weight *w, int64_t row, int64_t col) {
    int64_t i = row * w->n_in + col;
    switch (w->dtype) {
    case COOPT_DTYPE_F32: return ((const float *)w->data)[i];
    case COOPT_DTYPE_F16: return coopt_f16_to_f32(((const uint16_t *)w->data)[i]);
    case COOPT_DTYPE_BF16: return coopt_bf16_to_f32(((const uint16_t *)w->data)[i]);
    default: return NAN;
    }
}

static enum coopt_status parse_cfg(const char *json, struct coopt_model_config *c,
                                   struct coopt_hf_config_extra *x, const char **msg) {
    st_test_capture_begin();
    enum coopt_status rc = coopt_hf_parse_config(json, strlen(json), "d/config.json", c, x);
    *msg                 = st_test_capture_end();
    return rc;
}

// ---- config.json ----

#define BASE                                                                                       \
    "\"hidden_size\": 64, \"intermediate_size\": 160, \"num_hidden_layers\": 2, "                  \
    "\"num_attention_heads\": 4, \"vocab_size\": 100"

TEST(hf_config_fields) {
    struct coopt_model_config    c;
    struct coopt_hf_config_extra x;
    const char                  *msg;
    // defaults
    CHECK(t, parse_cfg("{\"architectures\":[\"LlamaForCausalLM\"]," BASE "}", &c, &x, &msg) ==
                 COOPT_OK);
    CHECK(t, c.dim == 64 && c.ffn_dim == 160 && c.n_layers == 2 && c.n_heads == 4 &&
                 c.n_kv_heads == 4);
    CHECK(t,
          c.head_dim == 16 && c.n_vocab == 100 && c.n_ctx_train == 2048 && c.sliding_window == 0);
    CHECK(t, c.rope_theta == 10000.0f && c.norm_eps == 1e-6f && c.rope_layout == COOPT_ROPE_HALF);
    CHECK(t, c.rope_scaling == COOPT_ROPE_SCALING_NONE && !c.tied_embeddings && !x.tie_explicit);
    CHECK(t, x.bos_id == -1 && x.eos_id == -1 && !x.quantized &&
                 strcmp(x.arch, "LlamaForCausalLM") == 0);
    // Mistral with GQA, sliding window, explicit head_dim, eos list, model_type fallback
    CHECK(t,
          parse_cfg("{\"model_type\":\"mistral\", \"num_key_value_heads\": 2, \"head_dim\": 32,"
                    "\"sliding_window\": 4096, \"rope_theta\": 1e6, \"rms_norm_eps\": 1e-5,"
                    "\"bos_token_id\": 1, \"eos_token_id\": [7, 8], \"tie_word_embeddings\": true,"
                    "\"max_position_embeddings\": 32768, \"rope_scaling\": null," BASE "}",
                    &c, &x, &msg) == COOPT_OK);
    CHECK(t, c.n_kv_heads == 2 && c.head_dim == 32 && c.sliding_window == 4096 &&
                 c.rope_theta == 1e6f);
    CHECK(t, c.norm_eps == 1e-5f && c.n_ctx_train == 32768 && c.tied_embeddings && x.tie_explicit);
    CHECK(t, x.bos_id == 1 && x.eos_id == 7 && strcmp(x.arch, "mistral") == 0);
    CHECK(t, parse_cfg("{\"architectures\":[\"MistralForCausalLM\"], \"sliding_window\": null," BASE
                       "}",
                       &c, &x, &msg) == COOPT_OK &&
                 c.sliding_window == 0);
    // rope scaling
    CHECK(
        t,
        parse_cfg(
            "{\"model_type\":\"llama\", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 32.0,"
            "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0,"
            "\"original_max_position_embeddings\": 8192}," BASE "}",
            &c, &x, &msg) == COOPT_OK);
    CHECK(t, c.rope_scaling == COOPT_ROPE_SCALING_LLAMA3 && c.rope_factor == 32.0f &&
                 c.rope_low_freq_factor == 1.0f);
    CHECK(t, c.rope_high_freq_factor == 4.0f && c.rope_orig_ctx == 8192);
    CHECK(
        t,
        parse_cfg(
            "{\"model_type\":\"llama\", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 4}," BASE
            "}",
            &c, &x, &msg) == COOPT_OK);
    CHECK(t, c.rope_scaling == COOPT_ROPE_SCALING_LINEAR && c.rope_factor == 4.0f);
    // quantization_config is reported, not rejected, by the parser
    CHECK(
        t,
        parse_cfg(
            "{\"model_type\":\"llama\", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4}," BASE
            "}",
            &c, &x, &msg) == COOPT_OK);
    CHECK(t, x.quantized && strcmp(x.quant_method, "gptq") == 0);
}

TEST(hf_config_errors) {
    struct coopt_model_config c;
    const char               *msg;
    enum coopt_status         rc;
    rc = parse_cfg("{\"architectures\":[\"GPT2LMHeadModel\"]," BASE "}", &c, NULL, &msg);
    CHECKF(t,
           rc == COOPT_ERR_UNSUPPORTED &&
               strstr(msg,
                      "d/config.json: architecture 'GPT2LMHeadModel' is not supported (supported: "
                      "LlamaForCausalLM, MistralForCausalLM)"),
           "%s", msg);
    rc = parse_cfg("{\"model_type\":\"gpt2\"," BASE "}", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_UNSUPPORTED && strstr(msg, "'gpt2'"));
    rc = parse_cfg("{" BASE "}", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"hidden_size\": 64, \"intermediate_size\": 160,"
                   "\"num_attention_heads\": 4, \"vocab_size\": 100}",
                   &c, NULL, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "missing field 'num_hidden_layers'"), "%s",
           msg);
    rc = parse_cfg("{\"model_type\":\"llama\", \"hidden_size\": \"64\", \"intermediate_size\": 160,"
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100}",
                   &c, NULL, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "'hidden_size' must be an integer, got string"),
           "%s", msg);
    rc = parse_cfg("{\"model_type\":\"llama\", \"num_key_value_heads\": 3," BASE "}", &c, NULL,
                   &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"num_key_value_heads\": 8," BASE "}", &c, NULL,
                   &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"hidden_size\": 66, \"intermediate_size\": 160,"
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100}",
                   &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"rms_norm_eps\": -1," BASE "}", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"hidden_act\": \"gelu\"," BASE "}", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_UNSUPPORTED && strstr(msg, "gelu"));
    rc = parse_cfg(
        "{\"model_type\":\"llama\", \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4}," BASE
        "}",
        &c, NULL, &msg);
    CHECKF(t,
           rc == COOPT_ERR_UNSUPPORTED && strstr(msg, "rope_scaling type 'yarn' is not supported"),
           "%s", msg);
    rc = parse_cfg("{\"model_type\":\"llama\", \"rope_scaling\": {\"type\": \"linear\"}," BASE "}",
                   &c, NULL, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "'factor'"), "%s", msg);
    rc = parse_cfg(
        "{\"model_type\":\"llama\", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8,"
        "\"low_freq_factor\": 4, \"high_freq_factor\": 4, \"original_max_position_embeddings\": 8192}," BASE
        "}",
        &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"hidden_size\": 1e400, \"intermediate_size\": 160,"
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100}",
                   &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"num_hidden_layers\": 2.5, \"hidden_size\": 64,"
                   "\"intermediate_size\": 160, \"num_attention_heads\": 4, \"vocab_size\": 100}",
                   &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"eos_token_id\": \"x\"," BASE "}", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\":\"llama\", \"tie_word_embeddings\": 1," BASE "}", &c, NULL,
                   &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("[1]", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_cfg("{\"model_type\": ", &c, NULL, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT && strstr(msg, "d/config.json: invalid JSON"));
}

// ---- real models ----

TEST(hf_load_story_lmrs) {
    const char *dir = test_model_path("story-lmrs");
    if (access(dir, R_OK) != 0) SKIP(t, "story-lmrs not found");
    struct coopt_model *m;
    enum coopt_status   rc = load(dir, &m, NULL);
    CHECKF(t, rc == COOPT_OK, "%s", coopt_status_str(rc));
    const struct coopt_model_config *c = &m->config;
    bool cfg_ok = c->dim == 128 && c->ffn_dim == 384 && c->n_layers == 2 && c->n_heads == 8 &&
                  c->n_kv_heads == 4 && c->head_dim == 16 && c->n_vocab == 2048 &&
                  c->n_ctx_train == 512 && c->norm_eps == 1e-6f && c->rope_theta == 10000.0f &&
                  c->tied_embeddings && c->rope_layout == COOPT_ROPE_HALF;
    // only lm_head.weight is stored; it serves as the embedding too
    bool w_ok = m->tok_embd.data == m->output.data && m->tok_embd.dtype == COOPT_DTYPE_F32 &&
                m->tok_embd.n_out == 2048 && m->tok_embd.n_in == 128 &&
                weight_at(&m->output, 0, 1) == -0.02587890625f &&
                weight_at(&m->output, 2047, 127) == -0.421875f && m->out_norm[0] == 0.640625f &&
                m->out_norm[2] == 0.68359375f && m->layers[0].attn_norm[10] == 0.1865234375f &&
                m->layers[1].w_down.n_out == 128 && m->layers[1].w_down.n_in == 384 &&
                weight_at(&m->layers[1].w_down, 5, 7) == -0.0419921875f &&
                m->layers[0].wq.bias == NULL && m->layers[1].wk.n_out == 64;
    bool gen_ok = isnan(m->gen_temp) && isnan(m->gen_top_p) && m->gen_top_k == -1 && m->tokenizer;
    coopt_model_free(m);
    CHECK(t, cfg_ok);
    CHECK(t, w_ok);
    CHECK(t, gen_ok);
}

TEST(hf_load_tinystories_sharded) {
    const char *dir = test_model_path("tinystories-mha-25m");
    if (access(dir, R_OK) != 0) SKIP(t, "tinystories-mha-25m not found");
    struct coopt_model *m;
    enum coopt_status   rc = load(dir, &m, NULL);
    CHECKF(t, rc == COOPT_OK, "%s", coopt_status_str(rc));
    const struct coopt_model_config *c = &m->config;
    bool cfg_ok = c->dim == 512 && c->ffn_dim == 1376 && c->n_layers == 8 && c->n_heads == 8 &&
                  c->n_kv_heads == 8 && c->head_dim == 64 && c->n_vocab == 512 &&
                  c->n_ctx_train == 512 && c->norm_eps == 1e-5f && !c->tied_embeddings &&
                  m->n_files == 4;
    // values from Python (bf16 decoded), one tensor per shard
    bool w_ok = m->tok_embd.data != m->output.data && m->tok_embd.dtype == COOPT_DTYPE_BF16 &&
                weight_at(&m->tok_embd, 3, 0) == -0.01116943359375f &&
                weight_at(&m->output, 511, 511) == -0.123046875f &&
                weight_at(&m->layers[7].wv, 100, 200) == -0.00543212890625f &&
                m->layers[3].ffn_norm[0] == 0.7109375f && m->layers[5].w_down.n_in == 1376 &&
                weight_at(&m->layers[5].w_down, 511, 1375) == 0.00927734375f &&
                m->out_norm[7] == 0.92578125f;
    bool gen_ok = m->gen_temp == 1.0f && m->gen_top_p == 0.95f && m->gen_top_k == -1;
    coopt_model_free(m);
    CHECK(t, cfg_ok);
    CHECK(t, w_ok);
    CHECK(t, gen_ok);
}

// ---- synthetic directories ----

// A tiny model: dim 8, ffn 12, 1 layer, 2 heads, 1 kv head, vocab 10, F16 weights.
#define TINY_CFG                                                                                   \
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 8, \"intermediate_size\": 12,"   \
    "\"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 1,"            \
    "\"vocab_size\": 10, \"rms_norm_eps\": 1e-5"

enum tiny_flaw {
    TINY_OK = 0,
    TINY_NO_UP,      // model.layers.0.mlp.up_proj.weight missing
    TINY_NO_LM_HEAD, // untied, lm_head missing
    TINY_I64_WEIGHT, // o_proj stored as I64
    TINY_3D_WEIGHT,  // gate_proj with 3 dims
    TINY_SHORT_NORM, // model.norm.weight of 7 elements
    TINY_BIAS,       // q/k/v biases present
};

static uint16_t g_tiny_data[4096];

// Writes dir/name with the tiny model's tensors (values: element index * 0.01 in F16).
static bool write_tiny(const char *dir, const char *name, enum tiny_flaw flaw, int part,
                       int n_parts) {
    for (int i = 0; i < 4096; i++)
        g_tiny_data[i] = coopt_f32_to_f16((float)(i % 512) * 0.01f);
    struct {
        const char *name;
        int         n_dims;
        int64_t     shape[3];
    } ts[] = {
        {"model.embed_tokens.weight", 2, {10, 8}},
        {"lm_head.weight", 2, {10, 8}},
        {"model.norm.weight", 1, {flaw == TINY_SHORT_NORM ? 7 : 8}},
        {"model.layers.0.input_layernorm.weight", 1, {8}},
        {"model.layers.0.post_attention_layernorm.weight", 1, {8}},
        {"model.layers.0.self_attn.q_proj.weight", 2, {8, 8}},
        {"model.layers.0.self_attn.k_proj.weight", 2, {4, 8}},
        {"model.layers.0.self_attn.v_proj.weight", 2, {4, 8}},
        {"model.layers.0.self_attn.o_proj.weight", 2, {8, 8}},
        {"model.layers.0.mlp.gate_proj.weight", flaw == TINY_3D_WEIGHT ? 3 : 2, {12, 8, 1}},
        {"model.layers.0.mlp.up_proj.weight", 2, {12, 8}},
        {"model.layers.0.mlp.down_proj.weight", 2, {8, 12}},
        {"model.layers.0.self_attn.q_proj.bias", 1, {8}},
        {"model.layers.0.self_attn.k_proj.bias", 1, {4}},
        {"model.layers.0.self_attn.v_proj.bias", 1, {4}},
    };
    struct coopt_st_writer *w = NULL;
    if (coopt_st_writer_init(&w) != COOPT_OK) return false;
    bool ok = true;
    for (int i = 0; i < (int)(sizeof(ts) / sizeof(ts[0])); i++) {
        if (i % n_parts != part) continue;
        if (flaw == TINY_NO_UP && strstr(ts[i].name, "up_proj")) continue;
        if (flaw == TINY_NO_LM_HEAD && strstr(ts[i].name, "lm_head")) continue;
        if (flaw != TINY_BIAS && strstr(ts[i].name, ".bias")) continue;
        if (flaw == TINY_I64_WEIGHT && strstr(ts[i].name, "o_proj")) {
            int64_t sh[2] = {8, 2}; // 16 int64 = 128 bytes, like 8x8 f16 would be 128 too
            ok = ok && coopt_st_writer_add_raw(w, ts[i].name, "I64", 2, sh, g_tiny_data, NULL,
                                               NULL) == COOPT_OK;
            continue;
        }
        ok = ok && coopt_st_writer_add(w, ts[i].name, COOPT_DTYPE_F16, ts[i].n_dims, ts[i].shape,
                                       g_tiny_data) == COOPT_OK;
    }
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    ok = ok && coopt_st_writer_write(w, path) == COOPT_OK;
    coopt_st_writer_free(w);
    return ok;
}


// A minimal valid tokenizer.json (6 tokens, within the tiny models' vocabulary of 10).
#define TINY_TOKENIZER                                                                             \
    "{\"model\": {\"type\": \"BPE\", \"byte_fallback\": false, \"vocab\": {\"<unk>\": 0, \"<s>\": 1, " \
    "\"</s>\": 2, \"a\": 3, \"b\": 4, \"ab\": 5}, \"merges\": [\"a b\"]}, \"added_tokens\": []}"

static bool write_text(const char *dir, const char *name, const char *text) {
    return st_test_write_file(dir, name, text, strlen(text));
}

TEST(hf_load_synthetic) {
    char dir[512];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    CHECK(t, write_text(dir, "tokenizer.json", TINY_TOKENIZER));
    struct coopt_model *m;
    const char         *msg;
    enum coopt_status   rc;
    bool                ok = true;

    // a good model; do_sample false -> greedy
    ok = ok && write_text(dir, "config.json", TINY_CFG ", \"tie_word_embeddings\": false}");
    ok = ok && write_text(dir, "generation_config.json",
                          "{\"do_sample\": false, \"temperature\": 0.7, \"top_k\": 40}");
    ok = ok && write_tiny(dir, "model.safetensors", TINY_OK, 0, 1);
    CHECK(t, ok);
    rc      = load(dir, &m, &msg);
    bool g1 = rc == COOPT_OK && m->config.n_kv_heads == 1 && m->layers[0].wk.n_out == 4 &&
              m->layers[0].w_down.n_in == 12 && m->layers[0].wq.dtype == COOPT_DTYPE_F16 &&
              m->tok_embd.data != m->output.data && m->gen_temp == 0.0f && m->gen_top_k == 40 &&
              isnan(m->gen_top_p) && fabsf(weight_at(&m->layers[0].w_up, 1, 2) - 0.10f) < 1e-3f;
    coopt_model_free(m);
    CHECKF(t, g1, "%s %s", coopt_status_str(rc), msg);

    // missing tensor
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_NO_UP, 0, 1));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(
        t,
        rc == COOPT_ERR_FORMAT &&
            strstr(msg, "/model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' not found"),
        "%s", msg);
    // untied without lm_head
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_NO_LM_HEAD, 0, 1));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "'lm_head.weight' not found"), "%s", msg);
    // ...tie_word_embeddings absent: the lone embedding is used for both
    CHECK(t, write_text(dir, "config.json", TINY_CFG "}"));
    rc      = load(dir, &m, &msg);
    bool g2 = rc == COOPT_OK && m->config.tied_embeddings && m->output.data == m->tok_embd.data;
    coopt_model_free(m);
    CHECKF(t, g2, "%s", msg);
    // unsupported dtype, wrong rank, short norm
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_I64_WEIGHT, 0, 1));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_UNSUPPORTED &&
               strstr(msg, "'model.layers.0.self_attn.o_proj.weight' has unsupported dtype I64"),
           "%s", msg);
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_3D_WEIGHT, 0, 1));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "has 3 dimensions, expected 2"), "%s", msg);
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_SHORT_NORM, 0, 1));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "'model.norm.weight' shape [7], expected [8]"),
           "%s", msg);
    // biases become owned f32
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_BIAS, 0, 1));
    rc      = load(dir, &m, &msg);
    bool g3 = rc == COOPT_OK && m->layers[0].wq.bias && m->layers[0].wk.bias &&
              m->layers[0].wv.bias && !m->layers[0].wo.bias &&
              fabsf(m->layers[0].wk.bias[3] - 0.03f) < 1e-4f;
    coopt_model_free(m);
    CHECKF(t, g3, "%s", msg);
    // a header of odd length (valid, but not how Python pads it) leaves the data misaligned:
    // the loader must hand out aligned copies
    {
        CHECK(t, write_tiny(dir, "model.safetensors", TINY_OK, 0, 1));
        char path[1024], *file = NULL;
        size_t size = 0;
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        CHECK(t, coopt_read_file(path, &file, &size) == COOPT_OK);
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = (n << 8) | (uint8_t)file[i];
        uint8_t *odd = malloc(size + 1);
        memcpy(odd, file, 8 + n);
        odd[8 + n] = ' ';
        memcpy(odd + 9 + n, file + 8 + n, size - 8 - n);
        for (int i = 0; i < 8; i++) odd[i] = (uint8_t)((n + 1) >> (8 * i));
        bool wrote = st_test_write_file(dir, "model.safetensors", odd, size + 1);
        free(odd);
        free(file);
        CHECK(t, wrote);
        rc      = load(dir, &m, &msg);
        bool g4 = rc == COOPT_OK && (uintptr_t)m->layers[0].w_up.data % 2 == 0 &&
                  fabsf(weight_at(&m->layers[0].w_up, 1, 2) - 0.10f) < 1e-3f &&
                  fabsf(m->out_norm[3] - 0.03f) < 1e-4f;
        coopt_model_free(m);
        CHECKF(t, g4, "%s", msg);
    }
    // corrupt safetensors file
    CHECK(t, st_test_write_file(dir, "model.safetensors", "\x40\0\0\0\0\0\0\0{\"a\"", 12));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_FORMAT && strstr(msg, "model.safetensors: header length 64 runs past"),
           "%s", msg);
    // a GPTQ config over float tensors: the GPTQ tensors are missing; other methods are refused
    CHECK(t, write_tiny(dir, "model.safetensors", TINY_OK, 0, 1));
    CHECK(t, write_text(dir, "config.json",
                        TINY_CFG ", \"quantization_config\": {\"quant_method\": \"gptq\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "tensor 'model.layers.0.self_attn.q_proj.qweight' not found"),
           "%s", msg);
    CHECK(t, write_text(dir, "config.json",
                        TINY_CFG ", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 8}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_UNSUPPORTED && strstr(msg, "8 bits is not supported"), "%s", msg);
    CHECK(t, write_text(dir, "config.json",
                        TINY_CFG ", \"quantization_config\": {\"quant_method\": \"awq\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_UNSUPPORTED && strstr(msg, "'awq'"), "%s", msg);
    // bad generation_config.json, unknown architecture, missing config.json
    CHECK(t, write_text(dir, "config.json", TINY_CFG "}"));
    CHECK(t, write_text(dir, "generation_config.json", "{\"temperature\": \"hot\"}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "generation_config.json: field 'temperature'"),
           "%s", msg);
    CHECK(t, write_text(dir, "config.json", "{\"architectures\": [\"PhiForCausalLM\"]}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_UNSUPPORTED &&
               strstr(msg, "config.json: architecture 'PhiForCausalLM' is not supported"),
           "%s", msg);
    char path[1024];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    remove(path);
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECK(t, rc == COOPT_ERR_IO);
    st_test_rmtree(dir);
}

TEST(hf_load_sharded_synthetic) {
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    CHECK(t, write_text(dir, "tokenizer.json", TINY_TOKENIZER));
    struct coopt_model *m;
    const char         *msg;
    enum coopt_status   rc;
    bool ok = write_text(dir, "config.json", TINY_CFG ", \"tie_word_embeddings\": false}") &&
              write_tiny(dir, "s0.safetensors", TINY_OK, 0, 2) &&
              write_tiny(dir, "s1.safetensors", TINY_OK, 1, 2);
    CHECK(t, ok);
    // the index from the names in the shards
    char idx[8192];
    int  n = snprintf(idx, sizeof(idx), "{\"metadata\": {}, \"weight_map\": {");
    for (int s = 0; s < 2; s++) {
        struct coopt_safetensors *st;
        snprintf(path, sizeof(path), "%s/s%d.safetensors", dir, s);
        CHECK(t, coopt_safetensors_open(path, &st) == COOPT_OK);
        for (int i = 0; i < st->n_tensors; i++) {
            n += snprintf(idx + n, sizeof(idx) - (size_t)n, "%s\"%s\": \"s%d.safetensors\"",
                          n > 40 ? "," : "", st->tensors[i].name, s);
        }
        coopt_safetensors_free(st);
    }
    snprintf(idx + n, sizeof(idx) - (size_t)n, "}}");
    CHECK(t, write_text(dir, COOPT_ST_INDEX_NAME, idx));
    rc      = load(dir, &m, &msg);
    bool g1 = rc == COOPT_OK && m->n_files == 2 && m->layers[0].w_down.n_in == 12;
    coopt_model_free(m);
    CHECKF(t, g1, "%s", msg);

    // a shard file missing
    snprintf(path, sizeof(path), "%s/s1.safetensors", dir);
    char moved[1024];
    snprintf(moved, sizeof(moved), "%s/s1.moved", dir);
    CHECK(t, rename(path, moved) == 0);
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_IO && strstr(msg, "s1.safetensors: missing") &&
               strstr(msg, COOPT_ST_INDEX_NAME),
           "%s", msg);
    CHECK(t, rename(moved, path) == 0);
    // the index names a shard that does not exist, or one outside the directory
    CHECK(
        t,
        write_text(
            dir, COOPT_ST_INDEX_NAME,
            "{\"weight_map\": {\"model.norm.weight\": \"s0.safetensors\", \"lm_head.weight\": \"s9.safetensors\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_IO && strstr(msg, "s9.safetensors: missing"), "%s", msg);
    CHECK(t, write_text(dir, COOPT_ST_INDEX_NAME,
                        "{\"weight_map\": {\"model.norm.weight\": \"../s0.safetensors\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "bad shard file name"), "%s", msg);
    // a tensor the index does not know, and one the index places in the wrong shard
    CHECK(t, write_text(dir, COOPT_ST_INDEX_NAME,
                        "{\"weight_map\": {\"model.norm.weight\": \"s0.safetensors\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_FORMAT &&
               strstr(msg, COOPT_ST_INDEX_NAME ": tensor 'model.embed_tokens.weight' not found"),
           "%s", msg);
    CHECK(
        t,
        write_text(
            dir, COOPT_ST_INDEX_NAME,
            "{\"weight_map\": {\"model.embed_tokens.weight\": \"s1.safetensors\", \"x\": \"s0.safetensors\"}}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECKF(t,
           rc == COOPT_ERR_FORMAT &&
               strstr(msg, "s1.safetensors: tensor 'model.embed_tokens.weight' not found"),
           "%s", msg);
    CHECK(t, write_text(dir, COOPT_ST_INDEX_NAME, "{\"weight_map\": [1]}"));
    rc = load(dir, &m, &msg);
    coopt_model_free(m);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    st_test_rmtree(dir);
}
