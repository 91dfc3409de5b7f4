"""Checks HTTPS on `dynamo-run in=http` with the official `openai` SDK.

Usage: python tls_client.py HTTPS_BASE MODEL CA_FILE
A client that trusts the CA gets answers; one that does not, and plain HTTP to the port, fail.
"""
import sys

import openai

base, model, ca = sys.argv[1:4]


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


trusted = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30,
                        http_client=openai.DefaultHttpxClient(verify=ca))
r = trusted.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
check("https with the CA", r.choices[0].message.content is not None, r)
for name, client in (
    ("untrusted certificate refused", openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)),
    ("plain http refused", openai.OpenAI(base_url=f"{base.replace('https://', 'http://')}/v1", api_key="unused",
                                         max_retries=0, timeout=30)),
):
    try:
        client.models.list()
        check(name, False, "no error")
    except openai.APIConnectionError as e:
        check(name, True)
