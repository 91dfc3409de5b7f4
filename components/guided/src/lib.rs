//! Guided decoding: a request's output held to a grammar (structured output), token by token.
//!
//! [`Grammars`] is one model's vocabulary as [llguidance](https://github.com/guidance-ai/llguidance)
//! sees it (each token's bytes, from the model's `tokenizer.json`, and its end-of-sequence ids),
//! built once per model. [`Grammars::compile`] turns a request's [`Guided`] spec into a
//! [`Constraint`]: a JSON object, JSON valid against a JSON Schema, a regular expression, or one
//! of a list of strings. Before each draw, [`Constraint::apply`] sets the logits of the tokens
//! the grammar does not allow next to minus infinity (only an end-of-sequence token once the
//! grammar is complete); after it, the sampled token advances the grammar
//! ([`Constraint::advance`], which also catches up on tokens generated elsewhere, e.g. before a
//! migration).
//!
//! JSON is generated compact (no whitespace between tokens of the JSON: llguidance's
//! `whitespace_flexible: false`), so a model cannot wander off into endless whitespace; a
//! schema's own `x-guidance` options override that. A spec that does not compile, or is larger
//! than [`MAX_SPEC_BYTES`], is a [`GuidedError::Grammar`]: the client's error, with
//! llguidance's message. llguidance bounds the work of compiling a grammar and of each mask
//! (its `ParserLimits`), so no schema can hang a worker.

use std::time::{Duration, Instant};

use dynamo_protocols::llm::{Guided, TokenId};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// The most bytes a spec (schema, pattern or choices) may have.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuidedError {
    /// The model's vocabulary cannot be read for guided decoding.
    #[error("guided decoding is unavailable for this model: {0}")]
    Vocabulary(String),
    /// The spec is not a grammar this server can enforce (the client's error).
    #[error("{0}")]
    Grammar(String),
    /// A token the grammar does not allow reached it, or the grammar failed while running.
    #[error("guided decoding failed: {0}")]
    Failed(String),
}

/// A model's vocabulary for guided decoding: compiles specs into [`Constraint`]s.
pub struct Grammars {
    factory: ParserFactory,
    eos: std::sync::Arc<[TokenId]>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// From the model's `tokenizer.json`, the number of logits per position (which may
    /// exceed the tokenizer's vocabulary: the extra ids are never allowed) and the ids that
    /// end a sequence (at least one).
    pub fn new(
        tokenizer_json: &[u8],
        vocab_size: usize,
        eos: &[TokenId],
    ) -> Result<Self, GuidedError> {
        let bad = |e: String| GuidedError::Vocabulary(e);
        let json: Value = serde_json::from_slice(tokenizer_json)
            .map_err(|e| bad(format!("tokenizer.json is not JSON: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| bad(format!("cannot read the tokens' bytes: {e}")))?;
        if words.len() > vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
                words.len()
            )));
        }
        words.resize(vocab_size, Vec::new());
        let (&first, rest) = eos
            .split_first()
            .ok_or_else(|| bad("the model names no end-of-sequence token".into()))?;
        if let Some(t) = eos.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(bad(format!(
                "end-of-sequence token {t} is outside the vocabulary"
            )));
        }
        let mut trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, first), &words);
        if !rest.is_empty() {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = std::sync::Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: eos.into(),
        })
    }

    /// Compiles `spec` (the client's error when it does not compile).
    pub fn compile(&self, spec: &Guided) -> Result<Constraint, GuidedError> {
        let grammar = grammar(spec)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GuidedError::Grammar(format!("the grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuidedError::Grammar(format!(
                "the grammar does not compile: {e}"
            )));
        }
        Ok(Constraint {
            matcher,
            consumed: 0,
            spent: Duration::ZERO,
            eos: self.eos.clone(),
        })
    }
}

/// The llguidance grammar of a spec.
fn grammar(spec: &Guided) -> Result<TopLevelGrammar, GuidedError> {
    let size = match spec {
        Guided::JsonObject => 0,
        Guided::JsonSchema { schema, .. } => schema.len(),
        Guided::Regex { pattern } => pattern.len(),
        Guided::Choice { choices } => choices.iter().map(String::len).sum(),
        Guided::Lark { grammar } => grammar.len(),
    };
    if size > MAX_SPEC_BYTES {
        return Err(GuidedError::Grammar(format!(
            "the spec is {size} bytes; at most {MAX_SPEC_BYTES} are allowed"
        )));
    }
    Ok(match spec {
        Guided::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
        Guided::JsonSchema { schema, strict } => {
            let mut schema: Value = serde_json::from_str(schema)
                .map_err(|e| GuidedError::Grammar(format!("the schema is not JSON: {e}")))?;
            if !schema.is_object() && !schema.is_boolean() {
                return Err(GuidedError::Grammar(
                    "the schema must be a JSON object".into(),
                ));
            }
            if *strict {
                close_objects(&mut schema, 0);
            }
            TopLevelGrammar::from_json_schema(compact(schema))
        }
        Guided::Regex { pattern } => {
            if pattern.is_empty() {
                return Err(GuidedError::Grammar("the pattern is empty".into()));
            }
            TopLevelGrammar::from_regex(pattern)
        }
        Guided::Choice { choices } => {
            if choices.is_empty() || choices.iter().any(String::is_empty) {
                return Err(GuidedError::Grammar(
                    "choices must be a non-empty list of non-empty strings".into(),
                ));
            }
            let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
            TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
        }
        Guided::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
    })
}

/// Compact JSON unless the schema sets its own llguidance options.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// OpenAI's strict mode: an object schema that does not say otherwise allows no properties
/// beyond those it lists. Applied through nested schemas (bounded depth).
fn close_objects(schema: &mut Value, depth: usize) {
    if depth > 64 {
        return;
    }
    match schema {
        Value::Object(o) => {
            let is_object = o.get("type").is_some_and(|t| {
                t == "object"
                    || t.as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "object"))
            }) || o.contains_key("properties");
            if is_object && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, v) in o.iter_mut() {
                if key != "enum" && key != "const" && key != "default" && key != "examples" {
                    close_objects(v, depth + 1);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| close_objects(v, depth + 1)),
        _ => {}
    }
}

/// `s` as a regular expression matching exactly it.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    /// Generated tokens the grammar has consumed.
    consumed: usize,
    /// Time spent computing masks and advancing.
    spent: Duration,
    eos: std::sync::Arc<[TokenId]>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Advances over the sequence's generated tokens it has not seen yet (`generated`: all
    /// of them, from the first).
    pub fn advance(&mut self, generated: &[TokenId]) -> Result<(), GuidedError> {
        let started = Instant::now();
        let new = generated.get(self.consumed..).unwrap_or_default();
        for &t in new {
            self.matcher
                .consume_token(t)
                .map_err(|e| GuidedError::Failed(format!("token {t}: {e}")))?;
        }
        self.consumed = generated.len();
        self.spent += started.elapsed();
        Ok(())
    }

    /// Sets the logits of every token the grammar does not allow next to minus infinity.
    /// Once the grammar is complete, only end-of-sequence tokens remain.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), GuidedError> {
        let started = Instant::now();
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GuidedError::Failed(e.to_string()))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= mask.len() || !mask.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.spent += started.elapsed();
        Ok(())
    }

    /// Whether `token`, drawn under this constraint's last mask, ends the sequence: an
    /// end-of-sequence token is allowed only where the grammar is complete. The sequence must
    /// end there whatever its stop tokens (e.g. with `ignore_eos`): the grammar allows nothing
    /// after it.
    pub fn ends_with(&self, token: TokenId) -> bool {
        self.eos.contains(&token)
    }

    /// Time spent on this sequence's grammar so far (masks and advancing).
    pub fn spent(&self) -> Duration {
        self.spent
    }
}

#[cfg(test)]
mod tests;
