//! The preprocessor on a generated model folder: template, tokenization, validation,
//! incremental detokenization and stop handling, as a frontend uses them.

use std::sync::{Arc, OnceLock};

use dynamo_preprocessor::detok::{ByteLevelTable, Decoder};
use dynamo_preprocessor::make_model::{build_tokenizer, make_model, MakeModelSettings, IM_END};
use dynamo_preprocessor::{ModelFolder, Preprocessor, RequestError};
use dynamo_protocols::llm::{EngineOutput, FinishReason};
use serde_json::{json, Value};

fn model() -> &'static (tempfile::TempDir, Preprocessor) {
    static M: OnceLock<(tempfile::TempDir, Preprocessor)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        make_model(dir.path(), &MakeModelSettings::default()).unwrap();
        let folder = ModelFolder::load(dir.path()).unwrap();
        let pre = Preprocessor::new("tiny", folder.files()).unwrap();
        (dir, pre)
    })
}

fn pre() -> &'static Preprocessor {
    &model().1
}

fn chat_err(body: Value) -> RequestError {
    pre().chat(&body).unwrap_err()
}

#[test]
fn generated_folder_is_deterministic_with_a_real_vocabulary() {
    let a = build_tokenizer(&MakeModelSettings::default()).unwrap();
    let b = build_tokenizer(&MakeModelSettings::default()).unwrap();
    assert!(
        a.get_vocab_size(true) >= 4096,
        "vocab {}",
        a.get_vocab_size(true)
    );
    assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
    // Common words are single tokens; text round-trips.
    let enc = a.encode(" the of and", false).unwrap();
    assert_eq!(enc.get_ids().len(), 3);
    assert_eq!(pre().context_length(), 4096);
    assert!(!pre().eos_ids().is_empty());
    assert!(pre().has_fast_encoder());
}

#[test]
fn chat_template_frames_messages_and_tokenizes() {
    let p = pre()
        .chat(&json!({"model": "tiny", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]}
        ], "max_tokens": 5, "stop": "x", "stream": true, "stream_options": {"include_usage": true}}))
        .unwrap();
    let text = pre()
        .tokenizer()
        .decode(&p.request.token_ids, false)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(p.request.stop.max_tokens, 5);
    assert_eq!(p.stop_strings, vec!["x".to_string()]);
    assert!(p.stream && p.include_usage);
    let im_end = pre().tokenizer().token_to_id(IM_END).unwrap();
    assert!(p.request.stop.stop_token_ids.contains(&im_end));
}

#[test]
fn bad_requests_name_the_parameter() {
    let cases = [
        (json!({"model": "m"}), None, "missing field `messages`"),
        (
            json!({"model": "m", "messages": []}),
            Some("messages"),
            "must not be empty",
        ),
        (
            json!({"model": "m", "messages": "hi"}),
            Some("messages"),
            "invalid type",
        ),
        (
            json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
            Some("messages[0].role"),
            "robot",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}),
            Some("n"),
            "between 1 and 128",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(open"}}}}),
            Some("response_format"),
            "compile",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "guided_regex": "a+", "guided_choice": ["a"]}),
            Some("guided_choice"),
            "send one",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "min_tokens": 3}),
            Some("min_tokens"),
            "grammar decides",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 2}),
            Some("logprobs"),
            "true or false",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            Some("top_logprobs"),
            "needs logprobs",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            Some("top_logprobs"),
            "between 0 and 20",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            Some("max_tokens"),
            "at least 1",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]}]}),
            Some("messages[0].content[1]"),
            "only text content parts are supported (got type \"image_url\")",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}),
            Some("logit_bias"),
            "not a token id",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"7": -101}}),
            Some("logit_bias"),
            "outside [-100, 100]",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                   "logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            Some("logit_bias"),
            "at most 300",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}),
            Some("max_completion_tokens"),
            "at least 1",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3.5}),
            Some("temperature"),
            "between",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}),
            Some("max_tokens"),
            "invalid type",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]}),
            Some("messages"),
            "system message must come first",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}),
            Some("stop"),
            "empty",
        ),
        (json!([1, 2]), None, "JSON object"),
    ];
    for (body, param, needle) in cases {
        let e = chat_err(body.clone());
        assert_eq!(e.param.as_deref(), param, "{body}: {e:?}");
        assert!(e.message.contains(needle), "{body}: {e:?}");
    }
}

#[test]
fn prompt_over_the_context_is_refused() {
    let long = "word ".repeat(5000);
    let e = chat_err(json!({"model": "m", "messages": [{"role": "user", "content": long}]}));
    assert_eq!(e.code, Some("context_length_exceeded"));
    // Counted after tokenizing: by its bytes alone it might fit.
    assert!(!e.message.contains("at least"), "{}", e.message);
    // A megabyte cannot fit whatever its tokens: refused before it is tokenized.
    let huge = "abcdefghij ".repeat(100_000);
    let e = chat_err(json!({"model": "m", "messages": [{"role": "user", "content": huge}]}));
    assert_eq!(e.code, Some("context_length_exceeded"));
    assert!(e.message.contains("at least"), "{}", e.message);
    let e = chat_err(
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4090}),
    );
    assert_eq!(e.code, Some("context_length_exceeded"));
    assert_eq!(e.param.as_deref(), Some("max_tokens"));
}

/// A `developer` message is a system message for a template that does not know the role
/// (one written before it existed), and keeps its name for one that does.
#[test]
fn developer_messages_render_as_system_for_templates_without_the_role() {
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), &MakeModelSettings::default()).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["chat_template"] = json!(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    );
    std::fs::write(&config, c.to_string()).unwrap();
    let old = Preprocessor::new("old", ModelFolder::load(dir.path()).unwrap().files()).unwrap();
    let render = |pre: &Preprocessor, role: &str| {
        pre.chat(&json!({"model": "m", "messages": [
            {"role": role, "content": "be brief"},
            {"role": "user", "content": "hi"}
        ]}))
        .unwrap()
        .request
        .token_ids
    };
    assert_eq!(render(&old, "developer"), render(&old, "system"));
    assert_ne!(
        render(&old, "user"),
        render(&old, "system"),
        "roles render differently"
    );
    // The generated template names `developer`: it renders the role itself.
    assert_ne!(render(pre(), "developer"), render(pre(), "system"));
}

/// Nothing is silently ignored: an unknown field is refused naming it; an identifier such as
/// `user` is accepted; defaults fill the context.
#[test]
fn unknown_fields_are_refused_and_defaults_fill_the_context() {
    let e = pre()
        .completion(&json!({"model": "m", "prompt": "one two", "frobnicate": {"x": 1}}))
        .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("frobnicate"));
    let p = pre()
        .completion(&json!({"model": "m", "prompt": "one two", "user": "u1"}))
        .unwrap();
    assert_eq!(
        p.request.stop.max_tokens as usize + p.request.token_ids.len(),
        4096
    );
}

/// Streaming a text token by token gives the text, for multi-byte characters and spaces too.
#[test]
fn incremental_detokenization_matches_whole_decode() {
    let tok = pre().tokenizer();
    for text in [
        "Hello world, the server said: café naïve größe.",
        "日本語のテキスト 🎉🙂 mixed with ascii",
        "  leading spaces\nand\ttabs  ",
    ] {
        let ids = tok.encode_fast(text, false).unwrap().get_ids().to_vec();
        let prompt = tok
            .encode_fast("Prompt:", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let table = ByteLevelTable::of(tok).map(Arc::new);
        assert!(table.is_some(), "the generated tokenizer is byte-level");
        // With the byte table and through the library: the same text.
        for table in [None, table] {
            let mut d = Decoder::new(tok.clone(), table, &prompt);
            let mut out = String::new();
            for &t in &ids {
                let piece = d.push(t);
                assert!(!piece.contains('\u{FFFD}'), "split character in {piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&d.flush());
            assert_eq!(out, tok.decode(&ids, true).unwrap());
            assert_eq!(out, text);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// Any ids (special tokens, added tokens, pieces of multi-byte characters, ids past the
    /// vocabulary): the byte table decodes them as `tokenizers` does, and streaming them
    /// releases the same pieces either way.
    #[test]
    fn the_byte_table_decodes_as_the_tokenizer(
        ids in proptest::collection::vec(0u32..2_000, 0..24),
        specials in proptest::collection::vec(proptest::prelude::any::<bool>(), 24),
    ) {
        let tok = pre().tokenizer();
        let table = Arc::new(ByteLevelTable::of(tok).unwrap());
        let vocab = tok.get_vocab_size(true) as u32;
        let added: Vec<u32> = tok.get_added_tokens_decoder().keys().copied().collect();
        // Some ids swapped for added (special) tokens, one past the vocabulary.
        let ids: Vec<u32> = ids
            .iter()
            .zip(&specials)
            .map(|(&id, &s)| match (s, id % 7) {
                (true, 0) => vocab + 3,
                (true, _) => added[id as usize % added.len()],
                _ => id % vocab,
            })
            .collect();
        proptest::prop_assert_eq!(table.decode(&ids), tok.decode(&ids, true).unwrap());
        let (mut a, mut b) = (
            Decoder::new(tok.clone(), None, &ids[..ids.len() / 4]),
            Decoder::new(tok.clone(), Some(table), &ids[..ids.len() / 4]),
        );
        for &t in &ids {
            proptest::prop_assert_eq!(a.push(t), b.push(t));
        }
        proptest::prop_assert_eq!(a.flush(), b.flush());
    }
}

fn run_output(prompt: &str, body: Value, tokens: &[u32]) -> (String, Option<FinishReason>, u32) {
    let mut body = body;
    body["prompt"] = json!(prompt);
    let prepared = pre().completion(&body).unwrap();
    let mut out = pre().output(&prepared);
    let mut text = String::new();
    for &t in tokens {
        let p = out.process(&EngineOutput {
            token_ids: vec![t],
            ..Default::default()
        });
        text.push_str(&p.text);
        if let Some(f) = p.finish {
            return (text, Some(f), out.completion_tokens());
        }
    }
    (text, None, out.completion_tokens())
}

#[test]
fn stop_strings_max_tokens_and_stop_tokens() {
    let tok = pre().tokenizer();
    let ids = |s: &str| tok.encode_fast(s, false).unwrap().get_ids().to_vec();
    let gen = ids("alpha beta gamma delta epsilon");

    let (text, finish, n) = run_output("x", json!({"model": "m", "stop": ["gamma"]}), &gen);
    assert_eq!(text, "alpha beta ");
    assert_eq!(finish, Some(FinishReason::Stop));
    assert!(n >= 3 && n < gen.len() as u32, "{n}");

    let (text, finish, n) = run_output("x", json!({"model": "m", "max_tokens": 2}), &gen);
    assert_eq!(finish, Some(FinishReason::Length));
    assert_eq!(n, 2);
    assert_eq!(text, tok.decode(&gen[..2], true).unwrap());

    let eos = tok.token_to_id(IM_END).unwrap();
    let mut with_eos = gen.clone();
    with_eos.insert(2, eos);
    let (text, finish, n) = run_output("x", json!({"model": "m"}), &with_eos);
    assert_eq!((finish, n), (Some(FinishReason::Stop), 3));
    assert_eq!(text, tok.decode(&gen[..2], true).unwrap());
    // ignore_eos keeps going past it (and the special token prints nothing).
    let (_, finish, n) = run_output("x", json!({"model": "m", "ignore_eos": true}), &with_eos);
    assert_eq!((finish, n), (None, with_eos.len() as u32));
}

/// The grammars that force a tool call compile for every format, against a real vocabulary;
/// a tool result for a call never made is refused naming it.
#[test]
fn forced_tool_grammars_compile_and_tool_results_need_their_call() {
    use dynamo_preprocessor::tools::{check_tools, forced_grammar, ToolFormat};
    let dir = &model().0;
    let folder = ModelFolder::load(dir.path()).unwrap();
    let tokenizer = folder.files().get("tokenizer.json").unwrap();
    let grammars = dynamo_guided::Grammars::new(tokenizer, 4096, &[1]).unwrap();
    let tools = check_tools(&[
        json!({"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}),
        json!({"type": "function", "function": {"name": "g"}}),
    ])
    .unwrap();
    for format in [
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
        ToolFormat::Mistral,
    ] {
        for (named, parallel) in [(None, true), (Some("g"), false)] {
            let spec = forced_grammar(format, &tools, named, parallel);
            grammars
                .compile(&spec)
                .unwrap_or_else(|e| panic!("{format:?} {named:?}: {e}: {spec:?}"));
        }
    }
    let e = chat_err(json!({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "call_nope", "content": "7"}]}));
    assert_eq!(
        e.param.as_deref(),
        Some("messages[1].tool_call_id"),
        "{e:?}"
    );
    let ok = pre().chat(&json!({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"}]}));
    assert!(ok.is_ok(), "{ok:?}");
}
