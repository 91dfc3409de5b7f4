//! The KV router over a real nats-server: three mocker workers (one `dynamo-run` process each)
//! and a frontend in this process in `kv` mode. Repeated-prefix requests land on the worker that
//! holds the prefix; a lost event batch is repaired by a resync from the worker's dump; a killed
//! worker's blocks are purged from the index. Then the router as its own component
//! (`dynamo-run router`): a frontend routes through it, and a second frontend's router sees
//! those requests' load through the shared decisions.

mod common;

use std::time::Duration;

use common::{dynamo_run, eventually, model_dir, Proc};
use dynamo_actors::frontend::{
    Endpoint, Frontend, FrontendSettings, Generation, RouterMode, Serving,
};
use dynamo_actors::router::KvRouter;
use dynamo_kv::block_hashes;
use dynamo_protocols::kv::{
    KvEvent, KvEventBatch, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock,
    WorkerId, KV_EVENTS_TOPIC, LOAD_TOPIC,
};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::serve::encode_event;
use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{InstanceId, Runtime, RuntimeSettings};
use serde_json::json;

const BS: usize = 16;

struct Worker {
    _proc: Proc,
    instance: InstanceId,
}

fn worker(url: &str, dir: &str) -> Worker {
    let proc = Proc::start(
        dynamo_run()
            .args([
                "--bus",
                url,
                "in=dyn://e2e.backend.generate",
                "out=mocker",
                "--model-path",
                dir,
            ])
            .args([
                "--model-name",
                "m",
                "--num-gpu-blocks",
                "256",
                "--block-size",
                "16",
            ])
            .args(["--speedup-ratio", "20"])
            .env("DYN_DISCOVERY__LEASE", "2s"),
    );
    let instance = InstanceId::parse_hex(proc.instance())
        .unwrap_or_else(|_| panic!("ready line {:?}", proc.ready));
    Worker {
        _proc: proc,
        instance,
    }
}

/// Starts a completion of `prefix` plus three tokens from `suffix` on.
async fn start(
    serving: &std::sync::Arc<Serving>,
    prefix: &[u32],
    suffix: u32,
    max_tokens: u32,
) -> Generation {
    let mut prompt = prefix.to_vec();
    prompt.extend([suffix, suffix + 1, suffix + 2]);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens});
    serving.start(Endpoint::Completions, &body).await.unwrap()
}

/// Runs a two-token completion of `prefix` + `suffix` to the end; the worker that served it.
async fn ask(serving: &std::sync::Arc<Serving>, prefix: &[u32], suffix: u32) -> InstanceId {
    let mut g = start(serving, prefix, suffix, 2).await;
    while let Some(p) = g.next().await {
        p.unwrap();
    }
    g.worker
}

/// The leading blocks of `hashes` that `router`'s index credits to `w`.
fn held(router: &KvRouter, hashes: &[SequenceHash], w: WorkerId) -> Option<u32> {
    router
        .index()
        .find_matches(hashes)
        .get(&w)
        .map(|o| o.blocks())
}

async fn idle(loads: &mut dynamo_runtime::bus::Subscription, worker: &str) {
    common::until_idle(loads, worker).await
}

/// Sends `prefix` once, waits until `router` indexes the serving worker's 10 blocks of it,
/// then checks that six more requests with that prefix land on the same worker (round-robin
/// would alternate). Returns that worker and the prefix's block hashes.
///
/// Between requests it waits for the holder's next idle load report (`runtime` subscribes
/// to the workers' load subject): a report taken while a request ran can reach a router after
/// that request's end, and routers then count its blocks as other load for a moment; each
/// request here starts on a settled view, as requests spaced apart would.
async fn prefix_sticks(
    runtime: &Runtime,
    serving: &std::sync::Arc<Serving>,
    router: &KvRouter,
    prefix: &[u32],
) -> (InstanceId, Vec<SequenceHash>) {
    let mut loads = common::subscribe_events(runtime, "e2e", "backend", LOAD_TOPIC).await;
    let hashes: Vec<SequenceHash> = block_hashes(prefix, BS).into_iter().map(|h| h.1).collect();
    let holder = ask(serving, prefix, 1000).await;
    let wid = WorkerId(holder.as_u64());
    eventually(
        "the holder's blocks are indexed",
        Duration::from_secs(5),
        || held(router, &hashes, wid) == Some(10),
    )
    .await;
    let holder_token = holder.to_string();
    idle(&mut loads, &holder_token).await;
    for i in 0..6 {
        assert_eq!(
            ask(serving, prefix, 2000 + i * 10).await,
            holder,
            "request {i} with the same prefix"
        );
        idle(&mut loads, &holder_token).await;
    }
    (holder, hashes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_follows_the_prefix_resyncs_and_purges() {
    let server = NatsServer::start().unwrap();
    let dir = model_dir();
    let runtime = common::runtime_with_lease(server.url(), Duration::from_secs(2)).await;
    let mut settings = FrontendSettings::new(Namespace::new("e2e").unwrap());
    settings.router_mode = RouterMode::Kv;
    let frontend = Frontend::start(&runtime, settings).await.unwrap();
    let mut workers: Vec<Worker> = (0..3).map(|_| worker(&server.url(), dir)).collect();
    tokio::time::timeout(Duration::from_secs(10), frontend.models().wait_for("m", 3))
        .await
        .expect("three workers listed");
    let serving = frontend.serving().clone();
    let router = serving.router().unwrap().clone();

    let prefix: Vec<u32> = (300..460).collect();
    let (holder, hashes) = prefix_sticks(&runtime, &serving, &router, &prefix).await;
    let wid = WorkerId(holder.as_u64());
    let ask = |suffix: u32| ask(&serving, &prefix, suffix);

    // A router that starts late (a second frontend) rebuilds the index from the workers'
    // dumps, without new traffic.
    let mut late = FrontendSettings::new(Namespace::new("e2e").unwrap());
    late.router_mode = RouterMode::Kv;
    let late = Frontend::start(&runtime, late).await.unwrap();
    let late_router = late.serving().router().unwrap().clone();
    eventually(
        "the late router knows the holder's blocks",
        Duration::from_secs(5),
        || held(&late_router, &hashes, wid) == Some(10),
    )
    .await;
    late.shutdown().await;

    // Someone speaking for the holder: a batch on its subject stamped with another instance
    // id is dropped and counted, neither indexed nor a gap that starts a resync.
    let component = ComponentId::new("e2e", "backend").unwrap();
    let subject = component.event_subject(&Topic::new(KV_EVENTS_TOPIC).unwrap(), holder);
    let forged_block = SequenceHash(0xf0f0_f0f0);
    let forged = KvEventBatch {
        worker: WorkerId(holder.as_u64() ^ 1),
        events: vec![KvEvent {
            event_id: 2_000_000,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent_hash: None,
                blocks: vec![StoredBlock {
                    block_hash: forged_block,
                    tokens_hash: LocalBlockHash(2),
                }],
            },
        }],
    };
    let (resyncs, refused) = (router.resyncs(), router.forged());
    runtime
        .bus()
        .publish(Outgoing::new(
            subject.clone(),
            encode_event(&forged).unwrap(),
        ))
        .await
        .unwrap();
    eventually(
        "the forged batch is refused",
        Duration::from_secs(5),
        || router.forged() > refused,
    )
    .await;
    assert_eq!(router.resyncs(), resyncs, "a forged batch is no gap");
    assert!(router.index().find_matches(&[forged_block]).is_empty());

    // A batch lost on the way: the next one the router sees skips ids. Forge one far ahead
    // with a block the worker never stored; the router must resync from the dump.
    let bogus = SequenceHash(0xdead_beef);
    let batch = KvEventBatch {
        worker: wid,
        events: vec![KvEvent {
            event_id: 1_000_000,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent_hash: None,
                blocks: vec![StoredBlock {
                    block_hash: bogus,
                    tokens_hash: LocalBlockHash(1),
                }],
            },
        }],
    };
    let resyncs = router.resyncs();
    runtime
        .bus()
        .publish(Outgoing::new(subject, encode_event(&batch).unwrap()))
        .await
        .unwrap();
    runtime.bus().flush().await.unwrap();
    // After the resync the index holds exactly the dump: the prefix, never the forged block.
    eventually("the router resyncs", Duration::from_secs(5), || {
        router.resyncs() > resyncs
    })
    .await;
    assert!(!router.index().find_matches(&[bogus]).contains_key(&wid));
    assert_eq!(held(&router, &hashes, wid), Some(10));
    assert_eq!(
        ask(3000).await,
        holder,
        "routing still follows the prefix after the resync"
    );

    // Kill the holder: once its lease lapses its blocks leave the index, and the prefix goes
    // to a live worker.
    let pos = workers.iter().position(|w| w.instance == holder).unwrap();
    drop(workers.remove(pos));
    eventually(
        "the killed worker is purged",
        Duration::from_secs(8),
        || held(&router, &hashes, wid).is_none(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut changes = frontend.models().changes();
        while frontend.models().get("m").map(|m| m.instances.len()) != Some(2) {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("the model keeps two instances");
    let next = ask(4000).await;
    assert_ne!(next, holder);
    assert!(workers.iter().any(|w| w.instance == next));
    frontend.shutdown().await;
    runtime.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_component_routes_and_replicas_share_its_decisions() {
    let server = NatsServer::start().unwrap();
    let dir = model_dir();
    let _router =
        Proc::start(dynamo_run().args(["--bus", &server.url(), "--namespace", "e2e", "router"]));
    let workers: Vec<Worker> = (0..2).map(|_| worker(&server.url(), dir)).collect();
    let runtime = Runtime::start(RuntimeSettings {
        bus: Some(server.url()),
        ..Default::default()
    })
    .await
    .unwrap();
    // Frontend A routes through the router component; frontend B has a router of its own.
    let mut a = FrontendSettings::new(Namespace::new("e2e").unwrap());
    a.router_mode = RouterMode::Kv;
    a.remote_router = true;
    let a = Frontend::start(&runtime, a).await.unwrap();
    assert!(a.serving().router().is_none(), "A routes remotely");
    let mut b = FrontendSettings::new(Namespace::new("e2e").unwrap());
    b.router_mode = RouterMode::Kv;
    let b = Frontend::start(&runtime, b).await.unwrap();
    for f in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(10), f.models().wait_for("m", 2))
            .await
            .expect("two workers listed");
    }
    let serving = a.serving().clone();
    let b_router = b.serving().router().unwrap().clone();
    let prefix: Vec<u32> = (500..660).collect();
    // Routed by the router component; B's index sees the holder's blocks.
    prefix_sticks(&runtime, &serving, &b_router, &prefix).await;

    // A long request routed by the component shows in B's accounting while it runs...
    let mut long = start(&serving, &prefix, 3000, 1500).await;
    let worker = WorkerId(long.worker.as_u64());
    eventually("B accounts for A's request", Duration::from_secs(5), || {
        b_router.shared_leases() == 1 && b_router.accounted(worker).1 > 0
    })
    .await;
    let first = long.next().await;
    assert!(matches!(first, Some(Ok(_))), "{:?}", first.map(|r| r.err()));
    eventually("B sees the first token", Duration::from_secs(5), || {
        b_router.accounted(worker).0 == 0
    })
    .await;
    // ...and leaves it when the request ends.
    while let Some(p) = long.next().await {
        p.unwrap();
    }
    drop(long);
    eventually("B releases A's request", Duration::from_secs(5), || {
        b_router.shared_leases() == 0 && b_router.accounted(worker) == (0, 0)
    })
    .await;
    drop(workers);
    a.shutdown().await;
    b.shutdown().await;
    runtime.close().await;
}
