//! `dynamo-run bench`: an OpenAI-HTTP load generator.
//!
//! Workloads send token-id prompts to `/v1/completions` (exact lengths on any model; ids are
//! drawn from 260..3900, inside every vocabulary of 4096 tokens or more), streaming with
//! `include_usage` so that TTFT, ITL, output tokens and cached tokens come from the server:
//! - `shared-prefix`: `--groups` x `--prompts-per-group`; each group shares a system prompt of
//!   `--system-prompt-tokens`, each prompt adds a question of `--question-tokens`; each request
//!   picks a group at random and that group's next prompt;
//! - `multi-turn`: `--users` x `--turns`; each turn re-sends the history plus a new question;
//! - `trace:FILE`: Mooncake-format JSONL (`timestamp` ms, `input_length`, `output_length`,
//!   `hash_ids`), where equal hash ids become equal blocks of `--trace-block-size` tokens;
//!   sent at the trace's times unless `--request-rate` or `--concurrency` pace it.
//!
//! Load is closed-loop at `--concurrency`, or open-loop Poisson at `--request-rate` (with
//! `--concurrency` as the cap in flight); bounded by `--requests` and `--duration`; the first
//! `--warmup` requests are not measured. Results go to stdout, `--output-json` and `--plot` (SVG).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynamo_simulator::trace::{self, Rng};
use dynamo_simulator::RequestRecord;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The frontend, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    #[arg(long)]
    model: String,
    /// shared-prefix, multi-turn, or trace:FILE.jsonl
    #[arg(long, default_value = "shared-prefix")]
    workload: String,
    /// Measured requests (after warm-up).
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Requests in flight (closed loop), or the cap in flight with --request-rate.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Send no request after this many seconds even if some remain (those in flight finish).
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 8)]
    groups: usize,
    #[arg(long, default_value_t = 32)]
    prompts_per_group: usize,
    #[arg(long, default_value_t = 1024)]
    system_prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    question_tokens: usize,
    #[arg(long, default_value_t = 64)]
    output_tokens: u32,
    #[arg(long, default_value_t = 8)]
    users: usize,
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Tokens per hash id in a trace.
    #[arg(long, default_value_t = 512)]
    trace_block_size: usize,
    /// What to do with a trace line that does not parse: skip it (reported) or abort.
    #[arg(long, default_value = "abort", value_parser = ["skip", "abort"])]
    on_bad_line: String,
    #[arg(long)]
    output_json: PathBuf,
    /// One JSON line per measured request (its index in the workload, start, TTFT,
    /// end-to-end, cached tokens, status), as `dynamo-run simulate --requests-jsonl` writes
    /// them: to compare a real run with a simulated one request by request.
    #[arg(long)]
    requests_jsonl: Option<PathBuf>,
    /// Write an SVG plot of TTFT and end-to-end latency over the run.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV block size of the workers, for the oracle hit rate.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// With both targets: SLA attainment, the share of requests (failed ones included) whose
    /// TTFT and mean ITL are within them (as `dynamo-run simulate` counts it).
    #[arg(long, requires = "itl_target_ms")]
    ttft_target_ms: Option<f64>,
    #[arg(long, requires = "ttft_target_ms")]
    itl_target_ms: Option<f64>,
}

/// One request to send: prompt token ids, output length, and (traces) when to send it.
#[derive(Debug, Clone)]
struct Job {
    prompt: Vec<u32>,
    max_tokens: u32,
    at: Option<Duration>,
}

fn shared_prefix(a: &BenchArgs, n: usize) -> Vec<Job> {
    let mut rng = Rng(a.seed);
    let groups = a.groups.max(1);
    let per_group = a.prompts_per_group.max(1);
    let systems: Vec<Vec<u32>> = (0..groups)
        .map(|_| rng.tokens(a.system_prompt_tokens))
        .collect();
    let questions: Vec<Vec<u32>> = (0..groups * per_group)
        .map(|_| rng.tokens(a.question_tokens))
        .collect();
    // Each request picks a group at random (so no routing policy lines up with the order) and
    // the group's next prompt; past prompts-per-group, a group's prompts repeat.
    let mut next = vec![0usize; groups];
    (0..n)
        .map(|_| {
            let g = (rng.next_u64() % groups as u64) as usize;
            let k = next[g] % per_group;
            next[g] += 1;
            let mut prompt = systems[g].clone();
            prompt.extend_from_slice(&questions[g * per_group + k]);
            Job {
                prompt,
                max_tokens: a.output_tokens,
                at: None,
            }
        })
        .collect()
}

fn multi_turn(a: &BenchArgs, n: usize) -> Vec<Job> {
    let mut rng = Rng(a.seed);
    let mut histories: Vec<Vec<u32>> = (0..a.users.max(1))
        .map(|_| rng.tokens(a.system_prompt_tokens))
        .collect();
    let mut jobs = Vec::new();
    'outer: for _turn in 0..a.turns.max(1) {
        for h in histories.iter_mut() {
            if jobs.len() == n {
                break 'outer;
            }
            h.extend(rng.tokens(a.question_tokens));
            jobs.push(Job {
                prompt: h.clone(),
                max_tokens: a.output_tokens,
                at: None,
            });
            // The answer joins the history for the next turn.
            h.extend(rng.tokens(a.output_tokens as usize));
        }
    }
    jobs
}

/// Parses a Mooncake trace ([`dynamo_simulator::trace`], as the simulator reads it); bad
/// lines are skipped (and reported) or abort, as asked.
fn trace(a: &BenchArgs, path: &Path) -> Result<Vec<Job>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trace {}", path.display()))?;
    let mut skipped = 0;
    let reqs = trace::parse_mooncake(&text, a.on_bad_line == "skip", |e| {
        eprintln!("trace {} {e}; skipped", path.display());
        skipped += 1;
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "trace {} {e} (use --on-bad-line skip to skip such lines)",
            path.display()
        )
    })?;
    if skipped > 0 {
        eprintln!(
            "trace: {skipped} bad lines skipped, {} requests",
            reqs.len()
        );
    }
    Ok(reqs
        .iter()
        .enumerate()
        .map(|(i, r)| Job {
            prompt: trace::prompt(r, i, a.trace_block_size, a.seed),
            max_tokens: r.output_length,
            at: Some(Duration::from_secs_f64(r.timestamp / 1e3)),
        })
        .collect())
}

#[derive(Debug, Default, Clone)]
struct Sample {
    /// The request's index in the workload.
    index: usize,
    /// The worker instance that served it (the frontend's `x-dynamo-instance-id`).
    worker: Option<u64>,
    start: f64,
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    output_tokens: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// The completion tokens asked for (`ignore_eos`: what a complete answer has).
    expected: u32,
    status: Option<u16>,
}

async fn send(client: &reqwest::Client, url: &str, model: &str, job: &Job, t0: Instant) -> Sample {
    let started = Instant::now();
    let mut s = Sample {
        start: started.duration_since(t0).as_secs_f64(),
        expected: job.max_tokens,
        ..Default::default()
    };
    let body = json!({"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": true,
                      "ignore_eos": true, "stream_options": {"include_usage": true}});
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            s.status = Some(0);
            return s;
        }
    };
    if !resp.status().is_success() {
        s.status = Some(resp.status().as_u16());
        return s;
    }
    s.worker = resp
        .headers()
        .get(dynamo_actors::frontend::WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| dynamo_runtime::InstanceId::parse_hex(v).ok())
        .map(|i| i.as_u64());
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            s.status = Some(0);
            return s;
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let Some(data) = std::str::from_utf8(&event)
                .ok()
                .and_then(|e| e.trim().strip_prefix("data: "))
            else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v.get("error").is_some() {
                s.status = Some(500);
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                s.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
            let has_text = v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some(now.duration_since(started).as_secs_f64() * 1e3),
                    Some(l) => s.itl.push(now.duration_since(l).as_secs_f64() * 1e3),
                }
                last = Some(now);
            }
        }
    }
    s.e2e = started.elapsed().as_secs_f64() * 1e3;
    s.status.get_or_insert(200);
    s
}

fn stats(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null, "max": null, "mean": null});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[v.len() - 1], "mean": v.iter().sum::<f64>() / v.len() as f64})
}

fn progress(done: usize, total: usize, errors: usize, started: Instant) {
    let width = 30;
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    eprint!(
        "\r[{}{}] {done}/{total} requests, {:.1} req/s, {errors} errors ",
        "#".repeat(filled),
        ".".repeat(width - filled),
        done as f64 / started.elapsed().as_secs_f64().max(1e-9)
    );
    let _ = std::io::stderr().flush();
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.request_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--request-rate must be a positive number");
    }
    let total = a.requests + a.warmup;
    let mut jobs = match a.workload.as_str() {
        "shared-prefix" => shared_prefix(&a, total),
        "multi-turn" => multi_turn(&a, total),
        w if w.starts_with("trace:") => trace(&a, Path::new(&w["trace:".len()..]))?,
        other => bail!("unknown workload {other:?}; use shared-prefix, multi-turn or trace:FILE"),
    };
    jobs.truncate(total);
    if jobs.is_empty() {
        bail!("the workload has no requests");
    }
    let url = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}; is the frontend running?"))?
        .json()
        .await?;
    if !models["data"]
        .as_array()
        .is_some_and(|d| d.iter().any(|m| m["id"] == a.model.as_str()))
    {
        bail!(
            "{url} does not serve model {:?} (GET /v1/models: {models})",
            a.model
        );
    }
    let n = jobs.len();
    let warmup = a.warmup.min(n);
    let oracle = oracle_ratio(&jobs[warmup..], &jobs[..warmup], a.block_size);
    eprintln!(
        "bench: {} requests ({} warm-up) of {} against {url}",
        n - warmup,
        warmup,
        a.workload
    );
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.duration);
    let gate = Arc::new(Semaphore::new(a.concurrency));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng(a.seed ^ 0xabcdef);
    let mut next_at = Duration::ZERO;
    let paced_by_trace = a.request_rate.is_none() && jobs.iter().all(|j| j.at.is_some());
    let mut tasks = Vec::with_capacity(n);
    let ticker = {
        let (done, errors) = (done.clone(), errors.clone());
        tokio::spawn(async move {
            loop {
                progress(
                    done.load(Ordering::Relaxed),
                    n,
                    errors.load(Ordering::Relaxed),
                    t0,
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    for (i, job) in jobs.into_iter().enumerate() {
        if Instant::now() >= deadline {
            break;
        }
        if let Some(rate) = a.request_rate {
            next_at += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / rate);
            tokio::time::sleep_until((t0 + next_at).into()).await;
        } else if paced_by_trace {
            tokio::time::sleep_until((t0 + job.at.unwrap_or_default()).into()).await;
        }
        let permit = gate.clone().acquire_owned().await?;
        let (client, url, model) = (client.clone(), url.clone(), a.model.clone());
        let (samples, done, errors) = (samples.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Requests in flight when --duration ends finish (within a minute): cutting them
            // would count the benchmark's own stop as server errors.
            let s = tokio::time::timeout_at(
                (deadline + Duration::from_secs(60)).into(),
                send(&client, &url, &model, &job, t0),
            )
            .await;
            drop(permit);
            let mut s = s.unwrap_or(Sample {
                status: Some(0),
                ..Default::default()
            });
            s.index = i;
            if s.status != Some(200) {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            done.fetch_add(1, Ordering::Relaxed);
            if i >= warmup {
                samples.lock().await.push(s);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    ticker.abort();
    progress(
        done.load(Ordering::Relaxed),
        n,
        errors.load(Ordering::Relaxed),
        t0,
    );
    eprintln!();
    let samples = samples.lock().await.clone();
    report(&a, &samples, oracle)
}

/// The cached-token ratio a router that knew everything could reach: one cache of unlimited
/// size, so each request reuses the longest prefix (in whole blocks) any earlier request had.
fn oracle_ratio(measured: &[Job], warmup: &[Job], block_size: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let (mut cached, mut total) = (0u64, 0u64);
    for (i, job) in warmup.iter().chain(measured).enumerate() {
        let hashes = dynamo_kv::block_hashes(&job.prompt, block_size.max(1));
        // As the engines do, the last prompt token is always computed.
        let reusable = (job.prompt.len().saturating_sub(1)) / block_size.max(1);
        let hit = hashes[..reusable.min(hashes.len())]
            .iter()
            .take_while(|h| seen.contains(&h.1))
            .count();
        if i >= warmup.len() {
            cached += (hit * block_size) as u64;
            total += job.prompt.len() as u64;
        }
        seen.extend(hashes.iter().map(|h| h.1));
    }
    if total == 0 {
        0.0
    } else {
        cached as f64 / total as f64
    }
}

fn report(a: &BenchArgs, samples: &[Sample], oracle: f64) -> Result<()> {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status == Some(200)).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.status != Some(200)) {
        let key = match s.status {
            Some(0) | None => "connection_or_timeout".to_string(),
            Some(c) => c.to_string(),
        };
        *errors.entry(key).or_default() += 1;
    }
    let span = {
        let start = ok.iter().map(|s| s.start).fold(f64::INFINITY, f64::min);
        let end = ok.iter().map(|s| s.start + s.e2e / 1e3).fold(0.0, f64::max);
        (end - start).max(1e-9)
    };
    let out_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
    let prompt_tokens: u64 = ok.iter().map(|s| s.prompt_tokens).sum();
    let cached: u64 = ok.iter().map(|s| s.cached_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.clone()).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e).collect();
    let mut result = json!({
        "workload": a.workload,
        "model": a.model,
        "concurrency": a.concurrency,
        "request_rate": a.request_rate,
        "completed": ok.len(),
        "errors": errors,
        // Answers that ended with another number of tokens than asked for (lost or repeated
        // text: with ignore_eos a complete answer has exactly max_tokens).
        "incomplete": ok.iter().filter(|s| s.output_tokens != s.expected as u64).count(),
        "duration_s": span,
        "requests_per_second": ok.len() as f64 / span,
        "output_tokens_per_second": out_tokens as f64 / span,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "cached_token_ratio": if prompt_tokens > 0 { cached as f64 / prompt_tokens as f64 } else { 0.0 },
        "oracle_cached_token_ratio": oracle,
        "ttft_ms": stats(&mut ttft),
        "itl_ms": stats(&mut itl),
        "e2e_ms": stats(&mut e2e),
    });
    if let (Some(t), Some(i)) = (a.ttft_target_ms, a.itl_target_ms) {
        let met = ok
            .iter()
            .filter(|s| {
                let mean_itl = if s.itl.is_empty() {
                    0.0
                } else {
                    s.itl.iter().sum::<f64>() / s.itl.len() as f64
                };
                s.ttft.is_some_and(|f| f <= t) && mean_itl <= i
            })
            .count();
        let attainment = met as f64 / samples.len().max(1) as f64;
        result["attainment"] = json!(attainment);
    }
    std::fs::write(&a.output_json, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", a.output_json.display()))?;
    if let Some(path) = &a.requests_jsonl {
        let mut records: Vec<RequestRecord> = samples
            .iter()
            .map(|s| RequestRecord {
                index: s.index,
                start_s: s.start,
                ttft_ms: s.ttft,
                e2e_ms: s.e2e,
                prompt_tokens: s.prompt_tokens as u32,
                cached_tokens: s.cached_tokens as u32,
                output_tokens: s.output_tokens as u32,
                // 0: the frontend did not say.
                worker: s.worker.unwrap_or(0),
                ok: s.status == Some(200),
            })
            .collect();
        records.sort_by_key(|r| r.index);
        std::fs::write(path, trace::to_jsonl(&records))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    println!(
        "completed {} ({} errors) in {:.1}s: {:.2} req/s, {:.0} output tok/s, cached tokens {:.1}% (oracle {:.1}%)",
        ok.len(),
        samples.len() - ok.len(),
        span,
        result["requests_per_second"].as_f64().unwrap_or(0.0),
        result["output_tokens_per_second"].as_f64().unwrap_or(0.0),
        result["cached_token_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        oracle * 100.0
    );
    for (name, key) in [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms")] {
        let s = &result[key];
        println!(
            "{name:>5} ms: p50 {} p90 {} p99 {} max {} mean {}",
            f(&s["p50"]),
            f(&s["p90"]),
            f(&s["p99"]),
            f(&s["max"]),
            f(&s["mean"])
        );
    }
    let incomplete = result["incomplete"].as_u64().unwrap_or(0);
    if incomplete > 0 {
        println!("{incomplete} answers ended with another number of tokens than max_tokens");
    }
    if let (Some(t), Some(i), Some(at)) = (
        a.ttft_target_ms,
        a.itl_target_ms,
        result["attainment"].as_f64(),
    ) {
        println!(
            "  SLA (TTFT <= {t} ms, mean ITL <= {i} ms): {:.1}% of requests",
            at * 100.0
        );
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, svg(&ok)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// TTFT and end-to-end latency of each request against its start time.
fn svg(samples: &[&Sample]) -> String {
    let (w, h, pad) = (800.0, 400.0, 50.0);
    let xmax = samples.iter().map(|s| s.start).fold(1e-9, f64::max);
    let ymax = samples.iter().map(|s| s.e2e).fold(1e-9, f64::max);
    let x = |v: f64| pad + v / xmax * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v / ymax * (h - 2.0 * pad);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">request start (s), 0 to {xmax:.1}</text>\n\
         <text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">latency (ms), 0 to {ymax:.0}</text>\n\
         <text x=\"{}\" y=\"20\" fill=\"#d62728\">TTFT</text><text x=\"{}\" y=\"20\" fill=\"#1f77b4\">end to end</text>\n",
        h - pad, w - pad, h - pad, h - pad, w / 2.0, h - 10.0, h / 2.0, h / 2.0, w - 200.0, w - 150.0
    );
    for s in samples {
        out += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.5\" fill=\"#1f77b4\"/>\n",
            x(s.start),
            y(s.e2e)
        );
        if let Some(t) = s.ttft {
            out += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.5\" fill=\"#d62728\"/>\n",
                x(s.start),
                y(t)
            );
        }
    }
    out + "</svg>\n"
}
