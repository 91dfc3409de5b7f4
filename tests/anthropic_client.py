"""Checks `dynamo-run in=http out=native`'s Messages API with the official `anthropic` SDK.

Usage: python anthropic_client.py BASE_URL MODEL
Exits non-zero with a message on the first check that fails; prints one line per check.
"""
import sys

import anthropic

base, model = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


ask = [{"role": "user", "content": "Tell me about the weather on the coast in late autumn."}]
m = client.messages.create(model=model, max_tokens=12, messages=ask, system="Be terse.", temperature=0)
check(
    "message",
    m.type == "message" and m.role == "assistant" and m.content[0].type == "text" and m.content[0].text
    and m.stop_reason == "max_tokens" and m.usage.output_tokens == 12 and m.usage.input_tokens > 10
    and m.id.startswith("msg_"),
    m,
)

# Streaming gives the same text (greedy), with the SDK's event accumulation.
with client.messages.stream(model=model, max_tokens=12, messages=ask, system="Be terse.", temperature=0) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
check("stream", streamed == m.content[0].text and final.stop_reason == "max_tokens", (streamed, final))

# A stop sequence taken from the greedy answer (its longest word) ends it there, and is named.
text = m.content[0].text
stop = max(text.split(), key=len)
r = client.messages.create(model=model, max_tokens=12, messages=ask, system="Be terse.", temperature=0,
                           stop_sequences=[stop])
check("stop_sequence", r.stop_reason == "stop_sequence" and r.stop_sequence == stop
      and r.content[0].text == text[:text.index(stop)], (stop, text, r))

# Tools: a forced call (tool_choice any) is a tool_use block whose input fits the schema; the
# client sends the result back and the model answers.
tools = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                            "unit": {"enum": ["c", "f"]}},
                           "required": ["city", "unit"]}}]
r = client.messages.create(model=model, max_tokens=80, messages=ask, tools=tools,
                           tool_choice={"type": "any", "disable_parallel_tool_use": True})
uses = [b for b in r.content if b.type == "tool_use"]
check(
    "tool_use",
    r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    and set(uses[0].input) == {"city", "unit"} and uses[0].input["unit"] in ("c", "f"),
    r,
)
with client.messages.stream(model=model, max_tokens=80, messages=ask, tools=tools,
                            tool_choice={"type": "tool", "name": "get_weather"}) as s:
    final = s.get_final_message()
streamed_uses = [b for b in final.content if b.type == "tool_use"]
check("tool_use streamed", final.stop_reason == "tool_use" and streamed_uses
      and streamed_uses[0].input.get("unit") in ("c", "f"), final)
loop = ask + [
    {"role": "assistant", "content": [u.model_dump() for u in uses]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "7C and rain"}]},
]
r2 = client.messages.create(model=model, max_tokens=8, messages=loop, tools=tools, tool_choice={"type": "none"})
check("tool loop answers", r2.content[0].type == "text" and r2.content[0].text
      and r2.usage.input_tokens + r2.usage.cache_read_input_tokens > r.usage.input_tokens, r2)

# Bad input: errors in the API's own shape, naming the problem.
for name, kwargs, status in (
    ("no max_tokens", dict(messages=ask), 400),
    ("image block", dict(max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]), 400),
    ("unknown tool_use_id", dict(max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]), 400),
    ("server tool", dict(max_tokens=5, messages=ask, tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400),
):
    try:
        client.post("/v1/messages", cast_to=object, body={"model": model, **kwargs})
        check(f"{name} refused", False, "no error")
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(f"{name} refused", e.status_code == status and body.get("type") == "error"
              and body["error"]["type"] == "invalid_request_error", (e.status_code, e.body))
try:
    client.messages.create(model="no-such-model", max_tokens=5, messages=ask)
    check("unknown model", False, "no error")
except anthropic.NotFoundError as e:
    check("unknown model", e.body["error"]["type"] == "not_found_error", e.body)
