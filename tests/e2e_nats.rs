//! End to end across processes: `dynamo-run` children against a real nats-server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{dynamo_run, Proc};
use dynamo_protocols::echo::{EchoChunk, EchoRequest};
use dynamo_runtime::discovery::{DiscoveryEvent, DiscoverySettings};
use dynamo_runtime::subject::ComponentId;
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{CallOptions, Runtime, RuntimeSettings, Target};
use nix::sys::signal::Signal;

const LEASE: Duration = Duration::from_secs(2);

/// A `dynamo-run serve-echo` child (killed on drop) on `url`, with a 2 s discovery lease.
fn worker(url: &str, extra: &[&str]) -> Proc {
    worker_with_lease(url, extra, "2s")
}

fn worker_with_lease(url: &str, extra: &[&str], lease: &str) -> Proc {
    Proc::start(
        dynamo_run()
            .args(["--bus", url, "--namespace", "e2e"])
            .args(extra)
            .arg("serve-echo")
            .env("DYN_DISCOVERY__LEASE", lease),
    )
}

async fn client(server: &NatsServer) -> Runtime {
    client_with_lease(server, LEASE).await
}

async fn client_with_lease(server: &NatsServer, lease: Duration) -> Runtime {
    let settings = RuntimeSettings {
        discovery: DiscoverySettings {
            lease,
            ..Default::default()
        },
        ..Default::default()
    };
    Runtime::start(RuntimeSettings {
        bus: Some(server.url()),
        ..settings
    })
    .await
    .unwrap()
}

fn echo_target() -> Target {
    Target::Any(
        ComponentId::new("e2e", "echo")
            .unwrap()
            .endpoint("generate")
            .unwrap(),
    )
}

/// Starts an echo stream and reads its first chunk.
async fn start_stream(
    rt: &Runtime,
    req: &EchoRequest,
) -> dynamo_runtime::rpc::ResponseStream<EchoChunk> {
    let mut stream = rt
        .client()
        .call::<_, EchoChunk>(echo_target(), req, CallOptions::default())
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    stream
}

async fn next_event(
    w: &mut dynamo_runtime::discovery::DiscoveryWatch,
    secs: u64,
) -> DiscoveryEvent {
    tokio::time::timeout(Duration::from_secs(secs), w.next())
        .await
        .expect("discovery event in time")
        .expect("watch open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_leaves_discovery_within_the_lease() {
    let server = NatsServer::start().unwrap();
    let rt = client(&server).await;
    let mut watch = rt
        .discovery()
        .watch(dynamo_runtime::subject::DiscoveryFilter::all())
        .await
        .unwrap();
    let worker = worker(&server.url(), &[]);
    match next_event(&mut watch, 5).await {
        DiscoveryEvent::Joined(info) => assert_eq!(info.instance.to_string(), worker.instance()),
        other => panic!("{other:?}"),
    }
    let req = EchoRequest {
        text: "alive?".into(),
        repeat: 2,
        delay_ms: 0,
    };
    let chunks: Vec<EchoChunk> = rt
        .client()
        .call(echo_target(), &req, CallOptions::default())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(chunks.len(), 2);

    // A stream in progress when the process dies ends with Disconnected, not a hang.
    let long = EchoRequest {
        text: "long".into(),
        repeat: 1000,
        delay_ms: 50,
    };
    let mut stream = start_stream(&rt, &long).await;
    worker.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let err = loop {
        match stream.next().await.expect("stream ends with an error") {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, dynamo_runtime::RpcError::Disconnected { .. }),
        "{err:?}"
    );
    let hb = rt.settings().rpc.heartbeat_timeout;
    assert!(
        killed.elapsed() < hb + Duration::from_secs(1),
        "detected after {:?}",
        killed.elapsed()
    );

    match next_event(&mut watch, 10).await {
        DiscoveryEvent::Left { instance, .. } => {
            assert_eq!(instance.to_string(), worker.instance())
        }
        other => panic!("{other:?}"),
    }
    let gone_after = killed.elapsed();
    // The lease, plus the server's expiry sweep (about a second).
    assert!(
        gone_after <= LEASE + Duration::from_millis(1500),
        "left after {gone_after:?}"
    );
    assert!(rt
        .discovery()
        .list(&dynamo_runtime::subject::DiscoveryFilter::all())
        .await
        .unwrap()
        .is_empty());
    rt.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_drains_and_exits_zero() {
    stop_gracefully_on(Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_deregisters_drains_and_exits_zero() {
    stop_gracefully_on(Signal::SIGINT).await;
}

async fn stop_gracefully_on(signal: Signal) {
    let server = NatsServer::start().unwrap();
    // A lease far longer than the wait below (the bucket takes the first one): the worker
    // leaving within it is its own deregistration, not the lease running out.
    let rt = client_with_lease(&server, Duration::from_secs(120)).await;
    let mut watch = rt
        .discovery()
        .watch(dynamo_runtime::subject::DiscoveryFilter::all())
        .await
        .unwrap();
    let mut worker = worker_with_lease(&server.url(), &[], "120s");
    assert!(matches!(
        next_event(&mut watch, 5).await,
        DiscoveryEvent::Joined(_)
    ));
    let req = EchoRequest {
        text: "drain".into(),
        repeat: 10,
        delay_ms: 100,
    };
    let mut stream = start_stream(&rt, &req).await;
    worker.signal(signal);
    assert!(matches!(
        next_event(&mut watch, 10).await,
        DiscoveryEvent::Left { .. }
    ));
    let mut rest = 0;
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
        rest += 1;
    }
    assert_eq!(rest, 9, "the open request completes during the drain");
    let status = worker.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    rt.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_echo_and_ls_work_across_processes_and_metrics_are_served() {
    let server = NatsServer::start().unwrap();
    let port = common::free_port();
    let worker = worker(&server.url(), &["--metrics-port", &port.to_string()]);
    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .args([
            "--bus",
            &server.url(),
            "--namespace",
            "e2e",
            "call-echo",
            "--text",
            "over nats",
            "--repeat",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("over nats").count(), 4, "{stdout}");

    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .args(["--bus", &server.url(), "ls"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("instances in discovery: 1"), "{stdout}");
    assert!(stdout.contains("e2e-echo"), "{stdout}");

    let body = common::http_get(port, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let series = format!(
        "dynamo_runtime_requests_total{{endpoint=\"e2e.echo.generate\",instance=\"{}\"}} 1",
        worker.instance()
    );
    assert!(body.contains(&series), "{body}");
}

#[test]
fn demo_runs_on_the_embedded_bus() {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .args(["demo", "--requests", "2"])
        .env("DYN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("on the local bus"), "{stdout}");
    assert_eq!(stdout.matches("from the echo actor").count(), 6, "{stdout}");
    assert!(
        stdout.contains("services answering $SRV.INFO: 1"),
        "{stdout}"
    );
}

#[test]
fn bad_configuration_fails_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .args(["--bus", "localhost:4222", "demo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a nats:// URL"));
    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .arg("demo")
        .env("DYN_RPC__HEARTBEAT_INTERVAL", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("heartbeat_interval"));
    // Nothing listening: a connection error that says what to do.
    let port = common::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_dynamo-run"))
        .args(["--bus", &format!("nats://127.0.0.1:{port}"), "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nats-server"));
}

/// A worker process's `/health` (on `--metrics-port`) is its supervisor's view: 200 with each
/// role and its state once the worker serves.
#[test]
fn a_worker_process_health_lists_its_roles() {
    let server = NatsServer::start().unwrap();
    let port = common::free_port();
    let _worker = Proc::start(dynamo_run().args([
        "--bus",
        &server.url(),
        "--metrics-port",
        &port.to_string(),
        "in=dyn://e2e.backend.generate",
        "out=mocker",
        "--model-path",
        common::model_dir(),
    ]));
    let body = common::http_get(port, "/health");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json = body.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["status"], "ready", "{v}");
    let roles = &v["checks"][0]["roles"];
    assert_eq!(roles[0]["role"], "backend", "{v}");
    assert_eq!(roles[0]["kind"], "worker", "{v}");
    assert_eq!(roles[0]["state"], "serving", "{v}");
}

/// The mocker's bus-drop fault: the worker process loses its NATS connection without
/// deregistering. Calls to its instance get "no responders" at once, its discovery entry runs
/// out with its lease, and the process itself keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_drops_its_bus_connection_vanishes_from_the_bus() {
    use dynamo_actors::frontend::{Frontend, FrontendSettings};
    use dynamo_protocols::llm::{
        EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions,
    };
    use dynamo_runtime::rpc::RpcError;
    use dynamo_runtime::subject::Namespace;

    let server = NatsServer::start().unwrap();
    let mut worker = Proc::start(dynamo_run().env("DYN_DISCOVERY__LEASE", "2s").args([
        "--bus",
        &server.url(),
        "--namespace",
        "drop",
        "in=dyn://drop.backend.generate",
        "out=mocker",
        "--model-path",
        common::model_dir(),
        "--model-name",
        "tiny",
        "--mocker-drop-bus-after-ms",
        "1500",
    ]));
    let instance = worker.instance().to_string();
    let runtime = common::runtime_with_lease(server.url(), Duration::from_secs(2)).await;
    let frontend = Frontend::start(
        &runtime,
        FrontendSettings::new(Namespace::new("drop").unwrap()),
    )
    .await
    .unwrap();
    let table = frontend.models().clone();
    if tokio::time::timeout(Duration::from_secs(10), table.wait_for("tiny", 1))
        .await
        .is_err()
    {
        let names: Vec<String> = table.list().iter().map(|e| e.card.name.clone()).collect();
        panic!("the worker is not listed; listed: {names:?}");
    }
    let id = table.get("tiny").unwrap().instances[0].instance;
    assert_eq!(id.to_string(), instance);

    // Once the connection is gone, its instance subject has no responders...
    let target = Target::Instance(
        ComponentId::new("drop", "backend")
            .unwrap()
            .endpoint("generate")
            .unwrap(),
        id,
    );
    let req = PreprocessedRequest {
        token_ids: vec![10, 11, 12],
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens: 1,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = match runtime
            .client()
            .call::<_, EngineOutput>(target.clone(), &req, CallOptions::default())
            .await
        {
            Ok(stream) => stream.collect().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if matches!(r, Err(RpcError::NoResponders { .. })) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the dropped worker still answers: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and discovery forgets it when its lease runs out, though it never deregistered.
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while table.get("tiny").is_some_and(|e| !e.instances.is_empty()) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the lease of the dropped worker ran out");
    assert!(worker.alive(), "the process keeps running without its bus");
    frontend.shutdown().await;
    runtime.close().await;
}
