#!/usr/bin/env python3
"""A stand-in for a vLLM (or SGLang) server, for tests and benchmarks of `out=openai`.

It speaks the servers' dialects where our sidecar uses them:
- vLLM: POST /v1/completions with the prompt as token ids and `return_token_ids`, streamed
  as server-sent events whose choices carry `token_ids`; GET /health, /v1/models, /metrics
  (`vllm:num_requests_running|waiting`, `vllm:kv_cache_usage_perc`, `vllm:cache_config_info`,
  and SGLang's `sglang:num_running_reqs`, `num_queue_reqs`, `token_usage`).
- SGLang: POST /generate with `input_ids`, streamed chunks with cumulative `output_ids`.

It "generates" token ids by a fixed rule (greedy and repeatable: the same prompt gives the same
tokens) from the model's ordinary vocabulary, and keeps a prefix cache of `--num-blocks`
blocks (LRU) whose changes it publishes as vLLM's KV events on a ZeroMQ PUB socket:
frames [topic, sequence (8 bytes, big-endian), msgpack batch], in either encoding vLLM has
used (`--encoding array`: tagged positional arrays; `map`: maps keyed by field name) and with
either hash kind (`--hashes int`: unsigned 64-bit; `bytes`: 32 raw bytes). Its hashes are
seeded at random per start, as vLLM's are, so only the token ids can be compared across
instances.

The first line on stdout is `ready http=PORT zmq=PORT`.
"""

import argparse
import asyncio
import hashlib
import json
import os
import struct
import sys
import time
from collections import OrderedDict

import msgpack
import zmq
import zmq.asyncio
from aiohttp import web


class Cache:
    """The engine's prefix cache: block hash -> None, least recently used first."""

    def __init__(self, args, publish):
        self.args = args
        self.blocks = OrderedDict()
        self.seed = os.urandom(8)
        self.publish = publish

    def block_hash(self, parent, tokens):
        h = hashlib.sha256(self.seed + (parent if isinstance(parent, bytes) else
                                        struct.pack(">Q", parent or 0)) +
                           struct.pack(f">{len(tokens)}I", *tokens)).digest()
        if self.args.hashes == "bytes":
            return h
        return struct.unpack(">Q", h[:8])[0]

    def store(self, tokens):
        """Caches the full blocks of `tokens`; publishes what changed."""
        bs = self.args.block_size
        parent, chain = None, []
        for i in range(len(tokens) // bs):
            block = tokens[i * bs:(i + 1) * bs]
            h = self.block_hash(parent, block)
            chain.append((h, parent, block))
            parent = h
        new = [c for c in chain if c[0] not in self.blocks]
        for h, _, _ in chain:
            if h in self.blocks:
                self.blocks.move_to_end(h)
        keep = {c[0] for c in chain}
        evicted = []
        while len(self.blocks) + len(new) > self.args.num_blocks and self.blocks:
            victim = next((h for h in self.blocks if h not in keep), None)
            if victim is None:
                break
            del self.blocks[victim]
            evicted.append(victim)
        events = []
        if evicted:
            events.append(self.removed(evicted))
        if new:
            for h, _, _ in new:
                self.blocks[h] = None
            tokens_new = [t for _, _, b in new for t in b]
            events.append(self.stored([h for h, _, _ in new], new[0][1], tokens_new))
        if events:
            self.publish(events)

    def stored(self, hashes, parent, tokens):
        a = self.args
        if a.encoding == "map":
            return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                    "token_ids": tokens, "block_size": a.block_size, "lora_id": None,
                    "medium": "GPU", "lora_name": None, "extra_keys": None,
                    "kv_cache_spec_kind": "full_attention"}
        return ["BlockStored", hashes, parent, tokens, a.block_size, None, "GPU", None]

    def removed(self, hashes):
        if self.args.encoding == "map":
            return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}
        return ["BlockRemoved", hashes, "GPU"]


class Engine:
    def __init__(self, args):
        self.args = args
        self.requests = 0
        self.cancelled = 0
        self.running = 0
        self.active_blocks = 0
        self.seq = 0
        ctx = zmq.asyncio.Context()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100000)
        if args.zmq_port:
            self.pub.bind(f"tcp://127.0.0.1:{args.zmq_port}")
            self.zmq_port = args.zmq_port
        else:
            self.zmq_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.cache = Cache(args, self.publish)

    def publish(self, events):
        a = self.args
        if a.encoding == "map":
            batch = {"ts": time.time(), "events": events, "data_parallel_rank": 0}
        else:
            batch = [time.time(), events, 0]
        payload = msgpack.packb(batch, use_bin_type=True)
        self.pub.send_multipart([a.topic.encode(), struct.pack(">Q", self.seq), payload])
        self.seq += 1

    def tokens_for(self, prompt, n):
        lo, hi = self.args.vocab
        h = int.from_bytes(hashlib.sha256(struct.pack(f">{len(prompt)}I", *prompt)).digest()[:8], "big")
        return [lo + (h + 7919 * k) % (hi - lo) for k in range(n)]

    async def generate(self, prompt, max_tokens, stop_ids, min_tokens):
        """Yields (token, finish) pairs."""
        bs = self.args.block_size
        blocks = -(-len(prompt) // bs)
        self.running += 1
        self.active_blocks += blocks
        try:
            await asyncio.sleep(self.args.prefill_us * len(prompt) / 1e6)
            self.cache.store(prompt)
            out = []
            for k, t in enumerate(self.tokens_for(prompt, max_tokens)):
                if k > 0:
                    await asyncio.sleep(self.args.token_ms / 1e3)
                out.append(t)
                stop = t in stop_ids and len(out) >= min_tokens
                finish = "stop" if stop else ("length" if len(out) >= max_tokens else None)
                yield t, finish
                if finish:
                    break
            self.cache.store(prompt + out)
        finally:
            self.running -= 1
            self.active_blocks -= blocks


def token_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and t >= 0 for t in v):
        return None
    return v


def error(status, message):
    return web.json_response({"error": {"message": message, "type": "BadRequestError",
                                        "code": status}}, status=status)


def make_app(engine, args):
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(_):
        return web.Response(status=200)

    @routes.get("/v1/models")
    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    @routes.get("/metrics")
    async def metrics(_):
        usage = engine.active_blocks / args.num_blocks
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{args.model}",engine="0"}} {float(engine.running)}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{args.model}",engine="0"}} 0.0',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="{args.model}",engine="0"}} {usage}',
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{args.block_size}",num_gpu_blocks="{args.num_blocks}"}} 1.0',
            "# TYPE sglang:num_running_reqs gauge",
            f'sglang:num_running_reqs{{model_name="{args.model}"}} {float(engine.running)}',
            "# TYPE sglang:num_queue_reqs gauge",
            f'sglang:num_queue_reqs{{model_name="{args.model}"}} 0.0',
            "# TYPE sglang:token_usage gauge",
            f'sglang:token_usage{{model_name="{args.model}"}} {usage}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def sse(request, chunks):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            async for c in chunks:
                await resp.write(f"data: {c}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            engine.cancelled += 1
            raise
        return resp

    @routes.post("/v1/completions")
    async def completions(request):
        body = await request.json()
        if body.get("model") != args.model:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        prompt = token_list(body.get("prompt"))
        if prompt is None:
            return error(400, "this stand-in takes prompts as token ids")
        if not body.get("stream"):
            return error(400, "this stand-in streams only")
        max_tokens = int(body.get("max_tokens") or 16)
        stops = set(body.get("stop_token_ids") or [])
        with_ids = bool(body.get("return_token_ids"))
        engine.requests += 1

        async def chunks():
            async for t, finish in engine.generate(prompt, max_tokens, stops, int(body.get("min_tokens") or 0)):
                choice = {"index": 0, "text": f"<{t}>", "logprobs": None, "finish_reason": None}
                if with_ids:
                    choice["token_ids"] = [t]
                yield json.dumps({"id": "cmpl-x", "object": "text_completion", "created": int(time.time()),
                                  "model": args.model, "choices": [choice]})
                if finish:
                    last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
                    if with_ids:
                        last["token_ids"] = []
                    yield json.dumps({"id": "cmpl-x", "object": "text_completion", "created": int(time.time()),
                                      "model": args.model, "choices": [last]})

        return await sse(request, chunks())

    @routes.post("/generate")
    async def generate(request):
        body = await request.json()
        prompt = token_list(body.get("input_ids"))
        if prompt is None:
            return error(400, "input_ids: a list of token ids")
        sp = body.get("sampling_params") or {}
        max_tokens = int(sp.get("max_new_tokens") or 16)
        stops = set(sp.get("stop_token_ids") or [])
        engine.requests += 1

        async def chunks():
            out = []
            async for t, finish in engine.generate(prompt, max_tokens, stops, int(sp.get("min_new_tokens") or 0)):
                out.append(t)
                yield json.dumps({"text": "", "output_ids": list(out),
                                  "meta_info": {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                                                "finish_reason": {"type": finish} if finish else None}})

        return await sse(request, chunks())

    @routes.get("/stats")
    async def stats(_):
        return web.json_response({"requests": engine.requests, "cancelled": engine.cancelled,
                                  "cached_blocks": len(engine.cache.blocks)})

    app = web.Application()
    app.add_routes(routes)
    return app


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--zmq-port", type=int, default=0)
    p.add_argument("--model", default="m")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--vocab", type=int, nargs=2, default=[100, 200], metavar=("LO", "HI"),
                   help="generated token ids are drawn from [LO, HI)")
    p.add_argument("--encoding", choices=["array", "map"], default="map")
    p.add_argument("--hashes", choices=["int", "bytes"], default="int")
    p.add_argument("--topic", default="kv-events")
    p.add_argument("--token-ms", type=float, default=2.0, help="time per generated token")
    p.add_argument("--prefill-us", type=float, default=1.0, help="time per prompt token (µs)")
    args = p.parse_args()
    engine = Engine(args)
    runner = web.AppRunner(make_app(engine, args), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"ready http={port} zmq={engine.zmq_port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
