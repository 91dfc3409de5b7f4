//! API keys on a real `dynamo-run in=http` process, with the official SDKs: no key and a wrong
//! key get 401s in each API's shape, the right key works, a key limited to one request in
//! flight gets a 429 on its second concurrent request, `/health` stays open; the keys file is
//! re-read on SIGHUP; an unreadable keys file stops startup with an error naming it; no key
//! appears in the process's output.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{dynamo_run, model_dir, Proc};

/// `dynamo-run in=http out=echo` on a loopback port (more flags to add).
fn echo_http() -> Command {
    let mut cmd = dynamo_run();
    cmd.args(["in=http", "out=echo", "--model-path", model_dir()])
        .args([
            "--model-name",
            "tiny",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
        ]);
    cmd
}

fn frontend(keys: &Path) -> Proc {
    Proc::start(
        echo_http()
            .args(["--echo-delay-ms", "20", "--api-key", "sk-flag-key"])
            .arg("--api-keys-file")
            .arg(keys)
            .stderr(Stdio::piped()),
    )
}

/// A chat request's status with `key`.
async fn status(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_api() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "team sk-team-good\nbatch sk-team-limited inflight=1\n",
    )
    .unwrap();
    let mut server = frontend(&keys);
    let base = server.http_base();
    let stdout = common::python_checks(
        "auth_client.py",
        &[
            base.as_ref(),
            "tiny".as_ref(),
            "sk-team-good".as_ref(),
            "sk-team-limited".as_ref(),
        ],
        10,
    );
    // The flag's key works; a key added to the file works once the file is re-read.
    assert_eq!(status(&base, "sk-flag-key").await, 200);
    assert_eq!(status(&base, "sk-new").await, 401);
    std::fs::write(&keys, "team sk-team-good\nnewcomer sk-new\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    common::eventually_async("the new key works", Duration::from_secs(5), || {
        let base = base.clone();
        async move { status(&base, "sk-new").await == 200 }
    })
    .await;
    assert_eq!(
        status(&base, "sk-team-limited").await,
        401,
        "removed on reload"
    );
    // A file that no longer parses keeps the keys in force.
    std::fs::write(&keys, "one two three four\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(status(&base, "sk-new").await, 200);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    let mut err = String::new();
    if let Some(mut e) = server.take_stderr() {
        e.read_to_string(&mut err).unwrap();
    }
    for secret in ["sk-team-good", "sk-team-limited", "sk-flag-key", "sk-new"] {
        assert!(
            !err.contains(secret) && !stdout.contains(secret),
            "a key was printed: {err}"
        );
    }
}

#[test]
fn an_unreadable_keys_file_stops_startup_naming_it() {
    let out = echo_http()
        .args(["--api-keys-file", "/nonexistent/keys"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/keys"), "{err}");
}

/// HTTPS with `--tls-cert`/`--tls-key`: the openai SDK trusting the CA is served, one that
/// does not and plain HTTP are refused; a certificate that does not match its key, or a
/// missing file, stops startup with an error naming it.
#[test]
fn https_serves_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::write(dir.path());
    let (ca, cert, key) = (pki.ca, pki.server_cert, pki.server_key);
    let server = Proc::start(
        echo_http()
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key),
    );
    assert!(server.ready.contains("https://"), "{}", server.ready);
    let base = server.http_base().replace("http://", "https://");
    common::python_checks(
        "tls_client.py",
        &[base.as_ref(), "tiny".as_ref(), ca.as_os_str()],
        3,
    );
    // Another key for the certificate, and a missing file: clear startup errors.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    for (k, needle) in [
        (other.as_path(), "do not go together"),
        (Path::new("/nonexistent/key.pem"), "/nonexistent/key.pem"),
    ] {
        let out = echo_http()
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(k)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
    }
}
