//! The transport suite: every test runs once over the in-process bus (`local::*`) and once
//! over a real nats-server (`nats::*`), with the same assertions.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{observe, spawn_actor, Harness, Observed, OtherReq, TestReq, TestResp};
use dynamo_runtime::bus::{BusError, Headers, Outgoing};
use dynamo_runtime::discovery::DiscoveryEvent;
use dynamo_runtime::rpc::{RemoteErrorKind, RpcError};
use dynamo_runtime::subject::{
    service_query_subject, ComponentId, DiscoveryFilter, EndpointName, ServiceVerb, Subject,
    SubjectPattern,
};
use dynamo_runtime::{CallOptions, Target};

transport_suite!(
    publish_reaches_exact_and_wildcard_subscribers,
    flush_makes_subscriptions_visible_to_other_connections,
    queue_group_delivers_each_message_to_one_member,
    messages_arrive_in_publish_order,
    request_streams_every_reply,
    request_without_responders_is_a_typed_error,
    oversize_payload_is_refused_before_sending,
    dropping_a_subscription_unsubscribes,
    streaming_call_through_queue_group_and_instance_subject,
    remote_errors_are_typed,
    request_and_trace_ids_reach_the_handler,
    bad_input_gets_typed_errors_and_serving_continues,
    malformed_frames_are_a_typed_error_for_the_caller,
    caller_cancellation_reaches_the_handler,
    cancel_before_first_frame_reaches_the_handler,
    deadline_exceeded_is_typed_and_cancels_the_handler,
    dead_responder_is_detected_within_heartbeat_timeout,
    handler_dropping_its_stream_is_reported,
    slow_reader_slows_the_responder_without_losing_frames,
    oversize_request_and_response_are_typed_errors,
    overload_is_refused_with_a_typed_error,
    graceful_shutdown_drains_and_refuses_new_work,
    service_protocol_lists_endpoints_and_counts_requests,
    discovery_watch_sees_joins_and_leaves,
);

const SECOND: Duration = Duration::from_secs(1);

/// Makes a call and reads it to the end.
async fn call_all(
    caller: &dynamo_runtime::Runtime,
    target: Target,
    req: &impl serde::Serialize,
) -> Result<Vec<TestResp>, RpcError> {
    caller
        .client()
        .call::<_, TestResp>(target, req, CallOptions::default())
        .await?
        .collect()
        .await
}

/// Subscribes on a connection of its own and waits until the subscription is visible to
/// every other connection.
async fn subscribe_elsewhere(
    h: &Harness,
    pattern: &str,
    queue: Option<dynamo_runtime::subject::QueueGroup>,
) -> dynamo_runtime::bus::Subscription {
    let bus = h.bus().await;
    let sub = bus.subscribe(pat(pattern), queue).await.unwrap();
    bus.flush().await.unwrap();
    sub
}

fn subj(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

fn pat(s: &str) -> SubjectPattern {
    SubjectPattern::parse(s).unwrap()
}

async fn next_within(sub: &mut dynamo_runtime::bus::Subscription, ms: u64) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_millis(ms), sub.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.payload)
}

async fn publish_reaches_exact_and_wildcard_subscribers(h: &Harness) {
    let bus = h.bus().await;
    let publisher = h.bus().await;
    let mut exact = bus.subscribe(pat("t.a.b"), None).await.unwrap();
    let mut star = bus.subscribe(pat("t.*.b"), None).await.unwrap();
    let mut tail = bus.subscribe(pat("t.>"), None).await.unwrap();
    let mut other = bus.subscribe(pat("t.*"), None).await.unwrap();
    bus.flush().await.unwrap();
    publisher
        .publish(Outgoing::new(subj("t.a.b"), Bytes::from_static(b"1")))
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    for sub in [&mut exact, &mut star, &mut tail] {
        assert_eq!(next_within(sub, 5000).await.as_deref(), Some(&b"1"[..]));
    }
    assert_eq!(
        next_within(&mut other, 200).await,
        None,
        "t.* must not match t.a.b"
    );
}

async fn flush_makes_subscriptions_visible_to_other_connections(h: &Harness) {
    let caller = h.bus().await;
    for i in 0..200 {
        let subject = format!("fresh.{i}");
        let responder = h.bus().await;
        let mut sub = responder.subscribe(pat(&subject), None).await.unwrap();
        responder.flush().await.unwrap();
        // Right after the flush, a request from another connection must find the subscriber.
        let asked = caller.request(subj(&subject), Headers::new(), Bytes::new(), SECOND);
        let answer = async {
            let Ok(Some(m)) = tokio::time::timeout(SECOND, sub.next()).await else {
                return;
            };
            responder
                .publish(Outgoing::new(m.reply.unwrap(), Bytes::from_static(b"here")))
                .await
                .unwrap();
            responder.flush().await.unwrap();
        };
        let (asked, ()) = tokio::join!(asked, answer);
        let mut replies = asked.unwrap_or_else(|e| panic!("attempt {i}: {e}"));
        assert_eq!(&replies.next().await.unwrap().payload[..], b"here");
    }
}

async fn queue_group_delivers_each_message_to_one_member(h: &Harness) {
    let bus = h.bus().await;
    let q = dynamo_runtime::subject::QueueGroup::new("workers").unwrap();
    let mut a = subscribe_elsewhere(h, "jobs", Some(q.clone())).await;
    let mut b = subscribe_elsewhere(h, "jobs", Some(q)).await;
    let mut all = subscribe_elsewhere(h, "jobs", None).await;
    const N: usize = 200;
    for i in 0..N {
        bus.publish(Outgoing::new(subj("jobs"), Bytes::from(i.to_string())))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    let mut seen = HashMap::new();
    let (mut na, mut nb) = (0, 0);
    while let Some(p) = next_within(&mut a, 300).await {
        *seen.entry(p).or_insert(0) += 1;
        na += 1;
    }
    while let Some(p) = next_within(&mut b, 300).await {
        *seen.entry(p).or_insert(0) += 1;
        nb += 1;
    }
    let mut plain = 0;
    while next_within(&mut all, 300).await.is_some() {
        plain += 1;
    }
    assert_eq!(seen.len(), N, "every message reached the group");
    assert!(
        seen.values().all(|&c| c == 1),
        "no message reached two members"
    );
    assert!(na > 0 && nb > 0, "both members got work: {na} / {nb}");
    assert_eq!(plain, N, "a plain subscriber gets everything");
}

async fn messages_arrive_in_publish_order(h: &Harness) {
    let bus = h.bus().await;
    let mut sub = subscribe_elsewhere(h, "ordered", None).await;
    for i in 0u32..2000 {
        bus.publish(Outgoing::new(
            subj("ordered"),
            Bytes::from(i.to_le_bytes().to_vec()),
        ))
        .await
        .unwrap();
    }
    bus.flush().await.unwrap();
    for i in 0u32..2000 {
        let p = next_within(&mut sub, 2000).await.expect("message");
        assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), i);
    }
}

async fn request_streams_every_reply(h: &Harness) {
    let responder = h.bus().await;
    let mut sub = responder.subscribe(pat("svc.multi"), None).await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        let m = sub.next().await.unwrap();
        let reply = m.reply.unwrap();
        for i in 0..3u8 {
            responder
                .publish(Outgoing::new(reply.clone(), Bytes::from(vec![i])))
                .await
                .unwrap();
        }
        // A NATS client dropped right after publishing may lose what it has not flushed.
        responder.flush().await.unwrap();
    });
    let caller = h.bus().await;
    let mut replies = caller
        .request(
            subj("svc.multi"),
            Headers::new(),
            Bytes::from_static(b"?"),
            SECOND,
        )
        .await
        .unwrap();
    for i in 0..3u8 {
        let m = tokio::time::timeout(Duration::from_secs(2), replies.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&m.payload[..], &[i]);
    }
}

async fn request_without_responders_is_a_typed_error(h: &Harness) {
    let bus = h.bus().await;
    // Someone listens but never answers: a timeout, not a hang.
    let _mute = subscribe_elsewhere(h, "mute.svc", None).await;
    let err = bus
        .request(
            subj("mute.svc"),
            Headers::new(),
            Bytes::new(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Timeout { .. }), "{err:?}");
    let err = bus
        .request(subj("nobody.here"), Headers::new(), Bytes::new(), SECOND)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders { .. }), "{err:?}");
}

async fn oversize_payload_is_refused_before_sending(h: &Harness) {
    let bus = h.bus().await;
    let max = bus.max_payload();
    assert_eq!(
        max,
        1024 * 1024,
        "both transports default to nats-server's 1 MiB"
    );
    let mut sub = subscribe_elsewhere(h, "big", None).await;
    let err = bus
        .publish(Outgoing::new(subj("big"), Bytes::from(vec![0u8; max + 1])))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::PayloadTooLarge { size, max: m } if size == max + 1 && m == max)
    );
    bus.publish(Outgoing::new(subj("big"), Bytes::from(vec![7u8; max])))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let got = next_within(&mut sub, 2000)
        .await
        .expect("the largest allowed message arrives");
    assert_eq!(got.len(), max);
}

async fn dropping_a_subscription_unsubscribes(h: &Harness) {
    let bus = h.bus().await;
    let sub = bus.subscribe(pat("gone.soon"), None).await.unwrap();
    bus.flush().await.unwrap();
    drop(sub);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = h
        .bus()
        .await
        .request(subj("gone.soon"), Headers::new(), Bytes::new(), SECOND)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders { .. }), "{err:?}");
}

fn echo(text: &str, times: u32, delay_ms: u64) -> TestReq {
    TestReq::Echo {
        text: text.into(),
        times,
        delay_ms,
    }
}

async fn streaming_call_through_queue_group_and_instance_subject(h: &Harness) {
    let comp = ComponentId::new("test", "echo").unwrap();
    let ep_name = EndpointName::new("generate").unwrap();
    let (rt1, rt2, caller) = (h.runtime().await, h.runtime().await, h.runtime().await);
    let (a1, _o1) = spawn_actor().await;
    let (a2, _o2) = spawn_actor().await;
    let i1 = rt1
        .component(comp.clone(), serde_json::json!({}))
        .await
        .unwrap();
    let i2 = rt2
        .component(comp.clone(), serde_json::json!({}))
        .await
        .unwrap();
    let _s1 = i1
        .serve::<TestReq, TestResp, _>(ep_name.clone(), a1, serde_json::json!({}))
        .await
        .unwrap();
    let _s2 = i2
        .serve::<TestReq, TestResp, _>(ep_name.clone(), a2, serde_json::json!({}))
        .await
        .unwrap();
    let ep = comp.endpoint("generate").unwrap();

    let items: Vec<TestResp> = call_all(&caller, Target::Any(ep.clone()), &echo("hi", 5, 0))
        .await
        .unwrap();
    assert_eq!(items.len(), 5);
    assert!(items
        .iter()
        .enumerate()
        .all(|(i, r)| r.index == i as u32 && r.text == "hi"));

    let mut responders = std::collections::HashSet::new();
    for _ in 0..20 {
        let mut s = caller
            .client()
            .call::<_, TestResp>(
                Target::Any(ep.clone()),
                &echo("x", 1, 0),
                CallOptions::default(),
            )
            .await
            .unwrap();
        assert!(s.next().await.unwrap().is_ok());
        responders.insert(s.responder().unwrap());
        assert!(s.next().await.is_none());
    }
    assert_eq!(
        responders.len(),
        2,
        "the queue group spreads calls over both instances"
    );

    for inst in [i1.id(), i2.id()] {
        let mut s = caller
            .client()
            .call::<_, TestResp>(
                Target::Instance(ep.clone(), inst),
                &echo("direct", 2, 0),
                CallOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().text, "direct");
        assert_eq!(
            s.responder(),
            Some(inst),
            "the instance subject reaches that instance only"
        );
    }
}

/// Serves the test actor on `test.echo.generate` in a fresh runtime; returns what callers need.
async fn serve_one(
    h: &Harness,
) -> (
    dynamo_runtime::Runtime,
    dynamo_runtime::ServedEndpoint,
    tokio::sync::mpsc::UnboundedReceiver<Observed>,
    dynamo_runtime::EndpointId,
) {
    let rt = h.runtime().await;
    let (served, observed) = common::serve_test_actor(&rt, "echo").await;
    let ep = served.endpoint().clone();
    (rt, served, observed, ep)
}

async fn request_and_trace_ids_reach_the_handler(h: &Harness) {
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let id = dynamo_runtime::rpc::RequestId::new();
    let opts = CallOptions {
        request_id: Some(id),
        trace_id: Some("trace-abc".into()),
        ..Default::default()
    };
    let items: Vec<TestResp> = caller
        .client()
        .call(Target::Any(ep.clone()), &TestReq::Whoami, opts)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(items[0].text, format!("trace-abc/{id}"));
    // Without a trace id, the request id stands in for it.
    let items = call_all(&caller, Target::Any(ep), &TestReq::Whoami)
        .await
        .unwrap();
    let (trace, id) = items[0].text.split_once('/').unwrap();
    assert_eq!(trace, id);
}

async fn remote_errors_are_typed(h: &Harness) {
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let err = call_all(
        &caller,
        Target::Any(ep),
        &TestReq::Fail {
            message: "boom".into(),
        },
    )
    .await
    .unwrap_err();
    match err {
        RpcError::Remote(e) => {
            assert_eq!(e.kind, RemoteErrorKind::Internal);
            assert_eq!(e.message, "boom");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
}

async fn bad_input_gets_typed_errors_and_serving_continues(h: &Harness) {
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    // A request of a type the endpoint does not take.
    let err = call_all(
        &caller,
        Target::Any(ep.clone()),
        &OtherReq {
            unexpected: vec![1, 2],
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote(e) if e.kind == RemoteErrorKind::BadRequest),
        "{err:?}"
    );
    // Garbage where an envelope should be, with a reply subject: a BadRequest error frame.
    let bus = h.bus().await;
    let mut replies = bus
        .request(
            ep.subject(),
            Headers::new(),
            Bytes::from_static(b"\xc1 not msgpack"),
            SECOND,
        )
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(2), replies.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!m.payload.is_empty());
    // Garbage without a reply subject, and garbage on the control subject: ignored.
    bus.publish(Outgoing::new(ep.subject(), Bytes::from_static(b"junk")))
        .await
        .unwrap();
    bus.publish(Outgoing::new(
        ep.control_broadcast_subject(),
        Bytes::from_static(b"junk"),
    ))
    .await
    .unwrap();
    bus.flush().await.unwrap();
    // The endpoint still serves.
    let items: Vec<TestResp> = call_all(&caller, Target::Any(ep), &echo("still here", 2, 0))
        .await
        .unwrap();
    assert_eq!(items.len(), 2);
}

async fn malformed_frames_are_a_typed_error_for_the_caller(h: &Harness) {
    // A rogue responder on an endpoint subject answers with garbage.
    let rogue = h.bus().await;
    let ep = ComponentId::new("test", "rogue")
        .unwrap()
        .endpoint("generate")
        .unwrap();
    let mut sub = rogue.subscribe(ep.subject().into(), None).await.unwrap();
    rogue.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let reply = m.reply.unwrap();
            rogue
                .publish(Outgoing::new(
                    reply,
                    Bytes::from_static(b"\xc1 never valid msgpack"),
                ))
                .await
                .unwrap();
            rogue.flush().await.unwrap();
        }
    });
    let caller = h.runtime().await;
    let err = call_all(&caller, Target::Any(ep), &echo("x", 1, 0))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Protocol(_)), "{err:?}");
}

async fn caller_cancellation_reaches_the_handler(h: &Harness) {
    let (_rt, _served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let mut s = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep),
            &echo("slow", 1000, 20),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    let dropped = Instant::now();
    drop(s);
    assert_eq!(observe(&mut observed, 5).await, Observed::Cancelled);
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "cancelled promptly: {:?}",
        dropped.elapsed()
    );
}

async fn cancel_before_first_frame_reaches_the_handler(h: &Harness) {
    let (_rt, _served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let s = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep), &TestReq::Hang, CallOptions::default())
        .await
        .unwrap();
    // Give the request time to reach the handler, then drop before any frame arrived.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let dropped = Instant::now();
    drop(s);
    assert_eq!(observe(&mut observed, 5).await, Observed::Cancelled);
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "cancelled promptly: {:?}",
        dropped.elapsed()
    );
}

async fn deadline_exceeded_is_typed_and_cancels_the_handler(h: &Harness) {
    let (_rt, _served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let started = Instant::now();
    let opts = CallOptions {
        timeout: Some(Duration::from_millis(700)),
        ..Default::default()
    };
    let err = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep), &TestReq::Hang, opts)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::DeadlineExceeded { .. }),
        "heartbeats kept it alive until the deadline: {err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(observe(&mut observed, 5).await, Observed::Cancelled);
}

async fn dead_responder_is_detected_within_heartbeat_timeout(h: &Harness) {
    let (_rt, served, _observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let mut s = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep),
            &echo("then silence", 1000, 50),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    // The responder vanishes mid-stream: no end frame, no heartbeats.
    drop(served);
    let died = Instant::now();
    let err = loop {
        match s
            .next()
            .await
            .expect("the stream ends with an error, not silently")
        {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, RpcError::Disconnected { .. }), "{err:?}");
    let timeout = common::settings().rpc.heartbeat_timeout;
    assert!(
        died.elapsed() < timeout + Duration::from_millis(500),
        "detected in {:?}",
        died.elapsed()
    );
}

async fn handler_dropping_its_stream_is_reported(h: &Harness) {
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let mut s = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep), &TestReq::Drop, CallOptions::default())
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().text, "partial");
    let err = s.next().await.unwrap().unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote(e) if e.kind == RemoteErrorKind::Internal),
        "{err:?}"
    );
}

async fn slow_reader_slows_the_responder_without_losing_frames(h: &Harness) {
    let (_rt, _served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let window = caller.settings().rpc.stream_window as u32;
    let total = window * 8;
    let mut s = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep),
            &echo("flood", total, 0),
            CallOptions::default(),
        )
        .await
        .unwrap();
    // Read nothing for a while: the responder must stop at the window, not overflow us.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut expected = 0;
    while let Some(item) = s.next().await {
        let item = item.unwrap();
        assert_eq!(item.index, expected);
        expected += 1;
        if expected % 97 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(expected, total);
    assert_eq!(observe(&mut observed, 5).await, Observed::Finished);
}

async fn oversize_request_and_response_are_typed_errors(h: &Harness) {
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let max = caller.bus().max_payload();
    let huge = echo(&"y".repeat(max), 1, 0);
    let err = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep.clone()), &huge, CallOptions::default())
        .await
        .err()
        .expect("refused before sending");
    assert!(matches!(err, RpcError::PayloadTooLarge { .. }), "{err:?}");
    let err = call_all(
        &caller,
        Target::Any(ep.clone()),
        &TestReq::Big { size: max + 10 },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote(e) if e.kind == RemoteErrorKind::ResponseTooLarge),
        "{err:?}"
    );
    // Just under the limit works.
    let items: Vec<TestResp> =
        call_all(&caller, Target::Any(ep), &TestReq::Big { size: max - 1024 })
            .await
            .unwrap();
    assert_eq!(items[0].text.len(), max - 1024);
}

async fn overload_is_refused_with_a_typed_error(h: &Harness) {
    let mut settings = common::settings();
    settings.rpc.max_inflight = 2;
    let rt = h.runtime_with(settings).await;
    let (served, _obs) = common::serve_test_actor(&rt, "small").await;
    let ep = served.endpoint().clone();
    let caller = h.runtime().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = caller
            .client()
            .call::<_, TestResp>(
                Target::Any(ep.clone()),
                &echo("busy", 100, 50),
                CallOptions::default(),
            )
            .await
            .unwrap();
        assert!(s.next().await.unwrap().is_ok());
        open.push(s);
    }
    let err = call_all(&caller, Target::Any(ep), &echo("one more", 1, 0))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote(e) if e.kind == RemoteErrorKind::Overloaded),
        "{err:?}"
    );
}

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

async fn discovery_watch_sees_joins_and_leaves(h: &Harness) {
    let watcher = h.runtime().await;
    let mut watch = watcher
        .discovery()
        .watch(DiscoveryFilter::all())
        .await
        .unwrap();
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
            instance
        }
    );
    assert!(watcher
        .discovery()
        .list(&ep.discovery_filter())
        .await
        .unwrap()
        .is_empty());
    drop(rt);
}

/// NATS-only behaviour: a server restart does not drop registrations or subscriptions.
mod nats_only {
    use super::*;
    use common::TestReq;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_and_endpoints_survive_a_server_restart() {
        survives_restart(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_come_back_after_a_restart_that_lost_the_store() {
        survives_restart(true).await;
    }

    async fn survives_restart(empty_store: bool) {
        let mut h = Harness::nats().await;
        let rt = h.runtime().await;
        let (served, _obs) = common::serve_test_actor(&rt, "echo").await;
        let ep = served.endpoint().clone();
        let caller = h.runtime().await;
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
        h.finish().await;
    }
}
