"""Prints the request fields of the official openai SDK's chat and completions create params
(JSON: {"chat": [...], "completions": [...]}), for the test that walks them."""
import json

from openai.types import completion_create_params as completions
from openai.types.chat import completion_create_params as chat


def fields(t):
    out = set()
    for k in getattr(t, "__mro__", [t]):
        out |= set(getattr(k, "__annotations__", {}).keys())
    return sorted(out)


print(json.dumps({
    "chat": fields(chat.CompletionCreateParamsBase),
    "completions": fields(completions.CompletionCreateParamsBase),
}))
