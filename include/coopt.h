/*
 * coopt.h -- the public C API of the coopt inference engine.
 *
 * Lifecycle: coopt_model_load() maps a model file (GGUF, Hugging Face directory or llama2.c
 * checkpoint); coopt_ctx_init() creates a context that holds many sequences and a paged KV
 * cache; coopt_ctx_decode() runs one forward pass over a ragged batch of tokens from several
 * sequences (prefill chunks and single decode tokens mixed); coopt_ctx_logits() returns the
 * logits of the tokens that asked for them; a coopt_sampler picks the next token.
 * coopt_ctx_generate() runs greedy generation with the choice made on the device, so a GPU runs
 * the steps back to back instead of waiting for the host between tokens.
 *
 * Errors: every fallible function returns enum coopt_status (COOPT_OK == 0, errors < 0) and
 * prints the detail (file, tensor, expected value) to stderr at the point of failure.
 * Out-params are set to NULL/0 on failure. Nothing in the library exits the process.
 * Every _free() accepts NULL.
 */
#ifndef COOPT_H
#define COOPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- status ----

enum coopt_status {
    COOPT_OK              = 0,
    COOPT_ERR_IO          = -1, // file missing, unreadable, short read
    COOPT_ERR_FORMAT      = -2, // corrupt or inconsistent file contents
    COOPT_ERR_NOMEM       = -3, // allocation or mapping failed
    COOPT_ERR_UNSUPPORTED = -4, // valid input we do not handle (architecture, dtype, ...)
    COOPT_ERR_KV_FULL     = -5, // no free KV pages; the cache is left unchanged
    COOPT_ERR_INVALID     = -6, // bad argument from the caller (unknown sequence, bad token id, ...)
    COOPT_ERR_CTX_FULL    = -7, // a sequence would exceed the context length
};

// Returns a static string naming the status ("ok", "i/o error", ...). Never NULL.
const char *coopt_status_str(enum coopt_status s);

// ---- data types ----

enum coopt_dtype {
    COOPT_DTYPE_F32 = 0,
    COOPT_DTYPE_F16,
    COOPT_DTYPE_BF16,
    COOPT_DTYPE_Q8_0,     // GGML block: f16 scale + 32 int8        (34 bytes / 32 values)
    COOPT_DTYPE_Q4_0,     // GGML block: f16 scale + 16 bytes nibbles (18 bytes / 32 values)
    COOPT_DTYPE_FP8_E4M3, // OCP FP8 E4M3 (KV cache)
    COOPT_DTYPE_FP8_E5M2, // OCP FP8 E5M2 (KV cache)
    COOPT_DTYPE_Q4_GPTQ,  // GPTQ 4-bit (weights only; see model.h)
    COOPT_DTYPE_I32,
    COOPT_DTYPE_COUNT
};

// "f32", "f16", "bf16", "q8_0", "q4_0", "fp8_e4m3", "fp8_e5m2", "gptq4", "i32".
const char *coopt_dtype_name(enum coopt_dtype t);
// Parses the names above (also "fp8" = fp8_e4m3, "e4m3", "e5m2"); returns false if unknown.
bool coopt_dtype_parse(const char *name, enum coopt_dtype *out);

// ---- tokenizer ----

struct coopt_tokenizer;

// Loads a tokenizer from a file: a Hugging Face tokenizer.json, a SentencePiece
// tokenizer.model, a llama2.c tokenizer.bin, a GGUF file (only its vocabulary is read), or a
// Hugging Face model directory (tokenizer.json preferred, else tokenizer.model).
enum coopt_status coopt_tokenizer_load(const char *path, struct coopt_tokenizer **out);
void coopt_tokenizer_free(struct coopt_tokenizer *tok);

enum {
    COOPT_TOKENIZE_ADD_BOS       = 1u << 0, // prepend BOS if the tokenizer uses one
    COOPT_TOKENIZE_PARSE_SPECIAL = 1u << 1, // "<s>", "<|eot_id|>" in the text become special tokens
};

// Encodes `len` bytes of UTF-8 `text`. On success *out is a malloc'd array of *n_out token ids
// (free with free()). Invalid UTF-8 is encoded through byte fallback, never rejected.
enum coopt_status coopt_tokenize(const struct coopt_tokenizer *tok, const char *text, size_t len,
                                 unsigned flags, int32_t **out, size_t *n_out);

int32_t coopt_tokenizer_n_vocab(const struct coopt_tokenizer *tok);
int32_t coopt_tokenizer_bos(const struct coopt_tokenizer *tok); // -1 if none
int32_t coopt_tokenizer_eos(const struct coopt_tokenizer *tok); // -1 if none
// True for tokens that end generation (EOS, <|eot_id|>, <|end_of_text|>, ...).
bool coopt_tokenizer_is_eog(const struct coopt_tokenizer *tok, int32_t id);

// Streaming detokenizer: turns token ids into UTF-8 bytes and never emits half a character.
// Zero-initialize (or call coopt_detok_reset) before the first token of a sequence.
struct coopt_detok {
    char    pending[8]; // bytes of an incomplete UTF-8 character
    int     n_pending;
    int32_t prev;       // previous token id (-1 at the start)
    int     n_tokens;   // tokens pushed so far
};
void coopt_detok_reset(struct coopt_detok *d);
// Appends the text of token `id` to out (capacity cap, NUL-terminated if cap > 0) and returns
// the number of bytes written (excluding NUL). Control tokens (BOS/EOS) produce no text.
// SentencePiece dummy prefix: the token right after BOS drops one leading space (as HF decode and
// sentencepiece decode do for an encoded prompt); any other token keeps its '▁' space, so
// generated tokens pushed without BOS continue a prompt correctly. Output longer than cap-1
// bytes is truncated at a character boundary.
size_t coopt_detok_push(struct coopt_detok *d, const struct coopt_tokenizer *tok, int32_t id,
                        char *out, size_t cap);
// Writes any incomplete bytes left (as U+FFFD), returns bytes written.
size_t coopt_detok_flush(struct coopt_detok *d, char *out, size_t cap);

// ---- model ----

struct coopt_model;

struct coopt_model_params {
    bool        prefetch;  // touch all weight pages at load (MADV_WILLNEED + read)
    bool        mlock;     // lock the mapping in memory
    int         n_threads; // threads for load-time work (repacking); 0 = all cores
    const char *device;    // "cpu" (default), "cuda"
};
struct coopt_model_params coopt_model_default_params(void);

// The device the command-line tools use when none is named: "cuda" when this build has CUDA and
// a GPU is present, else "cpu".
const char *coopt_default_device(void);

// Loads a model from `path`: a .gguf file, a Hugging Face directory (config.json +
// safetensors), or a llama2.c .bin checkpoint (tokenizer.bin / tok512.bin searched beside it,
// or set COOPT_TOKENIZER). Weights are views into mmap'ed files.
enum coopt_status coopt_model_load(const char *path, const struct coopt_model_params *params,
                                   struct coopt_model **out);
void coopt_model_free(struct coopt_model *m);

struct coopt_model_info {
    char             arch[32];       // "llama"
    char             desc[128];      // human readable, e.g. "llama 5L 64d 8h/4kv f32"
    int32_t          n_vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim;
    int32_t          n_ctx_train;
    int32_t          sliding_window; // 0 = none
    enum coopt_dtype weight_dtype;   // dominant matmul weight type
    uint64_t         n_params;
    uint64_t         weight_bytes;   // bytes read per token by the matmuls (incl. lm_head)
};
const struct coopt_model_info *coopt_model_get_info(const struct coopt_model *m);
// The model's tokenizer (borrowed; lives as long as the model). Never NULL for a loaded model.
const struct coopt_tokenizer *coopt_model_tokenizer(const struct coopt_model *m);

// ---- context: sequences, paged KV cache, batched forward ----

struct coopt_ctx;

struct coopt_ctx_params {
    int32_t          n_ctx;      // max tokens per sequence (0 = model's training context)
    int32_t          n_seq_max;  // max live sequences (default 16)
    int32_t          n_batch;    // max tokens per forward step; longer batches are split into
                                 // steps of this size (chunked prefill). Default 512.
    int32_t          page_size;  // tokens per KV page (default 16)
    int64_t          n_pages;    // KV pages in the pool (0 = enough for n_seq_max full sequences)
    enum coopt_dtype kv_type;    // KV storage type; COOPT_DTYPE_COUNT (the default) = auto:
                                 // FP8 E4M3 for head_dim >= 16, F16 below (docs/BENCHMARKS.md
                                 // "KV cache accuracy" has the measurements behind the rule)
    int32_t          n_threads;  // 0 = auto: 1 for models whose weights fit in cache (< 16 MiB read
                                 // per token, where thread hand-offs cost more than they save),
                                 // else all cores
    // Ablation switches (the defaults are the fast paths):
    int32_t          attn_partition; // split-K partition of long contexts in tokens (0 = 512, -1 = off)
    bool             attn_per_head;  // read K/V once per query head instead of once per KV group
    int32_t          kv_scale_search; // FP8 rows: scale candidates searched (0 = 16, 1 = plain amax)
    bool             no_step_graphs;  // run every step op by op (CUDA: no graph replay of decode steps;
                                      // COOPT_CUDA_GRAPHS=0 in the environment does the same)
};
struct coopt_ctx_params coopt_ctx_default_params(void);

enum coopt_status coopt_ctx_init(struct coopt_model *m, const struct coopt_ctx_params *params,
                                 struct coopt_ctx **out);
void coopt_ctx_free(struct coopt_ctx *c);

// Creates an empty sequence; *seq_id receives its id (0 <= id < n_seq_max).
// Returns COOPT_ERR_INVALID if n_seq_max sequences are live.
enum coopt_status coopt_seq_new(struct coopt_ctx *c, int32_t *seq_id);
// Frees the sequence and its KV pages. Unknown ids are ignored.
void coopt_seq_free(struct coopt_ctx *c, int32_t seq_id);
// Creates a new sequence sharing all of src's KV pages (reference counted; a partially filled
// last page is copied on the first write). n samples of one prompt store the prompt once.
enum coopt_status coopt_seq_fork(struct coopt_ctx *c, int32_t src, int32_t *seq_id);
// Number of tokens held by the sequence (its next token's position), or -1 if unknown.
int32_t coopt_seq_len(const struct coopt_ctx *c, int32_t seq_id);

struct coopt_sampler;

// One call's worth of tokens. Token i is appended to sequence seq_ids[i] at the next position
// of that sequence (tokens of one sequence must appear in order). Entries of one sequence may
// be interleaved with others'. want_logits[i] != 0 asks for token i's logits (NULL: only the
// last token of each sequence in the batch). samplers[i] (samplers NULL, or an entry NULL:
// none) asks for the next token drawn from token i's logits (if it gets logits) by that
// sampler: coopt_ctx_token.
// Where coopt_sampler_chainable(sampler) the draw is made where the logits are (on a GPU only
// the token and the random state come back, and coopt_ctx_logits(i) is NULL); otherwise the
// host draws from the logits. A sampler may draw once per batch (twice is COOPT_ERR_INVALID).
struct coopt_batch_input {
    int32_t                      n_tokens;
    const int32_t               *tokens;      // [n_tokens]
    const int32_t               *seq_ids;     // [n_tokens]
    const uint8_t               *want_logits; // [n_tokens] or NULL
    struct coopt_sampler *const *samplers;    // [n_tokens] or NULL
};

// Runs the forward pass. Returns COOPT_ERR_KV_FULL (cache unchanged) if pages run out,
// COOPT_ERR_CTX_FULL if a sequence would pass n_ctx, COOPT_ERR_INVALID for bad ids,
// COOPT_ERR_NOMEM (with a message; the sequences keep their lengths, the batch has no logits,
// a later call may succeed) when the device runs out of memory for the cache or the pass.
// On a GPU the call returns once the work is enqueued: the device may still be computing when
// it returns, so the host can prepare the next batch meanwhile (and a caller that enqueues the
// next batch without reading these logits keeps the device busy without a gap).
// coopt_ctx_logits() and coopt_ctx_synchronize() wait for it.
enum coopt_status coopt_ctx_decode(struct coopt_ctx *c, const struct coopt_batch_input *batch);
// Waits until the work of every coopt_ctx_decode() so far has finished (for timing).
void coopt_ctx_synchronize(struct coopt_ctx *c);
// Logits of batch token i (which must have asked for them), n_vocab floats; waits for the last
// decode to finish. Borrowed pointer, valid until the next coopt_ctx_decode(). NULL if token i
// has no logits.
const float *coopt_ctx_logits(struct coopt_ctx *c, int32_t i);
// The token samplers[i] of the last decode drew for batch token i (see coopt_batch_input):
// exactly the token coopt_sampler_sample(samplers[i], logits of token i) returns, with the
// sampler's random state left as that call leaves it (its penalty history is not touched: call
// coopt_sampler_accept). The draw counts when read: the first call waits for the decode and
// advances the sampler; later calls return the same token. -1 when token i has no logits or no
// sampler, or after the next decode.
int32_t coopt_ctx_token(struct coopt_ctx *c, int32_t i);

// Generation with the choice made where the logits are. Feeds `token` to sequence seq, then
// feeds each step's choice to the next step, until n_max tokens were fed or on_token returns
// false. The choice is the argmax (smp NULL, or a greedy sampler: temperature <= 0 without a
// repetition penalty) or the token coopt_sampler_sample(smp, logits) would draw -- the same
// token, bit for bit, with smp's random stream -- where coopt_sampler_chainable(smp); another
// sampler is COOPT_ERR_INVALID. The choice is made by the backend and fed to the next step
// without the host in between: on a GPU the host enqueues step k+1 before it has seen step k's
// token, so the device runs the steps back to back and only a token (and the random state)
// per step comes back. Afterwards smp's random state is as after drawing the last token passed
// to on_token (its penalty history is not touched: on_token may call coopt_sampler_accept). Each token that is fed after the first goes to
// on_token(ud, token) as it arrives, before it counts; false stops the generation and that token
// is not fed (the step that already ran with it is taken back). on_token may be NULL (all are
// fed). The last step's argmax is not reported (nothing feeds it). *n_fed (may be NULL) receives
// the tokens fed, `token` included. Errors as coopt_ctx_decode (CTX_FULL / KV_FULL when the next
// step does not fit: the tokens fed so far stay). Afterwards coopt_ctx_logits has no rows.
typedef bool coopt_gen_token_fn(void *ud, int32_t token);
struct coopt_sampler;
enum coopt_status coopt_ctx_generate(struct coopt_ctx *c, int32_t seq, int32_t token, int32_t n_max,
                                     struct coopt_sampler *smp, coopt_gen_token_fn *on_token, void *ud,
                                     int32_t *n_fed);

struct coopt_kv_stats {
    int64_t n_pages, n_pages_used, page_size;
    size_t  page_bytes;    // bytes of one page (all layers, K and V)
    size_t  bytes_per_token;
    enum coopt_dtype kv_type; // the storage type in use (auto resolved)
};
void coopt_ctx_kv_stats(const struct coopt_ctx *c, struct coopt_kv_stats *out);
// Threads the context's backend uses (n_threads after the auto rule).
int32_t coopt_ctx_n_threads(const struct coopt_ctx *c);

// ---- sampling ----

struct coopt_sampler;

struct coopt_sampler_params {
    float    temp;           // 0 = greedy
    int32_t  top_k;          // 0 = off
    float    top_p;          // 1 = off
    float    min_p;          // 0 = off
    float    repeat_penalty; // 1 = off
    int32_t  repeat_last_n;  // tokens of history the penalty looks at
    uint64_t seed;           // 0 = seeded from the clock; otherwise the same seed gives the same draws
};
struct coopt_sampler_params coopt_sampler_default_params(void);

enum coopt_status coopt_sampler_init(const struct coopt_sampler_params *p, int32_t n_vocab,
                                     struct coopt_sampler **out);
void coopt_sampler_free(struct coopt_sampler *s);
// Picks a token from n_vocab logits (not modified). Does not record it: call _accept.
int32_t coopt_sampler_sample(struct coopt_sampler *s, const float *logits);
// Records a token in the repetition-penalty history (prompt tokens too).
void coopt_sampler_accept(struct coopt_sampler *s, int32_t token);
// Clears the penalty history and restarts the random sequence from the seed.
void coopt_sampler_reset(struct coopt_sampler *s);
// Whether coopt_ctx_generate can make this sampler's choice where the logits are: greedy without
// a repetition penalty, or temperature > 0 without a penalty with 1 <= top_k <= 64 (the
// defaults) and a vocabulary of at most 262144 at top_k 64 (more at smaller k).
bool coopt_sampler_chainable(const struct coopt_sampler *s);

// ---- scheduler: continuous batching over a context ----
//
// Requests (prompt + generation limit + sampling) are admitted first come, first served. Each
// step builds ONE batch: a decode token for every running request, then prefill chunks of
// waiting requests while the token budget (n_batch) and free KV pages last. When pages run out
// for a decode token, the most recently admitted running request is preempted: its pages are
// freed and it is re-queued to be recomputed (prompt + tokens generated so far) later.

struct coopt_sched;

// Called for every generated token (done = false), and once when a request finishes
// (token = -1, done = true; reason "eos", "length", "context" or "cancelled").
typedef void coopt_sched_token_fn(void *ud, int32_t req_id, int32_t token, bool done, const char *reason);

struct coopt_sched_params {
    int32_t               max_step_tokens; // token budget per step (0 = the context's n_batch)
    int32_t               chunk_size;      // max prefill tokens of one request per step (default 512)
    coopt_sched_token_fn *on_token;
    void                 *ud;
};

// The scheduler borrows the context (and its model); free the scheduler first.
enum coopt_status coopt_sched_init(struct coopt_ctx *c, const struct coopt_sched_params *p, struct coopt_sched **out);
void coopt_sched_free(struct coopt_sched *s);
// Queues a request (prompt copied). max_new < 0: until end of generation or context.
enum coopt_status coopt_sched_add(struct coopt_sched *s, const int32_t *prompt, int32_t n_prompt, int32_t max_new,
                                  const struct coopt_sampler_params *sp, int32_t *req_id);
// Ends a request early (its callback gets done with reason "cancelled").
void coopt_sched_cancel(struct coopt_sched *s, int32_t req_id);
// Runs one step. *n_active receives the number of unfinished requests. Returns an error only
// for failures other than page pressure (which the scheduler handles by waiting/preempting).
enum coopt_status coopt_sched_step(struct coopt_sched *s, int32_t *n_active);

struct coopt_sched_stats {
    int64_t n_steps, n_preemptions, n_prompt_tokens, n_gen_tokens, n_recomputed_tokens;
};
void coopt_sched_get_stats(const struct coopt_sched *s, struct coopt_sched_stats *out);

// ---- misc ----

// Monotonic clock in microseconds.
int64_t coopt_time_us(void);
// Number of online CPU cores.
int coopt_n_cores(void);

#ifdef __cplusplus
}
#endif
#endif // COOPT_H
