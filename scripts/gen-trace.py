"""Writes a synthetic Mooncake-format trace (JSONL) with realistic prefix reuse.

Each line: {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}.
Requests draw a shared "system prompt" of several blocks from a Zipf-popular set (so a few
prefixes are very common), sometimes continue a previous conversation (its blocks plus new
ones), and end with unique blocks. Arrivals are Poisson.

Usage: python3 scripts/gen-trace.py --requests 1000 --rate 10 --block-size 512 > trace.jsonl
"""
import argparse
import json
import random

p = argparse.ArgumentParser()
p.add_argument("--requests", type=int, default=1000)
p.add_argument("--rate", type=float, default=10.0, help="requests per second")
p.add_argument("--block-size", type=int, default=512)
p.add_argument("--prefixes", type=int, default=50, help="distinct shared prefixes")
p.add_argument("--prefix-blocks", type=int, default=4)
p.add_argument("--unique-blocks", type=int, default=3, help="mean unique blocks per request")
p.add_argument("--followup", type=float, default=0.3, help="share of requests that continue a conversation")
p.add_argument("--output-mean", type=int, default=200)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

rng = random.Random(a.seed)
next_id = 0


def fresh(n):
    global next_id
    ids = list(range(next_id, next_id + n))
    next_id += n
    return ids


prefixes = [fresh(a.prefix_blocks) for _ in range(a.prefixes)]
weights = [1.0 / (i + 1) for i in range(a.prefixes)]
history = []
t = 0.0
for _ in range(a.requests):
    t += rng.expovariate(a.rate) * 1000.0
    if history and rng.random() < a.followup:
        base = rng.choice(history)
    else:
        base = rng.choices(prefixes, weights)[0]
    ids = base + fresh(max(1, int(rng.expovariate(1.0 / a.unique_blocks))))
    history.append(ids)
    if len(history) > 200:
        history.pop(0)
    tail = rng.randint(1, a.block_size)
    print(json.dumps({
        "timestamp": int(t),
        "input_length": (len(ids) - 1) * a.block_size + tail,
        "output_length": max(1, int(rng.expovariate(1.0 / a.output_mean))),
        "hash_ids": ids,
    }))
