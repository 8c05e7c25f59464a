#!/usr/bin/env python3
"""
ref_llama.py -- an independent numpy reference of the LLaMA forward pass, used to make the golden
files under tests/golden (see make_golden.py). Never needed at runtime.

Design: plain, obviously-correct numpy, computed in float64 by default so that it is clearly more
accurate than the engine's float32 path (the golden tests then measure the engine's error, not the
reference's). Every forward recomputes the whole sequence (no KV cache): the sequences are a few
dozen tokens and the models tiny, and the reference should have as few moving parts as possible.
Passing dtype=np.float32 runs the same code in float32; make_golden.py uses that to measure how
far a float32 implementation drifts from float64, which justifies the tests' tolerance.

Loaders (all return a Model with weights as [out, in] matrices, like nn.Linear / GGUF rows):
  * Hugging Face directory: config.json + model.safetensors or sharded model-*.safetensors with
    model.safetensors.index.json. F32/F16 go through the `safetensors` package's numpy API;
    BF16 (which numpy lacks) is read from the raw bytes and widened with bit ops (bf16 is the top
    16 bits of an f32, so the conversion is exact). Q/K rows are in rotate-half RoPE layout.
  * GGUF (`gguf` package): llama architecture, F32/F16 (other types through gguf.quants if
    available). Q/K rows are stored for interleaved-pair RoPE (llama.cpp's HF converter permutes
    them), so the model is run with the interleaved RoPE.
  * llama2.c legacy .bin: 7 int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size (negative = untied classifier), seq_len), then f32 tensors. Interleaved RoPE.

Semantics follow transformers' LlamaForCausalLM (modeling_llama.py):
  RMSNorm      y = w * x / sqrt(mean(x^2) + eps)
  RoPE         inv_freq[i] = theta^(-2i/d), i < d/2, scaled per rope_scaling (none, "linear",
               "llama3" as in _compute_llama3_parameters); angle = pos * inv_freq[i].
               rotate-half (HF): pairs (i, i + d/2); interleaved (GGUF/llama2.c): pairs (2i, 2i+1).
  attention    softmax(q k^T / sqrt(head_dim) + causal mask) v; query head h reads kv head
               h // (n_heads / n_kv_heads) (GQA; MHA when equal)
  MLP          down(silu(gate(x)) * up(x))
  logits       lm_head(norm(x)); lm_head = embed_tokens when tied

Self-check: `python3 scripts/ref_llama.py` greedy-decodes stories260K.gguf from "Once upon a time"
and prints the story (compare with the README of the models directory), checks that the llama2.c
.bin gives the same logits, and that the GGUF run with its Q/K rows un-permuted to rotate-half
layout gives the same logits as the interleaved run (the two RoPE layouts agree).
"""
import json
import math
import os
import struct
import sys

import numpy as np

ROPE_HALF = "half"            # HF rotate-half
ROPE_INTERLEAVED = "interleaved"  # GGUF / llama2.c adjacent pairs


class Model:
    """Config fields plus weights. Matrices are [out, in] float64 (or the chosen dtype)."""

    def __init__(self):
        self.n_vocab = self.dim = self.n_layers = self.n_heads = self.n_kv_heads = 0
        self.head_dim = self.ffn_dim = 0
        self.eps = 1e-5
        self.rope_theta = 10000.0
        self.rope_scaling = None  # dict as in config.json, or None
        self.rope_layout = ROPE_HALF
        self.embed = None   # [n_vocab, dim]
        self.layers = []    # dicts: attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down
        self.norm = None    # [dim]
        self.lm_head = None  # [n_vocab, dim]
        self.vocab = None   # list of piece strings when the file carries them

    def astype(self, dtype):
        m = Model()
        m.__dict__.update(self.__dict__)
        m.embed = self.embed.astype(dtype)
        m.norm = self.norm.astype(dtype)
        m.lm_head = self.lm_head.astype(dtype)
        m.layers = [{k: v.astype(dtype) for k, v in l.items()} for l in self.layers]
        return m


# ---- loaders ----

def bf16_to_f32(raw_u16):
    """Exact BF16 -> F32: the bf16 bits are the high half of the f32 bits."""
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


def _read_safetensors(path):
    """Returns {name: np.ndarray float32/64} for one .safetensors file."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    base = 8 + hlen
    out = {}
    bf16 = {k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"}
    with safe_open(path, framework="np") as st:
        for k in st.keys():
            if k not in bf16:
                out[k] = st.get_tensor(k).astype(np.float32)
    if bf16:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for k in bf16:
            info = header[k]
            a, b = info["data_offsets"]
            u16 = np.frombuffer(raw[base + a: base + b].tobytes(), dtype="<u2")
            out[k] = bf16_to_f32(u16).reshape(info["shape"])
    return out


def load_hf(dirpath):
    cfg = json.load(open(os.path.join(dirpath, "config.json")))
    idx = os.path.join(dirpath, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for fn in files:
        tensors.update(_read_safetensors(os.path.join(dirpath, fn)))

    m = Model()
    m.dim = cfg["hidden_size"]
    m.n_layers = cfg["num_hidden_layers"]
    m.n_heads = cfg["num_attention_heads"]
    m.n_kv_heads = cfg.get("num_key_value_heads") or m.n_heads
    m.head_dim = cfg.get("head_dim") or m.dim // m.n_heads
    m.ffn_dim = cfg["intermediate_size"]
    m.n_vocab = cfg["vocab_size"]
    m.eps = cfg.get("rms_norm_eps", 1e-6)
    m.rope_theta = cfg.get("rope_theta", 10000.0)
    m.rope_scaling = cfg.get("rope_scaling")
    m.max_pos = cfg.get("max_position_embeddings", 2048)
    m.rope_layout = ROPE_HALF
    tied = cfg.get("tie_word_embeddings", False)

    f64 = lambda a: np.asarray(a, dtype=np.float64)
    # story-lmrs stores only lm_head.weight (tied); others store only embed_tokens when tied.
    emb = tensors.get("model.embed_tokens.weight")
    head = tensors.get("lm_head.weight")
    if emb is None:
        emb = head
    if head is None or tied:
        head = emb
    m.embed, m.lm_head = f64(emb), f64(head)
    m.norm = f64(tensors["model.norm.weight"])
    for i in range(m.n_layers):
        p = "model.layers.%d." % i
        m.layers.append(dict(
            attn_norm=f64(tensors[p + "input_layernorm.weight"]),
            wq=f64(tensors[p + "self_attn.q_proj.weight"]),
            wk=f64(tensors[p + "self_attn.k_proj.weight"]),
            wv=f64(tensors[p + "self_attn.v_proj.weight"]),
            wo=f64(tensors[p + "self_attn.o_proj.weight"]),
            ffn_norm=f64(tensors[p + "post_attention_layernorm.weight"]),
            w_gate=f64(tensors[p + "mlp.gate_proj.weight"]),
            w_up=f64(tensors[p + "mlp.up_proj.weight"]),
            w_down=f64(tensors[p + "mlp.down_proj.weight"]),
        ))
    return m


def _gguf_field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.parts[f.data[0]][0].item() if len(f.data) == 1 else [f.parts[i] for i in f.data]


def load_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama", "only llama architecture: %s" % arch

    def tensor(name):
        t = next(t for t in r.tensors if t.name == name)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.array(t.data, dtype=np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            a = np.array(t.data, dtype=np.float16).astype(np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
            a = bf16_to_f32(np.array(t.data).view(np.uint16))
        else:
            from gguf import quants
            a = quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; numpy data is row-major with the reverse shape.
        shape = [int(x) for x in reversed(t.shape.tolist())]
        return a.reshape(shape).astype(np.float64)

    m = Model()
    m.dim = int(_gguf_field(r, "llama.embedding_length"))
    m.n_layers = int(_gguf_field(r, "llama.block_count"))
    m.n_heads = int(_gguf_field(r, "llama.attention.head_count"))
    m.n_kv_heads = int(_gguf_field(r, "llama.attention.head_count_kv", m.n_heads))
    m.head_dim = m.dim // m.n_heads
    rope_dims = int(_gguf_field(r, "llama.rope.dimension_count", m.head_dim))
    assert rope_dims == m.head_dim, "partial rope not supported"
    m.ffn_dim = int(_gguf_field(r, "llama.feed_forward_length"))
    m.eps = float(_gguf_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    m.rope_theta = float(_gguf_field(r, "llama.rope.freq_base", 10000.0))
    m.max_pos = int(_gguf_field(r, "llama.context_length", 2048))
    stype = r.fields.get("llama.rope.scaling.type")
    if stype is not None and bytes(stype.parts[-1]).decode() == "linear":
        m.rope_scaling = {"rope_type": "linear",
                          "factor": float(_gguf_field(r, "llama.rope.scaling.factor"))}
    m.rope_layout = ROPE_INTERLEAVED
    m.embed = tensor("token_embd.weight")
    names = {t.name for t in r.tensors}
    m.lm_head = tensor("output.weight") if "output.weight" in names else m.embed
    m.norm = tensor("output_norm.weight")
    m.n_vocab = m.embed.shape[0]
    for i in range(m.n_layers):
        p = "blk.%d." % i
        m.layers.append(dict(
            attn_norm=tensor(p + "attn_norm.weight"), wq=tensor(p + "attn_q.weight"),
            wk=tensor(p + "attn_k.weight"), wv=tensor(p + "attn_v.weight"),
            wo=tensor(p + "attn_output.weight"), ffn_norm=tensor(p + "ffn_norm.weight"),
            w_gate=tensor(p + "ffn_gate.weight"), w_up=tensor(p + "ffn_up.weight"),
            w_down=tensor(p + "ffn_down.weight"),
        ))
    f = r.fields.get("tokenizer.ggml.tokens")
    if f is not None:
        m.vocab = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return m


def load_llama2c(path):
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    w = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    off = [0]

    def take(*shape):
        n = int(np.prod(shape))
        a = w[off[0]: off[0] + n].reshape(shape)
        off[0] += n
        return a

    m = Model()
    m.dim, m.ffn_dim, m.n_layers = dim, hidden, n_layers
    m.n_heads, m.n_kv_heads = n_heads, n_kv_heads
    m.n_vocab, m.head_dim, m.max_pos = vocab, head_dim, seq_len
    m.eps, m.rope_theta, m.rope_layout = 1e-5, 10000.0, ROPE_INTERLEAVED
    m.embed = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    m.norm = take(dim)
    take(seq_len * head_dim // 2)  # freq_cis_real (unused: recomputed)
    take(seq_len * head_dim // 2)  # freq_cis_imag
    m.lm_head = m.embed if shared else take(vocab, dim)
    assert off[0] == w.size, "llama2.c file size mismatch: %d of %d floats used" % (off[0], w.size)
    for i in range(n_layers):
        m.layers.append(dict(attn_norm=rms_att[i], wq=wq[i], wk=wk[i], wv=wv[i], wo=wo[i],
                             ffn_norm=rms_ffn[i], w_gate=w1[i], w_up=w3[i], w_down=w2[i]))
    return m


def load(path):
    if os.path.isdir(path):
        return load_hf(path)
    if path.endswith(".gguf"):
        return load_gguf(path)
    return load_llama2c(path)


# ---- forward ----

def rope_inv_freq(m):
    """inv_freq[d/2] as transformers' rope init functions compute it (in float64)."""
    d = m.head_dim
    inv = 1.0 / (m.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = m.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        # transformers _compute_llama3_parameters
        factor = sc["factor"]
        lo, hi = sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        low_wavelen = old_ctx / lo
        high_wavelen = old_ctx / hi
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, out)
    raise ValueError("unsupported rope_scaling %r" % (sc,))


def apply_rope(x, pos, inv_freq, layout):
    """x: [T, H, d]; pos: [T]. Returns the rotated copy."""
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]  # [T, d/2]
    cos = np.cos(ang).astype(x.dtype)[:, None, :]
    sin = np.sin(ang).astype(x.dtype)[:, None, :]
    d2 = x.shape[-1] // 2
    if layout == ROPE_HALF:
        x1, x2 = x[..., :d2], x[..., d2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def forward(m, tokens):
    """Logits [T, n_vocab] for every position of `tokens` (positions 0..T-1), causal."""
    dt = m.embed.dtype
    T = len(tokens)
    pos = np.arange(T)
    inv_freq = rope_inv_freq(m)
    H, KV, d = m.n_heads, m.n_kv_heads, m.head_dim
    grp = H // KV
    mask = np.triu(np.full((T, T), -np.inf, dtype=dt), k=1)
    x = m.embed[np.asarray(tokens)]
    for L in m.layers:
        h = rmsnorm(x, L["attn_norm"], m.eps)
        q = (h @ L["wq"].T).reshape(T, H, d)
        k = (h @ L["wk"].T).reshape(T, KV, d)
        v = (h @ L["wv"].T).reshape(T, KV, d)
        q = apply_rope(q, pos, inv_freq, m.rope_layout)
        k = apply_rope(k, pos, inv_freq, m.rope_layout)
        att = np.empty((T, H, d), dtype=dt)
        for hh in range(H):
            kh, vh = k[:, hh // grp], v[:, hh // grp]
            s = (q[:, hh] @ kh.T) / np.sqrt(dt.type(d)) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            att[:, hh] = s @ vh
        x = x + att.reshape(T, H * d) @ L["wo"].T
        h = rmsnorm(x, L["ffn_norm"], m.eps)
        g = h @ L["w_gate"].T
        u = h @ L["w_up"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ L["w_down"].T
    x = rmsnorm(x, m.norm, m.eps)
    return x @ m.lm_head.T


def greedy(m, prompt, steps):
    """Prefill then `steps` greedy tokens. Returns (tokens, logits [steps+1, n_vocab]): row 0 is
    the last prompt token's logits, row i the logits after feeding greedy token i."""
    seq = list(prompt)
    rows, out = [], []
    for s in range(steps + 1):
        lg = forward(m, seq)[-1]
        rows.append(lg)
        if s < steps:
            t = int(np.argmax(lg))
            out.append(t)
            seq.append(t)
    return out, np.stack(rows)


def hf_permute_qk_to_half(m):
    """Copy of an interleaved-layout model with Q/K rows reordered to rotate-half layout (the
    inverse of llama.cpp's convert_hf_to_gguf permute)."""
    r = Model()
    r.__dict__.update(m.__dict__)
    d = m.head_dim

    def unperm(w, n_head):
        # interleaved row order per head: (i, pair j) -> 2*i + j; half layout: j*d/2 + i
        return w.reshape(n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    r.layers = [dict(l, wq=unperm(l["wq"], m.n_heads), wk=unperm(l["wk"], m.n_kv_heads))
                for l in m.layers]
    r.rope_layout = ROPE_HALF
    return r


def pieces_to_text(vocab, ids):
    """SentencePiece-style decode of vocab pieces: '▁' -> ' ', <0xNN> -> byte."""
    b = bytearray()
    for i in ids:
        p = vocab[i]
        if p.startswith("<0x") and p.endswith(">") and len(p) == 6:
            b.append(int(p[3:5], 16))
        elif p in ("<s>", "</s>", "<unk>"):
            continue
        else:
            b += p.replace("\u2581", " ").encode("utf-8")
    return b.decode("utf-8", errors="replace")


def main():
    models = os.environ.get("COOPT_MODELS", "../shared/models")
    g = load(os.path.join(models, "stories260K.gguf"))
    prompt = [1, 403, 407, 261, 378]  # <s> ▁Once ▁upon ▁a ▁time (512-piece vocab)
    toks, lg = greedy(g, prompt, 40)
    print("story:", pieces_to_text(g.vocab, prompt + toks).strip())
    b = load(os.path.join(models, "stories260K.bin"))
    seq = prompt + toks
    # ~1e-11, not 0: the GGUF stores rms eps as f32 (9.99999975e-6), the .bin implies 1e-5
    print("llama2.c bin vs gguf max |dlogit|:", np.abs(forward(b, seq) - forward(g, seq)).max())
    h = hf_permute_qk_to_half(g)
    print("rotate-half (unpermuted) vs interleaved max |dlogit|:",
          np.abs(forward(h, seq) - forward(g, seq)).max())


if __name__ == "__main__":
    main()
