//! `dynamo-run serve` on the shipped graphs: bad graphs fail before anything starts, naming
//! file, line and key; `config/mocker-cluster.yaml` serves on the embedded bus and takes a
//! `dynamo-run bench` run; over a real nats-server each replica is a supervised process that
//! answers the NATS service protocol (checked with `nats-py`), is restarted when killed, and
//! SIGTERM stops them all.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{base, dynamo_run, graph, model_dir, signal, Serve};
use dynamo_runtime::testing::NatsServer;
use nix::sys::signal::Signal;

/// `config/mocker-cluster.yaml` over `nats`, with `backends` backend replicas and the
/// frontend on a free port.
fn cluster_over(nats: &NatsServer, backends: usize) -> Serve {
    let model = format!("defaults.model_path={}", model_dir());
    let replicas = format!("backend.replicas={backends}");
    Serve::start(&[
        &graph("mocker-cluster.yaml"),
        "--bus",
        &nats.url(),
        "--set",
        &model,
        "--set",
        &replicas,
        "--set",
        "frontend.http_port=0",
    ])
}

/// Processes running now: (pid, parent pid, command line, arguments separated by spaces).
fn processes() -> Vec<(i32, i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The parent pid follows the state, after the parenthesised command name.
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            Some((pid, ppid, cmd))
        })
        .collect()
}

#[test]
fn bad_graphs_fail_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let worker = "  backend:\n    role: worker\n    engine: mocker\n    model_path: /m\n";
    let cases: &[(&str, String, &str)] = &[
        ("unknown key", format!("components:\n{worker}    engin: mocker\n"), ":6: components.backend.engin: unknown key"),
        ("unknown role", "components:\n  x:\n    role: gpu\n".into(), ":3: components.x.role: unknown role"),
        ("zero replicas", format!("components:\n{worker}    replicas: 0\n"), ":6: components.backend.replicas"),
        ("missing engine", "components:\n  backend:\n    role: worker\n    model_path: /m\n".into(), "needs `engine:`"),
        (
            "cycle",
            format!("components:\n{worker}    depends_on: [frontend]\n  frontend:\n    role: frontend\n    depends_on: [backend]\n"),
            "dependency cycle",
        ),
        ("bad reference", format!("components:\n{worker}    depends_on: [nobody]\n"), ":6: components.backend.depends_on: no component named \"nobody\""),
        (
            "port clash",
            "components:\n  a:\n    role: frontend\n    http_port: 9000\n  b:\n    role: frontend\n    http_port: 9000\n".into(),
            "port 9000 is also a http_port",
        ),
        ("wrong type", format!("components:\n{worker}    num_gpu_blocks: lots\n"), ":6: components.backend.num_gpu_blocks"),
        ("worker key on a frontend", "components:\n  f:\n    role: frontend\n    engine: mocker\n".into(), ":4: components.f.engine: only a worker"),
    ];
    for (what, yaml, needle) in cases {
        let file = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&file, yaml).unwrap();
        let t = Instant::now();
        let out = dynamo_run().arg("serve").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        assert!(
            stderr.contains(file.to_str().unwrap()),
            "{what} names the file: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("ready"),
            "{what}: something started"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    // --set names a component that is not there.
    let out = dynamo_run()
        .args([
            "serve",
            &graph("mocker-cluster.yaml"),
            "--set",
            "nobody.replicas=2",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no component \"nobody\""));
}

#[test]
fn mocker_cluster_on_the_embedded_bus_serves_a_bench_run() {
    let model = format!("defaults.model_path={}", model_dir());
    let mut serve = Serve::start(&[
        &graph("mocker-cluster.yaml"),
        "--set",
        &model,
        "--set",
        "frontend.http_port=0",
    ]);
    let frontend = serve.wait_out("[frontend] ready: http://", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(30));
    assert!(serve
        .out
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("32 worker(s)")));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    common::succeed(
        dynamo_run()
            .args([
                "bench",
                "--url",
                &base(&frontend),
                "--model",
                "tiny",
                "--workload",
                "shared-prefix",
            ])
            .args([
                "--requests",
                "48",
                "--concurrency",
                "8",
                "--warmup",
                "0",
                "--output-tokens",
                "8",
            ])
            .args([
                "--groups",
                "4",
                "--system-prompt-tokens",
                "256",
                "--question-tokens",
                "32",
            ])
            .args([
                "--block-size",
                "64",
                "--output-json",
                json.to_str().unwrap(),
            ]),
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["completed"], 48, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    // The KV router (a router component here) finds the shared prefixes.
    assert!(r["cached_token_ratio"].as_f64().unwrap() > 0.3, "{r}");
    assert!(serve.terminate(Duration::from_secs(30)).success());
}

#[test]
fn over_nats_replicas_are_supervised_processes() {
    let nats = NatsServer::start().unwrap();
    let mut serve = cluster_over(&nats, 2);
    let frontend = serve.wait_out(
        "[frontend.0] ready: model tiny at http://",
        0,
        Duration::from_secs(60),
    );
    serve.wait_out("ready: graph", 0, Duration::from_secs(30));
    let url = format!("{}/v1/completions", base(&frontend));
    let ask = || {
        let out = Command::new("curl")
            .args(["-sf", &url, "-H", "content-type: application/json"])
            .args([
                "-d",
                r#"{"model": "tiny", "prompt": "hello there", "max_tokens": 4}"#,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    };
    ask();
    // `watch events` shows the KV blocks a request stores; `ls` shows models and load.
    // `watch` says on stderr once it is subscribed: events before that are not its to show.
    let watch = common::Watch::start(&nats.url(), "events");
    let lines = watch.lines.clone();
    let until = Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("] stored "))
    {
        assert!(
            Instant::now() < until,
            "watch showed no stored event: {:?}",
            lines.lock().unwrap()
        );
        // A new prompt each round: a repeated one is cached and stores nothing new.
        round += 1;
        let prompt: String = (0..120).map(|i| format!("word{i}r{round} ")).collect();
        let body =
            serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 2}).to_string();
        Command::new("curl")
            .args([
                "-sf",
                &url,
                "-H",
                "content-type: application/json",
                "-d",
                &body,
            ])
            .output()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(watch);
    let ls = dynamo_run()
        .args(["--bus", &nats.url(), "ls"])
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert_eq!(ls.matches("model=tiny  kv=").count(), 2, "{ls}");
    assert!(ls.contains("dynamo.router.route"), "{ls}");
    // Every component answers the NATS service protocol (checked with the nats-py client).
    let out = Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nats_micro.py"))
        .arg(nats.url())
        .arg("dynamo-backend:generate,model_files,kv_dump")
        .arg("dynamo-router:route")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok dynamo-router STATS"), "{stdout}");
    // Kill one worker process: the supervisor restarts it.
    let serve_pid = serve.child.id() as i32;
    let (pid, _, _) = processes()
        .into_iter()
        .find(|(_, ppid, cmd)| {
            *ppid == serve_pid && cmd.contains("in=dyn://dynamo.backend.generate")
        })
        .expect("a worker child of serve");
    signal(pid, Signal::SIGKILL);
    serve.wait_err("restarting in", Duration::from_secs(10));
    serve.wait_out("[backend.", 2, Duration::from_secs(30));
    ask();
    let status = serve.terminate(Duration::from_secs(40));
    assert!(status.success(), "{status}");
    // Every child is gone.
    let alive = processes()
        .iter()
        .filter(|(_, _, cmd)| cmd.contains(&nats.url()))
        .count();
    assert_eq!(alive, 0, "children left running");
}

/// Children of a supervisor killed outright (SIGKILL: no chance to stop them) notice and stop.
#[test]
fn children_do_not_outlive_a_killed_supervisor() {
    let nats = NatsServer::start().unwrap();
    let mut serve = cluster_over(&nats, 1);
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let children = || {
        processes()
            .iter()
            .filter(|(_, _, cmd)| cmd.contains(&nats.url()) && cmd.contains("--exit-with-parent"))
            .count()
    };
    assert_eq!(children(), 3, "backend, router and frontend processes");
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    while children() > 0 {
        assert!(
            Instant::now() < until,
            "{} children outlived the supervisor",
            children()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
