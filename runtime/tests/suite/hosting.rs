//! Discovery, the service protocol, graceful shutdown, and NATS-only restarts.

use std::time::Duration;

use bytes::Bytes;
use dynamo_runtime::bus::Headers;
use dynamo_runtime::discovery::DiscoveryEvent;
use dynamo_runtime::rpc::RpcError;
use dynamo_runtime::subject::{service_query_subject, DiscoveryFilter, ServiceVerb};
use dynamo_runtime::{CallOptions, Target};

use super::common::observe;
use super::{call_all, echo, serve_one, Harness, Observed, TestReq, TestResp, SECOND};
use crate::transport_suite;

transport_suite!(
    graceful_shutdown_drains_and_refuses_new_work,
    service_protocol_lists_endpoints_and_counts_requests,
    discovery_watch_sees_joins_and_leaves,
);

async fn graceful_shutdown_drains_and_refuses_new_work(h: &Harness) {
    let (rt, served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let mut watch = caller
        .discovery()
        .watch(ep.discovery_filter())
        .await
        .unwrap();
    assert!(matches!(
        watch.next().await,
        Some(DiscoveryEvent::Joined(_))
    ));
    let mut inflight = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep.clone()),
            &echo("drain me", 6, 100),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert!(inflight.next().await.unwrap().is_ok());
    let shutdown = tokio::spawn(served.shutdown(Duration::from_secs(10)));
    // Deregistered first.
    let left = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(left, Some(DiscoveryEvent::Left { .. })),
        "{left:?}"
    );
    // New work is not taken.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = call_all(&caller, Target::Any(ep.clone()), &echo("late", 1, 0))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::NoResponders { .. }), "{err:?}");
    // The request in flight completes.
    let mut rest = 0;
    while let Some(item) = inflight.next().await {
        item.unwrap();
        rest += 1;
    }
    assert_eq!(rest, 5);
    assert_eq!(observe(&mut observed, 5).await, Observed::Finished);
    let report = shutdown.await.unwrap();
    assert_eq!(report.open_at_start, 1);
    assert_eq!(report.cancelled, 0);
    drop(rt);

    // A request that outlives the grace period is cancelled.
    let (_rt2, served2, mut observed2, ep2) = serve_one(h).await;
    let _hung = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep2), &TestReq::Hang, CallOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = served2.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.cancelled, 1);
    assert_eq!(observe(&mut observed2, 5).await, Observed::Cancelled);
}

async fn service_protocol_lists_endpoints_and_counts_requests(h: &Harness) {
    let (_rt, served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    for _ in 0..3 {
        call_all(&caller, Target::Any(ep.clone()), &echo("n", 1, 0))
            .await
            .unwrap();
    }
    let bus = h.bus().await;
    let ask = |verb| {
        let bus = bus.clone();
        async move {
            let mut r = bus
                .request(
                    service_query_subject(verb),
                    Headers::new(),
                    Bytes::new(),
                    SECOND,
                )
                .await
                .unwrap();
            let m = tokio::time::timeout(Duration::from_secs(2), r.next())
                .await
                .unwrap()
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()
        }
    };
    let ping = ask(ServiceVerb::Ping).await;
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "test-echo");
    assert_eq!(ping["id"], served.instance().to_string());
    let info = ask(ServiceVerb::Info).await;
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    assert_eq!(info["endpoints"][0]["name"], "generate");
    assert_eq!(info["endpoints"][0]["subject"], ep.subject().as_str());
    assert_eq!(info["endpoints"][0]["queue_group"], ep.subject().as_str());
    let stats = ask(ServiceVerb::Stats).await;
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    assert_eq!(stats["endpoints"][0]["num_requests"], 3);
    assert_eq!(stats["endpoints"][0]["num_errors"], 0);
}

/// Watches every instance in `rt`'s discovery.
async fn watch_all(rt: &dynamo_runtime::Runtime) -> dynamo_runtime::discovery::DiscoveryWatch {
    rt.discovery().watch(DiscoveryFilter::all()).await.unwrap()
}

async fn discovery_watch_sees_joins_and_leaves(h: &Harness) {
    let watcher = h.runtime().await;
    let mut watch = watch_all(&watcher).await;
    let (rt, served, _obs, ep) = serve_one(h).await;
    let joined = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap();
    match joined {
        DiscoveryEvent::Joined(info) => {
            assert_eq!(info.endpoint, ep);
            assert_eq!(info.instance, served.instance());
            assert_eq!(info.metadata["card"], 1);
        }
        other => panic!("expected a join, got {other:?}"),
    }
    let listed = watcher
        .discovery()
        .list(&ep.discovery_filter())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    // A lease refresh is not reported as a change.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), watch.next()).await;
    assert!(quiet.is_err(), "unexpected event {quiet:?}");
    let instance = served.instance();
    served.shutdown(Duration::from_secs(1)).await;
    let left = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        left,
        DiscoveryEvent::Left {
            endpoint: ep.clone(),
            instance,
            deregistered: true,
        }
    );
    assert!(watcher
        .discovery()
        .list(&ep.discovery_filter())
        .await
        .unwrap()
        .is_empty());
    // An endpoint dropped without a graceful shutdown deregisters as well, at once rather than
    // when its lease runs out (2 s here).
    let (dropped, _obs) = crate::common::serve_test_actor(&rt, "dropped").await;
    let (dropped_ep, instance) = (dropped.endpoint().clone(), dropped.instance());
    let joined = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
    assert!(
        matches!(joined, Ok(Some(DiscoveryEvent::Joined(_)))),
        "{joined:?}"
    );
    drop(dropped);
    let left = tokio::time::timeout(Duration::from_millis(1000), watch.next()).await;
    assert_eq!(
        left.ok().flatten(),
        Some(DiscoveryEvent::Left {
            endpoint: dropped_ep,
            instance,
            deregistered: true,
        })
    );
    drop(rt);
}

/// NATS-only behaviour: a server restart does not drop registrations or subscriptions.
mod nats_only {
    use super::*;
    use crate::common::TestReq;
    use dynamo_runtime::{Runtime, RuntimeSettings};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_and_endpoints_survive_a_server_restart() {
        survives_restart(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_come_back_after_a_restart_that_lost_the_store() {
        survives_restart(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_reports_an_instance_lost_with_the_servers_store() {
        let mut h = Harness::nats().await;
        let watcher = h.runtime().await;
        let mut watch = watch_all(&watcher).await;
        // A process that will die while the server is down: never deregistered, and its
        // registration vanishes with the store instead of expiring in front of the watcher.
        let url = h.nats.as_ref().unwrap().url();
        let doomed = Runtime::start(RuntimeSettings {
            bus: Some(url),
            ..crate::common::settings()
        })
        .await
        .unwrap();
        let (served, _obs) = crate::common::serve_test_actor(&doomed, "doomed").await;
        let instance = served.instance();
        let joined = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        assert!(
            matches!(joined, Ok(Some(DiscoveryEvent::Joined(_)))),
            "{joined:?}"
        );
        h.nats.as_mut().unwrap().kill();
        drop(served);
        drop(doomed);
        h.nats.as_mut().unwrap().restart_empty().unwrap();
        let left = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        match left {
            // Not a deregistration: it vanished.
            Ok(Some(DiscoveryEvent::Left {
                instance: gone,
                deregistered: false,
                ..
            })) => assert_eq!(gone, instance),
            other => panic!("expected the lost instance to leave, got {other:?}"),
        }
        h.finish().await;
    }

    /// Serves `component` on `rt` and watches it join from another runtime: the served
    /// endpoint, its observations, the watching runtime, its watch and the joined instance.
    async fn joined(
        h: &Harness,
        rt: &Runtime,
        component: &str,
    ) -> (
        dynamo_runtime::ServedEndpoint,
        tokio::sync::mpsc::UnboundedReceiver<Observed>,
        Runtime,
        dynamo_runtime::discovery::DiscoveryWatch,
        dynamo_runtime::discovery::InstanceInfo,
    ) {
        let (served, obs) = crate::common::serve_test_actor(rt, component).await;
        let caller = h.runtime().await;
        let mut watch = watch_all(&caller).await;
        let Some(DiscoveryEvent::Joined(info)) = watch.next().await else {
            panic!("the served instance joins");
        };
        assert_eq!(info.instance, served.instance());
        (served, obs, caller, watch, info)
    }

    /// A key-value bucket of the harness's nats-server, through a plain client.
    async fn bucket(h: &Harness, name: &str) -> async_nats::jetstream::kv::Store {
        let client = async_nats::connect(h.nats.as_ref().unwrap().url())
            .await
            .unwrap();
        async_nats::jetstream::new(client)
            .get_key_value(name)
            .await
            .unwrap()
    }

    /// Anyone on the bus can write the discovery bucket. Junk under an instance's key, and an
    /// entry stored under a key that names another instance, change nothing a watcher sees:
    /// no `Left` for the instance whose value was overwritten, no ghost `Joined` that no
    /// delete would ever remove.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn junk_and_foreign_discovery_entries_change_nothing() {
        let h = Harness::nats().await;
        let rt = h.runtime().await;
        let (served, _obs, _caller, mut watch, info) = joined(&h, &rt, "real").await;
        let bucket = bucket(&h, "dynamo-discovery").await;
        let value = serde_json::to_vec(&info).unwrap();
        let ghost_key = info
            .endpoint
            .discovery_key(dynamo_runtime::InstanceId::new(0x5eed));
        for (key, v) in [
            (info.key(), b"junk".to_vec()),
            (info.key(), b"{\"endpoint\": 7}".to_vec()),
            (ghost_key, value.clone()),
        ] {
            bucket.put(key, v.into()).await.unwrap();
        }
        // The watch is ordered: the next event is the next real change.
        let (other, _obs2) = crate::common::serve_test_actor(&rt, "other").await;
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(DiscoveryEvent::Joined(i))) => assert_eq!(i.instance, other.instance()),
            e => panic!("junk changed what the watcher sees: {e:?}"),
        }
        drop((served, other));
        h.finish().await;
    }

    /// An idle process refreshes one lease, however many instances it hosts: its discovery
    /// traffic does not grow with them (a fleet of 10k workers in 8 processes puts 8 leases
    /// per refresh, not 30k entries).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_discovery_traffic_does_not_grow_with_instances() {
        let h = Harness::nats().await;
        let rt = h.runtime().await;
        let mut served = Vec::new();
        for i in 0..20 {
            served.push(crate::common::serve_test_actor(&rt, &format!("many-{i}")).await);
        }
        let client = async_nats::connect(h.nats.as_ref().unwrap().url())
            .await
            .unwrap();
        let mut puts = client.subscribe("$KV.>").await.unwrap();
        // Three leases of idling: refreshes every third of a lease (2 s here), so about 9.
        let lease = rt.discovery().lease();
        let window = tokio::time::sleep(lease * 3);
        tokio::pin!(window);
        let mut subjects = Vec::new();
        loop {
            tokio::select! {
                _ = &mut window => break,
                m = futures::StreamExt::next(&mut puts) => subjects.push(m.unwrap().subject.to_string()),
            }
        }
        assert!(
            (3..=12).contains(&subjects.len()),
            "{} discovery puts in three leases: {subjects:?}",
            subjects.len()
        );
        assert!(
            subjects
                .iter()
                .all(|s| s.starts_with("$KV.dynamo-discovery-leases.")),
            "only the lease is refreshed: {subjects:?}"
        );
        assert_eq!(
            rt.discovery()
                .list(&DiscoveryFilter::all())
                .await
                .unwrap()
                .len(),
            20
        );
        drop(served);
        h.finish().await;
    }

    /// A lease that lapsed while its process lived (it stalled for longer than the lease, or
    /// someone removed it): watchers see its instances leave, and the process registers them
    /// again at its next refresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lapsed_lease_is_taken_again() {
        let h = Harness::nats().await;
        let rt = h.runtime().await;
        let (served, _obs, caller, mut watch, info) = joined(&h, &rt, "stalled").await;
        let lease = info.lease.clone().expect("entries name their lease");
        let leases = bucket(&h, "dynamo-discovery-leases").await;
        // What the server does when a lease runs out: a purge marker.
        leases.purge(&lease).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(DiscoveryEvent::Left {
                instance,
                deregistered: false,
                ..
            })) => assert_eq!(instance, served.instance()),
            other => panic!("expected the instance to leave with its lease, got {other:?}"),
        }
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(DiscoveryEvent::Joined(again))) => assert_eq!(again, info),
            other => panic!("expected the instance back at the next refresh, got {other:?}"),
        }
        let listed = caller
            .discovery()
            .list(&DiscoveryFilter::all())
            .await
            .unwrap();
        assert_eq!(listed, vec![info]);
        drop(served);
        h.finish().await;
    }

    async fn survives_restart(empty_store: bool) {
        let mut h = Harness::nats().await;
        let rt = h.runtime().await;
        let (served, _obs) = crate::common::serve_test_actor(&rt, "echo").await;
        let ep = served.endpoint().clone();
        let caller = h.runtime().await;
        let mut watch = watch_all(&caller).await;
        assert!(matches!(
            watch.next().await,
            Some(DiscoveryEvent::Joined(_))
        ));
        let req = TestReq::Echo {
            text: "before".into(),
            times: 1,
            delay_ms: 0,
        };
        assert_eq!(
            call_all(&caller, Target::Any(ep.clone()), &req)
                .await
                .unwrap()
                .len(),
            1
        );

        // Restart the server; clients reconnect by themselves. With an empty store the
        // discovery bucket is gone too, and the next lease refresh re-creates it.
        let server = h.nats.as_mut().unwrap();
        if empty_store {
            server.restart_empty().unwrap();
        } else {
            server.restart().unwrap();
        }

        // Wait for the reconnect, then for more than one lease: a dropped registration would be gone.
        let lease = rt.discovery().lease();
        tokio::time::sleep(lease + Duration::from_millis(1500)).await;
        let listed = caller
            .discovery()
            .list(&ep.discovery_filter())
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "registration survives the restart");
        assert_eq!(listed[0].instance, served.instance());
        let req = TestReq::Echo {
            text: "after".into(),
            times: 3,
            delay_ms: 0,
        };
        let items = call_all(&caller, Target::Any(ep), &req).await.unwrap();
        assert_eq!(
            items.len(),
            3,
            "subscriptions were re-created after the reconnect"
        );
        // A watch opened before the restart still reports what happens after it.
        let (late, _obs2) = crate::common::serve_test_actor(&rt, "late").await;
        let joined = loop {
            match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
                Ok(Some(DiscoveryEvent::Joined(info))) if info.instance == late.instance() => {
                    break true
                }
                Ok(Some(_)) => continue,
                _ => break false,
            }
        };
        assert!(
            joined,
            "the watch saw the instance that joined after the restart"
        );
        h.finish().await;
    }
}
