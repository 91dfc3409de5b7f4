//! Anthropic's Messages API, `POST /v1/messages`: whole answers and the streamed event
//! sequence, on the same preprocessing, routing and engines as chat completions.
//!
//! A request is checked against the API's own fields (unknown ones get a 400 naming them),
//! then mapped onto a chat request: `system` becomes the system message; text blocks become
//! message text; an assistant's `tool_use` blocks become its tool calls and a user's
//! `tool_result` blocks become `tool` messages (each must answer a `tool_use` id of an earlier
//! assistant turn); `tools` (`name`, `description`, `input_schema`) become functions and
//! `tool_choice` (`auto`, `any`, `tool`, `none`, `disable_parallel_tool_use`) the matching
//! OpenAI choice, so a forced call is enforced by guided decoding. The answer comes back as
//! content blocks: `thinking` (with a reasoning parser configured), `text`, `tool_use`; with
//! `stop_reason` `end_turn`, `stop_sequence` (naming it), `max_tokens` or `tool_use`, and usage
//! with cached prompt tokens as `cache_read_input_tokens`. Errors are the API's own shape,
//! `{"type": "error", "error": {"type", "message"}}`. Content this server cannot take (images,
//! documents, server tools, thinking budgets) is refused by name, never dropped.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{json, Map, Value};

use super::http::{json_response, start_mapped, with_ids, HttpState};
use super::serving::{ApiError, Generation};
use dynamo_protocols::llm::FinishReason;

/// The request fields of the Messages API this server takes.
const FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    // A prompt-caching hint: the prefix cache works without it.
    "cache_control",
];

/// The API's error type for a status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_body(e: &ApiError) -> Value {
    let message = match &e.param {
        Some(p) if !e.message.contains(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": error_type(e.status), "message": message}})
}

/// An error response in the Messages API's shape.
pub(super) fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, &error_body(e));
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, s.into());
    }
    r
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// `POST /v1/messages`.
pub(super) async fn messages(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    let (gen, stream, request_id) = match start_mapped(&state, req, to_chat).await {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let ids = Some((gen.worker, gen.prefill_worker));
    let response = if stream {
        sse(gen).into_response()
    } else {
        match whole(gen).await {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => return error_response(&e),
        }
    };
    with_ids(response, ids, request_id.as_deref())
}

/// Text of a `content` that is a string or a list of blocks of which only `text` is taken
/// (`what` names it in errors).
fn text_of(content: &Value, what: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (kind, _) => {
                        return Err(bad(
                            &format!("{what}[{j}]"),
                            format!(
                                "only text blocks are supported here (got {})",
                                kind.unwrap_or("a block without a type")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Value::Null => Ok(String::new()),
        other => Err(bad(
            what,
            format!("must be a string or a list of blocks, not {other}"),
        )),
    }
}

/// The Messages request as a chat-completions body, and whether it streams.
fn to_chat(body: &Value) -> Result<(Value, bool), ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object", None))?;
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(
            unknown,
            format!("unknown parameter {unknown:?}: this server does not support it"),
        ));
    }
    for (k, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
        let ok = match k.as_str() {
            "temperature" | "top_p" => v.is_number(),
            "top_k" => v.as_i64().is_some_and(|n| n >= 1),
            "stream" => v.is_boolean(),
            "stop_sequences" => v
                .as_array()
                .is_some_and(|a| a.iter().all(|s| s.as_str().is_some_and(|s| !s.is_empty()))),
            "metadata" => v
                .as_object()
                .is_some_and(|o| o.keys().all(|x| x == "user_id")),
            "thinking" => v.get("type").is_some_and(Value::is_string),
            "service_tier" => v.is_string(),
            "cache_control" => v.get("type").is_some_and(Value::is_string),
            _ => true,
        };
        if !ok {
            return Err(bad(
                k,
                format!("{k} = {v} is not a value this server takes"),
            ));
        }
    }
    let mut chat = Map::new();
    match obj.get("model") {
        Some(Value::String(m)) => chat.insert("model".into(), json!(m)),
        _ => return Err(bad("model", "model is required (a string)")),
    };
    match obj.get("max_tokens").and_then(Value::as_i64) {
        Some(n) if n >= 1 => chat.insert("max_tokens".into(), json!(n)),
        _ => {
            return Err(bad(
                "max_tokens",
                "max_tokens is required: a positive integer",
            ))
        }
    };
    let mut messages = Vec::new();
    if let Some(system) = obj.get("system").filter(|s| !s.is_null()) {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    let list = obj
        .get("messages")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("messages", "messages must be a non-empty list"))?;
    let mut tool_ids: HashSet<String> = HashSet::new();
    for (i, m) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m.get("content").unwrap_or(&Value::Null);
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => {
                return Err(bad(
                    &format!("{p}.content"),
                    "content must be a string or a list of blocks",
                ))
            }
        };
        match role {
            "user" => {
                let mut text = String::new();
                for (j, b) in blocks.iter().enumerate() {
                    let bp = format!("{p}.content[{j}]");
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("tool_result") => {
                            let id = b
                                .get("tool_use_id")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(&bp, "a tool_result needs tool_use_id"))?;
                            if !tool_ids.contains(id) {
                                return Err(bad(
                                    &bp,
                                    format!("tool_result for {id:?}, which no earlier assistant turn's tool_use has"),
                                ));
                            }
                            let mut result =
                                text_of(b.get("content").unwrap_or(&Value::Null), &bp)?;
                            if b.get("is_error") == Some(&Value::Bool(true)) {
                                result = format!("Error: {result}");
                            }
                            messages.push(
                                json!({"role": "tool", "tool_call_id": id, "content": result}),
                            );
                        }
                        Some(kind) => {
                            return Err(bad(
                                &bp,
                                format!(
                                    "{kind} blocks are not supported (text and tool_result are)"
                                ),
                            ))
                        }
                        None => return Err(bad(&bp, "a content block needs a type")),
                    }
                }
                if !text.is_empty() || blocks.is_empty() {
                    messages.push(json!({"role": "user", "content": text}));
                }
            }
            "assistant" => {
                let (mut text, mut calls) = (String::new(), Vec::new());
                for (j, b) in blocks.iter().enumerate() {
                    let bp = format!("{p}.content[{j}]");
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("tool_use") => {
                            let (Some(id), Some(name)) = (
                                b.get("id").and_then(Value::as_str),
                                b.get("name").and_then(Value::as_str),
                            ) else {
                                return Err(bad(&bp, "a tool_use needs an id and a name"));
                            };
                            tool_ids.insert(id.to_string());
                            let input = b.get("input").cloned().unwrap_or(json!({}));
                            calls.push(json!({"id": id, "type": "function",
                                "function": {"name": name, "arguments": input.to_string()}}));
                        }
                        // Earlier turns' reasoning is not fed back (as Anthropic's own API).
                        Some("thinking" | "redacted_thinking") => {}
                        Some(kind) => {
                            return Err(bad(&bp, format!("{kind} blocks are not supported")))
                        }
                        None => return Err(bad(&bp, "a content block needs a type")),
                    }
                }
                let mut msg = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
            other => {
                return Err(bad(
                    &format!("{p}.role"),
                    format!("role {other:?} must be user or assistant (system goes in `system`)"),
                ))
            }
        }
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| bad("tools", "tools must be a list"))?;
        let mut functions = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let p = format!("tools[{i}]");
            match t.get("type").and_then(Value::as_str) {
                None | Some("custom") => {}
                Some(kind) => {
                    return Err(bad(
                        &p,
                        format!("server tool {kind:?} is not supported: define client tools (name, input_schema)"),
                    ))
                }
            }
            let mut f = json!({"name": t.get("name").cloned().unwrap_or(Value::Null)});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            match t.get("input_schema") {
                Some(s) if s.is_object() => f["parameters"] = s.clone(),
                _ => return Err(bad(&p, "a tool needs an input_schema object")),
            }
            functions.push(json!({"type": "function", "function": f}));
        }
        chat.insert("tools".into(), Value::Array(functions));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) {
        let mapped = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => match choice.get("name").and_then(Value::as_str) {
                Some(name) => json!({"type": "function", "function": {"name": name}}),
                None => return Err(bad("tool_choice", "tool_choice of type tool needs a name")),
            },
            _ => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice type must be auto, any, tool or none",
                ))
            }
        };
        chat.insert("tool_choice".into(), mapped);
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    match obj.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str) {
        None | Some("disabled") => {}
        Some(_) => {
            return Err(bad(
                "thinking",
                "extended thinking budgets are not supported; a model's own reasoning comes back as thinking blocks when the frontend runs with --reasoning-parser",
            ))
        }
    }
    match obj.get("service_tier").and_then(Value::as_str) {
        None | Some("auto" | "standard_only") => {}
        Some(other) => {
            return Err(bad(
                "service_tier",
                format!("service_tier {other:?} is not supported (auto, standard_only)"),
            ))
        }
    }
    if let Some(t) = obj.get("temperature").and_then(Value::as_f64) {
        if !(0.0..=1.0).contains(&t) {
            return Err(bad(
                "temperature",
                format!("temperature is {t}; it must be between 0 and 1"),
            ));
        }
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop_sequences", "stop"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(user) = obj.get("metadata").and_then(|m| m.get("user_id")) {
        chat.insert("user".into(), user.clone());
    }
    let stream = obj.get("stream") == Some(&Value::Bool(true));
    chat.insert("stream".into(), json!(stream));
    Ok((Value::Object(chat), stream))
}

fn stop_reason(finish: Option<FinishReason>, stop: &Option<String>) -> &'static str {
    match finish {
        Some(FinishReason::Length) => "max_tokens",
        Some(FinishReason::ToolCalls) => "tool_use",
        _ if stop.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

fn tool_use(call: &dynamo_preprocessor::tools::ToolCall) -> Value {
    let input: Value = serde_json::from_str(&call.arguments).unwrap_or(json!({}));
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
}

fn usage(gen: &Generation) -> Value {
    let u = gen.usage();
    let cached = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(cached),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "output_tokens": u.completion_tokens,
    })
}

fn message_id(gen: &Generation) -> String {
    format!("msg_{}", gen.id)
}

/// The whole answer.
async fn whole(mut gen: Generation) -> Result<Value, ApiError> {
    let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    let (mut finish, mut stop) = (None, None);
    while let Some(piece) = gen.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        thinking.push_str(&piece.reasoning);
        calls.extend(piece.tool_calls.iter().map(tool_use));
        if piece.finish.is_some() {
            finish = piece.finish;
            stop = piece.stop_sequence.clone();
        }
    }
    let mut content = Vec::new();
    if !thinking.is_empty() {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(calls);
    Ok(json!({
        "id": message_id(&gen),
        "type": "message",
        "role": "assistant",
        "model": gen.model,
        "content": content,
        "stop_reason": stop_reason(finish, &stop),
        "stop_sequence": stop,
        "usage": usage(&gen),
    }))
}

fn event(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The streamed answer's state: the generation, the open content block (its index and
/// type) and the events ready to send.
struct Streaming {
    gen: Option<Generation>,
    open: Option<(usize, &'static str)>,
    next_block: usize,
    ready: VecDeque<Event>,
}

impl Streaming {
    /// Opens a block of `kind` (closing another), with its `content_block_start` body.
    fn open(&mut self, kind: &'static str, block: Value) -> usize {
        if let Some((i, k)) = self.open {
            if k == kind && kind != "tool_use" {
                return i;
            }
            self.close();
        }
        let i = self.next_block;
        self.next_block += 1;
        self.ready.push_back(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": block}),
        ));
        self.open = Some((i, kind));
        i
    }

    fn close(&mut self) {
        if let Some((i, _)) = self.open.take() {
            self.ready.push_back(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }

    fn delta(&mut self, index: usize, delta: Value) {
        self.ready.push_back(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }
}

/// The streamed answer: `message_start`, content blocks (`content_block_start`, deltas,
/// `content_block_stop`), `message_delta` with the stop reason and usage, `message_stop`. An
/// error mid-stream is an `error` event.
fn sse(gen: Generation) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut ready = VecDeque::new();
    let mut start_usage = usage(&gen);
    start_usage["output_tokens"] = json!(0);
    start_usage["input_tokens"] = json!(gen.prepared.prompt_tokens());
    start_usage["cache_read_input_tokens"] = json!(0);
    ready.push_back(event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": message_id(&gen), "type": "message", "role": "assistant", "model": gen.model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    ));
    let state = Streaming {
        gen: Some(gen),
        open: None,
        next_block: 0,
        ready,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            let mut gen = st.gen.take()?;
            match gen.next().await {
                Some(Ok(piece)) => {
                    if !piece.reasoning.is_empty() {
                        let i = st.open("thinking", json!({"type": "thinking", "thinking": ""}));
                        st.delta(
                            i,
                            json!({"type": "thinking_delta", "thinking": piece.reasoning}),
                        );
                    }
                    if !piece.text.is_empty() {
                        let i = st.open("text", json!({"type": "text", "text": ""}));
                        st.delta(i, json!({"type": "text_delta", "text": piece.text}));
                    }
                    for call in &piece.tool_calls {
                        let i = st.open(
                            "tool_use",
                            json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}),
                        );
                        st.delta(
                            i,
                            json!({"type": "input_json_delta", "partial_json": call.arguments}),
                        );
                    }
                    if piece.finish.is_some() {
                        if st.next_block == 0 {
                            // An empty answer still has its (empty) text block.
                            st.open("text", json!({"type": "text", "text": ""}));
                        }
                        st.close();
                        let stop = piece.stop_sequence.clone();
                        st.ready.push_back(event(
                            "message_delta",
                            json!({"type": "message_delta",
                                "delta": {"stop_reason": stop_reason(piece.finish, &stop), "stop_sequence": stop},
                                "usage": usage(&gen)}),
                        ));
                        st.ready
                            .push_back(event("message_stop", json!({"type": "message_stop"})));
                        // Ends after these.
                        continue;
                    }
                    st.gen = Some(gen);
                }
                Some(Err(e)) => st.ready.push_back(event("error", error_body(&e))),
                None => {}
            }
        }
    });
    Sse::new(stream)
}
