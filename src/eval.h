/*
 * eval.h -- the arithmetic behind `coopt perplexity` and `coopt lambada`, kept out of apps/ so the
 * tests can link it. Everything here is pure math or plain file I/O; nothing touches a model.
 *
 * Conventions (each one matches a tool people compare against):
 *   - log-softmax is computed in double: logsumexp = max + log(sum exp(x - max)).
 *   - perplexity and its uncertainty follow llama.cpp's llama-perplexity:
 *       PPL = exp(mean nll), err = PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).
 *   - KL divergence, "Same top p", PPL(Q)/PPL(base) and their uncertainties follow llama.cpp's
 *     --kl-divergence, including its baseline file (--kl-divergence-base) byte for byte, so a
 *     baseline saved by either tool can be read by the other (see "baseline file" below).
 *   - LAMBADA follows lm-evaluation-harness lambada_openai: context = text before the last ' ',
 *     target = ' ' + last word, then HFLM._encode_pair moves trailing whitespace of the context
 *     onto the continuation.
 */
#ifndef COOPT_EVAL_H
#define COOPT_EVAL_H

#include "coopt.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// ---- log-softmax ----

// log(sum_i exp(logits[i])) in double, stable for any finite logits. If argmax is not NULL it
// receives the first index of the largest logit. n must be > 0.
double coopt_eval_logsumexp(const float *logits, int32_t n, int32_t *argmax);
// out[i] = log softmax(logits)[i] in double.
void coopt_eval_log_softmax(const float *logits, int32_t n, double *out);
// Negative log-likelihood of token tok: logsumexp(logits) - logits[tok].
double coopt_eval_nll(const float *logits, int32_t n, int32_t tok);
// Exact KL(P || Q) = sum_i p_i (log p_i - log q_i) of softmax(logits_p) and softmax(logits_q),
// in double (the reference the quantized baseline path is checked against).
double coopt_eval_kld_exact(const float *logits_p, const float *logits_q, int32_t n);

// ---- perplexity windows (llama-perplexity) ----

// A text of n_tokens is cut into n_tokens / n_ctx non-overlapping windows; in each window the
// logits of positions first .. n_ctx-2 (first = n_ctx/2) predict the tokens at first+1 .. n_ctx-1,
// so n_ctx - 1 - n_ctx/2 tokens are scored per window.
static inline int32_t coopt_eval_ppl_first(int32_t n_ctx) { return n_ctx / 2; }
static inline int32_t coopt_eval_ppl_n_scored(int32_t n_ctx) { return n_ctx - 1 - n_ctx / 2; }

// Running sums of negative log-likelihoods.
struct coopt_eval_ppl {
    double  sum_nll, sum_nll2;
    int64_t count;
};
void coopt_eval_ppl_add(struct coopt_eval_ppl *a, double nll);
// exp(sum_nll / count); 0 if count == 0.
double coopt_eval_ppl_value(const struct coopt_eval_ppl *a);
// llama-perplexity's "+/-": PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)); returns -1
// if it is undefined (count < 2 or a non-positive variance; llama.cpp prints an error then).
double coopt_eval_ppl_error(const struct coopt_eval_ppl *a);

// ---- statistics ----

// Mean and the standard error of the mean as llama.cpp's kl_divergence reports them:
// unc = sqrt((sum2/count - mean^2) / (count - 1)), but 0 unless count > 10 and the variance > 0.
void coopt_eval_mean_unc(double sum, double sum2, int64_t count, double *mean, double *unc);
// Covariance of the two means (llama.cpp): (sum_ab/count - mean_a*mean_b) / (count - 1); 0 if count < 10.
double coopt_eval_cov(double sum_a, double sum_b, double sum_ab, int64_t count);
// Standard error of a proportion p measured on n items: sqrt(p (1 - p) / (n - 1)); this is
// lm-evaluation-harness's mean_stderr of 0/1 scores. 0 if n < 2.
double coopt_eval_binomial_stderr(double p, int64_t n);
// Percentile of n ascending values with linear interpolation between neighbours at
// fraction * (n - 1) (llama.cpp); fraction <= 0 gives the minimum, >= 1 the maximum. n > 0.
double coopt_eval_percentile(const float *sorted, size_t n, double fraction);
// Median of n ascending values (mean of the two middle ones for even n). n > 0.
double coopt_eval_median(const float *sorted, size_t n);
// Sorts n floats ascending in place.
void coopt_eval_sort(float *v, size_t n);

// ---- quantized log-prob records (llama.cpp --kl-divergence-base) ----

// One record per scored token: uint16 r[coopt_eval_lp_record_len(n_vocab)].
//   r[0..1] float scale, r[2..3] float min_log_prob (native byte order, memcpy'd), then
//   r[4 + i] = round((logit_i - min_logit) / scale) for i < n_vocab (0 where logit_i <= min_logit),
//   padded to an even count. min_logit = min(max(min logit, max logit - 16), logit of the target),
//   scale = (max - min_logit) / 65535. (llama.cpp omits the target term; including it keeps the
//   format and makes PPL(base) exact when the target is far below the top token.)
//   The decoded log-prob of token i is scale * r[4 + i] + min_log_prob; the quantization step is
//   at most 16/65535 in log-prob.
size_t coopt_eval_lp_record_len(int32_t n_vocab);
// Writes the record of softmax(logits) into rec; returns the nll of tok (computed in double from
// the logits, not from the quantized record).
double coopt_eval_lp_encode(const float *logits, int32_t n_vocab, int32_t tok, uint16_t *rec);
// Decoded base log-prob of token i.
double coopt_eval_lp_get(const uint16_t *rec, int32_t i);

// Comparison of one token's current logits (Q) with its base record (P = base).
struct coopt_eval_kld_token {
    double kld;      // sum over tokens with base log-prob > -16 of p (log p - log q)
    double nll;      // -log q(target)
    double nll_base; // -log p(target) from the record
    double p_diff;   // q(target) - p(target)
    bool   same_top; // argmax of the logits == argmax of the record (first index on ties)
};
void coopt_eval_kld_token(const float *logits, const uint16_t *base, int32_t n_vocab, int32_t tok,
                          struct coopt_eval_kld_token *out);

// Running sums over scored tokens (llama.cpp kl_divergence_result).
struct coopt_eval_kld {
    double  sum_nll, sum_nll2, sum_nll_base, sum_nll_base2, sum_nll_nll_base;
    double  sum_kld, sum_kld2;
    double  sum_p_diff, sum_p_diff2, sum_p_diff4, max_p_diff;
    int64_t n_same_top, count;
};
void coopt_eval_kld_add(struct coopt_eval_kld *a, const struct coopt_eval_kld_token *t);

// ---- baseline file ----

// The llama.cpp logits file, native (little-endian) byte order:
//   char    magic[8] = "_logits_"
//   int32   n_ctx, n_vocab, n_chunk
//   int32   tokens[n_chunk * n_ctx]          the tokenized text (first token of each window NOT
//                                            replaced by BOS)
//   then for each chunk, coopt_eval_ppl_n_scored(n_ctx) records of coopt_eval_lp_record_len(n_vocab)
//   uint16 (positions first .. n_ctx-2 of the window, in order).
// Size: about 2 * n_vocab bytes per scored token (vocab 512: 1 KiB; vocab 32000: 64 KiB), so limit
// big runs with --chunks.
struct coopt_eval_base {
    FILE    *f;
    char    *path;
    int32_t  n_ctx, n_vocab, n_chunk;
    int32_t *tokens;    // [n_chunk * n_ctx]
    size_t   rec_len;   // uint16 per record
    int32_t  n_scored;  // records per chunk
    int32_t  chunk;     // next chunk to read or write
    bool     writing;
};
// Creates path and writes the header and tokens. On failure *b is zeroed.
enum coopt_status coopt_eval_base_create(const char *path, int32_t n_ctx, int32_t n_vocab, int32_t n_chunk,
                                         const int32_t *tokens, struct coopt_eval_base *b);
// Appends one chunk: n_scored records (rec_len uint16 each, back to back).
enum coopt_status coopt_eval_base_write_chunk(struct coopt_eval_base *b, const uint16_t *recs);
// Opens a baseline, reads its header and tokens and checks that the file size is exactly what the
// header implies (COOPT_ERR_FORMAT naming both sizes otherwise). On failure *b is zeroed.
enum coopt_status coopt_eval_base_open(const char *path, struct coopt_eval_base *b);
// Reads the next chunk's n_scored records into recs.
enum coopt_status coopt_eval_base_read_chunk(struct coopt_eval_base *b, uint16_t *recs);
// Closes the file (a write error surfacing at close is returned as COOPT_ERR_IO) and frees *b.
enum coopt_status coopt_eval_base_close(struct coopt_eval_base *b);

// ---- LAMBADA (lm-evaluation-harness lambada_openai) ----

// doc_to_text / doc_to_target: text.split(' ')[:-1] joined by ' ' is the context and
// ' ' + text.split(' ')[-1] the target. Returns the context length in bytes (text before the last
// ' ', 0 if there is none) and sets *word_off to where the last word starts (0 if no ' ').
size_t coopt_eval_lambada_split(const char *text, size_t len, size_t *word_off);
// Python str.rstrip(): the length of s without trailing whitespace (ASCII whitespace incl.
// \x1c-\x1f, and the UTF-8 encodings of Unicode White_Space such as U+00A0, U+2000-U+200A,
// U+3000). HFLM._encode_pair moves these bytes from the end of the context to the continuation.
size_t coopt_eval_rstrip_len(const char *s, size_t len);

#endif // COOPT_EVAL_H
