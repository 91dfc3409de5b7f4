//! Writes a small model folder in the Hugging Face layout, deterministically, so that tests and
//! the quickstart need no download: a byte-level BPE `tokenizer.json` trained on generated
//! English-like text, a ChatML chat template in `tokenizer_config.json`,
//! `generation_config.json` and a Llama `config.json`.
//!
//! The same settings always give byte-identical files (the corpus comes from a fixed-seed
//! generator and BPE training breaks ties deterministically); a test checks it.

use std::path::Path;

use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::{ModelError, CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG};

pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// A ChatML template, in the style of Qwen2.5's: a system message is optional, roles are
/// checked; with `tools`, a system turn lists them and asks for Hermes-style calls
/// (`<tool_call>{"name", "arguments"}</tool_call>`), assistant turns show their calls and tool
/// results come back as `<tool_response>` user turns.
pub const CHAT_TEMPLATE: &str = "{%- if tools %}\n\
{{- '<|im_start|>system\\n' }}\n\
{%- if messages[0]['role'] in ['system', 'developer'] %}\n\
{{- (messages[0]['content'] or '') | trim + '\\n\\n' }}\n\
{%- endif %}\n\
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}\n\
{%- for tool in tools %}\n\
{{- '\\n' + (tool | tojson) }}\n\
{%- endfor %}\n\
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}\n\
{%- endif %}\n\
{%- for message in messages %}\n\
{%- if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}\n\
{{- raise_exception('Unsupported role: ' + message['role']) }}\n\
{%- endif %}\n\
{%- if message['role'] in ['system', 'developer'] and not loop.first %}\n\
{{- raise_exception('A system message must come first') }}\n\
{%- endif %}\n\
{%- if message['role'] in ['system', 'developer'] and tools %}\n\
{%- elif message['role'] == 'tool' %}\n\
{{- '<|im_start|>user\\n<tool_response>\\n' + (message['content'] or '') | trim + '\\n</tool_response><|im_end|>\\n' }}\n\
{%- elif message['role'] == 'assistant' and message['tool_calls'] %}\n\
{{- '<|im_start|>assistant' }}\n\
{%- if message['content'] %}{{- '\\n' + message['content'] | trim }}{%- endif %}\n\
{%- for call in message['tool_calls'] %}\n\
{%- set args = call['function']['arguments'] %}\n\
{{- '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' + (args if args is string else (args | tojson)) + '}\\n</tool_call>' }}\n\
{%- endfor %}\n\
{{- '<|im_end|>\\n' }}\n\
{%- else %}\n\
{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') | trim + '<|im_end|>\\n' }}\n\
{%- endif %}\n\
{%- endfor %}\n\
{%- if add_generation_prompt %}\n\
{{- '<|im_start|>assistant\\n' }}\n\
{%- endif %}";

/// What to generate.
#[derive(Debug, Clone)]
pub struct MakeModelSettings {
    /// Vocabulary size of the tokenizer (at least 512).
    pub vocab_size: usize,
    /// Context length written to `config.json`.
    pub context_length: u32,
    /// Seed of the training corpus.
    pub seed: u64,
}

impl Default for MakeModelSettings {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            context_length: 4096,
            seed: 0x5eed,
        }
    }
}

/// SplitMix64: a tiny deterministic generator (the corpus must not depend on a crate's RNG).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const COMMON: &str = "the of and to in is it that was for on are with as he his they be at one have this from \
or had by word but what some we can out other were all there when up use your how said an each she which do \
their time if will way about many then them write would like so these her long make thing see him two has look \
more day could go come did number sound no most people my over know water than call first who may down side \
been now find any new work part take get place made live where after back little only round man year came show \
every good me give our under name very through just form sentence great think say help low line differ turn \
cause much mean before move right boy old too same tell does set three want air well also play small end put \
home read hand port large spell add even land here must big high such follow act why ask men change went light \
kind off need house picture try us again animal point mother world near build self earth father model server \
token cache request worker router prefill decode latency throughput memory block prefix engine stream batch";

const SYLLABLES: [&str; 48] = [
    "ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "qui", "ban", "ze", "po", "lin", "gar",
    "fe", "nu", "sto", "pra", "chi", "wen", "ol", "ex", "tri", "mon", "har", "is", "ul", "bre",
    "dy", "fan", "gle", "jo", "kro", "lu", "mar", "nes", "or", "pel", "ro", "sim", "tar", "ur",
    "vin", "wa", "yel", "zor", "ac", "em",
];

/// English-like text: common words and generated ones, with Zipf-like frequencies,
/// punctuation, numbers and a little non-ASCII.
fn corpus(seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut words: Vec<String> = COMMON.split_whitespace().map(str::to_string).collect();
    for _ in 0..3000 {
        let n = 1 + rng.below(3);
        let w: String = (0..n)
            .map(|_| SYLLABLES[rng.below(SYLLABLES.len())])
            .collect();
        words.push(w);
    }
    words.extend(["café", "naïve", "日本語", "größe", "ünïcode", "emoji🙂"].map(String::from));
    let mut lines = Vec::new();
    for _ in 0..6000 {
        let mut line = String::new();
        let len = 5 + rng.below(15);
        for i in 0..len {
            // Zipf-ish: squaring a uniform draw favours the front of the list.
            let u = rng.below(1 << 16) as f64 / (1u64 << 16) as f64;
            let w = &words[((u * u) * words.len() as f64) as usize];
            if i == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    line.extend(f.to_uppercase());
                    line.push_str(c.as_str());
                }
            } else {
                line.push(' ');
                line.push_str(w);
            }
            match rng.below(20) {
                0 => line.push(','),
                1 => line.push_str(&format!(" {}", rng.below(2000))),
                _ => {}
            }
        }
        line.push_str([".", "?", "!", ":"][rng.below(4)]);
        lines.push(line);
    }
    lines
}

fn invalid(file: &'static str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid {
        file,
        reason: e.to_string(),
    }
}

/// Trains the tokenizer (a second or so).
pub fn build_tokenizer(s: &MakeModelSettings) -> Result<Tokenizer, ModelError> {
    let specials: Vec<AddedToken> = [BOS, EOS, IM_START, IM_END]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(s.vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let lines = corpus(s.seed);
    tokenizer
        .train(&mut TrainerWrapper::from(trainer), lines.iter())
        .map_err(|e| invalid(TOKENIZER, e))?;
    // Completions get a BOS in front, as Llama tokenizers do; chat prompts get theirs from
    // the template framing instead.
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| invalid(TOKENIZER, "BOS missing after training"))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| invalid(TOKENIZER, e))?
        .special_tokens(vec![(BOS.to_string(), bos_id)])
        .build()
        .map_err(|e| invalid(TOKENIZER, e))?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// Writes the folder (creating it). Returns the vocabulary size.
pub fn make_model(out: &Path, s: &MakeModelSettings) -> Result<usize, ModelError> {
    let io = |path: &Path, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let tokenizer = build_tokenizer(s)?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| invalid(TOKENIZER, e))?;
    let tok_config = json!({
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "model_max_length": s.context_length,
        "add_bos_token": true,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let gen_config = json!({
        "bos_token_id": id(BOS),
        "eos_token_id": [id(EOS), id(IM_END)],
        "temperature": 0.7,
        "top_p": 0.9,
    });
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": s.context_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": id(BOS),
        "eos_token_id": id(EOS),
        "torch_dtype": "float32",
    });
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    for (name, text) in [
        (TOKENIZER, tok_json),
        (TOKENIZER_CONFIG, pretty(&tok_config)),
        (GENERATION_CONFIG, pretty(&gen_config)),
        (CONFIG, pretty(&config)),
    ] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    Ok(vocab)
}
