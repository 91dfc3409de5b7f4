use super::*;

/// A byte-level tokenizer: one token per byte (GPT-2's byte characters), a few merged
/// tokens, and `<eos>` (id 260).
fn tokenizer_json() -> Vec<u8> {
    let mut vocab = serde_json::Map::new();
    let mut n = 0u32;
    let mut chars = Vec::new();
    for b in 0..=255u32 {
        let printable = (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        chars.push(c);
        vocab.insert(c.to_string(), json!(b));
    }
    for (i, w) in ["\"a", "tr", "ue", "{\""].iter().enumerate() {
        vocab.insert(w.to_string(), json!(256 + i));
    }
    serde_json::to_vec(&json!({
        "version": "1.0",
        "added_tokens": [{"id": 260, "content": "<eos>", "special": true,
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
            "merges": []}
    }))
    .unwrap()
}

const EOS: TokenId = 260;
const VOCAB: usize = 264;

fn grammars() -> Grammars {
    Grammars::new(&tokenizer_json(), VOCAB, &[EOS]).unwrap()
}

fn bytes_of(t: TokenId) -> Vec<u8> {
    match t {
        0..=255 => vec![t as u8],
        256 => b"\"a".to_vec(),
        257 => b"tr".to_vec(),
        258 => b"ue".to_vec(),
        259 => b"{\"".to_vec(),
        _ => Vec::new(),
    }
}

/// Generates under `spec` with random logits (a model with random weights) until EOS or
/// `max` tokens: the text, and whether it ended with EOS.
fn generate(spec: &Guided, seed: u64, max: usize) -> (String, bool) {
    let g = grammars();
    let mut c = g.compile(spec).unwrap();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::new();
    let mut text = Vec::new();
    for _ in 0..max {
        c.advance(&out).unwrap();
        let mut logits: Vec<f32> = (0..VOCAB)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 1000) as f32 / 100.0
            })
            .collect();
        // Random models like to stay inside strings: make closing them unlikely, not banned.
        logits[b'"' as usize] -= 3.0;
        c.apply(&mut logits).unwrap();
        let best = (0..VOCAB)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as TokenId;
        assert!(logits[best as usize].is_finite(), "no token allowed");
        if best == EOS {
            return (String::from_utf8_lossy(&text).into_owned(), true);
        }
        out.push(best);
        text.extend(bytes_of(best));
    }
    (String::from_utf8_lossy(&text).into_owned(), false)
}

#[test]
fn random_logits_give_valid_json_of_the_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "ok": {"type": "boolean"},
            "size": {"enum": ["S", "M", "L"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}
        },
        "required": ["name", "ok", "size", "tags"]
    });
    let spec = Guided::JsonSchema {
        schema: schema.to_string(),
        strict: true,
    };
    for seed in 0..20 {
        let (text, ended) = generate(&spec, seed, 200);
        assert!(ended, "seed {seed}: no EOS after {text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!(o["ok"].is_boolean(), "{text}");
        assert!(
            ["S", "M", "L"].contains(&o["size"].as_str().unwrap()),
            "{text}"
        );
        assert!(o["tags"].as_array().unwrap().len() <= 2, "{text}");
    }
}

#[test]
fn json_object_regex_and_choice() {
    let (text, ended) = generate(
        &Guided::Regex {
            pattern: "[0-9]{3}-[a-z]{2}".into(),
        },
        1,
        50,
    );
    assert!(ended, "{text}");
    assert_eq!(text.len(), 6, "{text}");
    assert!(text.as_bytes()[3] == b'-', "{text}");
    let choices = vec!["yes".to_string(), "no (maybe)".to_string()];
    for seed in 0..5 {
        let (text, ended) = generate(
            &Guided::Choice {
                choices: choices.clone(),
            },
            seed,
            50,
        );
        assert!(ended && choices.contains(&text), "{text}");
    }
    // Any JSON object: starts as one, and is one whenever it ends.
    for seed in 0..5 {
        let (text, ended) = generate(&Guided::JsonObject, seed, 400);
        assert!(text.starts_with('{'), "{text}");
        if ended {
            assert!(serde_json::from_str::<Value>(&text).unwrap().is_object());
        }
    }
}

#[test]
fn bad_specs_are_grammar_errors() {
    let g = grammars();
    for (spec, needle) in [
        (
            Guided::JsonSchema {
                schema: "{not json".into(),
                strict: false,
            },
            "not JSON",
        ),
        (
            Guided::JsonSchema {
                schema: "[1, 2]".into(),
                strict: false,
            },
            "JSON object",
        ),
        (
            Guided::JsonSchema {
                schema: json!({"type": "integer", "minimum": 5, "maximum": 2}).to_string(),
                strict: false,
            },
            "compile",
        ),
        (
            Guided::Regex {
                pattern: "(unclosed".into(),
            },
            "compile",
        ),
        (Guided::Choice { choices: vec![] }, "non-empty"),
        (
            Guided::JsonSchema {
                schema: format!("{{\"description\": \"{}\"}}", "x".repeat(MAX_SPEC_BYTES)),
                strict: false,
            },
            "at most",
        ),
    ] {
        match g.compile(&spec) {
            Err(GuidedError::Grammar(m)) => assert!(m.contains(needle), "{spec:?}: {m}"),
            other => panic!("{spec:?}: {other:?}"),
        }
    }
    assert!(matches!(
        Grammars::new(b"{}", VOCAB, &[EOS]),
        Err(GuidedError::Vocabulary(_))
    ));
    assert!(matches!(
        Grammars::new(&tokenizer_json(), VOCAB, &[]),
        Err(GuidedError::Vocabulary(_))
    ));
}

#[test]
fn strict_closes_objects_and_a_migrated_sequence_catches_up() {
    let mut s =
        json!({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}});
    close_objects(&mut s, 0);
    assert_eq!(s["additionalProperties"], false);
    assert_eq!(s["properties"]["a"]["additionalProperties"], false);
    // Tokens generated before (e.g. on another worker) are consumed at once; a token the
    // grammar does not allow is an error, not a silent skip.
    let g = grammars();
    let mut c = g
        .compile(&Guided::Choice {
            choices: vec!["true".into()],
        })
        .unwrap();
    c.advance(&[257]).unwrap();
    let mut logits = vec![0.0; VOCAB];
    c.apply(&mut logits).unwrap();
    assert!(logits[258].is_finite() && logits[b'x' as usize] == f32::NEG_INFINITY);
    assert!(matches!(
        c.advance(&[257, b'x' as u32]),
        Err(GuidedError::Failed(_))
    ));
}
