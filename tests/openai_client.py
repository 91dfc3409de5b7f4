"""Checks a dynamo frontend with the official `openai` Python SDK.

Usage: python openai_client.py BASE_URL MODEL
Exits non-zero with a message on the first check that fails; prints one line per check.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


models = [m.id for m in client.models.list()]
check("models.list", model in models, models)
check("models.retrieve", client.models.retrieve(model).id == model)
try:
    client.models.retrieve("no-such-model")
    check("models.retrieve unknown is 404", False, "no error")
except openai.NotFoundError as e:
    check("models.retrieve unknown is 404", e.status_code == 404)

# Chat, whole: the echo engine repeats the framed prompt up to the end-of-turn token.
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello from openai"}]
)
c = r.choices[0]
check("chat content", c.message.content == "user\nHello from openai", repr(c.message.content))
check("chat finish", c.finish_reason == "stop", c.finish_reason)
u = r.usage
check("chat usage", u.prompt_tokens > 0 and u.completion_tokens > 0
      and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
whole = c.message.content

# Chat, streamed, with usage in a last chunk.
text, finish, usage = "", None, None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Hello from openai"}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.delta.content or ""
        finish = ch.finish_reason or finish
check("chat stream content", text == whole, repr(text))
check("chat stream finish", finish == "stop", finish)
check("chat stream usage", usage is not None and usage.completion_tokens == u.completion_tokens, usage)

# Completions with a stop string: it and what follows are cut.
r = client.completions.create(model=model, prompt="one two three four", stop=["three"], max_tokens=50)
check("completion stop", r.choices[0].text == "one two " and r.choices[0].finish_reason == "stop",
      r.choices[0])

# Completions streamed with max_tokens: finish length, exact usage.
text, finish, usage = "", None, None
for chunk in client.completions.create(
    model=model, prompt="alpha beta gamma delta epsilon", max_tokens=2, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.text
        finish = ch.finish_reason or finish
check("completion stream length", finish == "length", finish)
check("completion stream usage", usage is not None and usage.completion_tokens == 2, usage)
check("completion stream text", text and "alpha beta gamma delta epsilon".startswith(text), repr(text))

# Errors come back as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model is 404", False, "no error")
except openai.NotFoundError as e:
    check("unknown model is 404", e.status_code == 404)
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    check("max_tokens 0 is 400", False, "no error")
except openai.BadRequestError as e:
    check("max_tokens 0 is 400", "max_tokens" in str(e), str(e))
print("all checks passed")
