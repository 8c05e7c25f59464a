#!/usr/bin/env python3
"""make_gptq_fixture.py -- independent GPTQ packer for coopt's test fixtures (numpy only).

Written from the GPTQ checkpoint format as AutoGPTQ / GPTQModel / transformers define it:
  qweight int32 [in/8, out]   qweight[r, o] = sum_n q[8r+n, o] << 4n   (q: 4-bit, [in, out])
  qzeros  int32 [G, out/8]    qzeros[g, c]  = sum_n zs[g, 8c+n] << 4n  (zs = zero - 1 for the
                              v1 "gptq" format, the real zero for "gptq_v2")
  scales  f16   [G, out]
  g_idx   int32 [in]          group of each input column (act-order: position in the
                              activation order // group_size)
  W[o, i] = scales[g, o] * (q[i, o] - zero[g, o]),  g = g_idx[i]
Quantization is round-to-nearest per group, following AutoGPTQ's quantizer conventions:
range [min(w, 0), max(w, 0)], sym: symmetric range and zero 8, asym: zero = round(-min/scale);
q = clamp(round(w/scale) + zero, 0, 15). The scale is stored as f16 and the reference matrix
is dequantized from what is STORED (f16 scale, zero from qzeros), exactly as a loader must.
Act-order uses a fake Hessian diagonal (squared column norms): columns are quantized in
descending order, groups are consecutive in that order, g_idx maps each column to its group.

Output: tests/golden/gptq_<name>.bin, little endian:
  char magic[4] = "CGQF"; int32 version = 1, n_in, n_out, group_size, sym, act, v1, n_groups
  int32 qweight[in/8*out]; int32 qzeros[G*out/8]; uint16 scales[G*out]; int32 g_idx[in];
  float32 ref[out*in]  (dequantized W, row-major [out][in])

Usage: python3 scripts/make_gptq_fixture.py [model.safetensors]  (default: story-lmrs)
"""
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file

MAXQ = 15


def quantize_group(wg, sym):
    """wg [out, n] float32 -> (scale f32 [out], zero int [out])"""
    xmin = np.minimum(wg.min(axis=1), 0.0)
    xmax = np.maximum(wg.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, -1.0, xmin)
    xmax = np.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / MAXQ
    if sym:
        zero = np.full(scale.shape, (MAXQ + 1) // 2, dtype=np.int64)
    else:
        zero = np.round(-xmin / scale).astype(np.int64)
    return scale.astype(np.float32), zero


def gptq_pack(w, group_size, sym, act, v1):
    """w [out, in] float32 -> dict of checkpoint tensors + reference"""
    n_out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    if act:
        hdiag = (w.astype(np.float64) ** 2).sum(axis=0)   # fake Hessian diagonal
        order = np.argsort(-hdiag, kind="stable")          # columns in activation order
    else:
        order = np.arange(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)
    g_idx[order] = np.arange(n_in) // gs
    scale = np.zeros((n_groups, n_out), dtype=np.float32)
    zero = np.zeros((n_groups, n_out), dtype=np.int64)
    q = np.zeros((n_in, n_out), dtype=np.int64)            # [in, out], like qweight unpacked
    for g in range(n_groups):
        cols = order[g * gs:(g + 1) * gs]
        s, z = quantize_group(w[:, cols], sym)
        scale[g], zero[g] = s, z
        q[cols, :] = np.clip(np.round(w[:, cols] / s[:, None]) + z[:, None], 0, MAXQ).T
    stored_zero = zero - 1 if v1 else zero
    if v1:
        # AutoGPTQ stores zero-1 in 4 bits; a zero of 0 would wrap to 15 and read back as 16.
        assert (stored_zero >= 0).all(), "v1 fixture with a zero point of 0"
    # pack 8 input rows per int32 (low nibble first), 8 output zeros per int32
    qweight = np.zeros((n_in // 8, n_out), dtype=np.uint32)
    for n in range(8):
        qweight |= q[n::8, :].astype(np.uint32) << np.uint32(4 * n)
    qzeros = np.zeros((n_groups, n_out // 8), dtype=np.uint32)
    for n in range(8):
        qzeros |= stored_zero[:, n::8].astype(np.uint32) << np.uint32(4 * n)
    scales16 = scale.astype(np.float16)
    # reference from the stored tensors: unpack again, independent of the packing loops above
    qw_bytes = qweight.view(np.uint32)
    q_back = np.stack([(qw_bytes >> np.uint32(4 * n)) & 15 for n in range(8)], axis=1).reshape(n_in, n_out)
    z_back = np.stack([(qzeros >> np.uint32(4 * n)) & 15 for n in range(8)], axis=2).reshape(n_groups, n_out)
    z_back = z_back.astype(np.int64) + (1 if v1 else 0)
    assert (q_back == q).all() and (z_back == zero).all()
    s32 = scales16.astype(np.float32)
    ref = (s32[g_idx, :] * (q_back.astype(np.float32) - z_back[g_idx, :].astype(np.float32))).T
    return dict(qweight=qweight.view(np.int32), qzeros=qzeros.view(np.int32), scales=scales16,
                g_idx=g_idx, ref=np.ascontiguousarray(ref, dtype=np.float32), n_groups=n_groups)


def write(path, w, group_size, sym, act, v1):
    t = gptq_pack(w, group_size, sym, act, v1)
    n_out, n_in = w.shape
    with open(path, "wb") as f:
        f.write(b"CGQF")
        f.write(struct.pack("<8i", 1, n_in, n_out, group_size, int(sym), int(act), int(v1), t["n_groups"]))
        for k in ("qweight", "qzeros", "scales", "g_idx", "ref"):
            f.write(np.ascontiguousarray(t[k]).astype(t[k].dtype.newbyteorder("<")).tobytes())
    err = np.abs(t["ref"] - w).max()
    print(f"{path}: [{n_out},{n_in}] gs {group_size} sym {sym} act {act} v1 {v1}: "
          f"max |W - deq| {err:.4f}, {os.path.getsize(path)} bytes")


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    models = os.environ.get("COOPT_MODELS", os.path.join(root, "..", "shared", "models"))
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(models, "story-lmrs", "model.safetensors")
    t = load_file(src)
    k = t["model.layers.0.self_attn.k_proj.weight"].astype(np.float32)   # [64, 128]
    v = t["model.layers.0.self_attn.v_proj.weight"].astype(np.float32)   # [64, 128]
    d = t["model.layers.0.mlp.down_proj.weight"][:64].astype(np.float32) # [64, 384] slice
    out = os.path.join(root, "tests", "golden")
    cases = [  # name, weight, group_size, sym, act, v1
        ("k_g32_sym", k, 32, True, False, True),
        ("k_g64_asym_act", k, 64, False, True, True),
        ("k_g64_sym_act_v2", k, 64, True, True, False),
        ("v_g128_asym_v2", v, 128, False, False, False),
        ("v_gall_sym_act", v, -1, True, True, True),
        ("v_g32_asym_act", v, 32, False, True, True),
        ("down_g128_asym_act", d, 128, False, True, True),
        ("down_gall_asym_v2", d, -1, False, False, False),
    ]
    for name, w, gs, sym, act, v1 in cases:
        write(os.path.join(out, f"gptq_{name}.bin"), w, gs, sym, act, v1)


if __name__ == "__main__":
    main()
