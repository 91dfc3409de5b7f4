//! `dynamo-run in=http out=native` on the generated tiny model (random weights in the
//! Hugging Face layout), checked with the official `openai` and `anthropic` Python SDKs: chat
//! and completions, streaming, usage, prefix caching, greedy determinism, seeded sampling,
//! `logit_bias`, logprobs, `n` and batches, structured output, tool calls and tool loops, the
//! Responses and Messages APIs, and bad input answered with 400s while the server keeps
//! serving.

mod common;

use std::path::Path;
use std::process::Command;

use common::{native_server, python};

/// Runs an SDK check script against a fresh native server (`base`: the URL the SDK takes);
/// it must pass `checks` checks.
fn run_client(script: &str, base: impl Fn(&common::Proc) -> String, extra: &[&str], checks: usize) {
    let server = native_server();
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .arg(base(&server))
        .arg("tiny")
        .args(extra)
        .output()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        checks,
        "{stdout}"
    );
}

#[test]
fn openai_sdk_against_the_native_engine() {
    run_client(
        "tests/native_client.py",
        |s| format!("{}/v1", s.http_base()),
        &[common::model_dir()],
        56,
    );
}

/// The Messages API with the official `anthropic` SDK against the native engine: whole and
/// streamed messages, stop sequences, forced tool use (whole and streamed), a tool loop, and
/// bad input in the API's own error shape.
#[test]
fn anthropic_sdk_against_the_native_engine() {
    run_client("tests/anthropic_client.py", |s| s.http_base(), &[], 11);
}
