#!/usr/bin/env python3
"""Converts a Llama-family model folder of ours (`dynamo-run make-model`) to GGUF for llama.cpp.

usage: model-to-gguf.py MODEL_DIR OUT.gguf [f32|bf16|f16]

Needs the `gguf` package (llama.cpp's gguf-py) and numpy; no torch (llama.cpp's own converter
imports it). Weight matrices are written in the type asked for (default f32; bf16 and f16 are
rounded to nearest, ties to even, as the native engine rounds them), norms in F32 as llama.cpp's
converter writes them. As llama.cpp's converter does, the q and k projection
rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one.
The tokenizer (byte-level BPE) goes in as `gpt2` with its merges; special tokens are control
tokens; `<|im_end|>` is the end-of-turn token.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import gguf

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("native_reference", os.path.join(here, "native-reference.py"))
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


def permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    outtype = sys.argv[3] if len(sys.argv) == 4 else "f32"
    qtypes = {"f32": None, "bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16}
    if outtype not in qtypes:
        raise SystemExit(f"type {outtype!r}: use f32, bf16 or f16")
    cfg = json.load(open(os.path.join(src, "config.json")))
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{src}: model_type {cfg.get('model_type')!r}; only llama is converted")
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    tok_cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    if tok["model"]["type"] != "BPE":
        raise SystemExit("only byte-level BPE tokenizers are converted")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim", hidden // heads)

    w = gguf.GGUFWriter(out, "llama")
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "f16": gguf.LlamaFileType.MOSTLY_F16}[outtype])

    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    n = cfg["vocab_size"]
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    eos = ids.get(tok_cfg.get("eos_token")) if isinstance(tok_cfg.get("eos_token"), str) else None
    w.add_eos_token_id(eos if eos is not None else cfg["eos_token_id"])
    if "<|im_end|>" in ids:
        w.add_eot_token_id(ids["<|im_end|>"])
    w.add_add_bos_token(False)

    weights = reference.load_weights(src)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name in sorted(weights):
        a = weights[name].astype(np.float32)
        if name in names:
            target = names[name]
        elif name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            if rest not in per_layer:
                raise SystemExit(f"unexpected tensor {name}")
            target = f"blk.{layer}.{per_layer[rest]}"
            if rest == "self_attn.q_proj.weight":
                a = permute(a, heads)
            elif rest == "self_attn.k_proj.weight":
                a = permute(a, kv_heads)
        else:
            raise SystemExit(f"unexpected tensor {name}")
        a = np.ascontiguousarray(a)
        if qtypes[outtype] is not None and a.ndim == 2:
            w.add_tensor(target, gguf.quants.quantize(a, qtypes[outtype]), raw_dtype=qtypes[outtype])
        else:
            w.add_tensor(target, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({len(weights)} tensors, {outtype}, vocabulary {n})", file=sys.stderr)


if __name__ == "__main__":
    main()
