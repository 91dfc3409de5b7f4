//! Bus-side fuzz: random and mutated payloads on every subject a running graph subscribes to.
//!
//! `dynamo-run serve` runs a frontend, a KV router component, a planner and two mocker worker
//! processes over a real nats-server. The test records real traffic (requests, reply frames,
//! KV events, load reports, routing decisions, frontend statistics, discovery entries), asks
//! nats-server's monitoring endpoint (`/subsz`) for every subscription the graph holds, and then
//! publishes `FUZZ_MESSAGES` messages (default 3000; `FUZZ_SEED` repeats a run) round-robin
//! over those subscriptions: random bytes, structure-aware mutations of recorded payloads
//! (MessagePack and JSON values replaced by extremes, fields dropped, nested bodies mutated),
//! byte-level mutations, payloads of another subject, empty and deeply nested ones. Requests
//! keep flowing meanwhile. Then:
//! - no process crashed or restarted, and none logged a panic;
//! - every request sent during the fuzz ended (completed or failed, none hung);
//! - the graph serves whole answers afterwards;
//! - the processes counted what they dropped (`dynamo_bus_malformed_messages_total{kind}`)
//!   for every kind of subject.
//!
//! Left out on purpose: valid scale requests to `serve`'s scale endpoint (only random bytes go
//! there). Anyone on the bus may ask `serve` for more workers; who may speak on which subject
//! is the bus permissions' job (issue 21), not a parser's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{base, model_dir, Serve};
use dynamo_runtime::testing::NatsServer;
use futures::StreamExt;

/// A small deterministic generator (xorshift64*): a failing run repeats with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Which family a subject belongs to (what its recorded payloads look like).
fn family(subject: &str) -> String {
    let t: Vec<&str> = subject.split('.').collect();
    match t.as_slice() {
        ["_INBOX", ..] => "reply".into(),
        ["$KV", ..] => "discovery".into(),
        ["$SRV", kind, ..] => format!("srv.{kind}"),
        // dyn.{ep,ctl,ev}.{ns}.{component}.{endpoint or topic}[.{instance}]
        ["dyn", kind, _, component, name, ..] => format!("{kind}.{component}.{name}"),
        _ => subject.into(),
    }
}

/// NATS subject matching (`*` one token, `>` one or more).
fn matches(pattern: &str, subject: &str) -> bool {
    let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subject for `pattern`: a recorded one it matches, most often, else its wildcards filled
/// with random tokens.
fn instantiate(pattern: &str, seen: &[String], rng: &mut Rng) -> String {
    let hits: Vec<&String> = seen.iter().filter(|s| matches(pattern, s)).collect();
    if !hits.is_empty() && rng.chance(0.7) {
        return hits[rng.below(hits.len())].clone();
    }
    pattern
        .split('.')
        .map(|t| match t {
            "*" => format!("{:016x}", rng.next()),
            ">" => format!("{:016x}.{}", rng.next(), rng.below(100)),
            t => t.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn extreme_msgpack(rng: &mut Rng) -> rmpv::Value {
    use rmpv::Value;
    match rng.below(14) {
        0 => Value::from(u64::MAX),
        1 => Value::from(i64::MIN),
        2 => Value::from(-1),
        3 => Value::from(0),
        4 => Value::from(u32::MAX as u64 + 1),
        5 => Value::F64(f64::NAN),
        6 => Value::F64(f64::INFINITY),
        7 => Value::Nil,
        8 => Value::Boolean(true),
        9 => Value::from("x".repeat(rng.below(20_000))),
        10 => {
            let n = rng.below(64);
            Value::Binary(rng.bytes(n))
        }
        11 => Value::Array(vec![Value::from(u64::MAX); rng.below(5000)]),
        12 => Value::Map(vec![]),
        _ => Value::Array(vec![]),
    }
}

/// Mutates one node of a MessagePack value (descending into maps, arrays, and binaries that
/// hold MessagePack themselves, as a request envelope's body does).
fn mutate_msgpack(v: &mut rmpv::Value, rng: &mut Rng) {
    use rmpv::Value;
    match v {
        Value::Array(items) if !items.is_empty() && rng.chance(0.75) => {
            if rng.chance(0.1) {
                let n = rng.below(items.len());
                items.truncate(n);
            } else {
                let i = rng.below(items.len());
                mutate_msgpack(&mut items[i], rng);
            }
        }
        Value::Map(entries) if !entries.is_empty() && rng.chance(0.75) => {
            let i = rng.below(entries.len());
            if rng.chance(0.15) {
                entries.remove(i);
            } else if rng.chance(0.1) {
                entries[i].0 = Value::from(format!("k{}", rng.below(1000)));
            } else {
                mutate_msgpack(&mut entries[i].1, rng);
            }
        }
        Value::Binary(b) if rng.chance(0.8) => {
            if let Ok(mut inner) = rmpv::decode::read_value(&mut &b[..]) {
                mutate_msgpack(&mut inner, rng);
                let mut out = Vec::new();
                rmpv::encode::write_value(&mut out, &inner).unwrap();
                *b = out;
            } else {
                *v = extreme_msgpack(rng);
            }
        }
        _ => *v = extreme_msgpack(rng),
    }
}

fn mutate_json(v: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::{json, Value};
    match v {
        Value::Object(m) if !m.is_empty() && rng.chance(0.75) => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            if rng.chance(0.15) {
                m.remove(&k);
            } else {
                mutate_json(m.get_mut(&k).unwrap(), rng);
            }
        }
        Value::Array(a) if !a.is_empty() && rng.chance(0.75) => {
            let i = rng.below(a.len());
            mutate_json(&mut a[i], rng);
        }
        _ => {
            *v = match rng.below(9) {
                0 => json!(u64::MAX),
                1 => json!(-1),
                2 => json!(0),
                3 => json!(1e308),
                4 => json!(null),
                5 => json!(""),
                6 => json!("x".repeat(rng.below(20_000))),
                7 => json!([]),
                _ => json!({}),
            }
        }
    }
}

/// Bit flips, truncation, inserted or repeated bytes.
fn mutate_bytes(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = b.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let n = rng.below(out.len() + 1);
                out.truncate(n);
            }
            2 => {
                let at = rng.below(out.len() + 1);
                let n = 1 + rng.below(16);
                let junk = rng.bytes(n);
                out.splice(at..at, junk);
            }
            _ if !out.is_empty() => {
                let i = rng.below(out.len());
                let v = *rng.pick(&[0x00u8, 0xff, 0x7f, 0x80, 0xc1, 0xdc, 0xdd, 0xcf]);
                out[i] = v;
            }
            _ => {}
        }
    }
    out
}

/// A payload for a subject of `family`, from what was recorded.
fn payload(
    family: &str,
    samples: &BTreeMap<String, Vec<Bytes>>,
    rng: &mut Rng,
) -> (Vec<u8>, &'static str) {
    let own = samples.get(family).filter(|s| !s.is_empty());
    // `serve`'s scale endpoint: random bytes only (see the module).
    let own = own.filter(|_| !family.contains(".serve.scale"));
    let any: Vec<&Bytes> = samples
        .iter()
        .filter(|(f, _)| !f.contains(".serve.scale"))
        .flat_map(|(_, s)| s)
        .collect();
    let roll = rng.below(100);
    match (roll, own) {
        (0..=39, Some(own)) => {
            let b = rng.pick(own).clone();
            if let Ok(mut v) = rmpv::decode::read_value(&mut &b[..]) {
                mutate_msgpack(&mut v, rng);
                let mut out = Vec::new();
                rmpv::encode::write_value(&mut out, &v).unwrap();
                (out, "msgpack mutation")
            } else if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b) {
                mutate_json(&mut v, rng);
                (serde_json::to_vec(&v).unwrap(), "json mutation")
            } else {
                (mutate_bytes(&b, rng), "byte mutation")
            }
        }
        (40..=59, Some(own)) => {
            let b = rng.pick(own).clone();
            (mutate_bytes(&b, rng), "byte mutation")
        }
        (60..=69, _) if !any.is_empty() => (rng.pick(&any).to_vec(), "another subject's"),
        (70..=74, _) => (Vec::new(), "empty"),
        (75..=79, _) => {
            // Deep nesting: a decoder that recurses without a limit overflows its stack.
            let depth = 1 + rng.below(200_000);
            let open = if rng.chance(0.5) { 0x91u8 } else { b'[' };
            (vec![open; depth], "deep nesting")
        }
        _ => {
            let n = if rng.chance(0.1) {
                rng.below(512 * 1024)
            } else {
                rng.below(512)
            };
            (rng.bytes(n), "random bytes")
        }
    }
}

/// `name{kind="K"} V` lines of one exposition, summed per kind.
fn malformed_counts(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("dynamo_bus_malformed_messages_total{") else {
            continue;
        };
        let kind = rest
            .split("kind=\"")
            .nth(1)
            .and_then(|k| k.split('"').next())
            .unwrap_or("?");
        let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        *out.entry(kind.to_string()).or_default() += v;
    }
    out
}

/// `n` consecutive free loopback ports.
fn free_ports(n: u16) -> u16 {
    loop {
        let first = common::free_port();
        if first.checked_add(n).is_some()
            && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok())
        {
            return first;
        }
    }
}

/// One streaming completion: Ok(completion tokens, from its usage) or Err(why). `max_tokens`
/// 8, `ignore_eos`.
async fn ask(http: &reqwest::Client, url: &str, prompt: &str) -> Result<usize, String> {
    let body = serde_json::json!({
        "model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": true,
        "ignore_eos": true, "stream_options": {"include_usage": true},
    });
    let resp = http
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if text.contains("\"error\"") {
        return Err(text);
    }
    if !text.contains("data: [DONE]") {
        return Err(format!("the stream did not end: {text}"));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .map(|n| n as usize)
        .ok_or_else(|| format!("no usage in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bus_messages_crash_nothing_and_are_counted() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let total: usize = std::env::var("FUZZ_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!("FUZZ_SEED={seed} FUZZ_MESSAGES={total}");
    let mut rng = Rng(seed);

    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(4);
    let graph = dir.path().join("fuzz.yaml");
    std::fs::write(
        &graph,
        format!(
            "namespace: fuzz\n\
             defaults:\n  model_path: {model}\n  model_name: tiny\n  block_size: 16\n\
             components:\n\
             \x20 backend:\n    role: worker\n    replicas: 2\n    engine: mocker\n    num_gpu_blocks: 1024\n    metrics_port: {w}\n\
             \x20 router:\n    role: router\n    metrics_port: {r}\n\
             \x20 planner:\n    role: planner\n    pool: backend\n    profile: {profile}\n    ttft_target_ms: 100\n    itl_target_ms: 20\n    planner_interval_ms: 1000\n    min_replicas: 2\n    max_replicas: 2\n    metrics_port: {p}\n\
             \x20 frontend:\n    role: frontend\n    http_port: 0\n    router_mode: kv\n",
            model = model_dir(),
            profile = common::graph("profiles/mocker.json"),
            w = ports,
            r = ports + 2,
            p = ports + 3,
        ),
    )
    .unwrap();
    let mut serve = Serve::start(&[graph.to_str().unwrap(), "--bus", &nats.url()]);
    let frontend = serve.wait_out("/v1", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(60));
    let url = base(&frontend);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // Record real traffic until every family the graph speaks has been seen.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let my_cid = client.server_info().client_id;
    let mut spy = client.subscribe(">").await.unwrap();
    let seen: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = spy.next().await {
                let mut seen = seen.lock().unwrap();
                if seen.len() < 20_000 {
                    seen.push((m.subject.to_string(), m.payload));
                }
            }
        })
    };
    let wanted = [
        "ep.backend.generate",
        "reply",
        "ev.backend.kv_events",
        "ev.backend.load",
        "ev.router.router_decisions",
        "ev.frontend.stats",
    ];
    let until = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        let prompt: String = (0..40).map(|i| format!("w{i}r{round} ")).collect();
        ask(&http, &url, &prompt).await.unwrap();
        let families: BTreeSet<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(s, _)| family(s))
            .collect();
        if wanted.iter().all(|w| families.contains(*w)) {
            break;
        }
        assert!(
            Instant::now() < until,
            "recorded traffic lacks some of {wanted:?}: {families:?}"
        );
    }
    recorder.abort();
    // Discovery entries, from the bucket itself.
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js.get_key_value("dynamo-discovery").await.unwrap();
    let keys: Vec<String> = bucket
        .keys()
        .await
        .unwrap()
        .map(|k| k.unwrap())
        .collect()
        .await;
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    for k in &keys {
        if let Some(v) = bucket.get(k).await.unwrap() {
            seen.push((format!("$KV.dynamo-discovery.{k}"), v));
        }
    }
    let mut samples: BTreeMap<String, Vec<Bytes>> = BTreeMap::new();
    for (s, p) in &seen {
        let v = samples.entry(family(s)).or_default();
        if v.len() < 64 {
            v.push(p.clone());
        }
    }
    let seen_subjects: Vec<String> = seen.iter().map(|(s, _)| s.clone()).collect();

    // Every subscription of the graph's processes, from nats-server's monitoring endpoint.
    let subsz: serde_json::Value = http
        .get(format!(
            "http://127.0.0.1:{}/subsz?subs=1&limit=100000",
            nats.monitor_port()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let patterns: BTreeSet<String> = subsz["subscriptions_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cid"].as_u64() != Some(my_cid))
        .filter_map(|s| s["subject"].as_str())
        .filter(|s| {
            ["dyn.", "$SRV.", "_INBOX.", "$KV.dynamo-discovery."]
                .iter()
                .any(|p| s.starts_with(p))
        })
        .map(str::to_string)
        .collect();
    let patterns: Vec<String> = patterns.into_iter().collect();
    for f in [
        "ep.backend.generate",
        "ctl.backend.generate",
        "ev.backend.kv_events",
    ] {
        assert!(
            patterns.iter().any(|p| family(p) == f),
            "no {f} subscription in {patterns:?}"
        );
    }
    println!(
        "{} subscriptions, {} recorded messages in {} families",
        patterns.len(),
        seen.len(),
        samples.len()
    );

    // Requests keep coming while the bus is fuzzed.
    let fuzzing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let why: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut load = Vec::new();
    for c in 0..4 {
        let (http, url, fuzzing) = (http.clone(), url.clone(), fuzzing.clone());
        let (ok, failed, why) = (ok.clone(), failed.clone(), why.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while fuzzing.load(Ordering::Relaxed) {
                i += 1;
                let prompt: String = (0..30).map(|k| format!("c{c}q{i}t{k} ")).collect();
                match ask(&http, &url, &prompt).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.contains("timed out") || e.contains("timeout") => {
                        panic!("a request hung during the fuzz: {e}")
                    }
                    Err(e) => {
                        let e: String = e.chars().take(160).collect();
                        *why.lock().unwrap().entry(e).or_default() += 1;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    let inbox = client.new_inbox();
    let started = Instant::now();
    for i in 0..total {
        // Round-robin over the subscriptions, so every one gets its share.
        let pattern = &patterns[i % patterns.len()];
        let subject = instantiate(pattern, &seen_subjects, &mut rng);
        let (body, kind) = payload(&family(&subject), &samples, &mut rng);
        *kinds.entry(kind).or_default() += 1;
        let body = Bytes::from(body);
        let sent = if rng.chance(0.3) {
            client
                .publish_with_reply(subject.clone(), inbox.clone(), body)
                .await
        } else {
            client.publish(subject.clone(), body).await
        };
        sent.unwrap_or_else(|e| panic!("publish on {subject}: {e}"));
        if i % 200 == 199 {
            client.flush().await.unwrap();
        }
    }
    client.flush().await.unwrap();
    println!(
        "{total} messages on {} subscriptions in {:?}: {kinds:?}",
        patterns.len(),
        started.elapsed()
    );
    fuzzing.store(false, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    println!(
        "during the fuzz: {} requests completed, {} failed, none hung; failures: {:?}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        why.lock().unwrap()
    );

    // Nothing crashed: no child exited, nothing panicked.
    assert!(serve.child.try_wait().unwrap().is_none(), "serve exited");
    let logs = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().join("\n");
    let (out, err) = (logs(&serve.out), logs(&serve.err));
    for bad in ["exited (", "panicked"] {
        assert!(
            !out.contains(bad) && !err.contains(bad),
            "{bad:?} in the graph's output:\n{out}\n{err}"
        );
    }
    let get = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    // Discovery heals: entries overwritten with junk are put back at the owners' next lease
    // refresh, and the frontend lists both workers again.
    let originals: BTreeMap<String, Bytes> = seen
        .iter()
        .filter_map(|(s, v)| {
            Some((
                s.strip_prefix("$KV.dynamo-discovery.")?.to_string(),
                v.clone(),
            ))
        })
        .collect();
    let mut watch = bucket.watch_with_history(">").await.unwrap();
    let mut latest: BTreeMap<String, Bytes> = BTreeMap::new();
    let healed = tokio::time::timeout(Duration::from_secs(30), async {
        while originals.iter().any(|(k, v)| latest.get(k) != Some(v)) {
            let e = watch.next().await.unwrap().unwrap();
            latest.insert(e.key.clone(), e.value.clone());
        }
    })
    .await;
    assert!(healed.is_ok(), "discovery did not heal: {latest:?}");
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let health = get(format!("{url}/health")).await;
        if health.matches("\"instance_id\"").count() == 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the frontend does not list both workers: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The router lists both workers too (its `dynamo_router_workers` gauge).
    let router_metrics = format!("http://127.0.0.1:{}/metrics", ports + 2);
    loop {
        let m = get(router_metrics.clone()).await;
        if m.lines().any(|l| l == "dynamo_router_workers 2") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the router does not list both workers: {:?}",
            m.lines().find(|l| l.starts_with("dynamo_router_workers"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The graph still serves whole answers.
    for i in 0..10 {
        let prompt: String = (0..30).map(|k| format!("after{i}t{k} ")).collect();
        let tokens = ask(&http, &url, &prompt)
            .await
            .unwrap_or_else(|e| panic!("after the fuzz: {e}"));
        assert_eq!(tokens, 8, "a whole answer after the fuzz");
    }
    // What was dropped was counted, in every process and for every kind of subject.
    let mut total_by_kind: BTreeMap<String, f64> = BTreeMap::new();
    let processes = [
        ("frontend", format!("{url}/metrics")),
        ("backend.0", format!("http://127.0.0.1:{}/metrics", ports)),
        (
            "backend.1",
            format!("http://127.0.0.1:{}/metrics", ports + 1),
        ),
        ("router", format!("http://127.0.0.1:{}/metrics", ports + 2)),
        ("planner", format!("http://127.0.0.1:{}/metrics", ports + 3)),
    ];
    for (who, url) in processes {
        let counts = malformed_counts(&get(url).await);
        println!("{who}: {counts:?}");
        assert!(!counts.is_empty(), "{who} counted nothing it dropped");
        for (k, v) in counts {
            *total_by_kind.entry(k).or_default() += v;
        }
    }
    for kind in [
        "request",
        "control",
        "reply",
        "kv_events",
        "load",
        "decision",
        "statistics",
        "discovery",
    ] {
        assert!(
            total_by_kind.get(kind).is_some_and(|v| *v > 0.0),
            "no {kind:?} message was counted as dropped: {total_by_kind:?}"
        );
    }
    assert!(serve.terminate(Duration::from_secs(30)).success());
}
