"""Checks `dynamo-run in=http out=native` with the official `openai` Python SDK.

Usage: python native_client.py BASE_URL MODEL MODEL_DIR
Exits non-zero with a message on the first check that fails; prints one line per check.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


check("models.list", model in [m.id for m in client.models.list()])
messages = [
    {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
    {"role": "user", "content": "Tell me about the weather on the coast in late autumn."},
]
r1 = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
c = r1.choices[0]
check("chat finish length", c.finish_reason == "length", c.finish_reason)
check("chat usage", r1.usage.completion_tokens == 12 and r1.usage.prompt_tokens > 32, r1.usage)
check("chat text", isinstance(c.message.content, str) and len(c.message.content) > 0, repr(c.message.content))
details = r1.usage.completion_tokens_details
check("completion_tokens_details", details is not None and details.reasoning_tokens == 0, r1.usage)

# The same prompt again: greedy gives the same text, and its full blocks come from the cache.
r2 = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
check("greedy is deterministic", r2.choices[0].message.content == c.message.content)
cached = r2.usage.prompt_tokens_details.cached_tokens
check("prefix cache reused", cached is not None and cached >= 16, r2.usage)

# Streaming gives the same text, and usage at the end.
parts, usage = [], None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
check("stream text", "".join(parts) == c.message.content, ("".join(parts), c.message.content))
check("stream usage", usage is not None and usage.completion_tokens == 12, usage)

# Sampling with a seed is reproducible; another seed differs.
def sampled(seed):
    r = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
    )
    return r.choices[0].text

a, b, other = sampled(7), sampled(7), sampled(8)
check("seeded sampling repeats", a == b, (a, b))
check("another seed differs", a != other, (a, other))

# A prompt beyond the context is a 400 with an OpenAI error body; the server stays up.
try:
    client.completions.create(model=model, prompt="word " * 5000, max_tokens=4)
    check("context exceeded", False, "no error")
except openai.BadRequestError as e:
    check("context exceeded", e.status_code == 400, e)
r = client.completions.create(model=model, prompt="Still there?", max_tokens=3, temperature=0)
check("serves after a bad request", r.usage.completion_tokens == 3, r.usage)

# logit_bias: +100 on one token makes greedy decoding repeat it; bad keys and values are a 400
# naming the parameter.
r = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=4, temperature=0, logit_bias={"70": 100}
)
t = r.choices[0].text
check("logit_bias forces a token", len(t) >= 4 and len(t) % 4 == 0 and t == t[: len(t) // 4] * 4, repr(t))
for bad in ({"999999": 5}, {"70": 250}):
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, logit_bias=bad)
        check(f"logit_bias {bad} refused", False, "no error")
    except openai.BadRequestError as e:
        check(f"logit_bias {bad} refused", e.status_code == 400 and e.param == "logit_bias", e)

# logprobs (chat): one entry per generated token; the alternatives ranked, the greedy choice
# first; the tokens' bytes spell the text; streamed chunks carry the same entries.
kw = dict(model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
          extra_body={"ignore_eos": True})
r = client.chat.completions.create(**kw)
content = r.choices[0].logprobs.content
check("chat logprobs per token", len(content) == r.usage.completion_tokens == 8, (len(content), r.usage))
check(
    "greedy token is the top alternative",
    all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 and e.logprob <= 0
        and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        for e in content),
    content,
)
spelled = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
check("logprob bytes spell the text", spelled == r.choices[0].message.content, (spelled, r.choices[0].message.content))
streamed = []
for chunk in client.chat.completions.create(**kw, stream=True):
    if chunk.choices and chunk.choices[0].logprobs:
        streamed.extend(chunk.choices[0].logprobs.content)
check(
    "streamed logprobs match",
    [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content],
    (streamed, content),
)

# logprobs (completions): tokens, their logprobs, alternatives (the chosen one included) and
# text offsets; a sampled token is never more likely than the top alternative.
r = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3, logprobs=2,
    extra_body={"ignore_eos": True},
)
lp = r.choices[0].logprobs
check(
    "completion logprobs",
    len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    and all(len(t) <= 3 and max(t.values()) >= l - 1e-6 for t, l in zip(lp.top_logprobs, lp.token_logprobs))
    and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0,
    lp,
)
for bad, param in (
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
):
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, **bad)
        check(f"{bad} refused", False, "no error")
    except openai.BadRequestError as e:
        check(f"{bad} refused", e.status_code == 400 and e.param == param, e)
try:
    client.completions.create(model=model, prompt="x", max_tokens=2, logprobs=1, echo=True)
    check("echo with logprobs refused", False, "no error")
except openai.BadRequestError as e:
    check("echo with logprobs refused", e.status_code == 400 and e.param == "echo", e)

# n > 1: each choice its own sequence; a seeded request's choice i draws as seed + i would
# alone, so n choices are reproducible; the prompt counts once in usage.
def chat_n(n, seed, **kw):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=1.0, seed=seed, n=n,
        extra_body={"ignore_eos": True}, **kw,
    )

three = chat_n(3, 5)
singles = [chat_n(1, 5 + i) for i in range(3)]
check(
    "n choices are seeded sequences",
    [c.index for c in three.choices] == [0, 1, 2]
    and [c.message.content for c in three.choices] == [s.choices[0].message.content for s in singles]
    and len({c.message.content for c in three.choices}) > 1,
    (three.choices, [s.choices[0] for s in singles]),
)
check(
    "n usage counts the prompt once",
    three.usage.prompt_tokens == singles[0].usage.prompt_tokens and three.usage.completion_tokens == 30,
    three.usage,
)
again = chat_n(3, 5)
check("n choices reproducible", [c.message.content for c in again.choices] == [c.message.content for c in three.choices])
texts, finishes, usage = {}, {}, None
for chunk in chat_n(2, 5, stream=True, stream_options={"include_usage": True}):
    for c in chunk.choices:
        texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        if c.finish_reason:
            finishes[c.index] = c.finish_reason
    if chunk.usage:
        usage = chunk.usage
check(
    "n streamed",
    [texts.get(i) for i in range(2)] == [c.message.content for c in three.choices[:2]]
    and finishes == {0: "length", 1: "length"} and usage is not None and usage.completion_tokens == 20,
    (texts, finishes, usage),
)

# A batch of prompts in one completions request: what separate requests give, in order.
prompts = ["The river ran", "Under the old bridge"]
batch = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0, n=2)
alone = [client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0) for p in prompts]
check(
    "batch of prompts",
    [c.index for c in batch.choices] == [0, 1, 2, 3]
    and [c.text for c in batch.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    and batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone),
    (batch, alone),
)
for bad in (dict(n=129), dict(n=2, prompt=["x"] * 65)):
    try:
        client.completions.create(**{"model": model, "prompt": "x", "max_tokens": 2, **bad})
        check(f"too many sequences refused {list(bad)}", False, "no error")
    except openai.BadRequestError as e:
        check(f"too many sequences refused {list(bad)}", e.status_code == 400 and e.param == "n", e)

# Structured output by guided decoding: with random weights, the answer is still valid JSON of
# the schema (parsed by the SDK into the pydantic model), for greedy and sampled requests.
import json
from typing import List, Literal

import pydantic


class Ticket(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    title: str = pydantic.Field(max_length=12)
    urgent: bool
    size: Literal["S", "M", "L"]
    votes: int = pydantic.Field(ge=0, le=99)
    tags: List[Literal["ui", "api", "db"]] = pydantic.Field(max_length=2)


parsed = []
for seed in range(4):
    r = client.chat.completions.parse(
        model=model, messages=messages, response_format=Ticket, max_tokens=120,
        temperature=0 if seed == 0 else 1.0, seed=seed,
    )
    parsed.append((r.choices[0].finish_reason, r.choices[0].message.parsed))
check("json_schema parsed by the SDK", all(f == "stop" and isinstance(t, Ticket) for f, t in parsed), parsed)

# Any JSON object: the grammar keeps the output one; a random model rarely closes a string
# by itself, so a bias on '"' and '}' (tokens of the model's own vocabulary) lets it end.
vocab = json.load(open(f"{sys.argv[3]}/tokenizer.json"))["model"]["vocab"]
r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=200, response_format={"type": "json_object"},
    logit_bias={str(vocab['"']): 6, str(vocab["}"]): 3},
)
c = r.choices[0]
check(
    "json_object",
    c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict),
    (c.finish_reason, c.message.content),
)
r = client.completions.create(
    model=model, prompt="The code is", max_tokens=20, extra_body={"guided_regex": "[0-9]{4}-[A-Z]{2}"},
)
t = r.choices[0].text
check("guided_regex", len(t) == 7 and t[:4].isdigit() and t[4] == "-" and t[5:].isupper(), repr(t))
r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=1.0, seed=2,
    extra_body={"guided_choice": ["sunny", "rainy", "foggy"]},
)
check("guided_choice", r.choices[0].message.content in ("sunny", "rainy", "foggy"), r.choices[0].message.content)
streamed = "".join(
    ch.choices[0].delta.content or ""
    for ch in client.chat.completions.create(
        model=model, messages=messages, max_tokens=120, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": Ticket.model_json_schema(), "strict": True}},
    )
    if ch.choices
)
check("json_schema streamed", Ticket.model_validate_json(streamed) is not None, streamed)
for bad, param in (
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
    ({"type": "xml"}, "response_format"),
):
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=5, response_format=bad)
        check(f"bad response_format {bad['type']} refused", False, "no error")
    except openai.BadRequestError as e:
        check(f"bad response_format {bad['type']} refused", e.status_code == 400 and e.param == param, e)

# Tool calls: the chat template renders the tools (Hermes style); tool_choice "required" or a
# named function makes the model call one (guided decoding: arguments valid against the
# function's parameters, even with random weights); the call is parsed back into tool_calls,
# whole and streamed; then a tool loop: the client returns the result and the model answers.
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                      "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}},
]
ask = [{"role": "user", "content": "What is the weather in Oslo?"}]


def valid_call(call):
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 10 and args["unit"] in ("c", "f")
    return call.function.name == "get_time" and args.get("zone") in ("utc", "cet")


r = client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False,
    max_tokens=80, temperature=1.0, seed=4,
)
c = r.choices[0]
check(
    "tool_choice required gives a valid call",
    c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 and valid_call(c.message.tool_calls[0])
    and c.message.tool_calls[0].id.startswith("call_"),
    c,
)
r = client.chat.completions.create(
    model=model, messages=ask, tools=tools, max_tokens=80,
    tool_choice={"type": "function", "function": {"name": "get_time"}},
)
calls = r.choices[0].message.tool_calls
check("named tool_choice", calls and all(t.function.name == "get_time" and valid_call(t) for t in calls), r.choices[0])
deltas, finish = {}, None
for chunk in client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False,
    max_tokens=80, temperature=1.0, seed=4, stream=True,
):
    for ch in chunk.choices:
        for d in ch.delta.tool_calls or []:
            e = deltas.setdefault(d.index, {"name": "", "arguments": ""})
            e["name"] += d.function.name or ""
            e["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
check(
    "tool calls streamed",
    finish == "tool_calls" and list(deltas.values()) == [
        {"name": c.message.tool_calls[0].function.name, "arguments": c.message.tool_calls[0].function.arguments}],
    (deltas, finish),
)
loop = ask + [
    {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in c.message.tool_calls]},
    {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": '{"temp": 7, "sky": "rain"}'},
]
r2 = client.chat.completions.create(model=model, messages=loop, tools=tools, tool_choice="none", max_tokens=8)
check(
    "tool loop answers",
    r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    and r2.usage.prompt_tokens > r.usage.prompt_tokens,
    r2,
)
for bad, param in (
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0]"),
    (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
):
    try:
        client.chat.completions.create(model=model, messages=ask, max_tokens=5, **bad)
        check(f"bad tools refused ({param})", False, "no error")
    except openai.BadRequestError as e:
        check(f"bad tools refused ({param})", e.status_code == 400 and e.param == param, e)

# The Responses API: instructions and input, max_output_tokens (incomplete), streaming events,
# a continuation by previous_response_id, function tools with a call and its output fed back,
# structured output, and bad input.
r = client.responses.create(model=model, instructions="Be terse.", input="Tell me about the coast.",
                            max_output_tokens=10, temperature=0)
check(
    "response",
    r.object == "response" and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    and r.output_text and r.usage.output_tokens == 10 and r.id.startswith("resp_"),
    r,
)
events, text, completed = [], "", None
for ev in client.responses.create(model=model, instructions="Be terse.", input="Tell me about the coast.",
                                  max_output_tokens=10, temperature=0, stream=True):
    events.append(ev.type)
    if ev.type == "response.output_text.delta":
        text += ev.delta
    if ev.type in ("response.completed", "response.incomplete"):
        completed = ev.response
check(
    "response streamed",
    events[0] == "response.created" and text == r.output_text and completed is not None
    and completed.output_text == text and "response.output_item.done" in events,
    (events, text),
)
r2 = client.responses.create(model=model, previous_response_id=r.id, input="And in winter?", max_output_tokens=5)
check("previous_response_id continues", r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens, r2.usage)
rtools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
          for t in tools]
r3 = client.responses.create(model=model, input="Weather in Oslo?", tools=rtools, tool_choice="required",
                             parallel_tool_calls=False, max_output_tokens=80)
fcs = [o for o in r3.output if o.type == "function_call"]
check(
    "response function call",
    len(fcs) == 1 and fcs[0].name in ("get_weather", "get_time") and isinstance(json.loads(fcs[0].arguments), dict),
    r3.output,
)
r4 = client.responses.create(
    model=model, previous_response_id=r3.id, tools=rtools, max_output_tokens=6,
    input=[{"type": "function_call_output", "call_id": fcs[0].call_id, "output": '{"temp": 7}'}],
)
check("function_call_output answered", r4.output_text and r4.status in ("completed", "incomplete"), r4)
parsed = client.responses.parse(model=model, input="File a ticket.", text_format=Ticket, max_output_tokens=120)
check("responses.parse", isinstance(parsed.output_parsed, Ticket), parsed.output_text)
for bad, param in (
    (dict(previous_response_id="resp_nope"), "previous_response_id"),
    (dict(input=[{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]), "input[0]"),
    (dict(tools=[{"type": "web_search"}]), "tools[0]"),
    (dict(background=True), "background"),
):
    try:
        client.responses.create(**{"model": model, "input": "x", "max_output_tokens": 3, **bad})
        check(f"responses {param} refused", False, "no error")
    except openai.BadRequestError as e:
        check(f"responses {param} refused", e.status_code == 400 and e.param == param, e)
