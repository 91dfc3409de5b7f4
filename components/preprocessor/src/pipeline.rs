//! The request pipeline of one model: OpenAI request in, validated [`Prepared`] request out
//! (chat template applied, prompt tokenized, parameters checked); and per request, an
//! [`OutputProcessor`] that turns the engine's token ids into text with stop handling and exact
//! token counts.
//!
//! Every problem with a request is a [`RequestError`] naming the parameter, never a panic.

use std::sync::Arc;

use dynamo_protocols::llm::{
    EngineOutput, FinishReason, Guided, PreprocessedRequest, SamplingOptions, StopConditions,
    TokenId, MAX_TOP_LOGPROBS,
};
use dynamo_protocols::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationParams, MessageContent, Prompt,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::detok::{ByteLevelTable, Decoder, StopJail, TokenBytes};
use crate::fast_bpe::FastBpe;
use crate::fields::Api;
use crate::model::{
    ModelError, ModelFiles, CHAT_TEMPLATE, CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG,
};
use crate::template::{ChatTemplate, TemplateError};
use crate::tools::{OutputParsers, ReasoningParser, ToolCall, ToolFormat, ToolParser};

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Most sequences (prompts × `n`) one request may ask for (OpenAI's limit on `n`).
pub const MAX_SEQUENCES: usize = 128;
/// Most `logit_bias` entries a request may carry (as OpenAI).
pub const MAX_LOGIT_BIAS: usize = 300;

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A request the pipeline refuses (an HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub message: String,
    /// The offending parameter, as a JSON path (`messages[1].role`).
    pub param: Option<String>,
    /// A machine-readable code where OpenAI defines one (`context_length_exceeded`).
    pub code: Option<&'static str>,
}

impl RequestError {
    pub(crate) fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub(crate) fn unsupported(param: &str, what: &str) -> Self {
        Self::new(
            format!("{what} is not supported by this server"),
            Some(param),
        )
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a Value) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            RequestError::new(e.inner().to_string(), None)
        } else {
            RequestError::new(format!("{path}: {}", e.inner()), Some(&path))
        }
    })
}

/// A validated, tokenized request and what the frontend needs to answer it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub request: PreprocessedRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub stop_strings: Vec<String>,
    /// `nvext.backend_instance_id`: route to this instance.
    pub instance: Option<String>,
    /// Completions with `echo`: the prompt text, sent before the completion.
    pub echo: Option<String>,
    /// Choices per prompt (`n`).
    pub n: u32,
    /// The choice this sequence answers (`choices[].index`): prompt × `n` + its choice.
    pub index: u32,
    /// A completions batch: the prompts after the first, each validated on its own.
    pub rest: Vec<Prepared>,
    /// Chat with tools: the format whose calls are parsed out of the output.
    pub tool_format: Option<ToolFormat>,
    /// Split `<think>` reasoning into `reasoning_content`.
    pub reasoning: bool,
}

impl Prepared {
    pub fn prompt_tokens(&self) -> u32 {
        self.request.token_ids.len() as u32
    }

    /// The sequences this request asks for, in choice order: each prompt `n` times, each a
    /// request of its own with `index` set. A seeded request's choice `i` draws with
    /// `seed + i`, so a batch of prompts gives what separate requests would, and `n` choices
    /// are reproducible.
    pub fn expand(self) -> Vec<Prepared> {
        let n = self.n.max(1);
        let prompts: Vec<Prepared> = std::iter::once(Prepared {
            rest: Vec::new(),
            ..self.clone()
        })
        .chain(self.rest)
        .collect();
        let mut out = Vec::with_capacity(prompts.len() * n as usize);
        for (p, prompt) in prompts.into_iter().enumerate() {
            for i in 0..n {
                let mut one = prompt.clone();
                one.request.sampling.seed =
                    one.request.sampling.seed.map(|s| s.wrapping_add(i as u64));
                one.n = n;
                one.index = p as u32 * n + i;
                out.push(one);
            }
        }
        out
    }

    /// Sequences [`Prepared::expand`] gives.
    pub fn sequences(&self) -> usize {
        (1 + self.rest.len()) * self.n.max(1) as usize
    }
}

fn text_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn token_ids(v: &Value) -> Vec<TokenId> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| vec![n as TokenId]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as TokenId))
            .collect(),
        _ => Vec::new(),
    }
}

/// Tokenizer, chat template and limits of one model.
pub struct Preprocessor {
    name: String,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Each token's bytes, for logprobs.
    token_bytes: Arc<TokenBytes>,
    /// Fast incremental detokenization, for byte-level tokenizers.
    byte_table: Option<Arc<ByteLevelTable>>,
    /// The vocabulary for checking guided-decoding specs, built on first use.
    grammars: std::sync::OnceLock<Result<dynamo_guided::Grammars, String>>,
    /// How tool calls and reasoning are read out of this model's output.
    parsers: OutputParsers,
    /// Exact fast path for prompts, when the tokenizer's configuration allows one.
    fast: Option<FastBpe>,
    template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<TokenId>,
    context_length: u32,
    vocab_size: u32,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("name", &self.name)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl Preprocessor {
    pub fn new(name: &str, files: &ModelFiles) -> Result<Self, ModelError> {
        let tok_bytes = files
            .get(TOKENIZER)
            .ok_or(ModelError::Missing { file: TOKENIZER })?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(tok_bytes).map_err(|e| ModelError::Invalid {
                file: TOKENIZER,
                reason: e.to_string(),
            })?;
        let fast = files
            .json(TOKENIZER)?
            .and_then(|json| FastBpe::from_tokenizer_json(&json));
        let tok_config = files.json(TOKENIZER_CONFIG)?.unwrap_or(Value::Null);
        let template_src = match files.get(CHAT_TEMPLATE) {
            Some(b) => Some(String::from_utf8_lossy(b).into_owned()),
            None => match tok_config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the "default" one, else the first.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            },
        };
        let template = template_src
            .map(|s| ChatTemplate::new(&s))
            .transpose()
            .map_err(|e| ModelError::Invalid {
                file: TOKENIZER_CONFIG,
                reason: e.to_string(),
            })?;
        let bos_token = text_field(&tok_config, "bos_token");
        let eos_token = text_field(&tok_config, "eos_token");
        let mut eos_ids = Vec::new();
        for (file, value) in [
            (GENERATION_CONFIG, files.json(GENERATION_CONFIG)?),
            (CONFIG, files.json(CONFIG)?),
        ] {
            let _ = file;
            if let Some(v) = value.as_ref().and_then(|v| v.get("eos_token_id")) {
                eos_ids.extend(token_ids(v));
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let tokenizer = Arc::new(tokenizer);
        Ok(Self {
            name: name.to_string(),
            vocab_size: tokenizer.get_vocab_size(true) as u32,
            token_bytes: Arc::new(TokenBytes::new(tokenizer.clone())),
            byte_table: ByteLevelTable::of(&tokenizer).map(Arc::new),
            grammars: std::sync::OnceLock::new(),
            parsers: OutputParsers::default(),
            tokenizer,
            fast,
            template,
            bos_token,
            eos_token,
            eos_ids,
            context_length: files.context_length()?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn context_length(&self) -> u32 {
        self.context_length
    }

    pub fn eos_ids(&self) -> &[TokenId] {
        &self.eos_ids
    }

    /// The ordinary (non-special) token ids, as one range: special tokens sit at either end
    /// of the vocabulary in the layouts we know. Simulated engines sample from it.
    pub fn ordinary_tokens(&self) -> std::ops::Range<TokenId> {
        let special: Vec<TokenId> = self
            .tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let half = self.vocab_size / 2;
        let start = special
            .iter()
            .filter(|&&i| i < half)
            .max()
            .map_or(0, |m| m + 1);
        let end = special
            .iter()
            .filter(|&&i| i >= half)
            .min()
            .copied()
            .unwrap_or(self.vocab_size);
        start..end.max(start + 1)
    }

    /// Whether prompts take the fast byte-level BPE path ([`FastBpe`]).
    pub fn has_fast_encoder(&self) -> bool {
        self.fast.is_some()
    }

    pub fn tokenizer(&self) -> &Arc<tokenizers::Tokenizer> {
        &self.tokenizer
    }

    /// Tokenizes `text`; `special` adds the tokenizer's BOS/EOS framing. A text too long for
    /// the context by its bytes alone is refused before it is tokenized (where the tokenizer
    /// bounds the bytes a token stands for).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<TokenId>, RequestError> {
        if let Some(fast) = &self.fast {
            let at_least = text.len() / fast.max_token_bytes();
            let context = self.context_length as usize;
            if at_least >= context {
                return Err(RequestError {
                    message: format!(
                        "this model's maximum context length is {context} tokens; the prompt is at least {at_least} tokens ({} bytes of text, at most {} bytes a token)",
                        text.len(),
                        fast.max_token_bytes()
                    ),
                    param: None,
                    code: Some("context_length_exceeded"),
                });
            }
        }
        if let (false, Some(fast)) = (special, &self.fast) {
            return Ok(fast.encode(text));
        }
        self.tokenizer
            .encode_fast(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| RequestError::new(format!("cannot tokenize the prompt: {e}"), None))
    }

    /// Renders the chat template for `req` (the prompt text, before tokenization).
    pub fn render_chat(&self, req: &ChatCompletionRequest) -> Result<String, RequestError> {
        let template = self.template.as_ref().ok_or_else(|| {
            RequestError::new(
                format!(
                    "model {} has no chat template; use /v1/completions with a prompt",
                    self.name
                ),
                Some("messages"),
            )
        })?;
        if req.messages.is_empty() {
            return Err(RequestError::new(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        let mut messages = req
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        check_tool_results(&messages)?;
        if !template.knows_developer() {
            for m in &mut messages {
                if m["role"] == "developer" {
                    m["role"] = Value::from("system");
                }
            }
        }
        let mut ctx = json!({
            "messages": messages,
            "add_generation_prompt": true,
            "bos_token": self.bos_token.clone().unwrap_or_default(),
            "eos_token": self.eos_token.clone().unwrap_or_default(),
        });
        if let Some(tools) = &req.tools {
            ctx["tools"] = Value::Array(tools.clone());
        }
        if let Some(extra) = &req.chat_template_kwargs {
            for (k, v) in extra {
                ctx[k.as_str()] = v.clone();
            }
        }
        template.render(&ctx).map_err(|e| match e {
            TemplateError::Render(m) => {
                RequestError::new(format!("the chat template failed: {m}"), Some("messages"))
            }
            TemplateError::Compile(m) => RequestError::new(
                format!("the model's chat template does not compile: {m}"),
                None,
            ),
        })
    }

    /// Validates and tokenizes a `/v1/chat/completions` body.
    pub fn chat(&self, body: &Value) -> Result<Prepared, RequestError> {
        require_object(body)?;
        crate::fields::check(crate::fields::Api::Chat, body)?;
        let req: ChatCompletionRequest = parse(body)?;
        let params: GenerationParams = parse(body)?;
        let (tool_format, forced) = self.tool_setup(&req)?;
        let prompt = self.render_chat(&req)?;
        let tokens = self.encode(&prompt, false)?;
        let mut prepared = self.prepare(Api::Chat, tokens, params, None)?;
        if let Some(forced) = forced {
            if prepared.request.sampling.guided.is_some() {
                return Err(RequestError::new(
                    "tool_choice forces a tool call, which cannot be combined with response_format or guided_* (both constrain the output)",
                    Some("tool_choice"),
                ));
            }
            self.check_spec("tool_choice", &forced)?;
            prepared.request.sampling.guided = Some(Box::new(forced));
        }
        prepared.tool_format = tool_format;
        prepared.reasoning = self.parsers.reasoning;
        Ok(prepared)
    }

    /// Validates and tokenizes a `/v1/completions` body.
    pub fn completion(&self, body: &Value) -> Result<Prepared, RequestError> {
        require_object(body)?;
        crate::fields::check(crate::fields::Api::Completions, body)?;
        let req: CompletionRequest = parse(body)?;
        let params: GenerationParams = parse(body)?;
        if req.best_of.is_some_and(|b| b != 1) {
            return Err(RequestError::unsupported("best_of", "best_of other than 1"));
        }
        if req.suffix.is_some() {
            return Err(RequestError::unsupported("suffix", "suffix"));
        }
        let prompts: Vec<(Vec<TokenId>, String)> = match req.prompt {
            Prompt::Text(t) => vec![(self.encode(&t, true)?, t)],
            Prompt::Texts(v) => v
                .into_iter()
                .map(|t| Ok((self.encode(&t, true)?, t)))
                .collect::<Result<_, RequestError>>()?,
            Prompt::Tokens(ids) => vec![(ids, String::new())],
            Prompt::TokenBatches(v) => v.into_iter().map(|ids| (ids, String::new())).collect(),
        };
        if prompts.is_empty() {
            return Err(RequestError::new(
                "prompt is an empty list: send at least one prompt",
                Some("prompt"),
            ));
        }
        let batch = prompts.len() > 1;
        let mut all = Vec::with_capacity(prompts.len());
        for (i, (tokens, text)) in prompts.into_iter().enumerate() {
            let one = self.completion_prompt(tokens, text, req.echo == Some(true), params.clone());
            all.push(one.map_err(|mut e| {
                if batch {
                    e.message = format!("prompt[{i}]: {}", e.message);
                }
                e
            })?);
        }
        let mut first = all.remove(0);
        first.rest = all;
        check_sequences(&first)?;
        Ok(first)
    }

    /// One prompt of a completions request.
    fn completion_prompt(
        &self,
        tokens: Vec<TokenId>,
        text: String,
        echo: bool,
        params: GenerationParams,
    ) -> Result<Prepared, RequestError> {
        if let Some(bad) = tokens.iter().find(|&&t| t >= self.vocab_size) {
            return Err(RequestError::new(
                format!(
                    "prompt token id {bad} is outside the vocabulary (size {})",
                    self.vocab_size
                ),
                Some("prompt"),
            ));
        }
        let echo = if echo {
            Some(if text.is_empty() {
                self.tokenizer.decode(&tokens, true).unwrap_or_default()
            } else {
                text
            })
        } else {
            None
        };
        self.prepare(Api::Completions, tokens, params, echo)
    }

    fn prepare(
        &self,
        api: Api,
        token_ids: Vec<TokenId>,
        p: GenerationParams,
        echo: Option<String>,
    ) -> Result<Prepared, RequestError> {
        if token_ids.is_empty() {
            return Err(RequestError::new("the prompt is empty", Some("prompt")));
        }
        let n = match p.n {
            None => 1,
            Some(n) if (1..=MAX_SEQUENCES as i64).contains(&n) => n as u32,
            Some(n) => {
                return Err(RequestError::new(
                    format!("n is {n}; it must be between 1 and {MAX_SEQUENCES}"),
                    Some("n"),
                ))
            }
        };
        let logprobs = logprobs(api, &p, echo.is_some())?;
        let guided = self.guided(&p)?;
        if guided.is_some() && p.min_tokens.is_some_and(|m| m > 0) {
            return Err(RequestError::new(
                "min_tokens cannot be combined with structured output: the grammar decides where the output ends",
                Some("min_tokens"),
            ));
        }
        check_range("temperature", p.temperature, 0.0, 2.0)?;
        check_range("top_p", p.top_p, f32::MIN_POSITIVE, 1.0)?;
        check_range("presence_penalty", p.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?;
        let top_k = match p.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k.min(u32::MAX as i64) as u32),
            Some(k) => {
                return Err(RequestError::new(
                    format!("top_k is {k}; it must be positive, or -1 to disable"),
                    Some("top_k"),
                ))
            }
        };
        let logit_bias = self.logit_bias(p.logit_bias.as_ref())?;
        let prompt_len = token_ids.len() as u64;
        let context = self.context_length as u64;
        if prompt_len >= context {
            return Err(RequestError {
                message: format!(
                    "this model's maximum context length is {context} tokens; the prompt is {prompt_len} tokens, leaving no room to generate"
                ),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            });
        }
        let (max_param, max_tokens) = match (p.max_completion_tokens, p.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max_tokens {
            None => context - prompt_len,
            Some(m) if m < 1 => {
                return Err(RequestError::new(
                    format!("{max_param} is {m}; it must be at least 1"),
                    Some(max_param),
                ))
            }
            Some(m) if prompt_len + m as u64 > context => {
                return Err(RequestError {
                    message: format!(
                        "this model's maximum context length is {context} tokens; you asked for {} ({prompt_len} in the prompt, {m} to generate)",
                        prompt_len + m as u64
                    ),
                    param: Some(max_param.into()),
                    code: Some("context_length_exceeded"),
                })
            }
            Some(m) => m as u64,
        } as u32;
        let min_tokens = match p.min_tokens {
            None => 0,
            Some(m) if m < 0 || m as u64 > max_tokens as u64 => {
                return Err(RequestError::new(
                    format!(
                        "min_tokens is {m}; it must be between 0 and max_tokens ({max_tokens})"
                    ),
                    Some("min_tokens"),
                ))
            }
            Some(m) => m as u32,
        };
        let stop_strings = p.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop_strings.len() > MAX_STOP_STRINGS {
            return Err(RequestError::new(
                format!(
                    "stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                    stop_strings.len()
                ),
                Some("stop"),
            ));
        }
        if stop_strings.iter().any(String::is_empty) {
            return Err(RequestError::new(
                "stop strings must not be empty",
                Some("stop"),
            ));
        }
        // Under a grammar, EOS is allowed exactly where the output is complete.
        let stop_token_ids = if p.ignore_eos == Some(true) && guided.is_none() {
            Vec::new()
        } else {
            self.eos_ids.clone()
        };
        let stream = p.stream.unwrap_or(false);
        Ok(Prepared {
            request: PreprocessedRequest {
                token_ids,
                sampling: SamplingOptions {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k,
                    seed: p.seed.map(|s| s as u64),
                    presence_penalty: p.presence_penalty,
                    frequency_penalty: p.frequency_penalty,
                    logit_bias,
                    logprobs,
                    guided: guided.map(Box::new),
                },
                stop: StopConditions {
                    max_tokens,
                    min_tokens,
                    stop_token_ids,
                },
                remote_prefill: None,
                peer_prefix: None,
                resumed_tokens: 0,
            },
            stream,
            include_usage: stream && p.stream_options.is_some_and(|o| o.include_usage),
            stop_strings,
            instance: p.nvext.and_then(|x| x.backend_instance_id),
            echo,
            n,
            index: 0,
            rest: Vec::new(),
            tool_format: None,
            reasoning: false,
        })
    }

    /// The request's structured-output spec: `response_format` (`text`, `json_object`,
    /// `json_schema`) or one of the `guided_json`, `guided_regex`, `guided_choice` extensions,
    /// checked by compiling it against this model's vocabulary (a 400 naming the field and
    /// the grammar library's message when it does not compile).
    fn guided(&self, p: &GenerationParams) -> Result<Option<Guided>, RequestError> {
        let mut specs: Vec<(&str, Guided)> = Vec::new();
        let not_null = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
        if let Some(rf) = not_null(&p.response_format) {
            let bad = |what: String| RequestError::new(what, Some("response_format"));
            let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
                bad("response_format must be an object with a string `type`".into())
            })?;
            match kind {
                "text" => {}
                "json_object" => specs.push(("response_format", Guided::JsonObject)),
                "json_schema" => {
                    let js = rf.get("json_schema").ok_or_else(|| {
                        bad("response_format of type json_schema needs a `json_schema` object".into())
                    })?;
                    let schema = js.get("schema").ok_or_else(|| {
                        bad("response_format.json_schema needs a `schema`".into())
                    })?;
                    let strict = match js.get("strict") {
                        None | Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(v) => return Err(bad(format!("response_format.json_schema.strict is {v}; it must be true or false"))),
                    };
                    specs.push((
                        "response_format",
                        Guided::JsonSchema {
                            schema: schema.to_string(),
                            strict,
                        },
                    ));
                }
                other => {
                    return Err(bad(format!(
                        "response_format type {other:?} is not supported: use text, json_object or json_schema"
                    )))
                }
            }
        }
        if let Some(v) = not_null(&p.guided_json) {
            let schema = match v {
                Value::String(s) => s,
                v => v.to_string(),
            };
            specs.push((
                "guided_json",
                Guided::JsonSchema {
                    schema,
                    strict: false,
                },
            ));
        }
        if let Some(v) = not_null(&p.guided_regex) {
            let Value::String(pattern) = v else {
                return Err(RequestError::new(
                    "guided_regex must be a string",
                    Some("guided_regex"),
                ));
            };
            specs.push(("guided_regex", Guided::Regex { pattern }));
        }
        if let Some(v) = not_null(&p.guided_choice) {
            let choices: Option<Vec<String>> = v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect());
            let Some(choices) = choices else {
                return Err(RequestError::new(
                    "guided_choice must be a list of strings",
                    Some("guided_choice"),
                ));
            };
            specs.push(("guided_choice", Guided::Choice { choices }));
        }
        if specs.len() > 1 {
            return Err(RequestError::new(
                format!(
                    "{} and {} both constrain the output: send one",
                    specs[0].0, specs[1].0
                ),
                Some(specs[1].0),
            ));
        }
        let Some((field, spec)) = specs.pop() else {
            return Ok(None);
        };
        self.check_spec(field, &spec)?;
        Ok(Some(spec))
    }

    /// Compiles `spec` against this model's vocabulary: a 400 naming `field` with the
    /// grammar library's message when it does not compile.
    fn check_spec(&self, field: &str, spec: &Guided) -> Result<(), RequestError> {
        let grammars = self
            .grammars
            .get_or_init(|| {
                let json = self.tokenizer.to_string(false).map_err(|e| e.to_string())?;
                dynamo_guided::Grammars::new(
                    json.as_bytes(),
                    self.vocab_size as usize,
                    &self.eos_ids,
                )
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|why| RequestError::new(why.clone(), Some(field)))?;
        grammars
            .compile(spec)
            .map_err(|e| RequestError::new(format!("{field}: {e}"), Some(field)))?;
        Ok(())
    }

    /// Sets how this model's output is parsed for tool calls and reasoning (the frontend's
    /// settings; by default, the tool-call format is recognised from the chat template).
    pub fn set_parsers(&mut self, parsers: OutputParsers) {
        self.parsers = parsers;
    }

    /// The format this model writes tool calls in: the configured one, else the one its chat
    /// template shows.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        self.parsers
            .tool_call_parser
            .or_else(|| self.template.as_ref().and_then(|t| t.tool_format()))
    }

    /// A chat request's tools: checked, and (unless `tool_choice` is `none`) the format to
    /// parse calls out of the output, and the grammar that forces a call for `required` or a
    /// named function.
    fn tool_setup(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<(Option<ToolFormat>, Option<Guided>), RequestError> {
        let tools = match &req.tools {
            Some(t) if !t.is_empty() => crate::tools::check_tools(t)?,
            _ => {
                return match req.tool_choice.as_ref().filter(|c| !c.is_null()) {
                    Some(c) if c.as_str() != Some("none") && c.as_str() != Some("auto") => Err(
                        RequestError::new("tool_choice needs tools", Some("tool_choice")),
                    ),
                    _ => Ok((None, None)),
                };
            }
        };
        let choice = req.tool_choice.as_ref().filter(|c| !c.is_null());
        let named = match choice {
            None => None,
            Some(Value::String(s)) if s == "none" => return Ok((None, None)),
            Some(Value::String(s)) if s == "auto" || s == "required" => None,
            Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => {
                let name = v
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        RequestError::new(
                            "tool_choice {\"type\": \"function\"} needs function.name",
                            Some("tool_choice"),
                        )
                    })?;
                if !tools.iter().any(|(n, _)| n == name) {
                    return Err(RequestError::new(
                        format!("tool_choice names function {name:?}, which is not among the tools"),
                        Some("tool_choice"),
                    ));
                }
                Some(name.to_string())
            }
            Some(v) => {
                return Err(RequestError::new(
                    format!("tool_choice is {v}; it must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ..}}}}"),
                    Some("tool_choice"),
                ))
            }
        };
        let renders = self.template.as_ref().is_some_and(|t| t.renders_tools());
        let format = self.tool_format().filter(|_| renders).ok_or_else(|| {
            RequestError::new(
                format!(
                    "model {}'s chat template does not render tools (or its tool-call format is unknown: start the frontend with --tool-call-parser)",
                    self.name
                ),
                Some("tools"),
            )
        })?;
        let forced =
            (choice.and_then(Value::as_str) == Some("required") || named.is_some()).then(|| {
                crate::tools::forced_grammar(
                    format,
                    &tools,
                    named.as_deref(),
                    req.parallel_tool_calls != Some(false),
                )
            });
        Ok((Some(format), forced))
    }

    /// `logit_bias` as (token, bias) pairs: keys are token ids of this model's vocabulary,
    /// values in [-100, 100], at most [`MAX_LOGIT_BIAS`] entries (OpenAI's limits).
    fn logit_bias(
        &self,
        bias: Option<&std::collections::BTreeMap<String, f64>>,
    ) -> Result<Vec<(TokenId, f32)>, RequestError> {
        let Some(bias) = bias else {
            return Ok(Vec::new());
        };
        if bias.len() > MAX_LOGIT_BIAS {
            return Err(RequestError::new(
                format!(
                    "logit_bias has {} entries; at most {MAX_LOGIT_BIAS} are allowed",
                    bias.len()
                ),
                Some("logit_bias"),
            ));
        }
        let mut out = Vec::with_capacity(bias.len());
        for (key, &value) in bias {
            let token = key
                .parse::<TokenId>()
                .ok()
                .filter(|&t| t < self.vocab_size)
                .ok_or_else(|| {
                    RequestError::new(
                        format!(
                            "logit_bias key {key:?} is not a token id of this model (0 to {})",
                            self.vocab_size.saturating_sub(1)
                        ),
                        Some("logit_bias"),
                    )
                })?;
            if !(-100.0..=100.0).contains(&value) {
                return Err(RequestError::new(
                    format!("logit_bias value {value} for token {token} is outside [-100, 100]"),
                    Some("logit_bias"),
                ));
            }
            out.push((token, value as f32));
        }
        Ok(out)
    }

    /// The output side of one request.
    pub fn output(&self, prepared: &Prepared) -> OutputProcessor {
        OutputProcessor {
            decoder: Decoder::new(
                self.tokenizer.clone(),
                self.byte_table.clone(),
                &prepared.request.token_ids,
            ),
            token_bytes: prepared
                .request
                .sampling
                .logprobs
                .is_some()
                .then(|| self.token_bytes.clone()),
            tools: prepared.tool_format.map(ToolParser::new),
            reasoning: prepared.reasoning.then(ReasoningParser::default),
            called: false,
            jail: StopJail::new(prepared.stop_strings.clone()),
            stop: prepared.request.stop.clone(),
            generated: 0,
            cached_tokens: 0,
            finished: None,
        }
    }
}

fn require_object(body: &Value) -> Result<(), RequestError> {
    if body.is_object() {
        Ok(())
    } else {
        Err(RequestError::new(
            "the request body must be a JSON object",
            None,
        ))
    }
}

/// A request's sequences (prompts × `n`) within [`MAX_SEQUENCES`].
fn check_sequences(p: &Prepared) -> Result<(), RequestError> {
    let n = p.sequences();
    if n > MAX_SEQUENCES {
        return Err(RequestError::new(
            format!(
                "{} prompts × n = {} asks for {n} sequences; at most {MAX_SEQUENCES} per request",
                1 + p.rest.len(),
                p.n
            ),
            Some("n"),
        ));
    }
    Ok(())
}

/// How many alternatives per token a request wants with its logprobs (`None`: no logprobs).
/// Chat: `logprobs: true` and `top_logprobs` (0 to 20, only with `logprobs`); completions:
/// `logprobs: N` (0 to 20; OpenAI allows up to 5, vLLM 20), not with `echo` (the prompt's
/// logprobs are not computed).
fn logprobs(api: Api, p: &GenerationParams, echo: bool) -> Result<Option<u32>, RequestError> {
    let top = |name: &str, n: i64| {
        if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) {
            Ok(n as u32)
        } else {
            Err(RequestError::new(
                format!("{name} is {n}; it must be between 0 and {MAX_TOP_LOGPROBS}"),
                Some(name),
            ))
        }
    };
    let wanted = match api {
        Api::Chat => {
            let on = match &p.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(RequestError::new(
                        format!("logprobs is {v}; in chat it must be true or false (top_logprobs says how many alternatives)"),
                        Some("logprobs"),
                    ))
                }
            };
            match (on, p.top_logprobs) {
                (_, Some(n)) if !on => {
                    top("top_logprobs", n)?;
                    return Err(RequestError::new(
                        "top_logprobs needs logprobs set to true",
                        Some("top_logprobs"),
                    ));
                }
                (true, n) => Some(top("top_logprobs", n.unwrap_or(0))?),
                (false, None) => None,
                (false, Some(_)) => unreachable!("handled above"),
            }
        }
        Api::Completions => match &p.logprobs {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_i64() {
                Some(n) => Some(top("logprobs", n)?),
                None => {
                    return Err(RequestError::new(
                        format!("logprobs is {n}; it must be an integer between 0 and {MAX_TOP_LOGPROBS}"),
                        Some("logprobs"),
                    ))
                }
            },
            Some(v) => {
                return Err(RequestError::new(
                    format!("logprobs is {v}; in completions it must be an integer between 0 and {MAX_TOP_LOGPROBS}"),
                    Some("logprobs"),
                ))
            }
        },
    };
    if wanted.is_some() && echo {
        return Err(RequestError::new(
            "echo with logprobs is not supported (the prompt's logprobs are not computed): drop one of them",
            Some("echo"),
        ));
    }
    Ok(wanted)
}

fn check_range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), RequestError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(RequestError::new(
            format!("{name} is {x}; it must be between {lo} and {hi}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

/// Every `tool` message answers a call of an earlier assistant message (by
/// `tool_call_id`): a result for a call that was never made is the client's error.
fn check_tool_results(messages: &[Value]) -> Result<(), RequestError> {
    let mut calls = std::collections::HashSet::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(list) = m.get("tool_calls").and_then(Value::as_array) {
            calls.extend(
                list.iter()
                    .filter_map(|c| c.get("id").and_then(Value::as_str)),
            );
        }
        if m["role"] == "tool" {
            let p = format!("messages[{i}].tool_call_id");
            match m.get("tool_call_id").and_then(Value::as_str) {
                Some(id) if calls.contains(id) => {}
                Some(id) => {
                    return Err(RequestError::new(
                        format!(
                            "{p} is {id:?}, which no earlier assistant message's tool_calls has"
                        ),
                        Some(&p),
                    ))
                }
                None => {
                    return Err(RequestError::new(
                        "a tool message needs the tool_call_id of the call it answers",
                        Some(&p),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn message_value(i: usize, m: &ChatMessage) -> Result<Value, RequestError> {
    if !ROLES.contains(&m.role.as_str()) {
        let p = format!("messages[{i}].role");
        return Err(RequestError::new(
            format!(
                "{p} is {:?}; it must be one of {}",
                m.role,
                ROLES.join(", ")
            ),
            Some(&p),
        ));
    }
    let content = match &m.content {
        None => Value::Null,
        Some(MessageContent::Text(t)) => Value::String(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => text.push_str(t),
                    _ => {
                        let p = format!("messages[{i}].content[{j}]");
                        return Err(RequestError::new(
                            format!(
                                "{p}: only text content parts are supported (got type {:?})",
                                part.kind
                            ),
                            Some(&p),
                        ));
                    }
                }
            }
            Value::String(text)
        }
    };
    let mut v = json!({ "role": m.role, "content": content });
    if let Some(n) = &m.name {
        v["name"] = json!(n);
    }
    if let Some(t) = &m.tool_calls {
        v["tool_calls"] = t.clone();
    }
    if let Some(t) = &m.tool_call_id {
        v["tool_call_id"] = json!(t);
    }
    Ok(v)
}

/// Text released by one engine output.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    pub text: String,
    /// Set once: the sequence is over (later outputs are ignored).
    pub finish: Option<FinishReason>,
    /// With logprobs asked for: one entry per token of this output that became text (a
    /// stop token does not), in order. Text held back for a stop string or an incomplete
    /// character may come in a later piece than its tokens' entries.
    pub logprobs: Vec<LogprobEntry>,
    /// Reasoning text (`<think>`), with a reasoning parser configured.
    pub reasoning: String,
    /// Tool calls parsed out of the output (chat with tools).
    pub tool_calls: Vec<ToolCall>,
    /// With a `Stop` finish: the stop string that ended the sequence (none for a stop
    /// token).
    pub stop_sequence: Option<String>,
}

/// A token with its bytes and log probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: TokenId,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

impl TokenInfo {
    /// The token as text (bytes that are part of a character show as U+FFFD).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A generated token's logprob and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub token: TokenInfo,
    /// Most likely first.
    pub top: Vec<TokenInfo>,
}

/// Turns one request's engine outputs into text: incremental detokenization, stop tokens
/// (after `min_tokens`), stop strings, `max_tokens`, and the token count for usage.
pub struct OutputProcessor {
    decoder: Decoder,
    /// Set when the request asked for logprobs.
    token_bytes: Option<Arc<TokenBytes>>,
    tools: Option<ToolParser>,
    reasoning: Option<ReasoningParser>,
    /// A tool call was released.
    called: bool,
    jail: StopJail,
    stop: StopConditions,
    generated: u32,
    cached_tokens: u32,
    finished: Option<FinishReason>,
}

impl OutputProcessor {
    pub fn process(&mut self, out: &EngineOutput) -> Piece {
        let mut piece = self.text(out);
        self.parse(&mut piece);
        piece
    }

    /// Splits the piece's text into reasoning, content and tool calls (what the parsers
    /// hold back comes in a later piece; all of it by the last).
    fn parse(&mut self, piece: &mut Piece) {
        if self.tools.is_none() && self.reasoning.is_none() {
            return;
        }
        let text = std::mem::take(&mut piece.text);
        let (mut reasoning, mut content) = match &mut self.reasoning {
            Some(r) => r.push(&text),
            None => (String::new(), text),
        };
        if piece.finish.is_some() {
            if let Some(r) = &mut self.reasoning {
                reasoning.push_str(&r.finish());
            }
        }
        if let Some(t) = &mut self.tools {
            let mut parsed = t.push(&content);
            if piece.finish.is_some() {
                let rest = t.finish();
                parsed.content.push_str(&rest.content);
                parsed.calls.extend(rest.calls);
            }
            content = parsed.content;
            self.called |= !parsed.calls.is_empty();
            piece.tool_calls = parsed.calls;
        }
        piece.text = content;
        piece.reasoning = reasoning;
        if self.called && piece.finish == Some(FinishReason::Stop) {
            piece.finish = Some(FinishReason::ToolCalls);
            self.finished = piece.finish;
        }
    }

    fn text(&mut self, out: &EngineOutput) -> Piece {
        let mut piece = self.text_inner(out);
        if piece.finish.is_some() {
            piece.stop_sequence = self.jail.matched().map(str::to_string);
        }
        piece
    }

    fn text_inner(&mut self, out: &EngineOutput) -> Piece {
        let mut piece = Piece::default();
        if self.finished.is_some() {
            return piece;
        }
        if let Some(c) = out.cached_tokens {
            self.cached_tokens = c;
        }
        for (j, &t) in out.token_ids.iter().enumerate() {
            self.generated += 1;
            if self.generated > self.stop.min_tokens && self.stop.stop_token_ids.contains(&t) {
                return self.finish(piece, FinishReason::Stop);
            }
            if let (Some(tb), Some(lp)) = (&self.token_bytes, out.logprobs.get(j)) {
                let info = |id: TokenId, logprob: f32| TokenInfo {
                    id,
                    bytes: tb.bytes(id),
                    logprob,
                };
                piece.logprobs.push(LogprobEntry {
                    token: info(t, lp.logprob),
                    top: lp.top.iter().map(|&(id, l)| info(id, l)).collect(),
                });
            }
            let text = self.decoder.push(t);
            let released = self.jail.push(&text);
            piece.text.push_str(&released.text);
            if released.stopped {
                self.finished = Some(FinishReason::Stop);
                piece.finish = self.finished;
                return piece;
            }
            if self.generated >= self.stop.max_tokens {
                return self.finish(piece, FinishReason::Length);
            }
        }
        match out.finish_reason {
            Some(reason) => self.finish(piece, reason),
            None => piece,
        }
    }

    /// Ends the sequence: releases held text, unless it completes a stop string.
    fn finish(&mut self, mut piece: Piece, reason: FinishReason) -> Piece {
        let tail = self.decoder.flush();
        let released = self.jail.push(&tail);
        piece.text.push_str(&released.text);
        let reason = if released.stopped {
            FinishReason::Stop
        } else {
            piece.text.push_str(&self.jail.flush());
            reason
        };
        self.finished = Some(reason);
        piece.finish = Some(reason);
        piece
    }

    /// Ends a stream that stopped without a finish reason (the worker went away).
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    pub fn completion_tokens(&self) -> u32 {
        self.generated
    }

    pub fn cached_tokens(&self) -> u32 {
        self.cached_tokens
    }
}
