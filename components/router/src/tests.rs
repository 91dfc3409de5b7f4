//! Unit tests of the routing core.

use std::sync::Arc;
use std::time::Duration;

use dynamo_kv::block_hashes;
use dynamo_protocols::kv::{LoadReport, WorkerId};
use dynamo_protocols::router::RouterEvent;

use crate::*;
use dynamo_protocols::kv::{KvEvent, KvEventData, LocalBlockHash, StorageTier, StoredBlock};

fn store(router: &KvRouter, w: u64, tokens: &[u32], bs: usize) {
    router
        .index()
        .apply(WorkerId(w), &[stored(0, StorageTier::Device, tokens, bs)]);
}

/// Event `id`: `tokens`' full blocks stored on `tier`.
fn stored(id: u64, tier: StorageTier, tokens: &[u32], bs: usize) -> KvEvent {
    let blocks = block_hashes(tokens, bs)
        .into_iter()
        .map(|(l, s)| StoredBlock {
            block_hash: s,
            tokens_hash: LocalBlockHash(l.0),
        })
        .collect();
    KvEvent {
        event_id: id,
        tier,
        data: KvEventData::Stored {
            parent_hash: None,
            blocks,
        },
    }
}

#[test]
fn the_worker_holding_the_prefix_wins_until_load_outweighs_it() {
    let router = KvRouter::new(KvRouterSettings::default());
    let prompt: Vec<u32> = (0..64).collect();
    store(&router, 2, &prompt[..48], 16);
    let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
    let d = router.route(&workers, &prompt, 16).unwrap();
    assert_eq!(d.worker, WorkerId(2));
    assert_eq!(d.overlap.device, 3);
    drop(d);
    // Heavy decode load on worker 2 outweighs its 3 cached blocks.
    router.record_load(
        WorkerId(2),
        LoadReport {
            active_blocks: 50,
            total_blocks: 1000,
            ..Default::default()
        },
    );
    assert_ne!(
        router.route(&workers, &prompt, 16).unwrap().worker,
        WorkerId(2)
    );
}

/// A frontend in `least-loaded` mode asks a router component (set up for kv routing) to
/// route by load: the cached prefix must not attract the request.
#[test]
fn a_load_only_request_ignores_cached_prefixes() {
    let router = KvRouter::new(KvRouterSettings::default());
    let prompt: Vec<u32> = (0..64).collect();
    store(&router, 2, &prompt, 16);
    router.add_worker(WorkerId(1), "m".into(), 16);
    router.add_worker(WorkerId(2), "m".into(), 16);
    router.record_load(
        WorkerId(2),
        LoadReport {
            active_blocks: 2,
            total_blocks: 1000,
            ..Default::default()
        },
    );
    let by_overlap = router.route_model("m", &[], &prompt).unwrap();
    assert_eq!(by_overlap.worker, WorkerId(2), "kv mode follows the prefix");
    drop(by_overlap);
    let by_load = router.route_model_as("m", &[], &prompt, true).unwrap();
    assert_eq!(
        by_load.worker,
        WorkerId(1),
        "load-only picks the idle worker"
    );
    assert_eq!(by_load.overlap.device, 0);
}

/// The workers a model's requests go to follow joins and leaves at once (the candidate list
/// is kept between requests), other models' workers never count, and an excluded worker is
/// skipped.
#[test]
fn candidates_follow_joins_and_leaves() {
    let router = KvRouter::new(KvRouterSettings {
        seed: Some(7),
        ..Default::default()
    });
    let prompt: Vec<u32> = (0..64).collect();
    assert!(matches!(
        router.route_model("m", &[], &prompt),
        Err(RouteError::NoWorkers)
    ));
    router.add_worker(WorkerId(1), "m".into(), 16);
    router.add_worker(WorkerId(9), "other".into(), 16);
    assert_eq!(
        router.route_model("m", &[], &prompt).unwrap().worker,
        WorkerId(1)
    );
    // Worker 2 holds the prompt: once it joins, it wins.
    store(&router, 2, &prompt, 16);
    router.add_worker(WorkerId(2), "m".into(), 16);
    assert_eq!(
        router.route_model("m", &[], &prompt).unwrap().worker,
        WorkerId(2)
    );
    assert_eq!(
        router
            .route_model("m", &[WorkerId(2)], &prompt)
            .unwrap()
            .worker,
        WorkerId(1),
        "excluded"
    );
    router.forget(WorkerId(2));
    for _ in 0..10 {
        assert_eq!(
            router.route_model("m", &[], &prompt).unwrap().worker,
            WorkerId(1)
        );
    }
    router.forget(WorkerId(1));
    assert!(matches!(
        router.route_model("m", &[], &prompt),
        Err(RouteError::NoWorkers)
    ));
    assert_eq!(
        router.route_model("other", &[], &prompt).unwrap().worker,
        WorkerId(9)
    );
}

/// A router that knows workers 1 and 2 (as discovery would tell it).
fn knowing_workers(settings: KvRouterSettings) -> Arc<KvRouter> {
    let r = KvRouter::new(settings);
    for w in [1, 2] {
        r.add_worker(WorkerId(w), "m".into(), 16);
    }
    r
}

/// Two routers wired as the bus would: B applies A's decision events.
fn replicas() -> (
    Arc<KvRouter>,
    Arc<KvRouter>,
    tokio::sync::mpsc::UnboundedReceiver<RouterEvent>,
) {
    let a = knowing_workers(KvRouterSettings::default());
    let b = knowing_workers(KvRouterSettings::default());
    let (sink, rx) = DecisionSink::channel();
    a.share_decisions(sink);
    (a, b, rx)
}

fn forward(rx: &mut tokio::sync::mpsc::UnboundedReceiver<RouterEvent>, to: &KvRouter) {
    while let Ok(e) = rx.try_recv() {
        to.apply_decision(e);
    }
}

#[test]
fn replicas_agree_on_load_and_release_it_together() {
    let (a, b, mut rx) = replicas();
    let workers = [WorkerId(1), WorkerId(2)];
    let prompt: Vec<u32> = (0..160).collect();
    let mut d = a.route(&workers, &prompt, 16).unwrap();
    forward(&mut rx, &b);
    assert_eq!(a.accounted(d.worker), (160, 10));
    assert_eq!(b.accounted(d.worker), a.accounted(d.worker));
    assert_eq!(b.shared_leases(), 1);
    // B sees A's request, so it sends the next one to the other worker.
    let other = b.route(&workers, &prompt, 16).unwrap();
    assert_ne!(other.worker, d.worker);
    d.lease.prefill_done();
    forward(&mut rx, &b);
    assert_eq!(b.accounted(d.worker), (0, 10));
    let w = d.worker;
    drop(d);
    forward(&mut rx, &b);
    assert_eq!(b.accounted(w), (0, 0));
    assert_eq!(b.shared_leases(), 0);
}

/// Decisions are bus input: one for a worker this router does not know (a forged id, or a
/// worker not in its discovery view) leaves no load and no lease behind.
#[test]
fn a_decision_for_an_unknown_worker_is_dropped() {
    let (a, _, mut rx) = replicas();
    let stranger = KvRouter::new(KvRouterSettings::default());
    let d = a
        .route(&[WorkerId(1)], &(0..64).collect::<Vec<u32>>(), 16)
        .unwrap();
    forward(&mut rx, &stranger);
    assert_eq!(stranger.accounted(WorkerId(1)), (0, 0));
    assert_eq!(stranger.shared_leases(), 0);
    drop(d);
}

#[test]
fn out_of_order_duplicate_and_lost_decision_events_cannot_leak() {
    let (a, b, mut rx) = replicas();
    let prompt: Vec<u32> = (0..64).collect();
    let d = a.route(&[WorkerId(1)], &prompt, 16).unwrap();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    drop(d);
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    // The end arrives first (another publisher's path), then the decision, twice.
    let finished = events.pop().unwrap();
    b.apply_decision(finished.clone());
    b.apply_decision(events[0].clone());
    b.apply_decision(events[0].clone());
    assert_eq!(b.accounted(WorkerId(1)), (0, 0));
    assert_eq!(b.shared_leases(), 0);
    // A finish that never comes: the lease expires after its TTL.
    let c = knowing_workers(KvRouterSettings {
        shared_lease_ttl: Duration::ZERO,
        ..Default::default()
    });
    c.apply_decision(events[0].clone());
    assert_eq!(c.accounted(WorkerId(1)), (64, 4));
    std::thread::sleep(Duration::from_millis(5));
    let _ = c.route(&[WorkerId(2)], &prompt, 16).unwrap();
    assert_eq!(c.accounted(WorkerId(1)), (0, 0));
    assert_eq!(c.shared_leases(), 0);
}

#[test]
fn leases_account_until_dropped_and_busy_workers_are_skipped() {
    let router = KvRouter::new(KvRouterSettings {
        busy_threshold: Some(0.98),
        ..Default::default()
    });
    let workers = [WorkerId(1), WorkerId(2)];
    let prompt: Vec<u32> = (0..160).collect();
    let a = router.route(&workers, &prompt, 16).unwrap();
    // The first request's 10 blocks make its worker costlier: the next goes elsewhere.
    let b = router.route(&workers, &prompt, 16).unwrap();
    assert_ne!(a.worker, b.worker);
    drop((a, b));
    for w in workers {
        let acc = router.loads.get(&w).unwrap();
        assert_eq!(
            (acc.blocks, acc.prefill_tokens),
            (0, 0),
            "leases released everything"
        );
    }
    // Both workers report nearly full pools: the first report after the leases' release is
    // read against the counts before it (it may have been taken then), the second as it is.
    for w in [1, 2, 1, 2] {
        router.record_load(
            WorkerId(w),
            LoadReport {
                active_blocks: 99,
                total_blocks: 100,
                ..Default::default()
            },
        );
    }
    assert_eq!(
        router.route(&workers, &prompt, 16).err(),
        Some(RouteError::AllBusy(2))
    );
}

mod properties {
    use super::*;
    use crate::cost;
    use dynamo_kv::Overlap;
    use proptest::prelude::*;

    fn settings() -> impl Strategy<Value = KvRouterSettings> {
        // A weight of 0 (load alone) makes every idle worker tie, prefix hit or not.
        let weight = prop_oneof![1 => Just(0.0), 4 => 0.0f64..4.0];
        (weight, 0.0f64..1.0, 0.0f64..1.0, 0.0f64..1.0).prop_map(|(w, h, d, p)| KvRouterSettings {
            overlap_weight: w,
            host_credit: h,
            disk_credit: d.min(h),
            peer_credit: p,
            ..Default::default()
        })
    }

    proptest! {
        /// More decode load never lowers a worker's cost; more prompt work waiting neither.
        #[test]
        fn cost_is_monotone_in_load(
            s in settings(),
            needed in 0u32..512,
            device in 0u32..512,
            pending in 0.0f64..1e4,
            decode in 0.0f64..1e5,
            more in 0.0f64..1e4,
            host in 0u32..512,
            total in 0.0f64..2e3,
        ) {
            let device = device.min(needed);
            let o = Overlap { device, host: host.min(needed - device), disk: 0 };
            let at = |pending, decode| cost(&s, needed as f64, o, 0, pending, decode, total);
            let base = at(pending, decode);
            prop_assert!(at(pending, decode + more) >= base);
            prop_assert!(at(pending + more, decode) >= base);
        }

        /// Fewer cached blocks never lower the cost, on any tier; a device hit is worth at
        /// least a host hit, which is worth at least a disk hit.
        #[test]
        fn cost_is_monotone_in_uncached_blocks(
            s in settings(),
            needed in 1u32..512,
            cached in 0u32..512,
            fewer in 0u32..512,
            pending in 0.0f64..1e3,
            decode in 0.0f64..1e3,
            total in 0.0f64..2e3,
        ) {
            let cached = cached.min(needed);
            let less = cached.saturating_sub(fewer);
            let at = |device, host, disk| cost(&s, needed as f64, Overlap { device, host, disk }, 0, pending, decode, total);
            prop_assert!(at(less, 0, 0) >= at(cached, 0, 0));
            prop_assert!(at(0, less, 0) >= at(0, cached, 0));
            prop_assert!(at(0, 0, cached) >= at(0, cached, 0));
            prop_assert!(at(0, cached, 0) >= at(cached, 0, 0));
        }

        /// A peer that holds more of the prompt never raises a worker's cost, a longer run
        /// never more than a shorter, and it never beats holding the blocks on the device.
        #[test]
        fn a_peer_run_only_lowers_the_cost(
            s in settings(),
            needed in 1u32..512,
            device in 0u32..512,
            host in 0u32..512,
            run in 0u32..512,
            more in 0u32..512,
            pending in 0.0f64..1e3,
            decode in 0.0f64..1e3,
            total in 0.0f64..2e3,
        ) {
            let device = device.min(needed);
            let o = Overlap { device, host: host.min(needed - device), disk: 0 };
            let run = run.min(needed);
            let longer = (run + more).min(needed);
            let at = |o: Overlap, peer| cost(&s, needed as f64, o, peer, pending, decode, total);
            prop_assert!(at(o, run) <= at(o, 0));
            prop_assert!(at(o, longer) <= at(o, run));
            let all = Overlap { device: longer, host: 0, disk: 0 };
            let none = Overlap::default();
            prop_assert!(at(all, 0) <= at(none, longer));
        }

        /// Routing a model (idle workers counted, the others in load order, stopping at the
        /// first worker whose load alone costs more than the best so far) picks exactly the
        /// worker scoring every candidate picks, through any sequence of stored prefixes, load reports, routes and finished
        /// requests: two routers with the same seed and the same history agree on every
        /// decision.
        #[test]
        fn the_load_order_picks_what_scoring_every_worker_picks(
            s in settings(),
            busy in proptest::option::of(0.3f64..1.0),
            ops in proptest::collection::vec(
                (
                    0u64..24,
                    0u32..6,
                    1usize..300,
                    // Idle reports often (a worker whose pool is smaller than a prompt
                    // costs more even idle).
                    prop_oneof![Just(0u64), 0u64..400],
                    prop_oneof![Just(0u64), 0u64..200],
                    any::<bool>(),
                    prop_oneof![4u64..24, 24u64..800],
                ),
                1..60,
            ),
        ) {
            let s = KvRouterSettings { seed: Some(7), busy_threshold: busy, ..s };
            let (fast, all) = (KvRouter::new(s.clone()), KvRouter::new(s));
            let workers: Vec<WorkerId> = (1..=24).map(WorkerId).collect();
            for r in [&fast, &all] {
                for &w in &workers {
                    r.add_worker(w, "m".into(), 16);
                }
            }
            let mut open = Vec::new();
            for (w, prefix, len, active, queued, done, total) in ops {
                // Prompts share one of six prefixes.
                let prompt: Vec<u32> = (0..len as u32).map(|t| t + prefix * 1000).collect();
                for r in [&fast, &all] {
                    store(r, w + 1, &prompt[..len / 2], 16);
                    r.record_load(WorkerId(w + 1), LoadReport {
                        active_blocks: active,
                        // Pools from smaller than a prompt to twice the largest load.
                        total_blocks: total,
                        queued_prefill_tokens: queued,
                        ..Default::default()
                    });
                }
                let a = fast.route_model("m", &[], &prompt);
                let b = all.route(&workers, &prompt, 16);
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        prop_assert_eq!(a.worker, b.worker);
                        prop_assert_eq!(a.overlap, b.overlap);
                        open.push((a.lease, b.lease));
                    }
                    (Err(a), Err(b)) => prop_assert_eq!(a, b),
                    (a, b) => prop_assert!(false, "{:?} against {:?}", a.map(|d| d.worker), b.map(|d| d.worker)),
                }
                if done && !open.is_empty() {
                    open.remove(0);
                }
            }
        }

        /// Any interleaving of routing, first tokens and drops: once every lease is gone,
        /// nothing is accounted to any worker (a lease released once, never twice, never
        /// leaked), and a replica applying the shared events (duplicated) agrees.
        #[test]
        fn leases_release_exactly_once(
            ops in proptest::collection::vec((0usize..3, 1usize..200, any::<bool>(), any::<bool>()), 1..40),
        ) {
            let a = KvRouter::new(KvRouterSettings::default());
            let b = KvRouter::new(KvRouterSettings::default());
            let (sink, mut rx) = DecisionSink::channel();
            a.share_decisions(sink);
            let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
            let mut open: Vec<RouteLease> = Vec::new();
            for (drop_at, len, first, dup) in ops {
                let prompt: Vec<u32> = (0..len as u32).collect();
                let mut d = a.route(&workers, &prompt, 16).unwrap();
                if first {
                    d.lease.prefill_done();
                    d.lease.prefill_done();
                }
                open.push(d.lease);
                if drop_at < open.len() && dup {
                    drop(open.remove(drop_at));
                }
                while let Ok(e) = rx.try_recv() {
                    b.apply_decision(e.clone());
                    if dup {
                        b.apply_decision(e);
                    }
                }
            }
            drop(open);
            while let Ok(e) = rx.try_recv() {
                b.apply_decision(e);
            }
            for w in workers {
                prop_assert_eq!(a.accounted(w), (0, 0));
                prop_assert_eq!(b.accounted(w), (0, 0));
            }
            prop_assert_eq!(b.shared_leases(), 0);
        }
    }
}

/// Conditional disaggregation: short uncached prompts and saturated prefill pools stay on the
/// decode worker; otherwise the prefill worker holding the prompt's prefix gets it, and its
/// accounting holds the prompt until the lease goes.
#[test]
fn prefill_goes_remote_only_for_long_uncached_prompts_with_room_in_the_prefill_pool() {
    let router = KvRouter::new(KvRouterSettings {
        disagg_min_remote_tokens: 64,
        disagg_max_prefill_queue: 1000,
        ..Default::default()
    });
    let prompt: Vec<u32> = (0..256).collect();
    let none = dynamo_kv::Overlap::default();
    let decode = WorkerId(1);
    router.add_decode_worker(decode);
    assert_eq!(
        router.plan_prefill("m", decode, none, &prompt).label(),
        "local_no_prefill"
    );
    for w in [10, 11] {
        router.add_prefill_worker(
            WorkerId(w),
            "m".into(),
            16,
            format!("ns.prefill{w}.prefill"),
        );
    }
    router.add_prefill_worker(WorkerId(12), "other".into(), 16, "ns.p.prefill".into());
    assert_eq!(router.prefill_workers("m"), 2);
    // 208 of 256 tokens cached on the decode worker: 48 uncached, under 64: with idle
    // prefill workers it still goes remote; once both have work queued, it stays local.
    let mostly_cached = dynamo_kv::Overlap {
        device: 13,
        ..Default::default()
    };
    assert_eq!(
        router
            .plan_prefill("m", decode, mostly_cached, &prompt)
            .label(),
        "remote"
    );
    // (Reported twice: the plan above took a lease on one of them and gave it back, and the
    // first report after that is read against the router's counts before it.)
    for w in [10, 11, 10, 11] {
        router.record_load(
            WorkerId(w),
            LoadReport {
                queued_prefill_tokens: 100,
                total_blocks: 100,
                ..Default::default()
            },
        );
    }
    assert_eq!(
        router
            .plan_prefill("m", decode, mostly_cached, &prompt)
            .label(),
        "local_short"
    );
    // An aggregated worker prefills its own requests, prefill workers or not.
    assert_eq!(
        router.plan_prefill("m", WorkerId(2), none, &prompt).label(),
        "local_not_decode"
    );
    // Worker 11 holds most of the prompt: it gets the prefill.
    store(&router, 11, &prompt[..192], 16);
    let plan = router.plan_prefill("m", decode, none, &prompt);
    let PrefillPlan::Remote {
        worker,
        endpoint,
        lease,
    } = plan
    else {
        panic!("a long uncached prompt with an idle prefill pool goes remote");
    };
    assert_eq!(
        (worker, endpoint.as_str()),
        (WorkerId(11), "ns.prefill11.prefill")
    );
    assert_eq!(
        router
            .loads
            .get(&WorkerId(11))
            .unwrap()
            .pending_prefill_tokens(),
        100 + 64,
        "the uncached part is the prefill worker's pending work (beside the 100 it reported) while the lease lives"
    );
    drop(lease);
    assert_eq!(
        router
            .loads
            .get(&WorkerId(11))
            .unwrap()
            .pending_prefill_tokens(),
        100
    );
    // Both prefill workers report deep queues (twice, as above): saturated, the decode
    // worker prefills.
    for w in [10, 11, 10, 11] {
        router.record_load(
            WorkerId(w),
            LoadReport {
                queued_prefill_tokens: 5000,
                total_blocks: 100,
                ..Default::default()
            },
        );
    }
    assert_eq!(
        router.plan_prefill("m", decode, none, &prompt).label(),
        "local_saturated"
    );
    // A prefill worker that leaves is no longer planned for.
    router.forget(WorkerId(10));
    router.forget(WorkerId(11));
    assert_eq!(
        router.plan_prefill("m", decode, none, &prompt).label(),
        "local_no_prefill"
    );
}

/// A prefix the worker evicted from its device pool but holds in its host tier (the events
/// say so) still attracts the request, credited as host hits.
#[test]
fn a_prefix_held_on_the_host_tier_still_attracts_the_request() {
    let router = KvRouter::new(KvRouterSettings::default());
    let prompt: Vec<u32> = (0..64).collect();
    store(&router, 1, &prompt, 16);
    let hashes: Vec<_> = block_hashes(&prompt, 16).into_iter().map(|h| h.1).collect();
    // Device eviction, then the same blocks stored on the host tier.
    router.index().apply(
        WorkerId(1),
        &[
            KvEvent {
                event_id: 1,
                tier: StorageTier::Device,
                data: KvEventData::Removed {
                    block_hashes: hashes.clone(),
                },
            },
            stored(2, StorageTier::Host, &prompt, 16),
        ],
    );
    let d = router
        .route(&[WorkerId(1), WorkerId(2), WorkerId(3)], &prompt, 16)
        .unwrap();
    assert_eq!(d.worker, WorkerId(1));
    assert_eq!((d.overlap.device, d.overlap.host), (0, 4));
    // Nothing to compute (the prefix is onboarded, not prefilled), but four new device
    // blocks while the request runs.
    assert_eq!(router.accounted(WorkerId(1)), (0, 4));
    drop(d);
    // Worker 1's device pool is full: the request's 4 blocks would wait for memory there.
    // Without that wait it would still win (cost 4 - 2 + 10 = 12 against 4 + 9 = 13); with
    // it (12 + 4 = 16), the others, which have room, win. (Reported twice: the first report
    // after the release is read against the router's counts before it.)
    for (w, active, total) in [(1, 10, 10), (1, 10, 10), (2, 9, 100), (3, 9, 100)] {
        router.record_load(
            WorkerId(w),
            LoadReport {
                active_blocks: active,
                total_blocks: total,
                ..Default::default()
            },
        );
    }
    let d = router
        .route(&[WorkerId(1), WorkerId(2), WorkerId(3)], &prompt, 16)
        .unwrap();
    assert_ne!(d.worker, WorkerId(1));
}

/// A prefix a worker holds only on its disk tier (announced after a warm restart) attracts the
/// request too, credited as disk hits.
#[test]
fn a_prefix_held_on_the_disk_tier_attracts_the_request() {
    let router = KvRouter::new(KvRouterSettings::default());
    let prompt: Vec<u32> = (0..64).collect();
    router
        .index()
        .apply(WorkerId(2), &[stored(0, StorageTier::Disk, &prompt, 16)]);
    let d = router
        .route(&[WorkerId(1), WorkerId(2), WorkerId(3)], &prompt, 16)
        .unwrap();
    assert_eq!(d.worker, WorkerId(2));
    assert_eq!(
        (d.overlap.device, d.overlap.host, d.overlap.disk),
        (0, 0, 4)
    );
}

/// Cluster-wide sharing: a worker whose pool is full holds the prefix on its host tier; with
/// a peer credit, a worker with room wins the request and is told to fetch the prefix from
/// it (the whole run, the blocks it names); without one, nothing is suggested. A worker
/// holding the prefix itself is never sent to a peer.
#[test]
fn a_full_worker_holding_the_prefix_lends_it_to_one_with_room() {
    let prompt: Vec<u32> = (0..64).collect();
    let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
    let setup = |peer_credit: f64| {
        let router = KvRouter::new(KvRouterSettings {
            peer_credit,
            ..Default::default()
        });
        router
            .index()
            .apply(WorkerId(1), &[stored(0, StorageTier::Host, &prompt, 16)]);
        router.record_load(
            WorkerId(1),
            LoadReport {
                active_blocks: 10,
                total_blocks: 10,
                ..Default::default()
            },
        );
        router.record_load(
            WorkerId(2),
            LoadReport {
                active_blocks: 9,
                total_blocks: 100,
                ..Default::default()
            },
        );
        router.record_load(
            WorkerId(3),
            LoadReport {
                active_blocks: 5,
                total_blocks: 100,
                ..Default::default()
            },
        );
        router
    };
    let router = setup(0.4);
    let d = router.route(&workers, &prompt, 16).unwrap();
    assert_eq!(d.worker, WorkerId(3), "the least loaded worker with room");
    assert_eq!(d.peer, Some((WorkerId(1), 4)));
    // Its prefill is what the peer does not hold: nothing.
    assert_eq!(router.accounted(WorkerId(3)), (0, 4));
    drop(d);
    let router = setup(0.0);
    let d = router.route(&workers, &prompt, 16).unwrap();
    assert_eq!(d.peer, None);
    drop(d);
    // The holder with room keeps its own (host) hit: no peer.
    let router = setup(0.4);
    router.record_load(WorkerId(1), LoadReport::default());
    let d = router.route(&workers, &prompt, 16).unwrap();
    assert_eq!((d.worker, d.peer), (WorkerId(1), None));
}

/// A report taken just before one of the router's requests finished, but received after, shows
/// that request's blocks as someone else's load: read against the highest the router's counts
/// were since the previous report, it adds nothing. Load from elsewhere counts from the first
/// report that shows it, and goes with the first that does not.
#[test]
fn a_report_that_raced_a_finish_adds_no_load() {
    let router = KvRouter::new(KvRouterSettings::default());
    let (a, b) = (WorkerId(1), WorkerId(2));
    for w in [a, b] {
        router.add_worker(w, "m".into(), 16);
    }
    let report = |active, queued| LoadReport {
        active_blocks: active,
        queued_prefill_tokens: queued,
        total_blocks: 1000,
        ..Default::default()
    };
    let load = |w| {
        let acc = router.loads.get(&w).unwrap();
        (acc.decode_blocks(), acc.pending_prefill_tokens())
    };
    let prompt: Vec<u32> = (0..160).collect();
    let mut lease = router.route(&[a], &prompt, 16).unwrap().lease;
    // 10 blocks and 160 prompt tokens ours, and the worker's report agrees.
    router.record_load(a, report(10, 160));
    assert_eq!(load(a), (10, 160));
    // The first token comes back; a report taken before that arrives after it.
    lease.prefill_done();
    router.record_load(a, report(11, 160));
    assert_eq!(load(a), (11, 0), "not the prefill done already");
    // The request finishes; a report taken before that arrives after it.
    drop(lease);
    router.record_load(a, report(12, 0));
    assert_eq!(
        load(a),
        (2, 0),
        "only its output blocks, beyond the router's count"
    );
    router.record_load(a, report(0, 0));
    assert_eq!(load(a), (0, 0));
    // Load from elsewhere counts as soon as a report shows it, and goes with it.
    router.record_load(b, report(40, 300));
    assert_eq!(load(b), (40, 300));
    router.record_load(b, report(5, 0));
    assert_eq!(load(b), (5, 0));
}
