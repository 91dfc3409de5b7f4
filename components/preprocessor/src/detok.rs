//! Turning generated token ids into text, one piece at a time.
//!
//! [`Decoder`]: incremental detokenization. Decoding each token alone breaks multi-byte
//! characters (byte-level BPE splits them over tokens) and words whose spacing depends on their
//! neighbours (SentencePiece). Instead it keeps two offsets into the token list: text is
//! released only when decoding `tokens[prefix..]` yields more than `tokens[prefix..read]` and
//! does not end in an incomplete character (U+FFFD). The window starts with the last few
//! prompt tokens so that the first generated word gets its leading space right.
//!
//! [`StopJail`]: stop strings. Text that could still be the start of a stop string is held
//! back; once a stop string appears, the text before it is released and the rest discarded.

use std::collections::HashMap;
use std::sync::Arc;

use dynamo_protocols::llm::TokenId;

/// How many prompt tokens seed the decoding window.
const CONTEXT_TOKENS: usize = 5;

/// Every token's bytes, for a tokenizer whose decoder is byte-level alone (GPT-2, Llama 3,
/// Qwen): decoding ids (special tokens skipped) is then joining their bytes and reading them
/// as UTF-8, lossily, which is what `tokenizers` does after building a string per token and
/// mapping it back char by char. A streamed token is decoded twice over a window of a few
/// tokens; from this table that costs a few copies instead of the library's allocations.
pub struct ByteLevelTable {
    bytes: Vec<u8>,
    /// Token `id`'s bytes are `bytes[ends[id - 1]..ends[id]]` (from 0 for id 0); special
    /// tokens have none.
    ends: Vec<u32>,
}

impl ByteLevelTable {
    /// The table of `tokenizer`, when its decoder is byte-level alone (other decoders strip,
    /// replace or join pieces in ways a table cannot follow).
    pub fn of(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let byte_of = byte_level_chars(tokenizer)?;
        // The model's ids are dense from 0; added tokens may lie past them.
        let n = tokenizer
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .fold(tokenizer.get_vocab_size(false), |n, id| {
                n.max(id as usize + 1)
            });
        let added = tokenizer.get_added_vocabulary();
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(n);
        for id in 0..n as u32 {
            if let Some(token) = tokenizer.id_to_token(id) {
                if !added.is_special_token(&token) {
                    bytes.extend(byte_level_bytes(token, &byte_of));
                }
            }
            ends.push(u32::try_from(bytes.len()).ok()?);
        }
        Some(Self { bytes, ends })
    }

    fn token(&self, id: TokenId) -> &[u8] {
        let Some(&end) = self.ends.get(id as usize) else {
            return &[];
        };
        let start = match id {
            0 => 0,
            _ => self.ends[id as usize - 1],
        };
        &self.bytes[start as usize..end as usize]
    }

    /// `ids` as `tokenizers` decodes them with special tokens skipped.
    pub fn decode(&self, ids: &[TokenId]) -> String {
        let mut out = Vec::with_capacity(ids.len() * 8);
        for &id in ids {
            out.extend_from_slice(self.token(id));
        }
        match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// GPT-2's table inverted (character -> byte), when `tokenizer`'s decoder is byte-level alone.
fn byte_level_chars(tokenizer: &tokenizers::Tokenizer) -> Option<HashMap<char, u8>> {
    matches!(
        tokenizer.get_decoder(),
        Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
    )
    .then(|| {
        crate::fast_bpe::byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect()
    })
}

/// A token's bytes as the byte-level decoder reads it: a token all of whose characters map to
/// bytes is those bytes; any other (an added token's plain text) is its UTF-8.
fn byte_level_bytes(token: String, byte_of: &HashMap<char, u8>) -> Vec<u8> {
    token
        .chars()
        .map(|c| byte_of.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.into_bytes())
}

/// Incremental detokenizer for one sequence.
pub struct Decoder {
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// The tokenizer's byte table, when it has one.
    table: Option<Arc<ByteLevelTable>>,
    tokens: Vec<TokenId>,
    prefix: usize,
    read: usize,
}

impl Decoder {
    pub fn new(
        tokenizer: Arc<tokenizers::Tokenizer>,
        table: Option<Arc<ByteLevelTable>>,
        prompt: &[TokenId],
    ) -> Self {
        let tokens = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read = tokens.len();
        Self {
            tokenizer,
            table,
            tokens,
            prefix: 0,
            read,
        }
    }

    fn decode(&self, range: std::ops::Range<usize>) -> String {
        if let Some(table) = &self.table {
            return table.decode(&self.tokens[range]);
        }
        // Ids come from our own engine, checked against the vocabulary by the preprocessor;
        // an unknown id decodes to nothing rather than failing the stream.
        self.tokenizer
            .decode(&self.tokens[range], true)
            .unwrap_or_default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, token: TokenId) -> String {
        self.tokens.push(token);
        let before = self.decode(self.prefix..self.read);
        let after = self.decode(self.prefix..self.tokens.len());
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            // `after` extends `before` except in rare normalisation cases; cut on a character
            // boundary either way.
            let cut = if after.starts_with(&before) {
                before.len()
            } else {
                common_prefix_len(&before, &after)
            };
            self.prefix = self.read;
            self.read = self.tokens.len();
            after[cut..].to_string()
        } else {
            String::new()
        }
    }

    /// Text held back at the end of the stream (an incomplete character decodes lossily).
    pub fn flush(&mut self) -> String {
        if self.read == self.tokens.len() {
            return String::new();
        }
        let before = self.decode(self.prefix..self.read);
        let after = self.decode(self.prefix..self.tokens.len());
        self.read = self.tokens.len();
        let cut = common_prefix_len(&before, &after);
        after[cut..].to_string()
    }
}

/// Each token's own bytes, for logprobs (`bytes`, and `token` as their lossy UTF-8): a
/// byte-level BPE token's exact bytes (which may be part of a character), a SentencePiece
/// token's text with `▁` as a space and `<0xNN>` as its byte, an added token's content.
pub struct TokenBytes {
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Byte-level decoding: character -> byte (GPT-2's table, inverted).
    byte_level: Option<HashMap<char, u8>>,
}

impl TokenBytes {
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>) -> Self {
        let byte_level = byte_level_chars(&tokenizer);
        Self {
            tokenizer,
            byte_level,
        }
    }

    pub fn bytes(&self, id: TokenId) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(table) = &self.byte_level {
            return byte_level_bytes(piece, table);
        }
        if let Some(hex) = piece
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
        {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// Holds back text that may be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopJail {
    stops: Vec<String>,
    held: String,
    /// The stop string that ended the sequence.
    matched: Option<String>,
}

/// What [`StopJail::push`] releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string matched: `text` ends just before it and the sequence is over.
    pub stopped: bool,
}

impl StopJail {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            matched: None,
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // Earliest complete match wins. Released text never holds a stop's start, so any
        // match begins inside `held`.
        if let Some((pos, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, _)| *p)
        {
            let text = self.held[..pos].to_string();
            self.matched = Some(stop.clone());
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_string();
        self.held.drain(..keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// The stop string that ended the sequence, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// The held text, when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn jail_all(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut jail = StopJail::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = jail.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&jail.flush());
        (out, false)
    }

    #[test]
    fn stop_split_over_pieces_is_removed() {
        assert_eq!(
            jail_all(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn false_start_is_released() {
        let mut jail = StopJail::new(vec!["STOP".into()]);
        assert_eq!(jail.push("x ST").text, "x ");
        let r = jail.push("ART");
        assert_eq!((r.text.as_str(), r.stopped), ("START", false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(jail_all(&["bb", "a"], &["xxbba"]), ("xx".into(), true));
    }

    proptest! {
        /// Whatever the cut into pieces, the output is the text up to the first stop string
        /// (or all of it), the same as on the whole text at once.
        #[test]
        fn jail_equals_whole_text_search(text in "[ab ]{0,40}", cuts in proptest::collection::vec(0usize..40, 0..8)) {
            let stops = ["ab a", "bb"];
            let expected = match stops.iter().filter_map(|s| text.find(s)).min() {
                Some(p) => (text[..p].to_string(), true),
                None => (text.clone(), false),
            };
            let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c < text.len()).collect();
            points.sort();
            points.dedup();
            let mut pieces = Vec::new();
            let mut last = 0;
            for p in points { pieces.push(&text[last..p]); last = p; }
            pieces.push(&text[last..]);
            prop_assert_eq!(jail_all(&stops, &pieces), expected);
        }
    }
}
