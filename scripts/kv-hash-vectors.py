"""Independent reference for block hashes (ARCHITECTURE.md), with the Python `xxhash` package.

Reads JSON from stdin: {"block_size": N, "sequences": [[token ids], ...]} and prints, per
sequence, [[local, sequence], ...] for its full blocks, as JSON.
"""
import json
import struct
import sys

import xxhash

SEED = 1337


def hashes(tokens, block_size):
    out, parent = [], None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[i:i + block_size]
        local = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(block)}I", *block), seed=SEED)
        seq = local if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), seed=SEED)
        out.append([local, seq])
        parent = seq
    return out


req = json.load(sys.stdin)
print(json.dumps([hashes(s, req["block_size"]) for s in req["sequences"]]))
