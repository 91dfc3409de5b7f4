#!/usr/bin/env python3
"""The native engine against llama.cpp's server, side by side (driven by scripts/bench-llamacpp).

For each weight type (f32, bf16, f16) the two servers run one at a time on the same cores,
alternating which goes first each round, over the same HTTP API (`/v1/completions`, streamed,
prompts as token ids, `ignore_eos`):
- batch-1 decode: tokens/s between the first and the last of 128 streamed tokens;
- 512-token prefill: 512 / time to the first token of a fresh 512-token prompt (max_tokens 1);
- 8 concurrent: 8 requests at once (64-token prompts, 128 tokens each), output tokens/s over
  the wall time of the whole batch.
Every prompt is fresh (random ids), so neither server's prefix cache answers from memory.
Greedy agreement: for prompts of several lengths, llama.cpp's 32 greedy token ids (from its
`/completion`, `return_tokens`) decoded with the model's tokenizer against our 32-token
greedy text; llama.cpp's ids must hold more than one distinct token.

Prints a markdown table: per type and workload, each engine's best round (the VM's neighbours
only ever slow a round down) and ours / llama.cpp, with every round's figures after it.
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from tokenizers import Tokenizer

VOCAB_LO = 10  # ids below are special (bos, eos, chat markers)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stream(port, body):
    """Posts a streamed completion; returns (send time, [arrival time of each content chunk])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status} from :{port}: {resp.read()[:500]!r}")
    times = []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if any(c.get("text") for c in chunk.get("choices", [])):
            times.append(time.perf_counter())
    conn.close()
    return t0, times


def body(model, prompt, max_tokens):
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}


def measure(port, model, rng, n_prefill=3):
    out = {}
    # Warm-up: the first request pays for page faults and thread start-up.
    stream(port, body(model, [rng.randrange(VOCAB_LO, 4000) for _ in range(32)], 8))
    # Batch-1 decode.
    rates = []
    for _ in range(2):
        _, times = stream(port, body(model, [rng.randrange(VOCAB_LO, 4000) for _ in range(32)], 128))
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    out["decode"] = max(rates)
    # 512-token prefill.
    ttfts = []
    for _ in range(n_prefill):
        t0, times = stream(port, body(model, [rng.randrange(VOCAB_LO, 4000) for _ in range(512)], 1))
        ttfts.append(times[0] - t0)
    out["prefill"] = 512 / min(ttfts)
    # 8 concurrent.
    prompts = [[rng.randrange(VOCAB_LO, 4000) for _ in range(64)] for _ in range(8)]
    counts = [0] * 8

    def one(i):
        _, times = stream(port, body(model, prompts[i], 128))
        counts[i] = len(times)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = sum(counts) / (time.perf_counter() - t0)
    return out


def greedy_ours(port, model, ids):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps({"model": model, "prompt": ids, "max_tokens": 32, "temperature": 0.0,
                    "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]["text"]


def greedy_llama(port, ids):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        json.dumps({"prompt": ids, "n_predict": 32, "temperature": 0.0, "return_tokens": True,
                    "ignore_eos": True, "cache_prompt": False}).encode(),
        {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))["tokens"]


def wait_ready(port, path, proc, what, listed=None):
    """Until `path` answers 200 (and, with `listed`, its model list names that model: our
    frontend answers before its worker has registered)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200 and (listed is None
                                        or any(m.get("id") == listed for m in json.load(r).get("data", []))):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready on :{port} after 300 s")


def start(engine, dtype, a, logs):
    port = free_port()
    log = open(f"{logs}/{engine}-{dtype}.log", "a")
    if engine == "llama.cpp":
        cmd = [a.server, "-m", f"{a.gguf_prefix}-{dtype}.gguf", "--host", "127.0.0.1", "--port",
               str(port), "-t", str(a.threads), "-tb", str(a.threads), "-c", "8192", "-np", "8"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_ready(port, "/health", proc, "llama-server")
    else:
        cmd = [a.ours, "in=http", "out=native", "--model-path", a.model_dir, "--model-name", "small",
               "--http-port", str(port), "--dtype", dtype, "--kv-cache-dtype", a.ours_kv]
        proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                                env={**os.environ, "DYN_LOG": "warn"})
        wait_ready(port, "/v1/models", proc, "dynamo-run", listed="small")
    return proc, port


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--gguf-prefix", required=True, help="PREFIX-{f32,bf16,f16}.gguf")
    p.add_argument("--logs", required=True)
    p.add_argument("--types", default="f32,bf16,f16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours-kv", default="f16", help="our --kv-cache-dtype (llama.cpp's default KV is f16)")
    a = p.parse_args()
    tok = Tokenizer.from_file(f"{a.model_dir}/tokenizer.json")
    rng = random.Random(20)
    greedy_prompts = [[rng.randrange(VOCAB_LO, 4000) for _ in range(n)] for n in (8, 40, 100, 200, 350, 500)]
    results = {}
    agree = {}
    for dtype in a.types.split(","):
        runs = {"ours": [], "llama.cpp": []}
        for r in range(a.rounds):
            order = ["ours", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "ours"]
            for engine in order:
                print(f"== {dtype}, round {r + 1}: {engine}", file=sys.stderr)
                proc, port = start(engine, dtype, a, a.logs)
                try:
                    runs[engine].append(measure(port, "small", random.Random(1000 * r + len(engine))))
                    print(f"   {runs[engine][-1]}", file=sys.stderr)
                    if r == 0:
                        if engine == "llama.cpp":
                            agree.setdefault(dtype, {})["llama"] = [greedy_llama(port, ids) for ids in greedy_prompts]
                        else:
                            agree.setdefault(dtype, {})["ours"] = [greedy_ours(port, "small", ids) for ids in greedy_prompts]
                finally:
                    stop(proc)
        results[dtype] = runs
    print("| weights | workload | ours | llama.cpp | ours / llama.cpp | ours, each round | llama.cpp, each round |")
    print("|---|---|---:|---:|---:|---|---|")
    names = {"decode": "batch-1 decode, tokens/s", "prefill": "512-token prefill, tokens/s",
             "concurrent": "8 concurrent, output tokens/s"}
    for dtype, runs in results.items():
        for key, label in names.items():
            ours = max(x[key] for x in runs["ours"])
            llama = max(x[key] for x in runs["llama.cpp"])
            each = lambda e: " / ".join(f"{x[key]:.0f}" for x in runs[e])
            print(f"| {dtype} | {label} | {ours:.1f} | {llama:.1f} | {ours / llama:.2f}x | {each('ours')} | {each('llama.cpp')} |")
    print()
    for dtype, g in agree.items():
        same = 0
        for ids, ours, lids in zip(greedy_prompts, g["ours"], g["llama"]):
            want = tok.decode(lids, skip_special_tokens=True)
            ok = ours == want
            same += ok
            print(f"{'ok' if ok else 'DIFFERENT'} {dtype} greedy, {len(ids)}-token prompt: "
                  f"{len(set(lids))} distinct of {len(lids)} tokens"
                  + ("" if ok else f"\n  ours:      {ours!r}\n  llama.cpp: {want!r}"))
        print(f"{dtype}: {same} of {len(greedy_prompts)} prompts give the same 32 greedy tokens")


if __name__ == "__main__":
    main()
