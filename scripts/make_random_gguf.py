#!/usr/bin/env python3
"""Writes a random-weight LLaMA GGUF of a chosen shape, for speed benchmarks on models that do not
fit in cache (issue: generation speed on a 100M-1B model). Accuracy is never measured on these.

Weights ~ N(0, 0.02) (scaled down for the output projections so the residual stream stays O(1)),
norms = 1, vocabulary = the Llama 2 SentencePiece model from $COOPT_MODELS/llama2-tokenizer.

    python3 scripts/make_random_gguf.py --type q8_0 -o models-local/rand-480m-q8_0.gguf
"""
import argparse
import os

import numpy as np
import gguf
from gguf import quants

p = argparse.ArgumentParser()
p.add_argument("--dim", type=int, default=2048)
p.add_argument("--layers", type=int, default=8)
p.add_argument("--heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--ffn", type=int, default=5632)
p.add_argument("--ctx", type=int, default=4096)
p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default="f16")
p.add_argument("--seed", type=int, default=0)
p.add_argument("-o", "--output", required=True)
a = p.parse_args()

models = os.environ.get("COOPT_MODELS", "../shared/models")
import sentencepiece as spm  # noqa: E402

sp = spm.SentencePieceProcessor(model_file=os.path.join(models, "llama2-tokenizer/tokenizer.model"))
n_vocab = sp.get_piece_size()
tokens = [sp.id_to_piece(i).encode("utf-8") for i in range(n_vocab)]
scores = [sp.get_score(i) for i in range(n_vocab)]
types = []
for i in range(n_vocab):
    if sp.is_unknown(i):
        types.append(2)
    elif sp.is_control(i):
        types.append(3)
    elif sp.is_byte(i):
        types.append(6)
    else:
        types.append(1)

qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}[a.type]
rng = np.random.default_rng(a.seed)
w = gguf.GGUFWriter(a.output, "llama")
hd = a.dim // a.heads
w.add_context_length(a.ctx)
w.add_embedding_length(a.dim)
w.add_block_count(a.layers)
w.add_feed_forward_length(a.ffn)
w.add_head_count(a.heads)
w.add_head_count_kv(a.kv_heads)
w.add_layer_norm_rms_eps(1e-5)
w.add_rope_freq_base(10000.0)
w.add_rope_dimension_count(hd)
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)


def mat(name, n_out, n_in, std, t=qtype):
    x = (rng.standard_normal((n_out, n_in), dtype=np.float32) * std).astype(np.float32)
    if t == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, x)
    elif t == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, quants.quantize(x, t), raw_dtype=t)


def vec(name, n):
    w.add_tensor(name, np.ones(n, dtype=np.float32))


mat("token_embd.weight", n_vocab, a.dim, 0.02)
for l in range(a.layers):
    vec(f"blk.{l}.attn_norm.weight", a.dim)
    vec(f"blk.{l}.ffn_norm.weight", a.dim)
    mat(f"blk.{l}.attn_q.weight", a.dim, a.dim, 0.02)
    mat(f"blk.{l}.attn_k.weight", a.kv_heads * hd, a.dim, 0.02)
    mat(f"blk.{l}.attn_v.weight", a.kv_heads * hd, a.dim, 0.02)
    mat(f"blk.{l}.attn_output.weight", a.dim, a.dim, 0.02 / np.sqrt(2 * a.layers))
    mat(f"blk.{l}.ffn_gate.weight", a.ffn, a.dim, 0.02)
    mat(f"blk.{l}.ffn_up.weight", a.ffn, a.dim, 0.02)
    mat(f"blk.{l}.ffn_down.weight", a.dim, a.ffn, 0.02 / np.sqrt(2 * a.layers))
vec("output_norm.weight", a.dim)
mat("output.weight", n_vocab, a.dim, 0.02)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file(progress=True)
w.close()
print("wrote", a.output)
