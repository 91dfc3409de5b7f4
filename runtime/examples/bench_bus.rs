//! Bus benchmark: request/reply latency and streaming throughput of the runtime's RPC over the
//! in-process and NATS transports, next to raw `async-nats` on the same server in the same run.
//!
//! Run with `scripts/bench-bus` (release build; starts its own nats-server).
//! Latency paths take turns in `BENCH_ROUNDS` rounds (default 10) so that machine noise falls on
//! all of them alike. Options (env): `BENCH_ITERS` (sequential round trips per path over all
//! rounds, default 5000), `BENCH_FRAMES`
//! (frames streamed per throughput run, default 100000), `BENCH_SIZE` (payload bytes, 1024).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynamo_runtime::bus::{Bus, LocalBus, NatsBus, NatsSettings, Outgoing};
use dynamo_runtime::discovery::LocalDiscovery;
use dynamo_runtime::subject::{ComponentId, EndpointId, EndpointName, Subject};
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{CallOptions, Request, Runtime, RuntimeSettings, ServedEndpoint, Target};
use futures::StreamExt;
use hdrhistogram::Histogram;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct BenchReq {
    frames: u32,
    #[serde(with = "serde_bytes_compat")]
    payload: Bytes,
}

/// `Bytes` as a MessagePack bin, both ways.
mod serde_bytes_compat {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Bytes::deserialize(d)
    }
}

struct BenchActor;

enum BenchMsg {
    Req(Request<BenchReq, Bytes>),
}

impl From<Request<BenchReq, Bytes>> for BenchMsg {
    fn from(r: Request<BenchReq, Bytes>) -> Self {
        BenchMsg::Req(r)
    }
}

impl Actor for BenchActor {
    type Msg = BenchMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<BenchMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<BenchMsg>,
        msg: BenchMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let BenchMsg::Req(Request {
            body, mut reply, ..
        }) = msg;
        if body.frames <= 1 {
            // A unary answer is quick: reply from the actor itself, as unary roles do, in one
            // frame that is data and end.
            let _ = match body.frames {
                0 => reply.finish().await,
                _ => reply.finish_with(&body.payload).await,
            };
            return Ok(());
        }
        // A stream is produced by a task of its own, so the mailbox keeps moving.
        tokio::spawn(async move {
            for _ in 0..body.frames {
                if reply.send(&body.payload).await.is_err() {
                    return;
                }
            }
            let _ = reply.finish().await;
        });
        Ok(())
    }
}

/// Every call of the benchmark fails loudly after 10 s instead of waiting out the default
/// deadline.
fn call_options() -> CallOptions {
    CallOptions {
        timeout: Some(STALL),
        ..Default::default()
    }
}

/// How long any single wait of the benchmark may take before it reports a stall.
const STALL: Duration = Duration::from_secs(10);

/// Awaits `fut`, panicking with `what` if it takes longer than [`STALL`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STALL, fut)
        .await
        .unwrap_or_else(|_| panic!("stalled: {what} took over {STALL:?}"))
}

/// A round trip on `client`'s connection: afterwards the server has processed everything sent
/// before it, subscriptions included (`async_nats::Client::flush` only empties the socket).
async fn server_has_processed(client: &async_nats::Client) {
    let _ = client.request("_INBOX.bench.barrier", Bytes::new()).await;
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Latency {
    p50: f64,
    p99: f64,
}

fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

async fn serve(rt: &Runtime) -> (ServedEndpoint, EndpointId) {
    let comp = ComponentId::new("bench", "bus").unwrap();
    let (actor, _) = Actor::spawn(None, BenchActor, ()).await.unwrap();
    let inst = rt
        .component(comp.clone(), serde_json::json!({}))
        .await
        .unwrap();
    let served = inst
        .serve::<BenchReq, Bytes, _>(
            EndpointName::new("echo").unwrap(),
            actor,
            serde_json::json!({}),
        )
        .await
        .unwrap();
    (served, comp.endpoint("echo").unwrap())
}

/// Sequential unary calls (the answer is one frame that also ends the stream), timed from the
/// call until the stream has ended.
async fn rpc_latency(
    rt: &Runtime,
    ep: &EndpointId,
    payload: &Bytes,
    iters: usize,
    done: &mut Histogram<u64>,
) {
    let req = BenchReq {
        frames: 1,
        payload: payload.clone(),
    };
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        let mut s = rt
            .client()
            .call::<_, Bytes>(Target::Any(ep.clone()), &req, call_options())
            .await
            .unwrap();
        let item = s.next().await.unwrap().unwrap();
        assert!(s.next().await.is_none());
        let t_done = t.elapsed();
        assert_eq!(item.len(), payload.len());
        if i >= iters / 10 {
            done.record(t_done.as_nanos() as u64).unwrap();
        }
    }
}

async fn rpc_stream(rt: &Runtime, ep: &EndpointId, payload: &Bytes, frames: usize) -> f64 {
    let req = BenchReq {
        frames: frames as u32,
        payload: payload.clone(),
    };
    let t = Instant::now();
    let mut s = rt
        .client()
        .call::<_, Bytes>(Target::Any(ep.clone()), &req, call_options())
        .await
        .unwrap();
    let mut n = 0;
    while let Some(item) = s.next().await {
        item.unwrap();
        n += 1;
    }
    assert_eq!(n, frames);
    frames as f64 / t.elapsed().as_secs_f64()
}

/// Transport only, through the `Bus` trait: a responder echoes each message to its reply
/// subject; the caller waits on one long-lived inbox subscription.
async fn bus_latency(
    caller: Arc<dyn Bus>,
    responder: Arc<dyn Bus>,
    payload: &Bytes,
    iters: usize,
    h: &mut Histogram<u64>,
) {
    // Fresh subjects per run, so no earlier responder or inbox can ever interfere.
    let run = next_run();
    let subject = Subject::parse(format!("bench.bus.echo.{run}")).unwrap();
    let mut sub = responder
        .subscribe(subject.clone().into(), None)
        .await
        .unwrap();
    responder.flush().await.unwrap();
    let server = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                responder
                    .publish(Outgoing::new(r, m.payload))
                    .await
                    .unwrap();
            }
        }
    });
    let inbox = Subject::parse(format!("_INBOX.bench.{run}")).unwrap();
    let mut replies = caller.subscribe(inbox.clone().into(), None).await.unwrap();
    caller.flush().await.unwrap();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        caller
            .publish(Outgoing::new(subject.clone(), payload.clone()).with_reply(inbox.clone()))
            .await
            .unwrap();
        let r = within("bus reply", replies.next()).await.unwrap();
        let took = t.elapsed();
        assert_eq!(
            r.payload.len(),
            payload.len(),
            "{:?} on {} (caller {:?})",
            r.status,
            r.subject,
            caller.transport()
        );
        if i >= iters / 10 {
            h.record(took.as_nanos() as u64).unwrap();
        }
    }
    server.abort();
}

async fn raw_nats_latency(url: &str, payload: &Bytes, iters: usize, h: &mut Histogram<u64>) {
    let responder = async_nats::connect(url).await.unwrap();
    let subject = format!("raw.echo.{}", next_run());
    let mut sub = responder.subscribe(subject.clone()).await.unwrap();
    server_has_processed(&responder).await;
    let server = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                responder.publish(r, m.payload).await.unwrap();
            }
        }
    });
    let client = async_nats::connect(url).await.unwrap();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        let r = client
            .request(subject.clone(), payload.clone())
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(r.payload.len(), payload.len());
        if i >= iters / 10 {
            h.record(took.as_nanos() as u64).unwrap();
        }
    }
    server.abort();
}

async fn raw_nats_stream(url: &str, payload: &Bytes, frames: usize) -> f64 {
    let publisher = async_nats::connect(url).await.unwrap();
    let subscriber = async_nats::connect(url).await.unwrap();
    let mut sub = subscriber.subscribe("raw.stream").await.unwrap();
    server_has_processed(&subscriber).await;
    let t = Instant::now();
    let payload = payload.clone();
    let pubtask = tokio::spawn(async move {
        for _ in 0..frames {
            publisher
                .publish("raw.stream", payload.clone())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
    });
    for _ in 0..frames {
        within("raw pub/sub frame", sub.next()).await.unwrap();
    }
    let rate = frames as f64 / t.elapsed().as_secs_f64();
    pubtask.await.unwrap();
    rate
}

/// A runtime on its own NATS connection, as a separate process would have.
async fn nats_runtime(url: &str, settings: &RuntimeSettings) -> Runtime {
    Runtime::start(RuntimeSettings {
        bus: Some(url.to_string()),
        ..settings.clone()
    })
    .await
    .unwrap()
}

fn next_run() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);
    RUN.fetch_add(1, Ordering::Relaxed)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // Measure from a worker thread, where a server's callers run: `main` itself is polled on
    // the main thread, and every wake-up between it and a worker would cost a thread hand-off
    // that no deployment pays.
    if let Err(e) = tokio::spawn(bench()).await {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

async fn bench() {
    let iters = env_or("BENCH_ITERS", 5000);
    let frames = env_or("BENCH_FRAMES", 100_000);
    let size = env_or("BENCH_SIZE", 1024);
    let rounds = env_or("BENCH_ROUNDS", 10).max(1);
    let payload = Bytes::from(vec![0x5a; size]);
    let settings = RuntimeSettings::default();
    eprintln!("machine: {}", machine());
    eprintln!("{iters} sequential round trips and {frames} streamed frames of {size} B per path");

    let server = NatsServer::start().expect("nats-server (run scripts/install-nats.sh)");
    let url = server.url();

    let nats_rt = nats_runtime(&url, &settings).await;
    let (served_nats, ep) = serve(&nats_rt).await;
    // The caller on its own connection, as in a real deployment.
    let nats_caller = nats_runtime(&url, &settings).await;
    let local_bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let local_rt = Runtime::with(local_bus, Arc::new(LocalDiscovery::new()), settings.clone())
        .await
        .unwrap();
    let (served_local, ep_local) = serve(&local_rt).await;
    let nats_bus = |url: String| async move {
        Arc::new(NatsBus::connect(&NatsSettings::new(url)).await.unwrap()) as Arc<dyn Bus>
    };
    let local_only = LocalBus::new();

    // Latency: the paths take turns, round by round, so machine noise falls on all alike.
    let new_h = || Histogram::<u64>::new(3).unwrap();
    let (mut raw_h, mut bus_nats_h, mut bus_local_h) = (new_h(), new_h(), new_h());
    let (mut nats_done_h, mut local_done_h) = (new_h(), new_h());
    let per_round = (iters / rounds).max(1);
    for round in 1..=rounds {
        eprintln!("latency round {round}/{rounds} ({per_round} calls per path) ...");
        raw_nats_latency(&url, &payload, per_round, &mut raw_h).await;
        let (c, r) = (nats_bus(url.clone()).await, nats_bus(url.clone()).await);
        bus_latency(c, r, &payload, per_round, &mut bus_nats_h).await;
        let (c, r) = (Arc::new(local_only.clone()), Arc::new(local_only.clone()));
        bus_latency(c, r, &payload, per_round, &mut bus_local_h).await;
        rpc_latency(&nats_caller, &ep, &payload, per_round, &mut nats_done_h).await;
        rpc_latency(&local_rt, &ep_local, &payload, per_round, &mut local_done_h).await;
    }
    let raw = latency(&raw_h);
    let bus_nats = latency(&bus_nats_h);
    let bus_local = latency(&bus_local_h);
    let (nats_done, local_done) = (latency(&nats_done_h), latency(&local_done_h));

    eprintln!("stream: raw async-nats pub/sub ...");
    let raw_rate = raw_nats_stream(&url, &payload, frames).await;
    eprintln!("stream: runtime RPC over NATS ...");
    let nats_rate = rpc_stream(&nats_caller, &ep, &payload, frames).await;
    eprintln!("stream: runtime RPC in-process ...");
    let local_rate = rpc_stream(&local_rt, &ep_local, &payload, frames).await;

    println!("machine: {}", machine());
    println!(
        "payload {size} B; latency over {iters} sequential calls per path in {rounds} interleaved rounds; stream of {frames} frames\n"
    );
    println!("| path | p50 us | p99 us | p50 vs raw NATS | p99 vs raw NATS |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, l: &Latency| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
            l.p50,
            l.p99,
            l.p50 / raw.p50,
            l.p99 / raw.p99
        )
    };
    row("raw async-nats request/reply (reference)", &raw);
    row("Bus trait over NATS, transport only", &bus_nats);
    row("Bus trait in-process, transport only", &bus_local);
    row("runtime RPC over NATS, unary call", &nats_done);
    row("runtime RPC in-process, unary call", &local_done);
    println!();
    println!("| stream path | frames/s | vs raw NATS pub/sub |");
    println!("|---|---:|---:|");
    println!("| raw async-nats pub/sub (reference) | {raw_rate:.0} | 1.00x |");
    println!(
        "| runtime RPC stream over NATS | {nats_rate:.0} | {:.2}x |",
        nats_rate / raw_rate
    );
    println!(
        "| runtime RPC stream in-process | {local_rate:.0} | {:.2}x |",
        local_rate / raw_rate
    );
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target: runtime RPC over NATS p50 within 1.25x of raw async-nats: {:.2}x ({})",
        nats_done.p50 / raw.p50,
        verdict(nats_done.p50 / raw.p50 <= 1.25)
    );
    println!(
        "target: in-process at least 10x faster than NATS loopback, p50: transport {:.1}x ({}), full RPC stack {:.1}x ({})",
        bus_nats.p50 / bus_local.p50,
        verdict(bus_nats.p50 / bus_local.p50 >= 10.0),
        nats_done.p50 / local_done.p50,
        verdict(nats_done.p50 / local_done.p50 >= 10.0),
    );
    served_nats.shutdown(Duration::from_secs(1)).await;
    served_local.shutdown(Duration::from_secs(1)).await;
    nats_rt.close().await;
    nats_caller.close().await;
}
