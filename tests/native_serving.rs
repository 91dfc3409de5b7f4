//! `dynamo-run in=http out=native` on the generated tiny model (random weights in the
//! Hugging Face layout), checked with the official `openai` Python SDK: chat and completions,
//! streaming, usage, prefix caching, greedy determinism, seeded sampling, `logit_bias`, and a
//! too-long prompt answered with a 400 while the server keeps serving.

mod common;

use std::path::Path;
use std::process::Command;

use common::{native_server, python};

#[test]
fn openai_sdk_against_the_native_engine() {
    let py = python();
    let server = native_server();
    let out = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/native_client.py"))
        .arg(format!("{}/v1", server.http_base()))
        .arg("tiny")
        .arg(common::model_dir())
        .output()
        .expect("run the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        56,
        "{stdout}"
    );
}

/// The Messages API with the official `anthropic` SDK against the native engine: whole and
/// streamed messages, stop sequences, forced tool use (whole and streamed), a tool loop, and
/// bad input in the API's own error shape.
#[test]
fn anthropic_sdk_against_the_native_engine() {
    let py = python();
    let server = native_server();
    let out = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/anthropic_client.py"))
        .arg(server.http_base())
        .arg("tiny")
        .output()
        .expect("run the anthropic client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        11,
        "{stdout}"
    );
}
