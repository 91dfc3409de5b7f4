//! `dynamo-run in=text|batch out=echo` and the launcher's argument errors, as processes on the
//! embedded bus.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::{dynamo_run, model_dir};
use serde_json::Value;

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = dynamo_run()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn text_input_chats_in_the_terminal() {
    // A model named like a subcommand is still a flag value, not the `bench` subcommand.
    let out = run(
        &[
            "in=text",
            "out=echo",
            "--model-path",
            model_dir(),
            "--model-name",
            "bench",
            "--echo-delay-ms",
            "0",
        ],
        "hello terminal\nsecond turn\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Each turn echoes the conversation as the template frames it, up to the first end of turn.
    assert_eq!(
        stdout.matches("user\nhello terminal").count(),
        2,
        "{stdout}"
    );
}

/// Runs an echo batch; returns the process output and its JSON lines.
fn batch(input: &str) -> (Output, Vec<Value>) {
    let args = [
        input,
        "out=echo",
        "--model-path",
        model_dir(),
        "--echo-delay-ms",
        "0",
    ];
    let out = run(&args, "");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, lines)
}

#[test]
fn batch_input_writes_answers_with_timing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"text\": \"first prompt\"}\n\n{\"prompt\": \"one two three\", \"max_tokens\": 2}\n{\"messages\": [{\"role\": \"user\", \"content\": \"third\"}], \"stop\": \"ir\"}\n",
    )
    .unwrap();
    let input = format!("in=batch:{}", file.display());
    let (out, lines) = batch(&input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["response"], "user\nfirst prompt");
    assert_eq!(lines[1]["finish_reason"], "length");
    assert_eq!(lines[1]["usage"]["completion_tokens"], 2);
    assert_eq!(lines[2]["response"], "user\nth");
    for l in &lines {
        assert!(l["duration_ms"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(l["ttft_ms"].is_number(), "{l}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 requests (0 failed)"));

    // A bad line is reported in place and fails the run; the others are still answered.
    std::fs::write(&file, "{\"text\": \"fine\"}\nnot json\n{\"neither\": 1}\n").unwrap();
    let (out, lines) = batch(&input);
    assert!(!out.status.success());
    assert_eq!(lines[0]["response"], "user\nfine");
    assert!(lines[1]["error"].as_str().unwrap().contains("not JSON"));
    assert!(lines[2]["error"].as_str().unwrap().contains("needs"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 3 batch requests failed"));
}

#[test]
fn bad_launch_arguments_say_what_to_do() {
    let cases: [(&[&str], &str); 8] = [
        (&["in=carrier-pigeon"], "use http, text"),
        (&["out=gpt"], "not an engine"),
        (&["in=http", "out=echo"], "make-model"),
        (
            &["in=dyn://only.two", "out=echo"],
            "namespace.component.endpoint",
        ),
        (&["in=http", "bogus"], "expected in=... or out=..."),
        (
            &["--remote-router"],
            "needs --router-mode kv or least-loaded",
        ),
        (
            &["router", "--router-temperature=-1"],
            "--router-temperature must be a number >= 0",
        ),
        (
            &["--router-mode", "kv", "--busy-threshold", "1.5"],
            "--busy-threshold must be in (0, 1]",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args, "");
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let missing = run(
        &["in=text", "out=echo", "--model-path", "/nonexistent/model"],
        "",
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a directory"));
}

/// `dynamo-run profile` measures a mocker worker and writes a profile the planner loads (a
/// prefill point per input length, a decode point per batch and context); a grid the KV
/// cache cannot hold and an unknown engine are refused with what to do.
#[test]
fn profile_writes_a_planner_profile_and_refuses_what_cannot_be_measured() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profile.json");
    let profile = |extra: &[&str]| {
        dynamo_run()
            .args([
                "profile",
                "--model-path",
                model_dir(),
                "--model-name",
                "tiny",
            ])
            .args(["--speedup-ratio", "20", "--block-size", "16", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = profile(&[
        "--engine",
        "mocker",
        "--num-gpu-blocks",
        "256",
        "--isl",
        "32,256",
        "--batches",
        "1,4",
        "--contexts",
        "64,256",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr).contains("profile: decode of 4 sequences"));
    let p = dynamo_planner::Profile::load(&out, Some("tiny")).unwrap();
    assert_eq!(
        (p.engine.as_str(), p.prefill.len(), p.decode.len()),
        ("mocker", 2, 4)
    );
    assert!(p.prefill.iter().all(|x| x.ttft_ms > 0.0) && p.decode.iter().all(|x| x.itl_ms > 0.0));
    assert_eq!(p.settings["block_size"], 16);

    let too_big = profile(&[
        "--engine",
        "mocker",
        "--num-gpu-blocks",
        "16",
        "--batches",
        "64",
    ]);
    assert!(!too_big.status.success());
    let err = String::from_utf8_lossy(&too_big.stderr);
    assert!(err.contains("lower --batches or --contexts"), "{err}");
    let unknown = profile(&["--engine", "vllm"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("profile mocker or native"));
}
