//! Tool calls and reasoning in a model's output.
//!
//! A chat request with `tools` has them rendered by the model's chat template; the model
//! answers a call in its own format, which [`ToolParser`] turns back into OpenAI `tool_calls`,
//! as the text streams:
//! - [`ToolFormat::Hermes`] (Hermes, Qwen 2.5/3): `<tool_call>{"name": .., "arguments": {..}}</tool_call>`,
//!   one block per call;
//! - [`ToolFormat::Llama3Json`] (Llama 3.1+): the whole answer is `{"name": .., "parameters": {..}}`
//!   (after an optional `<|python_tag|>`), or several separated by `;`;
//! - [`ToolFormat::Mistral`]: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`.
//!
//! Text that is not a call is content; text that could still become the start of a call is
//! held back until it cannot (as stop strings are). A call block whose JSON does not parse is
//! left as content, never dropped.
//!
//! `tool_choice: "required"` or a named function is enforced by guided decoding:
//! [`forced_grammar`] builds a grammar of the format's call syntax whose arguments are valid
//! against the function's `parameters` schema.
//!
//! [`ReasoningParser`] splits `<think>...</think>` (DeepSeek-R1, Qwen3 and others) into
//! `reasoning_content` when the frontend is configured for it.

use dynamo_protocols::llm::Guided;
use serde_json::{json, Value};

use crate::pipeline::RequestError;

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "hermes" | "qwen" => Some(Self::Hermes),
            "llama3_json" | "llama3" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            _ => None,
        }
    }

    /// The format a chat template renders tool calls in, recognised by its markers.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }
}

/// How a frontend reads tool calls and reasoning out of models' output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputParsers {
    /// The tool-call format of every model (unset: recognised from each chat template).
    pub tool_call_parser: Option<ToolFormat>,
    /// Split `<think>...</think>` into `reasoning_content`.
    pub reasoning: bool,
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolCall {
    fn new(name: String, arguments: &Value) -> Self {
        Self {
            id: format!("call_{}", uuid_like()),
            name,
            arguments: arguments.to_string(),
        }
    }

    /// The OpenAI `tool_calls[]` entry (`index` for a streamed delta).
    pub fn to_openai(&self, index: Option<usize>) -> Value {
        let mut v = json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:016x}{:08x}",
        t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        n as u32
    )
}

/// What the parser releases.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Streaming tool-call parser for one sequence.
#[derive(Debug)]
pub struct ToolParser {
    format: ToolFormat,
    /// Text not yet released (a possible start of a call, or a call being read).
    held: String,
    /// Inside a call block (Hermes), or past the format's opening (Mistral, Llama 3).
    in_call: bool,
    /// Llama 3: whether anything but whitespace came yet (a call must open the answer).
    started: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            held: String::new(),
            in_call: false,
            started: false,
        }
    }

    /// Adds generated text; returns what is settled.
    pub fn push(&mut self, text: &str) -> Parsed {
        self.held.push_str(text);
        let mut out = Parsed::default();
        match self.format {
            ToolFormat::Hermes => self.hermes(&mut out),
            ToolFormat::Mistral => self.opening(MISTRAL_OPEN, &mut out),
            ToolFormat::Llama3Json => self.llama(&mut out),
        }
        out
    }

    /// The sequence ended: the calls of what is held, or it as content.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        let held = std::mem::take(&mut self.held);
        match self.format {
            ToolFormat::Hermes if self.in_call => {
                // An unclosed block: a call if its JSON is whole, else content.
                match hermes_call(&held) {
                    Some(c) => out.calls.push(c),
                    None => out.content = format!("{HERMES_OPEN}{held}"),
                }
            }
            ToolFormat::Mistral if self.in_call => match list_calls(&held, "arguments") {
                Some(calls) => out.calls = calls,
                None => out.content = format!("{MISTRAL_OPEN}{held}"),
            },
            ToolFormat::Llama3Json if self.in_call => {
                let body = held.trim().trim_start_matches(PYTHON_TAG);
                let calls: Option<Vec<ToolCall>> = body
                    .split(';')
                    .map(|part| object_call(part.trim(), "parameters"))
                    .collect();
                match calls {
                    Some(c) if !c.is_empty() => out.calls = c,
                    _ => out.content = held,
                }
            }
            _ => out.content = held,
        }
        self.in_call = false;
        out
    }

    fn hermes(&mut self, out: &mut Parsed) {
        loop {
            if self.in_call {
                let Some(end) = self.held.find(HERMES_CLOSE) else {
                    return;
                };
                let body = self.held[..end].to_string();
                self.held.drain(..end + HERMES_CLOSE.len());
                self.in_call = false;
                match hermes_call(&body) {
                    Some(c) => out.calls.push(c),
                    None => {
                        out.content
                            .push_str(&format!("{HERMES_OPEN}{body}{HERMES_CLOSE}"));
                    }
                }
                continue;
            }
            self.opening(HERMES_OPEN, out);
            if !self.in_call {
                return;
            }
        }
    }

    /// Content until `marker`, which opens a call (Mistral: everything after it is the
    /// call list, parsed at the end); text that could be the marker's start is held.
    fn opening(&mut self, marker: &str, out: &mut Parsed) {
        if self.in_call {
            return;
        }
        if let Some(start) = self.held.find(marker) {
            out.content.push_str(&self.held[..start]);
            self.held.drain(..start + marker.len());
            self.in_call = true;
            return;
        }
        let keep = partial_suffix(&self.held, marker);
        let release = self.held.len() - keep;
        out.content.push_str(&self.held[..release]);
        self.held.drain(..release);
    }

    /// Llama 3: an answer that opens with `{` (or the python tag) is a call, read whole.
    fn llama(&mut self, out: &mut Parsed) {
        if self.in_call {
            return;
        }
        if !self.started {
            let t = self.held.trim_start();
            if t.is_empty() || PYTHON_TAG.starts_with(t) {
                return;
            }
            self.started = true;
            if t.starts_with('{') || t.starts_with(PYTHON_TAG) {
                self.in_call = true;
                return;
            }
        }
        out.content.push_str(&self.held);
        self.held.clear();
    }
}

/// The longest suffix of `text` that is a proper prefix of `marker` (bytes to hold back).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

fn hermes_call(body: &str) -> Option<ToolCall> {
    object_call(body.trim(), "arguments")
}

/// `{"name": .., "<args>": {..}}` as a call (`arguments` may also be JSON text).
fn object_call(text: &str, args: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(text).ok()?;
    call_of(&v, args)
}

fn call_of(v: &Value, args: &str) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get(args).or_else(|| v.get("arguments")) {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
    };
    Some(ToolCall::new(name, &arguments))
}

fn list_calls(text: &str, args: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let calls: Option<Vec<ToolCall>> = match &v {
        Value::Array(a) => a.iter().map(|c| call_of(c, args)).collect(),
        obj => call_of(obj, args).map(|c| vec![c]),
    };
    calls.filter(|c| !c.is_empty())
}

/// A request's tools, checked: each a `function` with a valid name and, if given, an object
/// `parameters` schema. Returns (name, parameters schema) per tool.
pub fn check_tools(tools: &[Value]) -> Result<Vec<(String, Value)>, RequestError> {
    let mut out: Vec<(String, Value)> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let bad = |what: String| RequestError::new(format!("{p}: {what}"), Some(&p));
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("only tools of type \"function\" are supported".into()));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| bad("a function tool needs a `function` object".into()))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(bad(format!(
                "function name {name:?} must be 1-64 letters, digits, underscores or dashes"
            )));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(bad(format!("function {name:?} is defined twice")));
        }
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p) if p.is_object() => p.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "function.parameters must be a JSON Schema object, not {other}"
                )))
            }
        };
        out.push((name.to_string(), params));
    }
    Ok(out)
}

/// The grammar that makes the model call a tool in `format`: one of `tools` (or only
/// `named`), arguments valid against its parameters; with `parallel`, one or more calls.
pub fn forced_grammar(
    format: ToolFormat,
    tools: &[(String, Value)],
    named: Option<&str>,
    parallel: bool,
) -> Guided {
    let key = if format == ToolFormat::Llama3Json {
        "parameters"
    } else {
        "arguments"
    };
    let one = |name: &str, params: &Value| {
        json!({
            "type": "object",
            "properties": {"name": {"const": name}, key: params},
            "required": ["name", key],
            "additionalProperties": false,
        })
    };
    let choices: Vec<Value> = tools
        .iter()
        .filter(|(n, _)| named.is_none_or(|want| want == n))
        .map(|(n, p)| one(n, p))
        .collect();
    let call = if choices.len() == 1 {
        choices[0].clone()
    } else {
        json!({"anyOf": choices})
    };
    let compact = json!({"whitespace_flexible": false});
    let grammar = match format {
        ToolFormat::Hermes => {
            let mut call = call;
            call["x-guidance"] = compact;
            let repeat = if parallel { " (\"\\n\" block)*" } else { "" };
            format!(
                "start: block{repeat}\nblock: \"{HERMES_OPEN}\\n\" obj \"\\n{HERMES_CLOSE}\"\nobj: %json {call}\n"
            )
        }
        ToolFormat::Mistral => {
            let mut list = json!({"type": "array", "items": call, "minItems": 1});
            if !parallel {
                list["maxItems"] = json!(1);
            }
            list["x-guidance"] = compact;
            format!("start: \"{MISTRAL_OPEN}\" list\nlist: %json {list}\n")
        }
        ToolFormat::Llama3Json => {
            let mut call = call;
            call["x-guidance"] = compact;
            format!("start: obj\nobj: %json {call}\n")
        }
    };
    Guided::Lark { grammar }
}

/// Splits reasoning (`<think>...</think>`) from the answer, as the text streams. A model
/// whose template opens the think block itself (the output starts inside it) is handled:
/// text before a `</think>` is reasoning whether or not `<think>` came first.
#[derive(Debug, Default)]
pub struct ReasoningParser {
    held: String,
    /// The `<think>` marker was seen (and dropped).
    opened: bool,
    /// Past `</think>`: everything is content.
    done: bool,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

impl ReasoningParser {
    /// (reasoning, content) released by `text`.
    pub fn push(&mut self, text: &str) -> (String, String) {
        if self.done {
            return (String::new(), text.to_string());
        }
        self.held.push_str(text);
        if !self.opened {
            if let Some(at) = self.held.find(THINK_OPEN) {
                self.held.replace_range(at..at + THINK_OPEN.len(), "");
                self.opened = true;
            }
        }
        if let Some(end) = self.held.find(THINK_CLOSE) {
            let reasoning = self.held[..end].to_string();
            let content = self.held[end + THINK_CLOSE.len()..]
                .trim_start()
                .to_string();
            self.held.clear();
            self.done = true;
            return (reasoning, content);
        }
        let mut keep = partial_suffix(&self.held, THINK_CLOSE);
        if !self.opened {
            keep = keep.max(partial_suffix(&self.held, THINK_OPEN));
        }
        let release = self.held.len() - keep;
        (self.held.drain(..release).collect(), String::new())
    }

    /// The end: what is held is reasoning (the block never closed).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(format: ToolFormat, pieces: &[&str]) -> (String, Vec<(String, Value)>) {
        let mut p = ToolParser::new(format);
        let (mut content, mut calls) = (String::new(), Vec::new());
        for piece in pieces {
            let o = p.push(piece);
            content.push_str(&o.content);
            calls.extend(o.calls);
        }
        let o = p.finish();
        content.push_str(&o.content);
        calls.extend(o.calls);
        let calls = calls
            .into_iter()
            .map(|c| (c.name, serde_json::from_str(&c.arguments).unwrap()))
            .collect();
        (content, calls)
    }

    #[test]
    fn hermes_calls_split_over_pieces() {
        let (content, calls) = stream(
            ToolFormat::Hermes,
            &[
                "Sure. <to",
                "ol_call>\n{\"name\": \"get\", \"argu",
                "ments\": {\"city\": \"Oslo\"}}\n</tool",
                "_call>\n<tool_call>{\"name\": \"b\", \"arguments\": \"{}\"}</tool_call>",
            ],
        );
        assert_eq!(content.trim(), "Sure.");
        assert_eq!(
            calls,
            vec![
                ("get".into(), json!({"city": "Oslo"})),
                ("b".into(), json!({}))
            ]
        );
        // A false start is content; a broken block stays content, not dropped.
        let (content, calls) = stream(
            ToolFormat::Hermes,
            &["a <tool", "box> <tool_call>{bad</tool_call>"],
        );
        assert_eq!(content, "a <toolbox> <tool_call>{bad</tool_call>");
        assert!(calls.is_empty());
    }

    #[test]
    fn llama3_and_mistral() {
        let (content, calls) = stream(
            ToolFormat::Llama3Json,
            &[
                " <|python",
                "_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}",
            ],
        );
        assert_eq!(
            (content.as_str(), calls),
            ("", vec![("f".into(), json!({"x": 1}))])
        );
        let (content, calls) = stream(ToolFormat::Llama3Json, &["Hello {there}"]);
        assert_eq!((content.as_str(), calls.len()), ("Hello {there}", 0));
        let (content, calls) = stream(
            ToolFormat::Mistral,
            &["ok [TOOL_", "CALLS] [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"y\": true}}]"],
        );
        assert_eq!(content, "ok ");
        assert_eq!(
            calls,
            vec![("a".into(), json!({})), ("b".into(), json!({"y": true}))]
        );
    }

    #[test]
    fn reasoning_is_split_from_content() {
        let mut r = ReasoningParser::default();
        let mut got = (String::new(), String::new());
        for piece in ["<think>let me", " see</th", "ink>\n\nThe answer", " is 4."] {
            let (a, b) = r.push(piece);
            got.0.push_str(&a);
            got.1.push_str(&b);
        }
        assert_eq!(got, ("let me see".into(), "The answer is 4.".into()));
        // A template that opens the block itself: the output starts inside it.
        let mut r = ReasoningParser::default();
        assert_eq!(r.push("hmm</think>ok"), ("hmm".into(), "ok".into()));
    }

    #[test]
    fn tools_are_checked() {
        let ok = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        assert_eq!(
            check_tools(ok.as_array().unwrap()).unwrap()[0].0,
            "get_weather"
        );
        for (bad, needle) in [
            (json!([{"type": "retrieval"}]), "function"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "letters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                "JSON Schema",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                "twice",
            ),
        ] {
            let e = check_tools(bad.as_array().unwrap()).unwrap_err();
            assert!(e.message.contains(needle), "{e:?}");
            assert!(e.param.as_deref().unwrap().starts_with("tools["));
        }
    }
}
