//! Between the frontend and the workers: preprocessed requests in, token ids out; and the
//! model card a worker publishes so frontends can serve its model.

use serde::{Deserialize, Serialize};

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// Sampling parameters, already validated by the frontend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// `None` or 0: greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// `None`: no top-k cut.
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`: -100 bans a
    /// token, 100 all but forces it). Engines that cannot apply it refuse the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Return each generated token's log probability and this many of the most likely
    /// alternatives at its position (0: the token's own only); `None`: none. Engines without
    /// a model's logits refuse the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Guided decoding: the output must match this (structured output). Engines without a
    /// model's logits refuse the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided: Option<Box<Guided>>,
}

/// What guided decoding holds a request's output to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Guided {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this JSON Schema (the schema's JSON text). `strict`: objects
    /// without `additionalProperties` allow no other properties (OpenAI's strict mode).
    JsonSchema { schema: String, strict: bool },
    /// Text matching this regular expression, whole.
    Regex { pattern: String },
    /// Exactly one of these strings.
    Choice { choices: Vec<String> },
    /// A grammar in llguidance's Lark dialect (`%json {..}` embeds a JSON Schema): e.g. a
    /// tool call in the model's own call syntax.
    Lark { grammar: String },
}

/// The most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A generated token's log probability, and the most likely tokens at its position.
///
/// The distribution is the model's after `logit_bias` and the penalties, at temperature 1
/// (before temperature, top-k and top-p reshape it for the draw): under greedy decoding the
/// chosen token's logprob equals the first alternative's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// (token, logprob), most likely first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(TokenId, f32)>,
}

/// When an engine stops generating for a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Most tokens to generate (at least 1).
    pub max_tokens: u32,
    /// Stop tokens and EOS are not honoured before this many tokens.
    #[serde(default)]
    pub min_tokens: u32,
    /// Tokens that end generation (the model's EOS ids unless `ignore_eos`, plus the request's).
    #[serde(default)]
    pub stop_token_ids: Vec<TokenId>,
}

/// What a worker's `generate` endpoint takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    pub token_ids: Vec<TokenId>,
    pub sampling: SamplingOptions,
    pub stop: StopConditions,
    /// Set by a disaggregated router: the prompt's KV is computed on a prefill worker and
    /// handed to this (decode) worker. Only decode workers take such requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_prefill: Option<RemotePrefill>,
    /// Set by a router that shares KV across workers: a peer holds a longer leading run of
    /// the prompt's blocks (on its device or host tier) than this worker; fetch them from it
    /// when that beats computing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_prefix: Option<PeerPrefix>,
    /// A migrated request: the last `resumed_tokens` of `token_ids` are what it generated on
    /// a worker that failed (the client has them already). The engine continues after them:
    /// they count as output for penalties, and a seeded or greedy draw continues exactly
    /// (draws depend on the seed and the position). `stop` holds what is left of the budget.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A peer worker that holds the leading `blocks` full blocks of a request's prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPrefix {
    /// The peer's instance id.
    pub worker: u64,
    /// Its KV fetch endpoint (`namespace.component.kv_fetch`).
    pub endpoint: String,
    pub blocks: u32,
}

/// What a worker's `kv_fetch` endpoint takes: write the blocks of the chain `hashes` it holds
/// (device or host tier) from index `from` on, a leading run, into `target`'s first ranges.
/// The answer is one [`KvFetchReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvFetchRequest {
    /// Sequence hashes of the prompt's leading full blocks, from the first.
    pub hashes: Vec<crate::kv::SequenceHash>,
    /// The first block wanted (the ones before it the asking worker holds).
    pub from: u32,
    /// Where the bytes go, one range per wanted block; `None` for a simulated engine (the
    /// transfer's time only).
    #[serde(default)]
    pub target: Option<KvTarget>,
    /// Milliseconds from receipt within which the blocks must be written; past it nothing is
    /// (the asking worker reuses the target's memory after it).
    pub write_within_ms: u64,
}

/// How many blocks a `kv_fetch` wrote: the leading run from `from` that the peer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvFetchReply {
    pub blocks: u32,
}

/// Where a request's prompt is prefilled when not on the worker that decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePrefill {
    /// The prefill worker's instance id.
    pub prefill_worker: u64,
    /// Its prefill endpoint (`namespace.component.prefill`).
    pub endpoint: String,
}

/// What a prefill worker's `prefill` endpoint takes: compute `request`'s prompt and its first
/// token, and write the prompt's full blocks after the first `skip_blocks` into `target`.
/// The answer is one [`EngineOutput`] (the first token, with a finish reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    pub request: PreprocessedRequest,
    /// Leading full blocks of the prompt the decode worker holds already (not sent).
    #[serde(default)]
    pub skip_blocks: u32,
    /// Where the blocks' bytes go; `None` for a simulated engine (no bytes: the transfer's
    /// time is simulated, the decode side imports the blocks' identities only).
    #[serde(default)]
    pub target: Option<KvTarget>,
    /// Milliseconds from receipt within which the blocks must be written; a prefill worker
    /// past it writes nothing (the decode worker reuses the target's memory after it).
    pub write_within_ms: u64,
}

/// A decode worker's memory for one request's blocks: its transfer agent (the transfer
/// library's metadata, msgpack) and one range per block, in block order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTarget {
    #[serde(with = "serde_bytes")]
    pub agent: Vec<u8>,
    pub blocks: Vec<KvRange>,
}

/// A byte range of a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRange {
    pub region: u32,
    pub offset: u64,
    pub len: u64,
}

/// What a worker does with requests (one worker role, three configurations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerKind {
    /// Prefill and decode on the same worker.
    #[default]
    Aggregated,
    /// Only prefills: answers `prefill` requests with the first token and keeps the prompt's
    /// KV cached for a decode worker to fetch. Not listed by frontends as a generate target.
    Prefill,
    /// Decodes requests, including those whose prompt was prefilled elsewhere
    /// ([`PreprocessedRequest::remote_prefill`]).
    Decode,
}

impl WorkerKind {
    /// The key of a worker's discovery metadata that says its kind.
    pub const METADATA_KEY: &'static str = "worker_kind";
    /// The endpoint a prefill worker serves.
    pub const PREFILL_ENDPOINT: &'static str = "prefill";
    /// The endpoint a worker that shares its KV with peers serves ([`KvFetchRequest`]).
    pub const KV_FETCH_ENDPOINT: &'static str = "kv_fetch";

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Aggregated => "aggregated",
            WorkerKind::Prefill => "prefill",
            WorkerKind::Decode => "decode",
        }
    }
}

impl std::str::FromStr for WorkerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aggregated" => Ok(WorkerKind::Aggregated),
            "prefill" => Ok(WorkerKind::Prefill),
            "decode" => Ok(WorkerKind::Decode),
            other => Err(format!(
                "unknown worker kind {other:?}; expected aggregated, prefill or decode"
            )),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token, EOS, or (decided by the frontend) a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The answer is tool calls (decided by the frontend's tool-call parser).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// One streamed piece of a worker's answer. The last one carries `finish_reason`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    pub token_ids: Vec<TokenId>,
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens whose KV was already cached (first output only).
    #[serde(default)]
    pub cached_tokens: Option<u32>,
    /// The prefill worker that computed the prompt, when it was not this one (first output
    /// of a disaggregated request only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_worker: Option<u64>,
    /// With `SamplingOptions::logprobs`: one entry per token of `token_ids`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

/// A file of a model folder, named by its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFile {
    /// File name in the folder, e.g. `tokenizer.json`.
    pub name: String,
    /// XXH3-128 of the content, 32 lowercase hex digits.
    pub hash: String,
    pub size: u64,
}

/// What a worker publishes (in its discovery metadata, under [`ModelCard::METADATA_KEY`]) so
/// a frontend can serve its model: names, limits, and the files to build the preprocessor
/// from, fetched by hash from the worker's [`ModelCard::FILES_ENDPOINT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name clients use (`model` in requests).
    pub name: String,
    /// Context length in tokens (prompt + completion).
    pub context_length: u32,
    /// KV cache block size in tokens.
    pub kv_block_size: u32,
    /// KV cache capacity in blocks.
    pub kv_total_blocks: u64,
    /// `tokenizer.json`, `tokenizer_config.json` and, if present, `generation_config.json`
    /// and `config.json`.
    pub files: Vec<ModelFile>,
}

impl ModelCard {
    /// The key of the card in an instance's discovery metadata.
    pub const METADATA_KEY: &'static str = "model";
    /// The endpoint (on the worker's component) that serves model files by hash.
    pub const FILES_ENDPOINT: &'static str = "model_files";

    /// Whether the card is one a worker could serve: a name, a context and a block size of
    /// at least one token (a router divides by the block size). Readers of discovery leave out
    /// an instance whose card is not.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 1024 {
            return Err(format!("model name of {} bytes", self.name.len()));
        }
        if self.context_length == 0 || self.kv_block_size == 0 {
            return Err(format!(
                "context_length {} and kv_block_size {} must be at least 1",
                self.context_length, self.kv_block_size
            ));
        }
        Ok(())
    }

    /// An identity for the card's content: equal cards build equal preprocessors.
    pub fn content_key(&self) -> String {
        let mut key = format!("{}|{}", self.name, self.context_length);
        for f in &self.files {
            key.push('|');
            key.push_str(&f.hash);
        }
        key
    }
}

/// Ask a worker for one model file by content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRequest {
    pub hash: String,
}

/// One piece of a model file; the pieces concatenate to the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk {
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}
