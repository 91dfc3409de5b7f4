//! The planner end to end: `dynamo-run serve config/planner.yaml` (frontend, router, planner,
//! a mocker pool starting at one worker) grows the pool under a `dynamo-run bench` run and
//! drains it back to one under light load, with no request failing, on the embedded bus and
//! over a real nats-server (where every replica is a child process and the planner reaches
//! the `serve` process over NATS). Bad planner settings fail before anything starts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{base, dynamo_run, graph, model_dir, Serve, Watch};
use dynamo_runtime::testing::NatsServer;

/// `(from, to)` of every `[backend] scale A -> B` line so far.
fn scalings(serve: &Serve) -> Vec<(u32, u32)> {
    serve
        .out
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("[backend] scale ")?;
            let (a, b) = rest.split_once(" -> ")?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

fn drained(serve: &Serve) -> usize {
    serve
        .out
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("[backend]") && l.ends_with("drained and stopped"))
        .count()
}

/// A closed-loop bench of `concurrency` shared-prefix requests (512 prompt tokens, 32 out)
/// for `seconds`; returns its JSON report.
fn bench(url: &str, concurrency: usize, seconds: u32) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = dynamo_run()
        .args(["bench", "--url", url, "--model", "tiny"])
        .args(["--workload", "shared-prefix", "--groups", "16"])
        .args(["--system-prompt-tokens", "384", "--question-tokens", "128"])
        .args([
            "--output-tokens",
            "32",
            "--warmup",
            "0",
            "--requests",
            "100000",
        ])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--duration", &seconds.to_string()])
        .args([
            "--block-size",
            "64",
            "--output-json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn planner_graph(nats: Option<&NatsServer>) -> Serve {
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles/mocker.json");
    let sets = [
        format!("defaults.model_path={}", model_dir()),
        "frontend.http_port=0".into(),
        format!("planner.profile={}", profile.display()),
        // Decide every second; two quiet intervals before draining.
        "planner.planner_interval_ms=1000".into(),
        "planner.scale_down_after=2".into(),
        "planner.max_replicas=4".into(),
    ];
    let mut args = vec![graph("planner.yaml")];
    if let Some(n) = nats {
        args.extend(["--bus".into(), n.url()]);
    }
    for s in sets {
        args.extend(["--set".into(), s]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Serve::start(&args)
}

/// Up under load, down (by draining) under light load, no request lost either way.
fn scales_with_load(nats: Option<&NatsServer>) {
    let mut serve = planner_graph(nats);
    let frontend = serve.wait_out("/v1", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let url = base(&frontend);
    assert!(scalings(&serve).is_empty(), "no load, no change");
    // 32 requests in flight need more than one worker for a 100 ms TTFT.
    let heavy = bench(&url, 32, 6);
    assert_eq!(heavy["errors"], serde_json::json!({}), "{heavy}");
    let up = scalings(&serve);
    assert!(
        up.first().is_some_and(|&(from, to)| from == 1 && to >= 2),
        "the pool grew from 1 under load: {up:?}"
    );
    let peak = up.iter().map(|&(_, to)| to).max().unwrap();
    assert!(peak <= 4, "max_replicas holds: {up:?}");
    // Two requests in flight fit one worker: the pool drains back down while they run, and
    // none of them fails.
    let light = bench(&url, 2, 8);
    assert_eq!(light["errors"], serde_json::json!({}), "{light}");
    assert!(
        drained(&serve) >= 1,
        "a worker drained during the light run: {:?}",
        serve.out.lock().unwrap()
    );
    wait(
        "the pool back at one worker",
        Duration::from_secs(30),
        || {
            scalings(&serve).last().is_some_and(|&(_, to)| to == 1)
                && drained(&serve) == peak as usize - 1
        },
    );
    assert!(serve.terminate(Duration::from_secs(30)).success());
}

#[test]
fn planner_scales_a_pool_on_the_embedded_bus() {
    scales_with_load(None);
}

#[test]
fn planner_scales_a_pool_of_processes_over_nats() {
    let nats = NatsServer::start().unwrap();
    let watch = Watch::start(&nats.url(), "planner");
    scales_with_load(Some(&nats));
    // Every decision went out on the bus with its reason and inputs.
    let lines = watch.lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("scale up: the predicted load needs")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("scale down:") && l.contains("applied: ok")),
        "{lines:?}"
    );
}

#[test]
fn bad_planner_settings_fail_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let run = |sets: &[&str]| {
        let mut c = dynamo_run();
        c.arg("serve").arg(graph("planner.yaml"));
        c.args(["--set", &format!("defaults.model_path={}", model_dir())]);
        c.args(["--set", "frontend.http_port=0"]);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{sets:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let missing = dir.path().join("none.json");
    let e = run(&[&format!("planner.profile={}", missing.display())]);
    assert!(
        e.contains("none.json") && e.contains("dynamo-run profile"),
        "{e}"
    );
    let malformed = dir.path().join("bad.json");
    std::fs::write(&malformed, "{\"version\": 1, \"prefill\": [").unwrap();
    let e = run(&[&format!("planner.profile={}", malformed.display())]);
    assert!(e.contains("bad.json"), "{e}");
    // A profile of another model.
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles/mocker.json");
    let other = dir.path().join("other.json");
    let text = std::fs::read_to_string(&profile).unwrap().replacen(
        "\"model\": \"tiny\"",
        "\"model\": \"llama-70b\"",
        1,
    );
    assert!(text.contains("llama-70b"));
    std::fs::write(&other, text).unwrap();
    let e = run(&[&format!("planner.profile={}", other.display())]);
    assert!(e.contains("llama-70b") && e.contains("tiny"), "{e}");
    // A pool that is not a worker, targets that are not latencies, bounds that cross.
    let e = run(&["planner.pool=router"]);
    assert!(e.contains("planner.yaml") && e.contains("pool"), "{e}");
    let e = run(&["planner.ttft_target_ms=-5"]);
    assert!(e.contains("ttft-target-ms"), "{e}");
    let e = run(&["planner.min_replicas=5", "planner.max_replicas=2"]);
    assert!(e.contains("min 5") && e.contains("max 2"), "{e}");
    let e = run(&["planner.predictor=arima"]);
    assert!(e.contains("arima"), "{e}");
}
