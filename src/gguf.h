/*
 * gguf.h -- GGUF (llama.cpp) reader and writer.
 *
 * Reader: coopt_gguf_parse() validates a whole GGUF v2/v3 image held in memory (normally a
 * read-only mmap) before anything is used: every string and array length, nested arrays,
 * tensor dims, element-count overflow, tensor data range and alignment, duplicate keys and
 * tensor names. All views it hands out (strings, arrays, tensor data) point into that buffer,
 * so the buffer must outlive the struct coopt_gguf. Key and tensor names are copied and
 * NUL-terminated. Errors print "<file>: ..." naming the key or tensor.
 *
 * File layout (little-endian):
 *   "GGUF" u32 version (2|3) u64 n_tensors u64 n_kv
 *   n_kv x { str key, u32 type, value }              str = u64 len + bytes (no NUL)
 *   n_tensors x { str name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
 *   padding to general.alignment (default 32), then the data section; tensor offsets are
 *   relative to it and multiples of the alignment. ne[0] is the innermost (row) dimension.
 *
 * Writer: struct coopt_gguf_writer collects metadata and tensor descriptions, then writes a
 * v3 file in one pass, streaming each tensor's data from a pointer or a callback.
 */
#ifndef COOPT_GGUF_H
#define COOPT_GGUF_H

#include "coopt.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// GGUF metadata value types (the u32 type tag in the file).
enum coopt_gguf_type {
    COOPT_GGUF_U8 = 0,
    COOPT_GGUF_I8,
    COOPT_GGUF_U16,
    COOPT_GGUF_I16,
    COOPT_GGUF_U32,
    COOPT_GGUF_I32,
    COOPT_GGUF_F32,
    COOPT_GGUF_BOOL,
    COOPT_GGUF_STRING,
    COOPT_GGUF_ARRAY,
    COOPT_GGUF_U64,
    COOPT_GGUF_I64,
    COOPT_GGUF_F64,
    COOPT_GGUF_TYPE_COUNT
};

// GGML tensor type ids (ggml.h enum ggml_type) that coopt reads or names.
enum {
    COOPT_GGML_F32  = 0,
    COOPT_GGML_F16  = 1,
    COOPT_GGML_Q4_0 = 2,
    COOPT_GGML_Q4_1 = 3,
    COOPT_GGML_Q5_0 = 6,
    COOPT_GGML_Q5_1 = 7,
    COOPT_GGML_Q8_0 = 8,
    COOPT_GGML_Q6_K = 14,
    COOPT_GGML_BF16 = 30,
};

#define COOPT_GGUF_MAX_DIMS 4
#define COOPT_GGUF_DEFAULT_ALIGNMENT 32

// A view of one metadata value inside the parsed buffer.
struct coopt_gguf_value {
    enum coopt_gguf_type type;
    enum coopt_gguf_type elem_type; // arrays only
    uint64_t             n;         // arrays: element count; strings: byte length; else 1
    const uint8_t       *data;      // scalars: the value bytes (unaligned); strings: the bytes;
                                    // arrays: the first element's encoding
    size_t               n_bytes;   // encoded bytes at data (array: all elements)
    const uint8_t       *raw;       // the value's whole encoding after its type tag
    size_t               raw_bytes; //   (array: elem type + count + elements)
};

struct coopt_gguf_kv {
    const char             *key; // NUL-terminated (owned by the struct coopt_gguf)
    struct coopt_gguf_value val;
};

struct coopt_gguf_tensor {
    const char *name;                     // NUL-terminated (owned by the struct coopt_gguf)
    uint32_t    ggml_type;                // ggml type id (may be one coopt cannot compute with)
    int         n_dims;                   // 1..4
    int64_t     ne[COOPT_GGUF_MAX_DIMS];  // ne[0] = row length; unused dims are 1
    uint64_t    offset;                   // relative to the data section
    const void *data;                     // into the parsed buffer
    size_t      n_bytes;
};

struct coopt_gguf {
    const char               *name;      // file name used in messages (owned copy)
    const uint8_t            *base;      // the parsed buffer (borrowed, or mmap owned below)
    size_t                    size;
    uint32_t                  version;   // 2 or 3
    uint32_t                  alignment; // general.alignment or 32
    size_t                    data_offset; // start of the data section in the buffer
    int64_t                   n_kv;
    struct coopt_gguf_kv     *kv;        // [n_kv] in file order
    int64_t                   n_tensors;
    struct coopt_gguf_tensor *tensors;   // [n_tensors] in file order
    // private
    int32_t                  *kv_sorted;     // [n_kv] indices sorted by key
    int32_t                  *tensor_sorted; // [n_tensors] indices sorted by name
    char                     *names;         // arena holding every key and tensor name
    void                     *map_addr;      // set by coopt_gguf_open (owned mapping)
    size_t                    map_size;
};

// ---- reader ----

// Parses and validates `size` bytes at `data` (borrowed: must outlive *out). `name` is used in
// error messages. Returns COOPT_ERR_FORMAT for a corrupt file, COOPT_ERR_UNSUPPORTED for GGUF
// v1, a big-endian file or an unknown ggml type id, COOPT_ERR_NOMEM. *out is NULL on failure.
enum coopt_status coopt_gguf_parse(const void *data, size_t size, const char *name, struct coopt_gguf **out);
// Maps `path` read-only and parses it; the mapping is owned by *out.
enum coopt_status coopt_gguf_open(const char *path, struct coopt_gguf **out);
void coopt_gguf_close(struct coopt_gguf *g); // NULL ok

const struct coopt_gguf_kv *coopt_gguf_find_key(const struct coopt_gguf *g, const char *key); // NULL if absent
const struct coopt_gguf_tensor *coopt_gguf_find_tensor(const struct coopt_gguf *g, const char *name);

// Typed getters. If the key is absent: `required` -> COOPT_ERR_FORMAT ("key missing"),
// otherwise COOPT_OK with *out left unchanged (preset it to the default). A value of the wrong
// type or out of range -> COOPT_ERR_FORMAT naming the key. Integer getters accept every integer
// type (and bool) whose value fits; get_f32 also accepts f64 and integers; get_bool accepts
// integers.
enum coopt_status coopt_gguf_get_u32(const struct coopt_gguf *g, const char *key, bool required, uint32_t *out);
enum coopt_status coopt_gguf_get_i32(const struct coopt_gguf *g, const char *key, bool required, int32_t *out);
enum coopt_status coopt_gguf_get_u64(const struct coopt_gguf *g, const char *key, bool required, uint64_t *out);
enum coopt_status coopt_gguf_get_f32(const struct coopt_gguf *g, const char *key, bool required, float *out);
enum coopt_status coopt_gguf_get_bool(const struct coopt_gguf *g, const char *key, bool required, bool *out);
// String view into the buffer (not NUL-terminated).
enum coopt_status coopt_gguf_get_str(const struct coopt_gguf *g, const char *key, bool required,
                                     const char **s, size_t *len);
// Array view; elem_type may be checked by the caller (or use the converters below).
enum coopt_status coopt_gguf_get_arr(const struct coopt_gguf *g, const char *key, bool required,
                                     struct coopt_gguf_value *out);

// Array converters; `key` is only used in messages. Each checks the element type and writes
// arr->n elements. COOPT_ERR_FORMAT on a wrong element type or an out-of-range value.
// Strings: ptrs[i] points into the buffer (not NUL-terminated), lens[i] its length.
enum coopt_status coopt_gguf_arr_strings(const struct coopt_gguf *g, const char *key, const struct coopt_gguf_value *arr,
                                         const char **ptrs, uint32_t *lens);
enum coopt_status coopt_gguf_arr_f32(const struct coopt_gguf *g, const char *key, const struct coopt_gguf_value *arr,
                                     float *out);
enum coopt_status coopt_gguf_arr_i32(const struct coopt_gguf *g, const char *key, const struct coopt_gguf_value *arr,
                                     int32_t *out);

// "f32", "q4_K", ... for a ggml type id; "unknown" if the id is not a ggml type.
const char *coopt_ggml_type_name(uint32_t ggml_type);
// ggml id -> coopt dtype for the types coopt computes with (F32, F16, BF16, Q8_0, Q4_0).
bool coopt_ggml_to_dtype(uint32_t ggml_type, enum coopt_dtype *out);
// coopt dtype -> ggml id; returns false for types GGUF cannot hold (FP8, GPTQ).
bool coopt_dtype_to_ggml(enum coopt_dtype t, uint32_t *out);
// Bytes of a tensor of `ne` (n_dims dims) of the ggml type; 0 if the type is unknown, ne[0]
// is not a multiple of the block length, or the size overflows.
size_t coopt_ggml_nbytes(uint32_t ggml_type, int n_dims, const int64_t *ne);

// The tensor's coopt dtype; COOPT_ERR_UNSUPPORTED naming the tensor and its ggml type name
// if coopt cannot compute with it.
enum coopt_status coopt_gguf_tensor_dtype(const struct coopt_gguf *g, const struct coopt_gguf_tensor *t,
                                          enum coopt_dtype *out);

// Builds a tokenizer from the tokenizer.ggml.* metadata of a GGUF file (a vocab-only file is
// fine). The _from variant reads an already parsed file.
enum coopt_status coopt_gguf_load_tokenizer(const char *path, struct coopt_tokenizer **out);
enum coopt_status coopt_gguf_tokenizer_from(const struct coopt_gguf *g, struct coopt_tokenizer **out);

// ---- writer ----

struct coopt_gguf_writer;
struct coopt_gguf_sink;

// Streams a tensor's bytes: calls coopt_gguf_sink_write() any number of times with exactly
// n_bytes in total, returns a status (non-OK aborts the write).
typedef enum coopt_status (*coopt_gguf_fill_fn)(void *user, struct coopt_gguf_sink *sink);
enum coopt_status coopt_gguf_sink_write(struct coopt_gguf_sink *sink, const void *data, size_t n);

enum coopt_status coopt_gguf_writer_init(struct coopt_gguf_writer **out);
void coopt_gguf_writer_free(struct coopt_gguf_writer *w); // NULL ok
// Power of two; written as general.alignment when not 32.
enum coopt_status coopt_gguf_writer_set_alignment(struct coopt_gguf_writer *w, uint32_t alignment);

// Metadata setters copy key and value. Setting a key twice replaces the value.
enum coopt_status coopt_gguf_writer_set_u32(struct coopt_gguf_writer *w, const char *key, uint32_t v);
enum coopt_status coopt_gguf_writer_set_i32(struct coopt_gguf_writer *w, const char *key, int32_t v);
enum coopt_status coopt_gguf_writer_set_u64(struct coopt_gguf_writer *w, const char *key, uint64_t v);
enum coopt_status coopt_gguf_writer_set_f32(struct coopt_gguf_writer *w, const char *key, float v);
enum coopt_status coopt_gguf_writer_set_bool(struct coopt_gguf_writer *w, const char *key, bool v);
enum coopt_status coopt_gguf_writer_set_str(struct coopt_gguf_writer *w, const char *key, const char *s);
// Array of a fixed-size element type (not STRING/ARRAY): n elements, little-endian at data.
enum coopt_status coopt_gguf_writer_set_arr(struct coopt_gguf_writer *w, const char *key, enum coopt_gguf_type elem,
                                            const void *data, uint64_t n);
// Array of strings; lens may be NULL (then NUL-terminated).
enum coopt_status coopt_gguf_writer_set_arr_str(struct coopt_gguf_writer *w, const char *key,
                                                const char *const *strs, const uint32_t *lens, uint64_t n);
// Copies a key/value from a parsed file (any type, nested arrays included).
enum coopt_status coopt_gguf_writer_copy_kv(struct coopt_gguf_writer *w, const struct coopt_gguf_kv *kv);

// Adds a tensor of ggml type `ggml_type` and dims ne[0..n_dims) (ne[0] innermost). Data comes
// from `data` (borrowed until coopt_gguf_writer_write returns) or, if data is NULL, from
// fill(user, sink). Duplicate names and unknown types are rejected (COOPT_ERR_INVALID).
enum coopt_status coopt_gguf_writer_add_tensor(struct coopt_gguf_writer *w, const char *name, uint32_t ggml_type,
                                               int n_dims, const int64_t *ne, const void *data,
                                               coopt_gguf_fill_fn fill, void *user);

// Writes the file (v3). On failure the partial file is removed.
enum coopt_status coopt_gguf_writer_write(struct coopt_gguf_writer *w, const char *path);

#endif // COOPT_GGUF_H
