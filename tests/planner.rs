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
    scalings_of(serve, "backend")
}

/// `(from, to)` of every `[{pool}] scale A -> B` line so far.
fn scalings_of(serve: &Serve, pool: &str) -> Vec<(u32, u32)> {
    let prefix = format!("[{pool}] scale ");
    serve
        .out
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (a, b) = rest.split_once(" -> ")?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

fn drained(serve: &Serve) -> usize {
    drained_of(serve, "backend")
}

fn drained_of(serve: &Serve, pool: &str) -> usize {
    let prefix = format!("[{pool}]");
    serve
        .out
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(&prefix) && l.ends_with("drained and stopped"))
        .count()
}

/// A closed-loop bench of `concurrency` shared-prefix requests (512 prompt tokens, 32 out)
/// for `seconds`; returns its JSON report.
fn bench(url: &str, concurrency: usize, seconds: u32) -> serde_json::Value {
    bench_shaped(url, concurrency, seconds, 384, 128, 32)
}

/// [`bench`] with prompts of a `system`-token shared prefix and a `question`, and `out`
/// output tokens.
fn bench_shaped(
    url: &str,
    concurrency: usize,
    seconds: u32,
    system: u32,
    question: u32,
    out: u32,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    common::succeed(
        dynamo_run()
            .args(["bench", "--url", url, "--model", "tiny"])
            .args(["--workload", "shared-prefix", "--groups", "16"])
            .args(["--system-prompt-tokens", &system.to_string()])
            .args(["--question-tokens", &question.to_string()])
            .args(["--output-tokens", &out.to_string()])
            .args(["--warmup", "0", "--requests", "100000"])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--duration", &seconds.to_string()])
            .args([
                "--block-size",
                "64",
                "--output-json",
                json.to_str().unwrap(),
            ]),
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// `GET /status.json` on the frontend.
fn status_json(port: u16) -> serde_json::Value {
    let r = common::http_get(port, "/status.json");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
    // The response may be chunked: the JSON object is between the outer braces.
    let (from, to) = (body.find('{').unwrap(), body.rfind('}').unwrap());
    serde_json::from_str(&body[from..=to]).unwrap_or_else(|e| panic!("{e}: {r}"))
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
    // The status page shows the pool grown, its workers and the decisions with reasons.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let status = status_json(port);
    let pool = &status["pools"][0];
    assert_eq!(pool["component"], "backend", "{status}");
    assert!(pool["desired"].as_u64().unwrap() >= 2, "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert!(workers.len() >= 2, "{status}");
    assert!(
        workers.iter().all(|w| w["total_blocks"].as_u64().is_some()),
        "{status}"
    );
    assert!(
        status["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"].as_str().unwrap().starts_with("scale up")),
        "{status}"
    );
    assert_eq!(status["targets"]["ttft_ms"], 100.0, "{status}");
    let page = common::http_get(port, "/status");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{page}"
    );
    assert!(
        page.contains("status.json") && !page.contains("src=\"http"),
        "self-contained"
    );
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

/// Disaggregated serving: a prompt-heavy load grows the prefill pool (real mocker prefill
/// workers, their KV written into the decode worker's memory), not the decode pool, and the
/// prefill pool drains back to one after it; no request fails.
#[test]
fn planner_scales_a_prefill_pool() {
    let dir = tempfile::tempdir().unwrap();
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles/mocker.json");
    let graph = dir.path().join("disagg-planner.yaml");
    std::fs::write(
        &graph,
        format!(
            "defaults:\n  model_path: {}\n  model_name: tiny\n  block_size: 64\ncomponents:\n  prefill:\n    role: prefill\n    engine: mocker\n  decode:\n    role: decode\n    engine: mocker\n  router:\n    role: router\n    disagg_min_remote_tokens: 0\n  frontend:\n    role: frontend\n    http_port: 0\n  planner:\n    role: planner\n    pool: decode\n    prefill_pool: prefill\n    profile: {}\n    ttft_target_ms: 100\n    itl_target_ms: 20\n    planner_interval_ms: 1000\n    scale_down_after: 2\n    max_replicas: 4\n    max_prefill_replicas: 4\n",
            model_dir(),
            profile.display()
        ),
    )
    .unwrap();
    let mut serve = Serve::start(&[graph.to_str().unwrap()]);
    let frontend = serve.wait_out("/v1", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    // 2048-token prompts, a quarter of them new, 16 tokens out: prefill work.
    let r = bench_shaped(&base(&frontend), 24, 8, 1536, 512, 16);
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    let up = scalings_of(&serve, "prefill");
    assert!(
        up.first().is_some_and(|&(from, to)| from == 1 && to >= 2),
        "the prefill pool grew: {:?}",
        serve.out.lock().unwrap()
    );
    assert!(
        scalings_of(&serve, "decode")
            .iter()
            .all(|&(_, to)| to < up.iter().map(|u| u.1).max().unwrap()),
        "the decode pool stayed below the prefill pool: {:?}",
        serve.out.lock().unwrap()
    );
    let peak = up.iter().map(|&(_, to)| to).max().unwrap();
    wait(
        "the prefill pool back at one worker",
        Duration::from_secs(30),
        || {
            scalings_of(&serve, "prefill")
                .last()
                .is_some_and(|&(_, to)| to == 1)
                && drained_of(&serve, "prefill") == peak as usize - 1
        },
    );
    assert!(serve.terminate(Duration::from_secs(30)).success());
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

mod role {
    //! The planner role against connectors that fail or record, over the embedded bus.

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use dynamo_actors::planner::connector::{Connector, ConnectorError};
    use dynamo_actors::planner::{ConnectorChoice, PlannerHandle, PlannerSettings};
    use dynamo_planner::{
        Limits, PlannerConfig, PolicySettings, Pools, PredictorKind, Profile, Targets,
    };
    use dynamo_protocols::planner::PlannerDecision;
    use dynamo_protocols::stats::{FrontendStats, ModelStats};
    use dynamo_runtime::bus::Outgoing;
    use dynamo_runtime::serve::encode_event;
    use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
    use dynamo_runtime::InstanceId;

    use super::common::runtime_on;

    /// Fails every call, counting them; or records the replicas asked for.
    #[derive(Default)]
    struct Fake {
        fail: bool,
        calls: AtomicU32,
        /// (pool, replicas) asked for, in order.
        scaled: Mutex<Vec<(String, u32)>>,
    }

    #[async_trait::async_trait]
    impl Connector for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn replicas(&self, pool: &str) -> Result<u32, ConnectorError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(ConnectorError::Failed {
                    pool: pool.into(),
                    reason: "the API server is down".into(),
                });
            }
            let scaled = self.scaled.lock().unwrap();
            Ok(scaled
                .iter()
                .rev()
                .find(|(p, _)| p == pool)
                .map_or(1, |(_, n)| *n))
        }
        async fn scale(&self, pool: &str, n: u32) -> Result<u32, ConnectorError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(ConnectorError::Failed {
                    pool: pool.into(),
                    reason: "the API server is down".into(),
                });
            }
            self.scaled.lock().unwrap().push((pool.to_string(), n));
            Ok(n)
        }
    }

    fn settings(ns: &str, ttft_ms: f64, connector: Arc<Fake>) -> PlannerSettings {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles/mocker.json");
        PlannerSettings {
            namespace: Namespace::new(ns).unwrap(),
            config: PlannerConfig {
                model: "tiny".into(),
                targets: Targets {
                    ttft_ms,
                    itl_ms: 20.0,
                },
                interval_s: 0.05,
                predictor: PredictorKind::Constant,
                policy: PolicySettings {
                    pools: Pools::Aggregated,
                    main: Limits { min: 1, max: 6 },
                    prefill: Limits { min: 0, max: 0 },
                    budget: 6,
                    down_after: 2,
                },
                stale_after: 3,
            },
            profile: Profile::load(&path, Some("tiny")).unwrap(),
            pool: "backend".into(),
            prefill_pool: None,
            connector: ConnectorChoice::Custom(connector),
        }
    }

    /// Where a frontend of `ns` publishes, and a 50 ms interval of `requests` requests of
    /// `isl` prompt and `osl` output tokens for model `tiny`.
    fn frontend_stats(
        ns: &str,
        requests: u64,
        isl: u64,
        osl: u64,
    ) -> (dynamo_runtime::subject::Subject, FrontendStats) {
        let subject = ComponentId::new(ns, "frontend")
            .unwrap()
            .event_subject(&Topic::new("stats").unwrap(), InstanceId::random());
        let mut stats = FrontendStats {
            interval_ms: 50,
            ..Default::default()
        };
        stats.models.insert(
            "tiny".into(),
            ModelStats {
                requests,
                input_tokens: requests * isl,
                output_tokens: requests * osl,
                ..Default::default()
            },
        );
        (subject, stats)
    }

    /// Publishes `stats` once an interval until a decision satisfies `done`; returns it.
    async fn publish_until(
        rt: &dynamo_runtime::Runtime,
        subject: &dynamo_runtime::subject::Subject,
        stats: &FrontendStats,
        rx: &mut tokio::sync::watch::Receiver<Option<PlannerDecision>>,
        done: impl Fn(&PlannerDecision) -> bool,
    ) -> PlannerDecision {
        let mut d = decision(rx, 1).await;
        while !done(&d) {
            rt.bus()
                .publish(Outgoing::new(subject.clone(), encode_event(stats).unwrap()))
                .await
                .unwrap();
            d = decision(rx, d.interval + 1).await;
        }
        d
    }

    /// Waits for decision number `n` and returns it.
    async fn decision(
        rx: &mut tokio::sync::watch::Receiver<Option<PlannerDecision>>,
        n: u64,
    ) -> PlannerDecision {
        loop {
            if let Some(d) = rx.borrow().clone() {
                if d.interval >= n {
                    return d;
                }
            }
            tokio::time::timeout(std::time::Duration::from_secs(10), rx.changed())
                .await
                .expect("the planner decides every interval")
                .unwrap();
        }
    }

    /// A connector that keeps failing is retried with backoff, not every interval, and the
    /// decisions say so.
    #[tokio::test]
    async fn a_failing_connector_is_retried_with_backoff() {
        let rt = runtime_on(None).await;
        let fake = Arc::new(Fake {
            fail: true,
            ..Default::default()
        });
        let p = PlannerHandle::start(&rt, settings("fail", 100.0, fake.clone()))
            .await
            .unwrap();
        let mut rx = p.last();
        let mut applied = Vec::new();
        for n in 1..=40 {
            applied.push(decision(&mut rx, n).await.applied);
        }
        let calls = fake.calls.load(Ordering::SeqCst);
        // Backoff from one interval, doubling: about log2(40) attempts, not 40.
        assert!((2..=8).contains(&calls), "{calls} calls over 40 intervals");
        assert!(
            applied
                .iter()
                .any(|a| a.starts_with("deferred: retrying in")
                    && a.contains("the API server is down")),
            "{applied:?}"
        );
        p.shutdown().await;
    }

    /// Statistics for a TTFT target below a prompt's time on an idle worker: the planner says
    /// no count meets it and runs at max; when the statistics stop it holds and says so.
    #[tokio::test]
    async fn unmeetable_targets_run_at_max_and_silence_holds() {
        let rt = runtime_on(None).await;
        let fake = Arc::new(Fake::default());
        let p = PlannerHandle::start(&rt, settings("unmeet", 5.0, fake.clone()))
            .await
            .unwrap();
        let mut rx = p.last();
        let (subject, stats) = frontend_stats("unmeet", 2, 512, 32);
        let seen = publish_until(&rt, &subject, &stats, &mut rx, |d| d.unmeetable.is_some()).await;
        assert!(
            seen.unmeetable
                .as_deref()
                .unwrap()
                .contains("TTFT target 5 ms"),
            "{seen:?}"
        );
        assert_eq!(seen.pools[0].desired, 6, "max: {seen:?}");
        assert_eq!(
            fake.scaled.lock().unwrap().last(),
            Some(&("backend".to_string(), 6))
        );
        // No more statistics: after stale_after intervals the decision holds and says why.
        let mut d = decision(&mut rx, seen.interval + 1).await;
        while d.stale_intervals < 3 {
            d = decision(&mut rx, d.interval + 1).await;
        }
        assert!(d.reason.contains("no frontend statistics"), "{d:?}");
        assert_eq!(d.pools[0].desired, 6, "held: {d:?}");
        p.shutdown().await;
    }

    /// Prefill and decode pools: each is sized for its own work and carried out on its own
    /// component; a prompt-heavy load needs more prefill workers than decode ones.
    #[tokio::test]
    async fn disaggregated_pools_are_sized_and_scaled_each() {
        let rt = runtime_on(None).await;
        let fake = Arc::new(Fake::default());
        let mut s = settings("disagg", 100.0, fake.clone());
        s.config.policy = PolicySettings {
            pools: Pools::Disaggregated,
            main: Limits { min: 1, max: 6 },
            prefill: Limits { min: 1, max: 6 },
            budget: 12,
            down_after: 2,
        };
        s.pool = "decode".into();
        s.prefill_pool = Some("prefill".into());
        let p = PlannerHandle::start(&rt, s).await.unwrap();
        let mut rx = p.last();
        // About 400 requests a second of 1024 prompt and 64 output tokens.
        let (subject, stats) = frontend_stats("disagg", 20, 1024, 64);
        let d = publish_until(&rt, &subject, &stats, &mut rx, |d| {
            d.pools.iter().any(|p| p.desired > 1)
        })
        .await;
        let (decode, prefill) = (&d.pools[0], &d.pools[1]);
        assert_eq!(
            (decode.component.as_str(), decode.kind.as_str()),
            ("decode", "decode")
        );
        assert_eq!(
            (prefill.component.as_str(), prefill.kind.as_str()),
            ("prefill", "prefill")
        );
        assert!(prefill.desired > decode.desired, "{d:?}");
        assert!(prefill.desired <= 6 && decode.desired >= 1, "{d:?}");
        let scaled = fake.scaled.lock().unwrap().clone();
        assert!(
            scaled
                .iter()
                .any(|(p, n)| p == "prefill" && *n == prefill.desired),
            "{scaled:?}"
        );
        p.shutdown().await;
    }
}

/// `dynamo-run simulate` writes its report and plot, replays a trace it wrote, and refuses
/// bad input with what to change.
#[test]
fn simulate_reports_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles/mocker.json");
    let (json, svg, trace) = (
        dir.path().join("r.json"),
        dir.path().join("r.svg"),
        dir.path().join("t.jsonl"),
    );
    common::succeed(
        dynamo_run()
            .args(["simulate", "--load", "step:10,5,20,40", "--duration", "60"])
            .args(["--ttft-target-ms", "100", "--itl-target-ms", "20"])
            .args([
                "--planner-interval-ms",
                "5000",
                "--startup-s",
                "2",
                "--max-replicas",
                "6",
            ])
            .arg("--profile")
            .arg(&profile)
            .arg("--output-json")
            .arg(&json)
            .arg("--plot")
            .arg(&svg)
            .arg("--write-trace")
            .arg(&trace),
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let lines = std::fs::read_to_string(&trace).unwrap().lines().count() as u64;
    assert_eq!(r["requests"], lines, "{r}");
    assert_eq!(r["completed"], lines, "{r}");
    assert!(
        r["peak_workers"].as_u64().unwrap() >= 2,
        "the step needed more: {r}"
    );
    assert!(!r["decisions"].as_array().unwrap().is_empty());
    assert!(r["timeline"].as_array().unwrap().len() >= 5);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("<polyline"),
        "{plot}"
    );
    assert!(!plot.contains("href"), "self-contained: {plot}");
    // The trace it wrote replays (static workers: no planner).
    let out = common::succeed(
        dynamo_run()
            .args([
                "simulate",
                "--workers",
                "2",
                "--ttft-target-ms",
                "100",
                "--itl-target-ms",
                "20",
            ])
            .arg("--trace")
            .arg(&trace),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{lines} requests (0 failed)")),
        "{text}"
    );
    // Per-request records, and a run replaying their routing: the same latencies.
    let records = dir.path().join("requests.jsonl");
    let static2 = |extra: &[&std::ffi::OsStr]| {
        let mut c = dynamo_run();
        c.args(["simulate", "--workers", "2"])
            .args(["--ttft-target-ms", "100", "--itl-target-ms", "20"])
            .arg("--trace")
            .arg(&trace)
            .args(extra);
        c
    };
    let own = common::succeed(&mut static2(&[
        "--requests-jsonl".as_ref(),
        records.as_os_str(),
    ]));
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len() as u64, lines);
    assert!(recs
        .iter()
        .all(|r| r["ok"] == true && r["ttft_ms"].as_f64().unwrap() > 0.0));
    let workers: std::collections::BTreeSet<u64> =
        recs.iter().map(|r| r["worker"].as_u64().unwrap()).collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let replay = common::succeed(&mut static2(&[
        "--route-from".as_ref(),
        records.as_os_str(),
    ]));
    let latencies = |o: &std::process::Output| {
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        t.lines()
            .find(|l| l.contains("TTFT ms"))
            .map(str::to_string)
            .unwrap_or(t)
    };
    assert_eq!(latencies(&replay), latencies(&own));
    // The same trace on a disaggregated deployment: prompts go to the prefill workers.
    let out = common::succeed(
        dynamo_run()
            .args(["simulate", "--workers", "1", "--prefill-workers", "1"])
            .args(["--ttft-target-ms", "100", "--itl-target-ms", "20"])
            .arg("--trace")
            .arg(&trace),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{lines} requests (0 failed)"))
            && text.contains("prompts prefilled on prefill workers"),
        "{text}"
    );
    let remote: u64 = text
        .lines()
        .find(|l| l.contains("prompts prefilled"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(remote > 0, "{text}");
    // Bad input.
    let bad = |args: &[&str]| {
        let out = dynamo_run().arg("simulate").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} ran");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let targets = ["--ttft-target-ms", "100", "--itl-target-ms", "20"];
    let e = bad(&[&["--load", "wave:3"][..], &targets].concat());
    assert!(e.contains("wave") && e.contains("steady"), "{e}");
    let e = bad(&["--load", "steady:5"]);
    assert!(e.contains("--ttft-target-ms"), "{e}");
    let e = bad(&[
        &["--load", "steady:5", "--prefill-pool", "prefill"][..],
        &targets,
    ]
    .concat());
    assert!(
        e.contains("--profile") && e.contains("--prefill-workers"),
        "{e}"
    );
    let profiled = ["--profile", profile.to_str().unwrap()];
    let e = bad(&[
        &["--load", "steady:5", "--prefill-workers", "2"][..],
        &targets,
        &profiled,
    ]
    .concat());
    assert!(e.contains("--prefill-pool"), "{e}");
    let e = bad(&targets);
    assert!(e.contains("--trace") && e.contains("--load"), "{e}");
    let e = bad(&[&["--load", "steady:5", "--hop-ms=-1"][..], &targets].concat());
    assert!(e.contains("--hop-ms") && e.contains("0 or more"), "{e}");
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"timestamp\": 1, \"input_length\": 10}\n").unwrap();
    let e = bad(&[&["--trace", broken.to_str().unwrap()][..], &targets].concat());
    assert!(e.contains("line 1") && e.contains("output_length"), "{e}");
    // Routes from a run on two workers cannot be replayed on one, nor from a file that
    // holds no request records.
    let replay = |from: &Path, workers: &str| {
        bad(&[
            &["--trace", trace.to_str().unwrap(), "--workers", workers][..],
            &["--route-from", from.to_str().unwrap()],
            &targets,
        ]
        .concat())
    };
    let e = replay(&records, "1");
    assert!(e.contains("2 workers") && e.contains("--workers 2"), "{e}");
    let e = replay(&broken, "2");
    assert!(
        e.contains("line 1") && e.contains("--requests-jsonl"),
        "{e}"
    );
    let e = bad(&[
        &[
            "--load",
            "steady:5",
            "--route-from",
            records.to_str().unwrap(),
        ][..],
        &targets,
        &profiled,
    ]
    .concat());
    assert!(e.contains("static"), "{e}");
}
