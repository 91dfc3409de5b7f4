//! `dynamo-run in=http out=native` on the generated tiny model (random weights in the
//! Hugging Face layout), checked with the official `openai` and `anthropic` Python SDKs: chat
//! and completions, streaming, usage, prefix caching, greedy determinism, seeded sampling,
//! `logit_bias`, logprobs, `n` and batches, structured output, tool calls and tool loops, the
//! Responses and Messages APIs, and bad input answered with 400s while the server keeps
//! serving.

mod common;

use common::native_server;

#[test]
fn openai_sdk_against_the_native_engine() {
    let server = native_server();
    let base = format!("{}/v1", server.http_base());
    common::python_checks(
        "native_client.py",
        &[base.as_ref(), "tiny".as_ref(), common::model_dir().as_ref()],
        56,
    );
}

/// The Messages API with the official `anthropic` SDK against the native engine: whole and
/// streamed messages, stop sequences, forced tool use (whole and streamed), a tool loop, and
/// bad input in the API's own error shape.
#[test]
fn anthropic_sdk_against_the_native_engine() {
    let server = native_server();
    common::python_checks(
        "anthropic_client.py",
        &[server.http_base().as_ref(), "tiny".as_ref()],
        11,
    );
}
