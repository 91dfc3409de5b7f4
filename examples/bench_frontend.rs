//! Frontend benchmark: `dynamo-run in=http out=echo` (frontend and echo worker in one process on
//! the embedded bus) under streaming chat load with ~600-token prompts, next to the echo engine
//! called directly in this process (no frontend) with the same prompts, pacing and concurrency.
//!
//! Reports per concurrency: req/s, TTFT and ITL p50/p99 for both, the frontend's added TTFT,
//! the server process's CPU-seconds per request and peak RSS; and, separately, the time to
//! apply the chat template and tokenize one ~600-token chat.
//!
//! At concurrency 32 it also runs the same load against four mocker workers in the server's
//! process (`out=mocker --num-workers 4`): the serving system's CPU per request where the
//! engine batches.
//!
//! Run with `scripts/bench-frontend` (release build). Knobs: BENCH_DELAY_MS (echo pacing, 5),
//! BENCH_MAX_TOKENS (64), BENCH_REQUESTS (scale factor, 1.0), BENCH_CONCURRENCY (levels to
//! run, of 1,32,128).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_engine::{EchoEngine, EchoSettings, Engine};
use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
use dynamo_preprocessor::{ModelFolder, Preprocessor};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WORDS: &str = "the server routes each request to the worker that holds the longest cached prefix \
of its prompt weighed against load while the planner adds and removes workers to hold latency targets \
at the least cost and the offloader moves cold blocks to host memory and disk";

/// A chat of about `tokens` tokens, different for each `seed`.
fn chat_body(model: &str, seed: u64, tokens: usize, max_tokens: u32) -> Value {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut text = String::new();
    // The words average two tokens.
    for _ in 0..tokens / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(words[(x % words.len() as u64) as usize]);
        text.push(' ');
    }
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text}
        ],
        "max_tokens": max_tokens,
        "stream": true,
        "ignore_eos": true
    })
}

#[derive(Default)]
struct Stats {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    requests: usize,
    wall: f64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut h = Histogram::<u64>::new(3).unwrap();
    for x in v {
        h.record((x * 1e6).max(1.0) as u64).unwrap();
    }
    h.value_at_quantile(p) as f64 / 1e3
}

fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ")".
    let ticks: f64 = fields
        .get(11)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// When one request started, and when each of its visible tokens arrived.
type Timings = futures::future::BoxFuture<'static, (Instant, Vec<Instant>)>;

/// Runs `n` requests, `conc` at a time, and gathers their TTFT and ITL.
async fn drive(conc: usize, n: usize, one: Arc<dyn Fn(usize) -> Timings + Send + Sync>) -> Stats {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (next, one) = (next.clone(), one.clone());
            tokio::spawn(async move {
                let mut s = Stats::default();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break s;
                    }
                    let (t0, tokens) = one(i).await;
                    if let Some(first) = tokens.first() {
                        s.ttft.push(first.duration_since(t0).as_secs_f64());
                    }
                    s.itl.extend(
                        tokens
                            .windows(2)
                            .map(|w| w[1].duration_since(w[0]).as_secs_f64()),
                    );
                    s.requests += 1;
                }
            })
        })
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await.unwrap();
        all.ttft.extend(s.ttft);
        all.itl.extend(s.itl);
        all.requests += s.requests;
    }
    all.wall = started.elapsed().as_secs_f64();
    all
}

async fn http_load(base: &str, model: &str, conc: usize, n: usize, max_tokens: u32) -> Stats {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(conc)
        .build()
        .unwrap();
    let (base, model) = (base.to_string(), model.to_string());
    let one = move |i: usize| -> Timings {
        let (client, base) = (client.clone(), base.clone());
        let body = chat_body(&model, i as u64, 600, max_tokens);
        Box::pin(async move {
            let t0 = Instant::now();
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut stream = r.bytes_stream();
            let mut tokens = Vec::new();
            let mut buf = Vec::new();
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk.unwrap());
                // One event per "\n\n"; count those carrying content.
                while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                    let ev: Vec<u8> = buf.drain(..pos + 2).collect();
                    if ev.windows(10).any(|w| w == b"\"content\":")
                        && !ev.windows(12).any(|w| w == b"\"content\":\"\"")
                    {
                        tokens.push(Instant::now());
                    }
                }
            }
            (t0, tokens)
        })
    };
    drive(conc, n, Arc::new(one)).await
}

async fn engine_load(
    pre: &Preprocessor,
    model: &str,
    conc: usize,
    n: usize,
    max_tokens: u32,
    delay: Duration,
) -> Stats {
    let engine = Arc::new(EchoEngine::new(EchoSettings {
        delay_per_token: delay,
    }));
    // Count, as the HTTP client does, only tokens that show as text (not special tokens).
    let tok = pre.tokenizer().clone();
    let visible: Arc<Vec<bool>> = Arc::new(
        (0..tok.get_vocab_size(true) as u32)
            .map(|t| !tok.decode(&[t], true).unwrap_or_default().is_empty())
            .collect(),
    );
    let reqs: Arc<Vec<_>> = Arc::new(
        (0..n)
            .map(|i| {
                pre.chat(&chat_body(model, i as u64, 600, max_tokens))
                    .unwrap()
                    .request
            })
            .collect(),
    );
    let one = move |i: usize| -> Timings {
        let (engine, visible, req) = (engine.clone(), visible.clone(), reqs[i].clone());
        Box::pin(async move {
            let t0 = Instant::now();
            let mut stream = engine.generate(req, CancellationToken::new()).unwrap();
            let mut tokens = Vec::new();
            while let Some(out) = stream.next().await {
                if out.unwrap().token_ids.iter().any(|&t| visible[t as usize]) {
                    tokens.push(Instant::now());
                }
            }
            (t0, tokens)
        })
    };
    drive(conc, n, Arc::new(one)).await
}

/// One table row: throughput and latency percentiles, then `extra` (the last columns).
fn row(conc: usize, name: &str, s: &Stats, extra: &str) {
    println!(
        "| {conc} | {name} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} {extra}",
        s.requests as f64 / s.wall,
        pct(&s.ttft, 0.5),
        pct(&s.ttft, 0.99),
        pct(&s.itl, 0.5),
        pct(&s.itl, 0.99),
    );
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[tokio::main]
async fn main() {
    let delay_ms: u64 = env_or("BENCH_DELAY_MS", 5);
    let max_tokens: u32 = env_or("BENCH_MAX_TOKENS", 64);
    let scale: f64 = env_or("BENCH_REQUESTS", 1.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("# bench-frontend on {cpu}, {cores} cores");
    println!("echo engine paced at {delay_ms} ms/token, {max_tokens} output tokens, ~600-token chat prompts, streaming\n");

    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), &MakeModelSettings::default()).unwrap();
    let folder = ModelFolder::load(dir.path()).unwrap();
    let model = "bench";
    let pre = Preprocessor::new(model, folder.files()).unwrap();

    // Template + tokenization alone.
    let bodies: Vec<Value> = (0..2000)
        .map(|i| chat_body(model, i, 600, max_tokens))
        .collect();
    let mut prep = Vec::new();
    let mut tokens = 0;
    for b in &bodies {
        let t0 = Instant::now();
        let p = pre.chat(b).unwrap();
        prep.push(t0.elapsed().as_secs_f64());
        tokens += p.prompt_tokens() as usize;
    }
    println!(
        "template + tokenize (+ validation) of a {}-token chat: p50 {:.3} ms, p99 {:.3} ms (target < 0.5 ms p50)\n",
        tokens / bodies.len(),
        pct(&prep, 0.5),
        pct(&prep, 0.99)
    );

    // The example sits in target/<profile>/examples/; the binary one level up.
    let bin = std::env::var("DYNAMO_RUN_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(|p| p.parent())
                .unwrap()
                .join("dynamo-run")
        });
    let serve = |engine: &[&str]| {
        let mut child = Command::new(&bin)
            .args(["in=http"])
            .args(engine)
            .args([
                "--model-path",
                dir.path().to_str().unwrap(),
                "--model-name",
                model,
                "--http-host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--max-inflight",
                "100000",
            ])
            .env("DYN_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn dynamo-run (cargo build --release first)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .expect("ready line")
            .to_string();
        (child, format!("http://{addr}"))
    };
    let delay = delay_ms.to_string();
    let (mut child, base) = serve(&["out=echo", "--echo-delay-ms", &delay]);
    let pid = child.id();
    // Warm up connections and caches.
    http_load(&base, model, 4, 40, max_tokens).await;

    println!("| concurrency | path | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | server CPU-s/req | server peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut added = Vec::new();
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32, 128]);
    for (conc, n) in [(1usize, 60usize), (32, 1200), (128, 2400)] {
        if !levels.contains(&conc) {
            continue;
        }
        let n = ((n as f64) * scale).max(conc as f64) as usize;
        let e = engine_load(
            &pre,
            model,
            conc,
            n,
            max_tokens,
            Duration::from_millis(delay_ms),
        )
        .await;
        let cpu0 = proc_cpu_secs(pid);
        let h = http_load(&base, model, conc, n, max_tokens).await;
        let cpu = (proc_cpu_secs(pid) - cpu0) / h.requests as f64;
        for (name, s, extra) in [
            ("engine alone", &e, String::from("| - | - |")),
            (
                "frontend + engine",
                &h,
                format!("| {:.4} | {:.0} |", cpu, peak_rss_mib(pid)),
            ),
        ] {
            row(conc, name, s, &extra);
        }
        added.push((
            conc,
            pct(&h.ttft, 0.5) - pct(&e.ttft, 0.5),
            pct(&h.itl, 0.5) - pct(&e.itl, 0.5),
        ));
    }
    println!();
    for (conc, ttft, itl) in added {
        println!("concurrency {conc}: frontend adds {ttft:.3} ms to TTFT p50 and {itl:.3} ms to ITL p50 (target at 32: TTFT < 1 ms)");
    }
    // The server's own view: TTFT from request arrival to first token out of the frontend.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (
        series("dynamo_frontend_time_to_first_token_seconds_sum"),
        series("dynamo_frontend_time_to_first_token_seconds_count"),
    );
    println!(
        "server-measured TTFT mean over all runs: {:.3} ms ({count} requests)",
        sum / count.max(1.0) * 1e3
    );
    let _ = child.kill();
    let _ = child.wait();

    // The same load on four mocker workers in the server's process (default timing model):
    // the serving system's CPU per request where the engine batches.
    if levels.contains(&32) {
        let (mut child, base) = serve(&["out=mocker", "--num-workers", "4"]);
        let pid = child.id();
        http_load(&base, model, 4, 40, max_tokens).await;
        let n = ((1200.0 * scale) as usize).max(32);
        let cpu0 = proc_cpu_secs(pid);
        let h = http_load(&base, model, 32, n, max_tokens).await;
        let cpu = (proc_cpu_secs(pid) - cpu0) / h.requests as f64;
        println!("\n| concurrency | path | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | server CPU-s/req | server peak RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let extra = format!("| {cpu:.4} | {:.0} |", peak_rss_mib(pid));
        row(32, "frontend + 4 mockers", &h, &extra);
        let _ = child.kill();
        let _ = child.wait();
    }
}
