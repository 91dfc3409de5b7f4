#!/usr/bin/env python3
"""The checks of scripts/check-llamacpp: our frontend + two out=openai sidecars over llama.cpp.

1. The official `openai` SDK streams chat answers through our stack.
2. Greedy answers through our stack equal llama.cpp's own greedy answer for the same prompt
   token ids (asked directly, cut at our stop tokens, decoded with the model's tokenizer).
3. Both llama.cpp servers served requests.
4. The TTFT our stack adds: alternating fresh prompts to llama.cpp directly and through our
   frontend (first streamed chunk, p50 and p90).
"""

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request

try:
    import httpx
except ImportError:  # openai 3 depends on httpx2, its successor with the same API
    import httpx2 as httpx
import openai
from tokenizers import Tokenizer


def llama_greedy(base, ids, n):
    body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "return_tokens": True, "stream": False,
            "cache_prompt": True, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
            "repeat_penalty": 1.0, "samplers": ["penalties", "top_k", "top_p", "temperature"]}
    req = urllib.request.Request(f"{base}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["tokens"]


def metric(base, name):
    text = urllib.request.urlopen(f"{base}/metrics").read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))


def first_chunk_ms(client, url, body):
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                return (time.perf_counter() - t0) * 1e3
    raise SystemExit(f"{url}: no streamed chunk")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frontend", required=True)
    p.add_argument("--llama", action="append", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model", default="small")
    p.add_argument("--ttft-pairs", type=int, default=30)
    a = p.parse_args()
    tok = Tokenizer.from_file(f"{a.model_dir}/tokenizer.json")
    cfg = json.load(open(f"{a.model_dir}/config.json"))
    tok_cfg = json.load(open(f"{a.model_dir}/tokenizer_config.json"))
    stops = {cfg["eos_token_id"], tok.token_to_id(tok_cfg["eos_token"])}
    client = openai.OpenAI(base_url=f"{a.frontend}/v1", api_key="none")
    deadline = time.time() + 120
    while True:
        try:
            if any(m.id == a.model for m in client.models.list().data):
                break
        except openai.APIConnectionError:
            pass
        if time.time() > deadline:
            raise SystemExit("the frontend never listed the model")
        time.sleep(0.5)
    print(f"frontend {a.frontend} lists {a.model!r}; llama.cpp servers: {', '.join(a.llama)}")

    # 1. Streaming chat through the SDK.
    for i, q in enumerate(["Hello! Who are you?", "Write a haiku about the sea.",
                           "List three prime numbers.", "What is 2+2?"]):
        stream = client.chat.completions.create(model=a.model, messages=[{"role": "user", "content": q}],
                                                max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks, finish, usage = 0, None, None
        for c in stream:
            if c.choices:
                chunks += 1
                finish = c.choices[0].finish_reason or finish
            if c.usage:
                usage = c.usage
        assert usage and 1 <= usage.completion_tokens <= 24, usage
        assert finish in ("stop", "length"), finish
        assert chunks >= 1
        print(f"ok chat stream {i + 1}: {chunks} chunks, {usage.completion_tokens} tokens, finish {finish}")

    # 2. Greedy equality with llama.cpp's own answer.
    rng = random.Random(7)
    vocab = cfg["vocab_size"]
    # The generated model's random weights tend to repeat one token, so many prompts of
    # several lengths: each is at least one independent greedy decision over the vocabulary.
    firsts = set()
    for n_prompt in (8, 64, 300, 1000) + tuple(rng.randrange(16, 512) for _ in range(12)):
        ids = [rng.randrange(100, vocab) for _ in range(n_prompt)]
        direct = llama_greedy(a.llama[0], ids, 32)
        cut = next((i + 1 for i, t in enumerate(direct) if t in stops), len(direct))
        want = tok.decode(direct[:cut], skip_special_tokens=True)
        got = "".join(c.choices[0].text for c in client.completions.create(
            model=a.model, prompt=ids, max_tokens=32, temperature=0, stream=True) if c.choices)
        assert got == want, f"prompt of {n_prompt}: ours {got!r} != llama.cpp's {want!r} (ids {direct[:cut]})"
        firsts.add(direct[0])
        print(f"ok greedy, {n_prompt}-token prompt: the same {cut} tokens as llama.cpp directly "
              f"({len(set(direct[:cut]))} distinct, first {direct[:4]})")
    print(f"ok greedy: 16 prompts, {len(firsts)} different first tokens, every answer equal")

    # 3. TTFT: llama.cpp directly vs through our frontend and sidecar (fresh prompts, alternating).
    http = httpx.Client(timeout=60)
    direct_ms, ours_ms = [], []
    for i in range(a.ttft_pairs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            ids = [rng.randrange(100, vocab) for _ in range(128)]
            if which == 0:
                direct_ms.append(first_chunk_ms(http, f"{a.llama[i % len(a.llama)]}/completion", {
                    "prompt": ids, "n_predict": 1, "stream": True, "return_tokens": True,
                    "temperature": 0.0, "cache_prompt": True}))
            else:
                ours_ms.append(first_chunk_ms(http, f"{a.frontend}/v1/completions", {
                    "model": a.model, "prompt": ids, "max_tokens": 1, "stream": True, "temperature": 0}))
    d50, o50 = statistics.median(direct_ms), statistics.median(ours_ms)
    print(f"ttft, 128-token prompts, {a.ttft_pairs} each: llama.cpp directly p50 {d50:.2f} ms "
          f"p90 {pct(direct_ms, 0.9):.2f} ms; through our frontend and sidecar p50 {o50:.2f} ms "
          f"p90 {pct(ours_ms, 0.9):.2f} ms; added p50 {o50 - d50:+.2f} ms")

    # 4. Both servers served.
    served = [metric(b, "llamacpp:tokens_predicted_total") for b in a.llama]
    assert all(s > 0 for s in served), served
    print(f"ok both llama.cpp servers served (tokens predicted: {', '.join(str(int(s)) for s in served)})")
    print("all checks passed")


if __name__ == "__main__":
    sys.exit(main())
