//! A fast encoder for byte-level BPE tokenizers (the GPT-2 family layout), used for prompts on
//! the request path; the `tokenizers` crate stays the reference and handles everything else.
//!
//! `tokenizers` builds a normalized string with per-byte alignments for every piece of text,
//! which is most of its cost on long prompts. Without offsets that work is unnecessary: this
//! encoder splits out added tokens (two leftmost-longest passes, non-normalized then normalized,
//! as `tokenizers` does), splits the rest with the GPT-2 pattern, maps bytes to their tokens and
//! applies the merges by rank, with a bounded cache of word encodings.
//!
//! The GPT-2 pattern ends in `\s+(?!\S)|\s+`; the lookahead needs a backtracking engine. Here the
//! `regex` crate matches the pattern without that branch, and a whitespace run followed by more
//! text gives back its last character, which is exactly what the lookahead does.
//!
//! [`FastBpe::from_tokenizer_json`] accepts only the configurations it reproduces exactly (no
//! normalizer, a `ByteLevel` pre-tokenizer with the default regex and no prefix space, plain BPE
//! without dropout or byte fallback, added tokens without strip or word-boundary rules) and
//! returns `None` otherwise. A property test checks equality with `tokenizers` on random text.

use std::collections::HashMap;
use std::sync::Mutex;

use aho_corasick::{AhoCorasick, MatchKind};
use dynamo_protocols::llm::TokenId;
use serde_json::Value;

const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
/// Cached words before the cache is cleared (bounds memory on adversarial input).
const CACHE_WORDS: usize = 65_536;
/// Words longer than this (in bytes) are not cached.
const CACHE_WORD_BYTES: usize = 64;

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100...
pub(crate) fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Word bytes -> their token ids.
type WordCache = HashMap<Box<[u8]>, Box<[TokenId]>>;

struct Added {
    matcher: AhoCorasick,
    ids: Vec<TokenId>,
}

impl Added {
    fn new(tokens: Vec<(String, TokenId)>) -> Option<Option<Self>> {
        if tokens.is_empty() {
            return Some(None);
        }
        let (patterns, ids): (Vec<String>, Vec<TokenId>) = tokens.into_iter().unzip();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .ok()?;
        Some(Some(Self { matcher, ids }))
    }
}

pub struct FastBpe {
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(TokenId, TokenId), (u32, TokenId)>,
    byte_ids: [TokenId; 256],
    /// Byte-level spelling -> id, for `ignore_merges` models.
    whole_words: Option<HashMap<String, TokenId>>,
    special: Option<Added>,
    normal: Option<Added>,
    split: regex::Regex,
    chars: [char; 256],
    cache: Mutex<WordCache>,
    /// The most bytes of text one token stands for.
    max_token_bytes: usize,
}

fn merge_pair(m: &Value) -> Option<(String, String)> {
    match m {
        Value::String(s) => {
            let (a, b) = s.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        }
        Value::Array(v) if v.len() == 2 => Some((v[0].as_str()?.into(), v[1].as_str()?.into())),
        _ => None,
    }
}

fn empty_or_null(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl FastBpe {
    /// Builds the encoder for a `tokenizer.json`, or `None` if its configuration is not one
    /// this encoder reproduces exactly.
    pub fn from_tokenizer_json(json: &Value) -> Option<Self> {
        if !json.get("normalizer").is_none_or(Value::is_null) {
            return None;
        }
        let pre = json.get("pre_tokenizer")?;
        let is_default_byte_level = pre.get("type")?.as_str()? == "ByteLevel"
            && pre.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
            && pre
                .get("use_regex")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        if !is_default_byte_level {
            return None;
        }
        let model = json.get("model")?;
        if model.get("type")?.as_str()? != "BPE"
            || !model.get("dropout").is_none_or(Value::is_null)
            || model
                .get("byte_fallback")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            || !empty_or_null(model.get("continuing_subword_prefix"))
            || !empty_or_null(model.get("end_of_word_suffix"))
        {
            return None;
        }
        let vocab: HashMap<String, TokenId> = model
            .get("vocab")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_u64()? as TokenId)))
            .collect::<Option<_>>()?;
        let mut merges = HashMap::new();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = merge_pair(m)?;
            let merged = vocab.get(&format!("{a}{b}"))?;
            let key = (*vocab.get(&a)?, *vocab.get(&b)?);
            merges.entry(key).or_insert((rank as u32, *merged));
        }
        let chars = byte_chars();
        let mut byte_ids = [0; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *vocab.get(&c.to_string())?;
        }
        let (mut special, mut normal) = (Vec::new(), Vec::new());
        for t in json.get("added_tokens")?.as_array()? {
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            if flag("single_word") || flag("lstrip") || flag("rstrip") {
                return None;
            }
            let entry = (
                t.get("content")?.as_str()?.to_string(),
                t.get("id")?.as_u64()? as TokenId,
            );
            if flag("normalized") {
                normal.push(entry);
            } else {
                special.push(entry);
            }
        }
        // Byte-level spellings: one character per byte of text.
        let max_token_bytes = vocab
            .keys()
            .map(|k| k.chars().count())
            .chain(special.iter().chain(&normal).map(|(c, _)| c.len()))
            .max()
            .unwrap_or(1)
            .max(1);
        let ignore_merges = model
            .get("ignore_merges")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Some(Self {
            merges,
            byte_ids,
            whole_words: ignore_merges.then_some(vocab),
            special: Added::new(special)?,
            normal: Added::new(normal)?,
            split: regex::Regex::new(PATTERN).ok()?,
            chars,
            cache: Mutex::new(HashMap::new()),
            max_token_bytes,
        })
    }

    /// The most bytes of text one token stands for: a text of `n` bytes is at least
    /// `n / max_token_bytes` tokens (no normalizer changes its bytes on this path).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Token ids of `text`, without the tokenizer's special-token framing
    /// (`add_special_tokens = false`).
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.split_added(
            text,
            self.special.as_ref(),
            &mut |piece, out| {
                self.split_added(
                    piece,
                    self.normal.as_ref(),
                    &mut |p, out| self.encode_plain(p, out),
                    out,
                )
            },
            &mut out,
        );
        out
    }

    fn split_added(
        &self,
        text: &str,
        added: Option<&Added>,
        rest: &mut dyn FnMut(&str, &mut Vec<TokenId>),
        out: &mut Vec<TokenId>,
    ) {
        let Some(added) = added else {
            return rest(text, out);
        };
        let mut last = 0;
        for m in added.matcher.find_iter(text) {
            if m.start() > last {
                rest(&text[last..m.start()], out);
            }
            out.push(added.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        if last < text.len() {
            rest(&text[last..], out);
        }
    }

    /// Pre-tokenizes and encodes text that holds no added tokens.
    fn encode_plain(&self, text: &str, out: &mut Vec<TokenId>) {
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.split.find_at(text, pos) else {
                break;
            };
            let mut end = m.end();
            let word = m.as_str();
            // `\s+(?!\S)`: a whitespace run followed by text leaves its last character to it.
            if end < text.len() && word.chars().all(char::is_whitespace) {
                let mut chars = word.char_indices();
                if let (Some(_), Some((last_start, _))) = (chars.nth(1), word.char_indices().last())
                {
                    end = m.start() + last_start;
                }
            }
            self.encode_word(&text.as_bytes()[m.start()..end], out);
            pos = end;
        }
    }

    fn encode_word(&self, word: &[u8], out: &mut Vec<TokenId>) {
        let cacheable = word.len() <= CACHE_WORD_BYTES;
        if cacheable {
            if let Ok(cache) = self.cache.lock() {
                if let Some(ids) = cache.get(word) {
                    out.extend_from_slice(ids);
                    return;
                }
            }
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        if cacheable {
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_WORDS {
                    cache.clear();
                }
                cache.insert(word.into(), ids.into_boxed_slice());
            }
        }
    }

    fn bpe(&self, word: &[u8]) -> Vec<TokenId> {
        if let Some(vocab) = &self.whole_words {
            let spelled: String = word.iter().map(|&b| self.chars[b as usize]).collect();
            if let Some(&id) = vocab.get(&spelled) {
                return vec![id];
            }
        }
        let mut ids: Vec<TokenId> = word.iter().map(|&b| self.byte_ids[b as usize]).collect();
        // Merge the lowest-ranked adjacent pair (leftmost on ties) until none applies.
        loop {
            let best = ids
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, id)| (rank, i, id))
                })
                .min_by_key(|&(rank, i, _)| (rank, i));
            let Some((_, i, merged)) = best else {
                return ids;
            };
            ids[i] = merged;
            ids.remove(i + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::make_model::{build_tokenizer, MakeModelSettings};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn pair() -> &'static (tokenizers::Tokenizer, FastBpe) {
        static P: OnceLock<(tokenizers::Tokenizer, FastBpe)> = OnceLock::new();
        P.get_or_init(|| {
            let tok = build_tokenizer(&MakeModelSettings::default()).unwrap();
            let json: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
            let fast =
                FastBpe::from_tokenizer_json(&json).expect("the generated tokenizer is supported");
            (tok, fast)
        })
    }

    fn same(text: &str) {
        let (tok, fast) = pair();
        let want = tok.encode_fast(text, false).unwrap().get_ids().to_vec();
        assert_eq!(fast.encode(text), want, "text {text:?}");
    }

    #[test]
    fn matches_tokenizers_on_hand_picked_text() {
        for t in [
            "",
            " ",
            "  ",
            "\n",
            "a  b",
            "a \n b",
            "end   ",
            "tabs\t\tx",
            " \u{3000}x",
            "it's they're I'll",
            "<|im_start|>user\nHello<|im_end|>\n",
            "x<|im_end|>y",
            "1234 56.7,8",
            "café 日本語 🙂🙂",
            "   leading",
            "trailing\n\n",
            "a\r\nb",
            "’quote’",
            "emoji🙂text",
        ] {
            same(t);
        }
    }

    #[test]
    fn unsupported_configurations_are_refused() {
        let (tok, _) = pair();
        let mut json: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        json["normalizer"] = serde_json::json!({"type": "NFC"});
        assert!(FastBpe::from_tokenizer_json(&json).is_none());
    }

    proptest! {
        #[test]
        fn matches_tokenizers_on_random_text(parts in proptest::collection::vec(prop::sample::select(vec![
            "a", "Zq", "the", " the", " ", "  ", "\n", "\t", "\r\n", "'s", "'", "'ll", "é", "日", "🙂",
            "1", "23", ".", ",!", "<|im_start|>", "<|im_end|>", "<s>", "server", " worker", "\u{a0}", "ß",
        ]), 0..24)) {
            same(&parts.concat());
        }
    }
}
