"""Checks API keys on `dynamo-run in=http` with the official `openai` and `anthropic` SDKs.

Usage: python auth_client.py BASE_URL MODEL GOOD_KEY LIMITED_KEY
The limited key allows one request in flight. Prints one line per check; exits non-zero on
the first that fails.
"""
import json
import sys
import time
import urllib.error
import urllib.request

import anthropic
import openai

base, model, good, limited = sys.argv[1:5]


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


def client(key):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


ask = [{"role": "user", "content": "hello there"}]

# No key at all: a 401 in OpenAI's shape, code invalid_api_key.
req = urllib.request.Request(f"{base}/v1/chat/completions", method="POST",
                             data=json.dumps({"model": model, "messages": ask}).encode(),
                             headers={"content-type": "application/json"})
try:
    urllib.request.urlopen(req)
    check("no key refused", False, "no error")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    check("no key refused", e.code == 401 and body["error"]["code"] == "invalid_api_key", body)

try:
    client("sk-wrong").chat.completions.create(model=model, messages=ask, max_tokens=3)
    check("wrong key refused", False, "no error")
except openai.AuthenticationError as e:
    check("wrong key refused", e.status_code == 401 and e.code == "invalid_api_key", e)

r = client(good).chat.completions.create(model=model, messages=ask, max_tokens=3)
check("right key works", r.choices[0].message.content is not None, r)
check("models need the key too", model in [m.id for m in client(good).models.list()])

# The limited key: one request in flight; a second concurrent one gets a 429 with Retry-After.
stream = client(limited).chat.completions.create(model=model, messages=ask, max_tokens=50, stream=True)
next(iter(stream))
try:
    client(limited).chat.completions.create(model=model, messages=ask, max_tokens=3)
    check("limited key's second request refused", False, "no error")
except openai.RateLimitError as e:
    check("limited key's second request refused",
          e.status_code == 429 and e.response.headers.get("retry-after") is not None, e)
r = client(good).chat.completions.create(model=model, messages=ask, max_tokens=3)
check("other keys are not limited by it", r.choices[0].message.content is not None)
stream.close()
# The server notices the closed stream at its next token (the echo engine's 20 ms pace).
deadline, r = time.monotonic() + 5, None
while r is None and time.monotonic() < deadline:
    try:
        r = client(limited).chat.completions.create(model=model, messages=ask, max_tokens=3)
    except openai.RateLimitError:
        time.sleep(0.02)
check("limited key works again once its stream ended", r is not None and r.choices[0].message.content is not None)

# Anthropic's SDK sends x-api-key; a wrong one is its authentication_error.
a = anthropic.Anthropic(base_url=base, api_key=good, max_retries=0, timeout=30)
m = a.messages.create(model=model, max_tokens=3, messages=ask)
check("x-api-key works", m.type == "message")
try:
    anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(
        model=model, max_tokens=3, messages=ask)
    check("anthropic wrong key refused", False, "no error")
except anthropic.AuthenticationError as e:
    check("anthropic wrong key refused", e.body["error"]["type"] == "authentication_error", e.body)

# Operations endpoints stay open by default.
check("health open", urllib.request.urlopen(f"{base}/health").status == 200)
