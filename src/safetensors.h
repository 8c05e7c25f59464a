/*
 * safetensors.h -- reader and streaming writer for the safetensors format, and the Hugging Face
 * config.json parser shared by the loader (hf.c) and the fuzz targets.
 *
 * File layout (https://github.com/huggingface/safetensors):
 *   u64 N (little endian) | N bytes of JSON header | data
 *   header = { "<name>": {"dtype": "F32", "shape": [a, b], "data_offsets": [begin, end]}, ...,
 *              "__metadata__": {"<key>": "<string>", ...} (optional) }
 * Offsets are relative to the start of the data section. The reader trusts nothing: N must fit
 * in the file (and be <= 100 MB), every dtype must be a known safetensors dtype, the shape's
 * element count times the element size must equal end - begin (overflow-checked),
 * begin <= end <= data size, and tensors must not overlap. The parsed object points into the
 * caller's buffer (no tensor data is copied); tensor data is not required to be aligned.
 */
#ifndef COOPT_SAFETENSORS_H
#define COOPT_SAFETENSORS_H

#include "coopt.h"

#include <cjson/cJSON.h>
#include "model.h"
#include "util.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COOPT_ST_MAX_DIMS    8
#define COOPT_ST_MAX_HEADER  (100u * 1000u * 1000u) // bytes of JSON header we accept
#define COOPT_ST_INDEX_NAME  "model.safetensors.index.json"
#define COOPT_ST_SINGLE_NAME "model.safetensors"

// ---- reader ----

struct coopt_st_tensor {
    const char      *name;         // NUL-terminated, owned by the coopt_safetensors
    char             st_dtype[12]; // dtype as written in the header: "F32", "I64", "F8_E4M3", ...
    bool             supported;    // st_dtype maps to a coopt_dtype (F32 F16 BF16 I32 F8_*)
    enum coopt_dtype dtype;        // valid iff supported
    size_t           elem_size;    // bytes per element
    int              n_dims;       // 0 (scalar) .. COOPT_ST_MAX_DIMS
    int64_t          shape[COOPT_ST_MAX_DIMS]; // outermost first, as in PyTorch
    int64_t          n_elems;
    uint64_t         offset; // of the data, relative to the data section
    const void      *data;   // into the parsed buffer; NOT necessarily aligned
    size_t           n_bytes;
};

struct coopt_safetensors {
    char                   *name; // for messages (usually the path)
    const uint8_t          *base; // the whole file
    size_t                  size;
    struct coopt_mmap       map; // set only if coopt_safetensors_open mapped the file
    int                     n_tensors;
    struct coopt_st_tensor *tensors; // [n_tensors] sorted by name (iterate in this order)
    int                     n_meta;
    char                  **meta_keys; // [n_meta] "__metadata__" entries
    char                  **meta_vals; // [n_meta]
};

// Parses a safetensors file held in `data` (size bytes; borrowed: it must outlive *out).
// `name` is used in messages. On failure *out is NULL and one line names the problem, e.g.
// "coopt: x.safetensors: tensor 'w': data_offsets [0, 12] hold 12 bytes, shape [2,3] F32 needs 24".
// Returns COOPT_ERR_FORMAT for corrupt input, COOPT_ERR_NOMEM on allocation failure.
enum coopt_status coopt_safetensors_parse(const void *data, size_t size, const char *name,
                                          struct coopt_safetensors **out);
// Maps `path` and parses it; the object owns the mapping. COOPT_ERR_IO if unreadable.
enum coopt_status coopt_safetensors_open(const char *path, struct coopt_safetensors **out);
void              coopt_safetensors_free(struct coopt_safetensors *st); // NULL ok

// Tensor by name (binary search), or NULL. Borrowed; lives as long as st.
const struct coopt_st_tensor *coopt_safetensors_find(const struct coopt_safetensors *st,
                                                     const char                     *name);
// "__metadata__" value by key, or NULL.
const char *coopt_safetensors_meta(const struct coopt_safetensors *st, const char *key);

// Safetensors dtype name -> element size (0 if unknown), and whether it maps to a coopt_dtype.
size_t coopt_st_dtype_size(const char *st_dtype, bool *supported, enum coopt_dtype *dtype);
// coopt_dtype -> safetensors name ("F32", "F16", "BF16", "I32", "F8_E4M3", "F8_E5M2"), or NULL
// for types safetensors cannot hold (Q8_0, Q4_0, GPTQ).
const char *coopt_st_dtype_name(enum coopt_dtype t);

// ---- writer ----
//
// Collect descriptors with coopt_st_writer_add*, then coopt_st_writer_write() writes the header
// (padded with spaces so the data starts at a multiple of 8, as the Python library does) and the
// data in the order the tensors were added, streaming from pointers or callbacks. The file is
// written to "<path>.tmp" and renamed into place, so a failure never leaves a half file at path.

struct coopt_st_writer;

// Produces the bytes [offset, offset + n) of a tensor into buf. Called with increasing offsets
// that cover the tensor exactly once, in chunks of at most 4 MiB.
typedef enum coopt_status coopt_st_fill_fn(void *user, void *buf, size_t offset, size_t n);

enum coopt_status coopt_st_writer_init(struct coopt_st_writer **out);
void              coopt_st_writer_free(struct coopt_st_writer *w); // NULL ok
// Adds a tensor whose data is `data` (borrowed until write). dtype must have a safetensors name.
// The name is copied. COOPT_ERR_INVALID for a duplicate name, bad shape or dtype.
enum coopt_status coopt_st_writer_add(struct coopt_st_writer *w, const char *name,
                                      enum coopt_dtype dtype, int n_dims, const int64_t *shape,
                                      const void *data);
// Same, with data produced by `fill` at write time.
enum coopt_status coopt_st_writer_add_fn(struct coopt_st_writer *w, const char *name,
                                         enum coopt_dtype dtype, int n_dims, const int64_t *shape,
                                         coopt_st_fill_fn *fill, void *user);
// Any safetensors dtype by name ("I64", "U8", ...), for what coopt_dtype cannot name.
enum coopt_status coopt_st_writer_add_raw(struct coopt_st_writer *w, const char *name,
                                          const char *st_dtype, int n_dims, const int64_t *shape,
                                          const void *data, coopt_st_fill_fn *fill, void *user);
// Adds or replaces a "__metadata__" entry (both strings copied).
enum coopt_status coopt_st_writer_meta(struct coopt_st_writer *w, const char *key,
                                       const char *value);
// Writes the file. The writer can be freed afterwards (or written again).
enum coopt_status coopt_st_writer_write(struct coopt_st_writer *w, const char *path);

// ---- Hugging Face config.json ----

// What config.json says beyond struct coopt_model_config.
struct coopt_hf_config_extra {
    char    arch[64];         // "LlamaForCausalLM", or the model_type when architectures is absent
    bool    tie_explicit;     // tie_word_embeddings was present
    int32_t bos_id, eos_id;   // -1 if absent (eos: the first of a list)
    bool    quantized;        // quantization_config present
    char    quant_method[32]; // its quant_method ("gptq", "awq", ...), "" if none
    // GPTQ parameters (quantization_config or quantize_config.json); valid when quantized
    int32_t q_bits;           // default 4
    int32_t q_group_size;     // default 128; -1 = one group over all inputs
    bool    q_desc_act;       // act-order (g_idx present)
    bool    q_sym;            // default true
    bool    q_zeros_v2;       // checkpoint_format "gptq_v2": zeros stored as is (v1 stores zero - 1)
};

struct coopt_model;
// A Hugging Face config.json object (LlamaForCausalLM) describing m's configuration, its
// tokenizer's BOS/EOS and its attention biases; the caller owns it (cJSON_Delete). NULL on OOM.
cJSON *coopt_hf_config_from_model(const struct coopt_model *m);

// Parses GPTQ parameters from a quantization_config object or quantize_config.json root into x
// (bits, group_size, desc_act, sym, checkpoint_format). `name` is used in messages.
enum coopt_status coopt_hf_parse_gptq_config(const cJSON *q, const char *name, struct coopt_hf_config_extra *x);

// Parses config.json text (len bytes, need not be NUL-terminated) into cfg (rope_layout HALF).
// `name` is used in messages. Returns COOPT_ERR_FORMAT for missing/ill-typed/inconsistent fields,
// COOPT_ERR_UNSUPPORTED for an architecture, activation or rope_scaling type we do not run.
// Does not reject quantization_config (the loader decides); extra may be NULL.
enum coopt_status coopt_hf_parse_config(const char *json, size_t len, const char *name,
                                        struct coopt_model_config    *cfg,
                                        struct coopt_hf_config_extra *extra);

#endif // COOPT_SAFETENSORS_H
