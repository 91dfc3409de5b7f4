"""Prints the request fields of the official SDKs' create params: openai's chat, completions
and responses, anthropic's messages (JSON: {"chat": [...], "completions": [...],
"responses": [...], "messages": [...]}), for the tests that walk them."""
import json

from anthropic.types import message_create_params as messages
from openai.types import completion_create_params as completions
from openai.types.responses import response_create_params as responses
from openai.types.chat import completion_create_params as chat


def fields(t):
    out = set()
    for k in getattr(t, "__mro__", [t]):
        out |= set(getattr(k, "__annotations__", {}).keys())
    return sorted(out)


print(json.dumps({
    "chat": fields(chat.CompletionCreateParamsBase),
    "completions": fields(completions.CompletionCreateParamsBase),
    "responses": fields(responses.ResponseCreateParamsBase),
    "messages": fields(messages.MessageCreateParamsBase),
}))
