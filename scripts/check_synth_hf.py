#!/usr/bin/env python3
"""check_synth_hf.py -- checks that a `coopt synth` directory is what Hugging Face tools expect.

Reads the directory with the `safetensors` package (numpy) and, when installed, `transformers`
(AutoConfig / LlamaConfig / GPTQConfig and the LlamaTokenizer; no PyTorch needed). Without
transformers the config keys are checked by hand against LlamaConfig's conventions.

Checks:
  - config.json: LlamaForCausalLM fields, head_dim, GQA divisibility, torch_dtype, and for GPTQ a
    quantization_config in the transformers/AutoGPTQ layout (quant_method gptq, bits 4,
    group_size, desc_act, sym, checkpoint_format gptq); quantize_config.json agrees
  - model.safetensors or shards + model.safetensors.index.json (every tensor where the index says,
    total_size = sum of tensor bytes, "format": "pt" metadata)
  - every tensor name / shape / dtype of LlamaForCausalLM (GPTQ: qweight int32 [in/8, out],
    qzeros int32 [groups, out/8], scales f16 [groups, out], g_idx int32 [in])
  - GPTQ values: zeros all 8 (stored 7, v1), g_idx a permutation-consistent group map with
    group_size members per group, dequantized weight std close to the target
  - --forward: a numpy reference forward pass (HF rotate-half RoPE, GQA, causal attention) over a
    few tokens, printing the residual-stream RMS after every layer and the logits' statistics;
    fails if anything is non-finite, explodes (> 1e3) or vanishes (< 1e-3)

usage: scripts/check_synth_hf.py DIR [--forward [--tokens N | --ids 1,9038,...]] [--quiet]
Exit status 0 iff every check passed.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
from safetensors import safe_open

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "BF16": np.uint16, "I64": np.int64}
ERRORS = []


def fail(msg):
    ERRORS.append(msg)
    print("FAIL", msg)


def check(cond, msg):
    if not cond:
        fail(msg)
    return cond


# ---- files ----

class Weights:
    """Tensor access over model.safetensors or shards. BF16 (which numpy lacks) is read raw."""

    def __init__(self, d):
        self.d = d
        idx = os.path.join(d, "model.safetensors.index.json")
        self.index = None
        if os.path.exists(idx):
            self.index = json.load(open(idx))
            self.where = dict(self.index["weight_map"])
        else:
            self.where = None
        files = sorted(set(self.where.values())) if self.where else ["model.safetensors"]
        self.headers = {}
        self.files = {}
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                hdr = json.loads(fh.read(n))
            self.headers[f] = (8 + n, hdr)
            self.files[f] = safe_open(path, framework="numpy")
        if self.where is None:
            self.where = {k: files[0] for k in self.headers[files[0]][1] if k != "__metadata__"}

    def info(self, name):
        f = self.where[name]
        base, hdr = self.headers[f]
        e = hdr[name]
        return e["dtype"], tuple(e["shape"]), f, base + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0]

    def get(self, name):
        dt, shape, f, off, n = self.info(name)
        if dt == "BF16":
            raw = np.fromfile(os.path.join(self.d, f), dtype=np.uint16, count=n // 2, offset=off)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return self.files[f].get_tensor(name)


def check_config(d, verbose):
    cfg = json.load(open(os.path.join(d, "config.json")))
    req = {"architectures": list, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
           "num_attention_heads": int, "num_key_value_heads": int, "vocab_size": int,
           "max_position_embeddings": int, "rms_norm_eps": float, "rope_theta": float, "hidden_act": str,
           "model_type": str, "torch_dtype": str, "tie_word_embeddings": bool, "bos_token_id": int,
           "eos_token_id": int}
    for k, t in req.items():
        check(k in cfg and isinstance(cfg[k], t), f"config.json: '{k}' missing or not {t.__name__}")
    check(cfg.get("architectures") == ["LlamaForCausalLM"], "config.json: architectures != [LlamaForCausalLM]")
    check(cfg.get("model_type") == "llama", "config.json: model_type != llama")
    check(cfg.get("hidden_act") == "silu", "config.json: hidden_act != silu")
    check("rope_scaling" in cfg and cfg["rope_scaling"] is None, "config.json: rope_scaling should be null")
    check(cfg.get("torch_dtype") in ("float16", "bfloat16"), "config.json: torch_dtype")
    check(cfg["hidden_size"] % cfg["num_attention_heads"] == 0, "hidden_size % num_attention_heads")
    check(cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0, "heads % kv heads")
    q = cfg.get("quantization_config")
    if q is not None:
        for k, v in {"quant_method": "gptq", "bits": 4, "sym": True, "checkpoint_format": "gptq"}.items():
            check(q.get(k) == v, f"quantization_config.{k} = {q.get(k)!r}, expected {v!r}")
        check(isinstance(q.get("group_size"), int) and (q["group_size"] == -1 or q["group_size"] > 0),
              "quantization_config.group_size")
        check(isinstance(q.get("desc_act"), bool), "quantization_config.desc_act")
        check(cfg["torch_dtype"] == "float16", "GPTQ checkpoints are float16")
        qc_path = os.path.join(d, "quantize_config.json")
        if os.path.exists(qc_path):
            qc = json.load(open(qc_path))
            for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "quant_method"):
                check(qc.get(k) == q.get(k), f"quantize_config.json {k} disagrees with config.json")
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    check(gen.get("bos_token_id") == cfg["bos_token_id"] and gen.get("eos_token_id") == cfg["eos_token_id"],
          "generation_config.json bos/eos disagree with config.json")
    check(os.path.exists(os.path.join(d, "tokenizer.model")), "tokenizer.model missing")

    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        c = transformers.AutoConfig.from_pretrained(d)
        check(type(c).__name__ == "LlamaConfig", f"AutoConfig gave {type(c).__name__}")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings"):
            check(getattr(c, k) == cfg[k], f"transformers LlamaConfig.{k} = {getattr(c, k)} != {cfg[k]}")
        if q is not None:
            from transformers.utils.quantization_config import GPTQConfig
            g = GPTQConfig.from_dict(dict(q))
            check(g.bits == 4 and g.group_size == q["group_size"] and g.desc_act == q["desc_act"] and g.sym,
                  "transformers GPTQConfig disagrees")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(d)
            ids = tok("Hello world")["input_ids"]
            check(ids[0] == cfg["bos_token_id"] or cfg["vocab_size"] != 32000,
                  f"tokenizer BOS {ids[0]} != config bos_token_id")
            if verbose:
                print(f"transformers {transformers.__version__}: {type(c).__name__}, {type(tok).__name__} "
                      f"({len(tok)} tokens), 'Hello world' -> {ids}")
        except Exception as e:  # noqa: BLE001 -- tokenizer backends vary between versions
            fail(f"transformers AutoTokenizer: {e}")
    elif verbose:
        print("transformers not installed: config keys checked by hand")
    return cfg


def expected_tensors(cfg):
    """name -> (dtype, shape) of LlamaForCausalLM (GPTQ: AutoGPTQ QuantLinear buffers)."""
    dim, ffn, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = dim // cfg["num_attention_heads"]
    qd, kvd = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    q = cfg.get("quantization_config")
    fdt = "BF16" if cfg["torch_dtype"] == "bfloat16" else "F16"
    exp = {"model.embed_tokens.weight": (fdt, (cfg["vocab_size"], dim)), "model.norm.weight": (fdt, (dim,)),
           "lm_head.weight": (fdt, (cfg["vocab_size"], dim))}
    for l in range(L):
        p = f"model.layers.{l}."
        exp[p + "input_layernorm.weight"] = (fdt, (dim,))
        exp[p + "post_attention_layernorm.weight"] = (fdt, (dim,))
        for name, (o, i) in {"self_attn.q_proj": (qd, dim), "self_attn.k_proj": (kvd, dim),
                             "self_attn.v_proj": (kvd, dim), "self_attn.o_proj": (dim, qd),
                             "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim),
                             "mlp.down_proj": (dim, ffn)}.items():
            if q is None:
                exp[p + name + ".weight"] = (fdt, (o, i))
            else:
                gs = q["group_size"] if q["group_size"] > 0 else i
                g = (i + gs - 1) // gs
                exp[p + name + ".qweight"] = ("I32", (i // 8, o))
                exp[p + name + ".qzeros"] = ("I32", (g, o // 8))
                exp[p + name + ".scales"] = ("F16", (g, o))
                exp[p + name + ".g_idx"] = ("I32", (i,))
    return exp


def check_tensors(d, cfg, W, verbose):
    exp = expected_tensors(cfg)
    got = set(W.where)
    check(got == set(exp), f"tensor names: missing {sorted(set(exp) - got)[:5]}, extra {sorted(got - set(exp))[:5]}")
    total = 0
    for name in sorted(got & set(exp)):
        dt, shape, f, off, n = W.info(name)
        total += n
        check((dt, shape) == exp[name], f"{name}: {dt} {list(shape)}, expected {exp[name][0]} {list(exp[name][1])}")
    for f, (base, hdr) in W.headers.items():
        check(hdr.get("__metadata__", {}).get("format") == "pt", f"{f}: __metadata__.format != 'pt'")
    if W.index is not None:
        check(W.index["metadata"]["total_size"] == total, "index total_size != sum of tensor bytes")
        for name, f in W.index["weight_map"].items():
            check(name in W.headers[f][1], f"index says {name} is in {f}, it is not")
        if verbose:
            print(f"{len(W.headers)} shards, total_size {total / 1e9:.2f} GB")
    elif verbose:
        print(f"single model.safetensors, {total / 1e9:.2f} GB")
    return total


# ---- GPTQ ----

def unpack_rows(q):  # int32 [in/8, out] -> uint8 [in, out], row 8r+j = nibble j
    u = q.view(np.uint32)
    return np.stack([(u >> (4 * j)) & 15 for j in range(8)], axis=1).reshape(-1, q.shape[1]).astype(np.uint8)


def unpack_cols(q):  # int32 [g, out/8] -> uint8 [g, out], column 8c+j = nibble j
    u = q.view(np.uint32)
    return np.stack([(u >> (4 * j)) & 15 for j in range(8)], axis=2).reshape(q.shape[0], -1).astype(np.uint8)


def dequant(W, prefix, cfg):
    """W [out, in] float32 as AutoGPTQ computes it (v1: zero = stored + 1)."""
    q = unpack_rows(W.get(prefix + ".qweight")).astype(np.float32)
    z = unpack_cols(W.get(prefix + ".qzeros")).astype(np.float32) + 1
    s = W.get(prefix + ".scales").astype(np.float32)
    g = W.get(prefix + ".g_idx")
    return (s[g] * (q - z[g])).T


def check_gptq_layer(W, cfg, l, verbose):
    q = cfg["quantization_config"]
    L = cfg["num_hidden_layers"]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        p = f"model.layers.{l}.{name}"
        z = unpack_cols(W.get(p + ".qzeros"))
        check(np.all(z == 7), f"{p}.qzeros: not all 7 (sym zero 8, v1)")
        g = W.get(p + ".g_idx")
        n_in = g.shape[0]
        gs = q["group_size"] if q["group_size"] > 0 else n_in
        counts = np.bincount(g, minlength=(n_in + gs - 1) // gs)
        check(g.min() >= 0 and counts.shape[0] == (n_in + gs - 1) // gs, f"{p}.g_idx out of range")
        check(np.all(counts[:-1] == gs), f"{p}.g_idx: groups do not have group_size members")
        if not q["desc_act"]:
            check(np.array_equal(g, np.arange(n_in) // gs), f"{p}.g_idx != i // group_size without desc_act")
        w = dequant(W, p, cfg)
        target = 1 / math.sqrt(n_in) * (1 / math.sqrt(2 * L) if name in ("self_attn.o_proj", "mlp.down_proj") else 1)
        std = float(w.std())
        check(abs(std / target - 1) < 0.05, f"{p}: dequantized std {std:.3g}, target {target:.3g}")
        check(abs(float(w.mean())) < 0.01 * target, f"{p}: dequantized mean {float(w.mean()):.3g} not ~0")
        if verbose and l == 0:
            print(f"{p}: std {std:.4g} (target {target:.4g})")


# ---- reference forward ----

def linear(W, cfg, prefix):
    if cfg.get("quantization_config") is not None:
        return dequant(W, prefix, cfg)
    return W.get(prefix + ".weight").astype(np.float32)


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(W, cfg, tokens, verbose):
    dim, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, T = dim // H, cfg["rms_norm_eps"], len(tokens)
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(T), inv)
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)

    def rope(x):  # [T, heads, hd], rotate-half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    x = W.get("model.embed_tokens.weight")[tokens].astype(np.float32)
    rms = [float(np.sqrt((x * x).mean()))]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rmsnorm(x, W.get(p + "input_layernorm.weight").astype(np.float32), eps)
        q = rope((h @ linear(W, cfg, p + "self_attn.q_proj").T).reshape(T, H, hd))
        k = rope((h @ linear(W, cfg, p + "self_attn.k_proj").T).reshape(T, KV, hd))
        v = (h @ linear(W, cfg, p + "self_attn.v_proj").T).reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, H * hd)
        x = x + o @ linear(W, cfg, p + "self_attn.o_proj").T
        h = rmsnorm(x, W.get(p + "post_attention_layernorm.weight").astype(np.float32), eps)
        g = h @ linear(W, cfg, p + "mlp.gate_proj").T
        u = h @ linear(W, cfg, p + "mlp.up_proj").T
        x = x + (g / (1 + np.exp(-g)) * u) @ linear(W, cfg, p + "mlp.down_proj").T
        rms.append(float(np.sqrt((x * x).mean())))
    h = rmsnorm(x, W.get("model.norm.weight").astype(np.float32), eps)
    logits = h @ W.get("lm_head.weight").astype(np.float32).T
    return rms, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--forward", action="store_true", help="numpy reference forward pass")
    ap.add_argument("--tokens", type=int, default=8, help="tokens for --forward (default 8)")
    ap.add_argument("--ids", help="comma-separated token ids for --forward (instead of random ones)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    verbose = not a.quiet

    cfg = check_config(a.dir, verbose)
    W = Weights(a.dir)
    check_tensors(a.dir, cfg, W, verbose)
    if not ERRORS and cfg.get("quantization_config") is not None:
        for l in sorted({0, cfg["num_hidden_layers"] - 1}):
            check_gptq_layer(W, cfg, l, verbose)
    if not ERRORS and a.forward:
        rng = np.random.default_rng(0)
        tokens = [cfg["bos_token_id"] if cfg["bos_token_id"] < cfg["vocab_size"] else 1] + \
            list(rng.integers(3, 32000, a.tokens - 1))
        if a.ids:
            tokens = [int(t) for t in a.ids.split(",")]
        rms, logits = forward(W, cfg, tokens, verbose)
        if verbose:
            print("residual RMS after embedding, then each layer:", " ".join(f"{r:.3g}" for r in rms))
            print(f"logits: std {logits.std():.3g}, max |.| {np.abs(logits).max():.3g}, "
                  f"argmax {logits.argmax(-1).tolist()}")
            top = np.argsort(-logits[-1])[:5]
            print("last token top-5:", ", ".join(f"{int(i)}:{logits[-1][i]:.4f}" for i in top))
        check(np.all(np.isfinite(logits)) and all(math.isfinite(r) for r in rms), "non-finite activations")
        check(1e-3 < min(rms) and max(rms) < 1e3, f"residual RMS out of [1e-3, 1e3]: {min(rms):.3g}..{max(rms):.3g}")
        check(0.1 < logits.std() < 100, f"logits std {logits.std():.3g} out of (0.1, 100)")
    print(f"{a.dir}: {'OK' if not ERRORS else f'{len(ERRORS)} problem(s)'}")
    return 0 if not ERRORS else 1


if __name__ == "__main__":
    sys.exit(main())
