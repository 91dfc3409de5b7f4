#!/usr/bin/env python3
"""Independent reference forward pass for the native engine's checks (numpy, float64).

usage: native-reference.py MODEL_DIR TOKENS [TOKENS ...]
  TOKENS: comma-separated token ids of one prompt.
Prints a JSON list: for each prompt, the logits after its last token.

Reads config.json and safetensors weights (single file or sharded index; F32, F16, BF16)
directly, and implements the Hugging Face Llama / Mistral / Qwen2 decoder: RMSNorm, RoPE
(rotate-half, with Llama-3 rope_scaling), grouped-query attention with a causal mask, SwiGLU,
tied or untied embeddings, Qwen2 q/k/v biases.
"""
import json
import math
import os
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[base + b : base + e]
        if t["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif t["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif t["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"unsupported dtype {t['dtype']}")
        out[name] = a.reshape(t["shape"]).astype(np.float64)
    return out


def load_weights(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for f in files:
        w.update(load_safetensors(os.path.join(d, f)))
    return w


def inv_freq(cfg, head_dim):
    theta = cfg.get("rope_theta", 10000.0)
    freqs = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old / low, old / high
        scaled = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                scaled.append(f)
            elif wl > low_wl:
                scaled.append(f / factor)
            else:
                s = (old / wl - low) / (high - low)
                scaled.append((1 - s) * f / factor + s * f)
        freqs = scaled
    return np.array(freqs)


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, freqs):
    # x: [T, heads, d]; rotate-half layout.
    ang = pos[:, None] * freqs[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(cfg, w, tokens):
    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or h // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    freqs = inv_freq(cfg, hd)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        xn = rms(x, w[p + "input_layernorm.weight"], eps)
        q = xn @ w[p + "self_attn.q_proj.weight"].T
        k = xn @ w[p + "self_attn.k_proj.weight"].T
        v = xn @ w[p + "self_attn.v_proj.weight"].T
        if qwen2 or (p + "self_attn.q_proj.bias") in w:
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q = rope(q.reshape(T, nh, hd), pos, freqs)
        k = rope(k.reshape(T, nkv, hd), pos, freqs)
        v = v.reshape(T, nkv, hd)
        rep = nh // nkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        xn = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = xn @ w[p + "mlp.gate_proj.weight"].T
        u = xn @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight")
    if head is None or cfg.get("tie_word_embeddings", False):
        head = w["model.embed_tokens.weight"]
    return x[-1] @ head.T


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = load_weights(d)
    out = [forward(cfg, w, [int(t) for t in arg.split(",")]).tolist() for arg in sys.argv[2:]]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
