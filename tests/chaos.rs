//! The CI-sized chaos run (`scripts/chaos` is the full one): `dynamo-run serve` over a real
//! nats-server (a frontend, a router component, three mocker worker processes) takes a
//! streaming load while worker processes get SIGKILL every second and a half; serve restarts
//! them. No request is lost: every answer comes back whole (exactly its `max_tokens` tokens,
//! `ignore_eos`), and the frontend's metrics show the streams it moved.

mod common;

use std::time::{Duration, Instant};

use common::{base, dynamo_run, model_dir, Serve};
use dynamo_runtime::testing::NatsServer;

/// The worker processes `serve` (pid `parent`) runs: its children whose command line runs
/// the mocker.
fn workers(parent: u32) -> Vec<i32> {
    children(parent, "out=mocker")
}

/// The children of `parent` whose command line holds `needle`.
fn children(parent: u32, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// A graph over NATS: a frontend, a router component, three mocker workers.
fn graph(dir: &std::path::Path) -> std::path::PathBuf {
    let graph = dir.join("chaos.yaml");
    std::fs::write(
        &graph,
        format!(
            "namespace: chaosci\n\
             defaults:\n  model_path: {}\n  model_name: tiny\n  block_size: 16\n\
             components:\n\
             \x20 backend:\n    role: worker\n    replicas: 3\n    engine: mocker\n    num_gpu_blocks: 2048\n\
             \x20 router:\n    role: router\n\
             \x20 frontend:\n    role: frontend\n    http_port: 0\n    router_mode: kv\n",
            model_dir()
        ),
    )
    .unwrap();
    graph
}

#[test]
fn killed_worker_processes_lose_no_request() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let graph = graph(dir.path());
    let mut serve = Serve::start(&[graph.to_str().unwrap(), "--bus", &nats.url()]);
    let frontend = serve.wait_out("/v1", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let url = base(&frontend);
    let serve_pid = serve.child.id();
    assert_eq!(workers(serve_pid).len(), 3, "three worker processes");

    // About 12 s of load: 150 answers of 150 tokens (a second each), 12 at a time.
    let json = dir.path().join("bench.json");
    let mut bench = dynamo_run()
        .args(["bench", "--url", &url, "--model", "tiny"])
        .args(["--workload", "shared-prefix", "--requests", "150"])
        .args(["--concurrency", "12", "--warmup", "0"])
        .args(["--system-prompt-tokens", "64", "--question-tokens", "32"])
        .args(["--output-tokens", "150", "--block-size", "16"])
        .args(["--output-json", json.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut kills = 0;
    let mut next = Instant::now() + Duration::from_millis(1500);
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        if kills < 4 && Instant::now() >= next {
            let pids = workers(serve_pid);
            if let Some(&pid) = pids.get(kills % pids.len().max(1)) {
                common::signal(pid, nix::sys::signal::Signal::SIGKILL);
                kills += 1;
            }
            next = Instant::now() + Duration::from_millis(1500);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "bench failed: {status:?}");
    assert!(kills >= 3, "{kills} kills happened during the load");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert_eq!(report["completed"], 150, "{report}");
    assert_eq!(report["incomplete"], 0, "every answer whole: {report}");

    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let metrics = common::http_get(port, "/metrics");
    let migrated: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("dynamo_frontend_migrations_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        migrated >= 1.0,
        "the kills hit streams in flight, which moved:\n{metrics}"
    );
    // serve saw each death first and announced the dead instances gone.
    let err = serve.err.lock().unwrap().join("\n");
    assert!(
        err.matches("announced its instance(s)").count() >= kills.min(3),
        "{err}"
    );
}

/// Shutdown does not depend on the bus: with nats-server gone, SIGTERM stops every process
/// (deregistration gives up after a moment; the leases expire the entries anyway) and `serve`
/// exits once its children are gone.
#[test]
fn everything_stops_without_the_bus() {
    let mut nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let graph = graph(dir.path());
    let mut serve = Serve::start_with_env(
        &[graph.to_str().unwrap(), "--bus", &nats.url()],
        &[("DYN_SHUTDOWN_GRACE", "3s")],
    );
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let kids = children(serve.child.id(), "dynamo-run");
    assert_eq!(
        kids.len(),
        5,
        "three workers, a router and a frontend: {kids:?}"
    );
    nats.kill();
    // Each process has 3 s of grace; serve kills what outlives it. Far less than this bound.
    let status = serve
        .stop(Duration::from_secs(30))
        .expect("serve exits without the bus");
    assert!(status.success(), "{status:?}");
    for pid in kids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty(), "child {pid} is still there: {state}");
    }
    let err = serve.err.lock().unwrap().join("\n");
    assert!(
        !err.contains("killing"),
        "every child stopped within its grace:\n{err}"
    );
}
