//! OpenAI's Responses API, `POST /v1/responses`: whole responses and the streamed event
//! sequence, on the same preprocessing, routing and engines as chat completions.
//!
//! A request is checked against the API's fields (unknown ones, and ones this server cannot
//! honour, get a 400 naming them) and mapped onto a chat request: `instructions` becomes the
//! system message; `input` (a string, or items) becomes messages: `message` items (text
//! content parts), `function_call` items the assistant's tool calls, `function_call_output`
//! items `tool` messages (each must answer a call of the conversation); `tools` (functions),
//! `tool_choice`, `parallel_tool_calls`, `text.format` (structured output) and
//! `max_output_tokens` map to their chat equivalents. `previous_response_id` continues a
//! stored response: its whole conversation (input and output) comes first. Responses are kept
//! in memory (with `store`, the default) for [`STORE_TTL`], at most [`STORE_MAX`] of them,
//! the oldest dropped first; an unknown or expired id is a 400 naming it.
//!
//! The answer's `output` holds a `reasoning` item (with a reasoning parser configured), a
//! `message` item with one `output_text` part, and a `function_call` item per tool call;
//! `status` is `completed`, or `incomplete` with `incomplete_details.reason:
//! "max_output_tokens"`. Streaming sends `response.created`, `response.in_progress`, the
//! items' `output_item.added` / `content_part.added` / `output_text.delta` / `...done` and
//! `function_call_arguments.delta` / `.done` events, then `response.completed` (or
//! `response.incomplete`) with the whole response; every event carries its
//! `sequence_number`. Errors are OpenAI error bodies (an `error` event mid-stream).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{json, Map, Value};

use super::http::{error_response, json_response, start_mapped, with_ids, HttpState};
use super::serving::{ApiError, Generation};
use dynamo_protocols::llm::FinishReason;

/// Responses kept for `previous_response_id`.
pub const STORE_MAX: usize = 1024;
/// How long a stored response can be continued.
pub const STORE_TTL: Duration = Duration::from_secs(3600);

/// Request fields honoured (or identifiers without effect on the output).
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "previous_response_id",
    "stream",
    "stream_options",
    "store",
    "text",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
    "truncation",
    "include",
    "reasoning",
    "background",
    "max_tool_calls",
    "top_logprobs",
    "conversation",
    "prompt",
];

/// Stored conversations by response id (with when they were stored), and the ids oldest
/// first.
type Stored = (HashMap<String, (Instant, Vec<Value>)>, VecDeque<String>);

/// Stored conversations, by response id.
#[derive(Default)]
pub struct ResponseStore {
    inner: Mutex<Stored>,
}

impl ResponseStore {
    fn get(&self, id: &str) -> Option<Vec<Value>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(id)
            .filter(|(at, _)| at.elapsed() < STORE_TTL)
            .map(|(_, m)| m.clone())
    }

    fn put(&self, id: String, messages: Vec<Value>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        while map.len() >= STORE_MAX {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        order.push_back(id.clone());
        map.insert(id, (Instant::now(), messages));
    }
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// Whether `v` has the JSON type field `k` takes (fields handled further on their own).
fn check_type(k: &str, v: &Value) -> Result<(), ApiError> {
    let keys_within = |allowed: &[&str]| {
        v.as_object()
            .is_some_and(|o| o.keys().all(|x| allowed.contains(&x.as_str())))
    };
    let ok = match k {
        "max_output_tokens" | "max_tool_calls" | "top_logprobs" => {
            v.as_i64().is_some_and(|n| n >= 1 || k == "top_logprobs")
        }
        "temperature" | "top_p" => v.is_number(),
        "parallel_tool_calls" | "stream" | "store" | "background" => v.is_boolean(),
        "user"
        | "safety_identifier"
        | "prompt_cache_key"
        | "prompt_cache_retention"
        | "truncation"
        | "service_tier"
        | "previous_response_id"
        | "instructions" => v.is_string(),
        "metadata" => v
            .as_object()
            .is_some_and(|o| o.values().all(Value::is_string)),
        "prompt_cache_options" => v.is_object() && v.as_object().is_some_and(|o| o.is_empty()),
        "stream_options" => keys_within(&["include_obfuscation"]),
        "text" => {
            keys_within(&["format", "verbosity"])
                && v.get("format")
                    .is_none_or(|f| f.get("type").is_some_and(Value::is_string))
                && v.get("verbosity")
                    .is_none_or(|x| x.is_null() || x == "medium")
        }
        "reasoning" => {
            keys_within(&["effort", "summary", "generate_summary"])
                && v.as_object()
                    .is_some_and(|o| o.values().all(Value::is_null))
        }
        "include" => v.is_array(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(bad(
            k,
            format!("{k} = {v} is not a value this server takes"),
        ))
    }
}

/// Text of a message item's content: a string, or `input_text` / `output_text` parts.
fn content_text(content: &Value, p: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    kind => {
                        return Err(bad(
                            &format!("{p}.content[{j}]"),
                            format!(
                                "only text content parts are supported (got {})",
                                kind.unwrap_or("a part without a type")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(
            &format!("{p}.content"),
            "content must be a string or a list of parts",
        )),
    }
}

/// The request mapped onto a chat body: (chat body, the conversation's messages without the
/// instructions (what a continuation starts from), whether it streams, whether to store).
struct Mapped {
    chat: Value,
    history: Vec<Value>,
    stream: bool,
    store: bool,
}

fn to_chat(body: &Value, store: &ResponseStore) -> Result<Mapped, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object", None))?;
    for (k, v) in obj {
        if !FIELDS.contains(&k.as_str()) {
            return Err(bad(
                k,
                format!("unknown parameter {k:?}: this server does not support it"),
            ));
        }
        if v.is_null() {
            continue;
        }
        check_type(k, v)?;
        let refused = match k.as_str() {
            "background" => v.as_bool() == Some(true),
            "conversation" | "prompt" | "max_tool_calls" | "top_logprobs" => !v.is_null(),
            "reasoning" => v.get("effort").is_some_and(|e| !e.is_null()),
            "include" => v.as_array().is_some_and(|a| !a.is_empty()),
            "truncation" => v.as_str().is_some_and(|t| t != "disabled"),
            "service_tier" => v.as_str().is_some_and(|t| t != "auto" && t != "default"),
            _ => false,
        };
        if refused {
            return Err(bad(k, format!("{k} = {v} is not supported by this server")));
        }
    }
    let mut chat = Map::new();
    match obj.get("model") {
        Some(Value::String(m)) => chat.insert("model".into(), json!(m)),
        _ => return Err(bad("model", "model is required (a string)")),
    };
    let mut history = match obj.get("previous_response_id").filter(|v| !v.is_null()) {
        Some(Value::String(id)) => store.get(id).ok_or_else(|| {
            let mut e = bad(
                "previous_response_id",
                format!("previous response {id:?} was not found (unknown, expired after {} s, or more than {STORE_MAX} responses ago)", STORE_TTL.as_secs()),
            );
            e.code = Some("previous_response_not_found");
            e
        })?,
        Some(_) => return Err(bad("previous_response_id", "must be a string")),
        None => Vec::new(),
    };
    let mut call_ids: HashSet<String> = history
        .iter()
        .filter_map(|m| m.get("tool_calls").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_string))
        .collect();
    match obj.get("input") {
        Some(Value::String(s)) => history.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("input[{i}]");
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                match kind {
                    "message" => {
                        let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                        if !["user", "assistant", "system", "developer"].contains(&role) {
                            return Err(bad(
                                &format!("{p}.role"),
                                format!("role {role:?} must be user, assistant, system or developer"),
                            ));
                        }
                        let text = content_text(item.get("content").unwrap_or(&Value::Null), &p)?;
                        history.push(json!({"role": role, "content": text}));
                    }
                    "function_call" => {
                        let (Some(id), Some(name)) = (
                            item.get("call_id").and_then(Value::as_str),
                            item.get("name").and_then(Value::as_str),
                        ) else {
                            return Err(bad(&p, "a function_call item needs call_id and name"));
                        };
                        let args = item.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                        call_ids.insert(id.to_string());
                        let call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}});
                        // Consecutive calls are one assistant turn.
                        match history.last_mut() {
                            Some(last) if last["role"] == "assistant" && last.get("tool_calls").is_some() => {
                                if let Some(a) = last["tool_calls"].as_array_mut() {
                                    a.push(call);
                                }
                            }
                            _ => history.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                        }
                    }
                    "function_call_output" => {
                        let id = item
                            .get("call_id")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad(&p, "a function_call_output item needs call_id"))?;
                        if !call_ids.contains(id) {
                            return Err(bad(
                                &p,
                                format!("function_call_output for {id:?}, which no function_call of this conversation has"),
                            ));
                        }
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v) => content_text(v, &p)?,
                            None => String::new(),
                        };
                        history.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
                    }
                    // Earlier reasoning is not fed back.
                    "reasoning" => {}
                    other => {
                        return Err(bad(
                            &p,
                            format!("input items of type {other:?} are not supported (message, function_call, function_call_output)"),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(bad(
                "input",
                "input is required: a string or a list of items",
            ))
        }
    }
    if history.is_empty() {
        return Err(bad("input", "input must not be empty"));
    }
    let mut messages = Vec::with_capacity(history.len() + 1);
    if let Some(ins) = obj.get("instructions").filter(|v| !v.is_null()) {
        let ins = ins
            .as_str()
            .ok_or_else(|| bad("instructions", "instructions must be a string"))?;
        messages.push(json!({"role": "system", "content": ins}));
    }
    messages.extend(history.iter().cloned());
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| bad("tools", "tools must be a list"))?;
        let mut functions = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let p = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    &p,
                    "only function tools are supported (no built-in tools such as web_search)",
                ));
            }
            let mut f = json!({"name": t.get("name").cloned().unwrap_or(Value::Null)});
            for key in ["description", "parameters", "strict"] {
                if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                    f[key] = v.clone();
                }
            }
            functions.push(json!({"type": "function", "function": f}));
        }
        chat.insert("tools".into(), Value::Array(functions));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) {
        let mapped = match choice {
            Value::String(s) => json!(s),
            v if v.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": v.get("name").cloned().unwrap_or(Value::Null)}})
            }
            v => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "tool_choice {v} is not supported (none, auto, required, or a function)"
                    ),
                ))
            }
        };
        chat.insert("tool_choice".into(), mapped);
    }
    if let Some(format) = obj
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
    {
        let mapped = match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": format.get("name").cloned().unwrap_or(json!("output")),
                "schema": format.get("schema").cloned().unwrap_or(Value::Null),
                "strict": format.get("strict").cloned().unwrap_or(Value::Null)}}),
            _ => format.clone(),
        };
        if format.get("type").and_then(Value::as_str) == Some("json_schema")
            && format.get("schema").is_none()
        {
            return Err(bad("text.format", "a json_schema format needs a schema"));
        }
        chat.insert("response_format".into(), mapped);
    }
    for (from, to) in [
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("user", "user"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    let stream = obj.get("stream") == Some(&Value::Bool(true));
    chat.insert("stream".into(), json!(stream));
    let store = obj.get("store") != Some(&Value::Bool(false));
    Ok(Mapped {
        chat: Value::Object(chat),
        history,
        stream,
        store,
    })
}

/// `POST /v1/responses`.
pub(super) async fn responses(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    let started = start_mapped(&state, req, |body| {
        let mut m = to_chat(body, &state.responses)?;
        let chat = std::mem::take(&mut m.chat);
        Ok((chat, (m, echo_fields(body))))
    })
    .await;
    let (gen, (mapped, echo), request_id) = match started {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let ids = Some((gen.worker, gen.prefill_worker));
    let head = Head {
        id: format!("resp_{}", gen.id),
        created: gen.created,
        model: gen.model.clone(),
        echo,
        history: mapped.history,
        store: mapped.store.then(|| state.clone()),
    };
    let response = if mapped.stream {
        sse(gen, head).into_response()
    } else {
        let mut out = Output::default();
        let mut gen = gen;
        while let Some(piece) = gen.next().await {
            match piece {
                Ok(p) => out.add(&p),
                Err(e) => return error_response(&e),
            }
        }
        let items = head.items(&out);
        json_response(StatusCode::OK, &head.finish(&out, &gen, items))
    };
    with_ids(response, ids, request_id.as_deref())
}

/// The request's settings a response object repeats.
fn echo_fields(body: &Value) -> Value {
    let get = |k: &str, default: Value| {
        body.get(k)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    json!({
        "instructions": get("instructions", Value::Null),
        "max_output_tokens": get("max_output_tokens", Value::Null),
        "metadata": get("metadata", json!({})),
        "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
        "previous_response_id": get("previous_response_id", Value::Null),
        "temperature": get("temperature", json!(1.0)),
        "top_p": get("top_p", json!(1.0)),
        "tool_choice": get("tool_choice", json!("auto")),
        "tools": get("tools", json!([])),
        "text": get("text", json!({"format": {"type": "text"}})),
        "store": get("store", json!(true)),
        "truncation": "disabled",
        "user": get("user", Value::Null),
    })
}

/// What a response is made of so far.
#[derive(Default)]
struct Output {
    text: String,
    reasoning: String,
    calls: Vec<dynamo_preprocessor::tools::ToolCall>,
    finish: Option<FinishReason>,
}

impl Output {
    fn add(&mut self, p: &dynamo_preprocessor::Piece) {
        self.text.push_str(&p.text);
        self.reasoning.push_str(&p.reasoning);
        self.calls.extend(p.tool_calls.iter().cloned());
        if p.finish.is_some() {
            self.finish = p.finish;
        }
    }
}

struct Head {
    id: String,
    created: u64,
    model: String,
    echo: Value,
    history: Vec<Value>,
    /// Where to store the finished response (with `store`).
    store: Option<Arc<HttpState>>,
}

impl Head {
    fn message_id(&self) -> String {
        format!("msg_{}", &self.id[5..])
    }

    fn reasoning_item(&self, text: &str) -> Value {
        json!({"type": "reasoning", "id": format!("rs_{}", &self.id[5..]), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"})
    }

    fn message_item(&self, text: &str, status: &str) -> Value {
        json!({"type": "message", "id": self.message_id(), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    }

    fn call_item(&self, c: &dynamo_preprocessor::tools::ToolCall, status: &str) -> Value {
        json!({"type": "function_call", "id": format!("fc_{}", &c.id[5..]), "call_id": c.id,
            "name": c.name, "arguments": c.arguments, "status": status})
    }

    /// The response object; `gen` gives usage (none while in progress).
    fn object(&self, status: &str, output: Vec<Value>, gen: Option<&Generation>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "error": null,
            "incomplete_details": null,
            "usage": null,
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), self.echo.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        if let Some(g) = gen {
            let u = g.usage();
            let cached = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
            v["usage"] = json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            });
        }
        if status == "incomplete" {
            v["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        v
    }

    fn items(&self, out: &Output) -> Vec<Value> {
        let mut items = Vec::new();
        if !out.reasoning.is_empty() {
            items.push(self.reasoning_item(&out.reasoning));
        }
        if !out.text.is_empty() || out.calls.is_empty() {
            items.push(self.message_item(&out.text, "completed"));
        }
        items.extend(out.calls.iter().map(|c| self.call_item(c, "completed")));
        items
    }

    /// The finished response (with its output `items`), stored for continuation.
    fn finish(&self, out: &Output, gen: &Generation, items: Vec<Value>) -> Value {
        let status = if out.finish == Some(FinishReason::Length) {
            "incomplete"
        } else {
            "completed"
        };
        if let Some(state) = &self.store {
            let mut messages = self.history.clone();
            let mut answer = json!({"role": "assistant", "content": out.text});
            if !out.calls.is_empty() {
                answer["tool_calls"] = out.calls.iter().map(|c| c.to_openai(None)).collect();
            }
            messages.push(answer);
            state.responses.put(self.id.clone(), messages);
        }
        self.object(status, items, Some(gen))
    }
}

/// The streamed response's state.
struct Streaming {
    gen: Option<Generation>,
    head: Head,
    out: Output,
    /// Output items so far (their index is `output_index`), and whether the message item
    /// (its index) is open.
    items: usize,
    /// The items done, in order (the final response's output).
    done: Vec<Value>,
    message: Option<usize>,
    seq: u64,
    ready: VecDeque<Event>,
}

impl Streaming {
    fn send(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.ready
            .push_back(Event::default().event(kind).data(data.to_string()));
    }

    fn open_message(&mut self) -> usize {
        if let Some(i) = self.message {
            return i;
        }
        let i = self.items;
        self.items += 1;
        self.message = Some(i);
        let item = self.head.message_item("", "in_progress");
        let mut item = item;
        item["content"] = json!([]);
        self.send(
            "response.output_item.added",
            json!({"output_index": i, "item": item}),
        );
        let id = self.head.message_id();
        self.send(
            "response.content_part.added",
            json!({"item_id": id, "output_index": i, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        );
        i
    }

    fn close_message(&mut self) {
        let Some(i) = self.message.take() else { return };
        let id = self.head.message_id();
        let text = self.out.text.clone();
        self.send(
            "response.output_text.done",
            json!({"item_id": id, "output_index": i, "content_index": 0, "text": text, "logprobs": []}),
        );
        self.send(
            "response.content_part.done",
            json!({"item_id": id, "output_index": i, "content_index": 0,
                "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
        );
        let item = self.head.message_item(&text, "completed");
        self.done.push(item.clone());
        self.send(
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        );
    }

    fn whole_item(&mut self, item: Value) {
        let i = self.items;
        self.items += 1;
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        self.send(
            "response.output_item.added",
            json!({"output_index": i, "item": added}),
        );
        if item["type"] == "function_call" {
            let id = item["id"].clone();
            let args = item["arguments"].clone();
            self.send(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": i, "delta": args}),
            );
            self.send(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": i, "arguments": args}),
            );
        }
        self.done.push(item.clone());
        self.send(
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        );
    }
}

fn sse(gen: Generation, head: Head) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut st = Streaming {
        gen: Some(gen),
        head,
        out: Output::default(),
        items: 0,
        done: Vec::new(),
        message: None,
        seq: 0,
        ready: VecDeque::new(),
    };
    let start = st.head.object("in_progress", Vec::new(), None);
    st.send("response.created", json!({"response": start.clone()}));
    st.send("response.in_progress", json!({"response": start}));
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            let mut gen = st.gen.take()?;
            match gen.next().await {
                Some(Ok(piece)) => {
                    st.out.add(&piece);
                    if !piece.text.is_empty() {
                        let i = st.open_message();
                        let id = st.head.message_id();
                        st.send(
                            "response.output_text.delta",
                            json!({"item_id": id, "output_index": i, "content_index": 0,
                                "delta": piece.text, "logprobs": []}),
                        );
                    }
                    for call in &piece.tool_calls {
                        st.close_message();
                        let item = st.head.call_item(call, "completed");
                        st.whole_item(item);
                    }
                    if piece.finish.is_some() {
                        // Reasoning comes as one item, at the end.
                        if !st.out.reasoning.is_empty() {
                            let item = st.head.reasoning_item(&st.out.reasoning.clone());
                            st.whole_item(item);
                        }
                        if st.out.text.is_empty() && st.out.calls.is_empty() {
                            st.open_message();
                        }
                        st.close_message();
                        let items = std::mem::take(&mut st.done);
                        let done = st.head.finish(&st.out, &gen, items);
                        let kind = if done["status"] == "incomplete" {
                            "response.incomplete"
                        } else {
                            "response.completed"
                        };
                        st.send(kind, json!({"response": done}));
                        continue;
                    }
                    st.gen = Some(gen);
                }
                Some(Err(e)) => {
                    let b = e.body();
                    st.send(
                        "error",
                        json!({"code": b.error.code, "message": b.error.message, "param": b.error.param}),
                    );
                }
                None => {}
            }
        }
    });
    Sse::new(stream)
}
