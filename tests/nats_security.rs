//! The bus locked down as config/nats/ describes: a real nats-server with TLS, client
//! certificates (mutual TLS) and the per-role users and permissions of
//! `config/nats/permissions.conf`. A deployment of real processes (worker, router, frontend),
//! each connecting as its role, serves a request end to end; the server refuses a worker
//! without a client certificate, wrong credentials, and a worker credential publishing for
//! another component or subscribing to every request; a forged event on an allowed subject is
//! dropped and counted by the router.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{dynamo_run, model_dir, Pki, Proc};
use dynamo_protocols::kv::{
    KvEvent, KvEventBatch, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock,
    WorkerId,
};
use dynamo_runtime::serve::encode_event;
use dynamo_runtime::testing::NatsServer;
use serde_json::json;

const ROLES: [&str; 8] = [
    "frontend", "router", "backend", "prefill", "decode", "planner", "serve", "observer",
];

fn password(role: &str) -> String {
    format!("pw-{role}-0123456789")
}

/// nats-server with TLS that verifies client certificates, and the shipped permissions.
fn secure_server(dir: &Path, pki: &Pki) -> NatsServer {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // nats-server includes files relative to the including one.
    std::fs::copy(
        root.join("config/nats/permissions.conf"),
        dir.join("permissions.conf"),
    )
    .unwrap();
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\ninclude permissions.conf\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    )
    .unwrap();
    let env: Vec<(String, String)> = ROLES
        .iter()
        .map(|r| {
            (
                format!("DYN_NATS_{}_PASSWORD", r.to_uppercase()),
                password(r),
            )
        })
        .collect();
    NatsServer::start_with_config(&conf, &env).unwrap()
}

/// `dynamo-run` connecting over TLS as `role`, trusting `ca`, with the client certificate
/// and key `cert` (mutual TLS) when given.
fn as_role(
    server: &NatsServer,
    role: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> std::process::Command {
    let mut c = dynamo_run();
    c.args(["--bus", &format!("tls://127.0.0.1:{}", server.port())])
        .arg("--nats-ca")
        .arg(ca)
        .env("DYN_NATS__USER", role)
        .env("DYN_NATS__PASSWORD", password(role))
        .env("DYN_NATS__INBOX_PREFIX", format!("_INBOX.{role}"));
    if let Some((cert, key)) = cert {
        c.arg("--nats-cert").arg(cert).arg("--nats-key").arg(key);
    }
    c
}

const WORKER: [&str; 8] = [
    "in=dyn://dynamo.backend.generate",
    "out=mocker",
    "--model-name",
    "m",
    "--speedup-ratio",
    "10",
    "--model-path",
    "",
];

fn worker_args() -> Vec<&'static str> {
    let mut a = WORKER.to_vec();
    a[7] = model_dir();
    a
}

/// What the server tells a client it refused (permission violations arrive as events).
async fn server_errors(
    server: &NatsServer,
    pki: &Pki,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client =
        async_nats::ConnectOptions::with_user_and_password("backend".into(), password("backend"))
            .add_root_certificates(pki.ca.clone())
            .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
            .require_tls(true)
            .custom_inbox_prefix("_INBOX.backend")
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(format!("tls://127.0.0.1:{}", server.port()))
            .await
            .unwrap();
    (client, rx)
}

async fn next_error(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the server answers a forbidden operation with an error")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_bus_with_per_role_users_serves_and_refuses_what_a_role_may_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::write(dir.path());
    let server = secure_server(dir.path(), &pki);
    let router_metrics = common::free_port();
    let mtls = Some((pki.client_cert.as_path(), pki.client_key.as_path()));

    // The deployment, each process as its role, serves a request end to end.
    let worker = Proc::start(as_role(&server, "backend", &pki.ca, mtls).args(worker_args()));
    let _router = Proc::start(as_role(&server, "router", &pki.ca, mtls).args([
        "--metrics-port",
        &router_metrics.to_string(),
        "router",
    ]));
    let frontend = Proc::start(as_role(&server, "frontend", &pki.ca, mtls).args([
        "in=http",
        "out=dyn",
        "--http-port",
        "0",
        "--http-host",
        "127.0.0.1",
        "--model-name",
        "m",
        "--router-mode",
        "kv",
        "--remote-router",
    ]));
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/completions", frontend.http_base()))
        .json(&json!({"model": "m", "prompt": "hello there", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");

    // A worker without a client certificate, and one with a wrong password: refused, with
    // an error that says what to check; neither password shows in it.
    let no_cert = as_role(&server, "backend", &pki.ca, None)
        .args(worker_args())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&no_cert.stderr);
    assert!(!no_cert.status.success(), "{err}");
    assert!(err.contains("--nats-cert"), "{err}");
    let wrong = as_role(&server, "backend", &pki.ca, mtls)
        .env("DYN_NATS__PASSWORD", "not-the-password")
        .args(worker_args())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success(), "{err}");
    assert!(err.contains("refused these credentials"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");

    // An expired client certificate, and a server certificate from an authority the worker
    // does not trust: refused as TLS failures.
    let expired = as_role(
        &server,
        "backend",
        &pki.ca,
        Some((&pki.expired_cert, &pki.expired_key)),
    )
    .args(worker_args())
    .output()
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_ca = Pki::write(other.path()).ca;
    let untrusted = as_role(&server, "backend", &other_ca, mtls)
        .args(worker_args())
        .output()
        .unwrap();
    for out in [expired, untrusted] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("TLS handshake failed"), "{err}");
    }

    // A worker credential may not publish for another component, nor read every request.
    let (client, mut errors) = server_errors(&server, &pki).await;
    let batch = |worker: WorkerId, id: u64| {
        encode_event(&KvEventBatch {
            worker,
            events: vec![KvEvent {
                event_id: id,
                tier: StorageTier::Device,
                data: KvEventData::Stored {
                    parent_hash: None,
                    blocks: vec![StoredBlock {
                        block_hash: SequenceHash(0xf0f0),
                        tokens_hash: LocalBlockHash(7),
                    }],
                },
            }],
        })
        .unwrap()
    };
    let instance = worker.instance().to_string();
    let wid = WorkerId(u64::from_str_radix(&instance, 16).unwrap());
    client
        .publish(
            format!("dyn.ev.dynamo.prefill.kv_events.{instance}"),
            batch(wid, 0),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(
        e.contains("Permissions Violation") && e.contains("dyn.ev.dynamo.prefill.kv_events"),
        "{e}"
    );
    let _sub = client.subscribe("dyn.ep.>").await.unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(
        e.contains("Permissions Violation") && e.contains("dyn.ep.>"),
        "{e}"
    );

    // On its own component's subject it may publish, but not for another instance: the
    // router drops that batch and counts it.
    client
        .publish(
            format!("dyn.ev.dynamo.backend.kv_events.{instance}"),
            batch(WorkerId(wid.0 ^ 1), 1_000_000),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let metrics = format!("http://127.0.0.1:{router_metrics}/metrics");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http
            .get(&metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let forged = text.lines().find(|l| {
            l.starts_with("dynamo_router_bad_events_total")
                && l.contains("reason=\"instance_mismatch\"")
        });
        if let Some(line) = forged {
            assert!(line.ends_with(" 1"), "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the router did not count the forged batch:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `serve --bus` with its credentials and TLS files in a `--config` file only (nothing in the
/// environment): the supervisor connects with them and hands them to its children; a component
/// with its own `nats:` user connects as that user instead (its password from the variable the
/// graph names), as nats-server's own list of connections shows; the graph serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_over_a_tls_bus_takes_its_credentials_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::write(dir.path());
    let server = secure_server(dir.path(), &pki);
    let graph = dir.path().join("graph.yaml");
    std::fs::write(
        &graph,
        format!(
            "namespace: dynamo\ndefaults:\n  model_path: {}\n  model_name: m\ncomponents:\n  backend:\n    role: worker\n    replicas: 2\n    engine: mocker\n    speedup_ratio: 10\n    nats:\n      user: backend\n      password_env: TEST_BACKEND_NATS_PASSWORD\n  frontend:\n    role: frontend\n    http_port: {}\n",
            model_dir(),
            common::free_port()
        ),
    )
    .unwrap();
    let config = dir.path().join("runtime.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  user: serve\n  password: {}\n  inbox_prefix: _INBOX.serve\n  tls:\n    ca_file: {:?}\n    cert_file: {:?}\n    key_file: {:?}\n",
            password("serve"),
            pki.ca,
            pki.client_cert,
            pki.client_key
        ),
    )
    .unwrap();
    let bus = format!("tls://127.0.0.1:{}", server.port());
    let backend_password = password("backend");
    let mut serve = common::Serve::start_with_env(
        &[
            graph.to_str().unwrap(),
            "--bus",
            &bus,
            "--config",
            config.to_str().unwrap(),
        ],
        &[("TEST_BACKEND_NATS_PASSWORD", backend_password.as_str())],
    );
    let frontend = serve.wait_out("/v1", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", common::base(&frontend)))
        .json(&json!({"model": "m", "prompt": "hello", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Who is connected: the supervisor and the frontend as `serve`, each backend replica as
    // `backend`.
    let connz: serde_json::Value = reqwest::get(format!(
        "http://127.0.0.1:{}/connz?auth=true",
        server.monitor_port()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let mut users: Vec<&str> = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["authorized_user"].as_str())
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["backend", "backend", "serve", "serve"], "{connz}");
    // The password is in no line the graph printed.
    serve.stop(Duration::from_secs(20));
    let printed = [
        serve.out.lock().unwrap().join("\n"),
        serve.err.lock().unwrap().join("\n"),
    ];
    assert!(printed.iter().all(|p| !p.contains(&password("serve"))));
}

/// The other ways to authenticate against a real server: a token and an NKey seed connect; a
/// wrong token is refused naming the credentials; a `.creds` file that is not one stops startup
/// naming it. No secret shows in an error.
#[test]
fn tokens_and_nkey_seeds_connect_and_bad_credentials_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    for (auth, env, ok) in [
        (
            "authorization { token: \"t0ken-right\" }".to_string(),
            ("DYN_NATS__TOKEN", "t0ken-right".to_string()),
            true,
        ),
        (
            "authorization { token: \"t0ken-right\" }".to_string(),
            ("DYN_NATS__TOKEN", "t0ken-wrong".to_string()),
            false,
        ),
        (
            format!(
                "authorization {{ users = [ {{ nkey: {} }} ] }}",
                user.public_key()
            ),
            ("DYN_NATS__NKEY_SEED", seed.clone()),
            true,
        ),
    ] {
        let conf = dir.path().join("auth.conf");
        std::fs::write(&conf, auth).unwrap();
        let server = NatsServer::start_with_config(&conf, &[]).unwrap();
        let out = dynamo_run()
            .args(["--bus", &server.url(), "ls"])
            .env(env.0, &env.1)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "{}: {err}", env.0);
        assert!(!err.contains(&env.1), "{err}");
        if !ok {
            assert!(err.contains("refused these credentials"), "{err}");
        }
    }
    let creds = dir.path().join("bad.creds");
    std::fs::write(&creds, "not a creds file").unwrap();
    let out = dynamo_run()
        .args(["--bus", "nats://127.0.0.1:1", "--nats-creds"])
        .arg(&creds)
        .arg("ls")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.creds"), "{err}");
}
