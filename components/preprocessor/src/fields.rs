//! Which request fields each API honours: nothing is silently ignored. A field is honoured
//! (possibly only with some values: the others are refused naming it), accepted as an
//! identifier with no effect on the output (`user`, `metadata`, ...), or refused with a 400
//! that names it. A field this server does not know is refused too: a client that sends it
//! expects an effect it would not get.

use serde_json::Value;

use crate::pipeline::RequestError;

/// The APIs whose bodies are checked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

/// What happens to a field.
enum Policy {
    /// Used to generate the answer (validated where it is used).
    Honoured,
    /// Identifies the caller or request, or a caching hint: no effect on the output by
    /// definition.
    Identifier,
    /// Honoured only when `ok` holds for its value; any other value is refused.
    Only(fn(&Value) -> bool, &'static str),
    /// Not supported: any value but `null` is refused.
    Refused(&'static str),
}

use Policy::*;

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn text_only(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

fn default_tier(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

/// The policy of `field` for `api`; `None` for a field this server does not know.
fn policy(api: Api, field: &str) -> Option<Policy> {
    Some(match (api, field) {
        // Both APIs.
        (_, "model" | "max_tokens" | "temperature" | "top_p" | "seed" | "n") => Honoured,
        (_, "presence_penalty" | "frequency_penalty" | "logprobs" | "stop" | "stream") => Honoured,
        (_, "stream_options" | "top_k" | "min_tokens" | "ignore_eos" | "nvext") => Honoured,
        (_, "user" | "safety_identifier" | "prompt_cache_key" | "metadata") => Identifier,
        (_, "prompt_cache_options" | "prompt_cache_retention") => Identifier,
        (_, "moderation") => Refused("moderation"),
        (_, "logit_bias") => Honoured,
        // Structured output: OpenAI's response_format, and vLLM's guided_* extensions.
        (_, "response_format" | "guided_json" | "guided_regex" | "guided_choice") => Honoured,
        (_, "store") => Only(is_false, "store: true (this server keeps no completions)"),
        (_, "service_tier") => Only(default_tier, "service tiers other than auto and default"),
        // Chat.
        (Api::Chat, "messages" | "tools" | "chat_template_kwargs") => Honoured,
        (Api::Chat, "max_completion_tokens" | "top_logprobs") => Honoured,
        (Api::Chat, "parallel_tool_calls") => Honoured,
        (Api::Chat, "tool_choice") => Honoured,
        (Api::Chat, "modalities") => Only(text_only, "output modalities other than text"),
        (Api::Chat, "audio") => Refused("audio output"),
        (Api::Chat, "prediction") => Refused("predicted outputs"),
        (Api::Chat, "web_search_options") => Refused("web search"),
        (Api::Chat, "reasoning_effort") => Refused("reasoning_effort"),
        (Api::Chat, "verbosity") => Refused("verbosity"),
        (Api::Chat, "functions" | "function_call") => {
            Refused("the deprecated functions API (use tools)")
        }
        // Completions.
        (Api::Completions, "prompt" | "echo" | "best_of" | "suffix") => Honoured,
        _ => return None,
    })
}

/// Refuses the first field of `body` (a JSON object) that `api` would not honour.
pub fn check(api: Api, body: &Value) -> Result<(), RequestError> {
    let Some(fields) = body.as_object() else {
        return Ok(());
    };
    for (name, value) in fields {
        match policy(api, name) {
            Some(Honoured | Identifier) => {}
            Some(_) if value.is_null() => {}
            Some(Only(ok, _)) if ok(value) => {}
            Some(Only(_, what) | Refused(what)) => {
                return Err(RequestError::unsupported(name, what));
            }
            None => {
                return Err(RequestError::new(
                    format!("unknown parameter {name:?}: this server does not support it"),
                    Some(name),
                ))
            }
        }
    }
    Ok(())
}

/// Whether `field` has a decision for `api` (tests walk the official SDK's request fields).
pub fn known(api: Api, field: &str) -> bool {
    policy(api, field).is_some()
}

/// Whether `field` is taken with any (well-typed) value: honoured, or without effect.
pub fn always_taken(api: Api, field: &str) -> bool {
    matches!(policy(api, field), Some(Honoured | Identifier))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_field_is_honoured_or_refused_by_name() {
        let ok = |api, body: Value| check(api, &body);
        assert!(ok(
            Api::Chat,
            json!({"model": "m", "messages": [], "user": "u", "logit_bias": {"50": 5}})
        )
        .is_ok());
        assert!(ok(
            Api::Chat,
            json!({"response_format": {"type": "text"}, "tool_choice": "auto"})
        )
        .is_ok());
        assert!(ok(Api::Chat, json!({"audio": null, "store": false})).is_ok());
        for (body, param) in [
            (json!({"store": true}), "store"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"guided_grammar": "x"}), "guided_grammar"),
        ] {
            let e = ok(Api::Chat, body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
        let e = ok(Api::Completions, json!({"messages": []})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(ok(Api::Completions, json!({"prompt": "p", "echo": true})).is_ok());
    }
}
