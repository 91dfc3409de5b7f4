//! Streaming request/response through hosted actors: errors, cancellation, deadlines,
//! heartbeats, flow control.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dynamo_runtime::bus::{Headers, Outgoing};
use dynamo_runtime::rpc::{RemoteErrorKind, RpcError};
use dynamo_runtime::subject::{ComponentId, EndpointName};
use dynamo_runtime::{CallOptions, Target};

use super::common::{observe, OtherReq};
use super::{
    call_all, echo, next_within, pat, serve_one, spawn_actor, Harness, Observed, TestReq, TestResp,
    SECOND,
};
use crate::transport_suite;

transport_suite!(
    streaming_call_through_queue_group_and_instance_subject,
    request_and_trace_ids_reach_the_handler,
    remote_errors_are_typed,
    a_unary_answer_is_one_message,
    bad_input_gets_typed_errors_and_serving_continues,
    junk_on_a_reply_inbox_is_dropped_and_the_answer_arrives,
    caller_cancellation_reaches_the_handler,
    cancel_before_first_frame_reaches_the_handler,
    deadline_exceeded_is_typed_and_cancels_the_handler,
    dead_responder_is_detected_within_heartbeat_timeout,
    a_probe_finds_a_vanished_responder_before_any_heartbeat_timeout,
    a_gone_notice_ends_the_calls_to_that_instance,
    handler_dropping_its_stream_is_reported,
    slow_reader_slows_the_responder_without_losing_frames,
    oversize_request_and_response_are_typed_errors,
    overload_is_refused_with_a_typed_error,
);

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
    let s1 = i1
        .serve::<TestReq, TestResp, _>(ep_name.clone(), a1, serde_json::json!({}))
        .await
        .unwrap();
    let s2 = i2
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
    wait_until_idle(&s1).await;
    wait_until_idle(&s2).await;
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

async fn a_unary_answer_is_one_message(h: &Harness) {
    let (_rt, served, _obs, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    // Watch every RPC reply on the bus (`_INBOX.{client}.{call}`).
    let tap_bus = h.bus().await;
    let mut tap = tap_bus.subscribe(pat("_INBOX.*.*"), None).await.unwrap();
    tap_bus.flush().await.unwrap();
    let unary = TestReq::Unary { text: "one".into() };
    let items = call_all(&caller, Target::Any(ep.clone()), &unary)
        .await
        .unwrap();
    assert_eq!(
        items,
        vec![TestResp {
            index: 0,
            text: "one".into()
        }]
    );
    assert_eq!(
        count_within(&mut tap, 300).await,
        1,
        "data and end in one frame"
    );
    let items = call_all(&caller, Target::Any(ep), &echo("one", 1, 0))
        .await
        .unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        count_within(&mut tap, 300).await,
        2,
        "a data frame, then an end frame"
    );
    wait_until_idle(&served).await;
}

/// Counts the messages `sub` receives until it has been quiet for `ms`.
async fn count_within(sub: &mut dynamo_runtime::bus::Subscription, ms: u64) -> usize {
    let mut n = 0;
    while next_within(sub, ms).await.is_some() {
        n += 1;
    }
    n
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

async fn junk_on_a_reply_inbox_is_dropped_and_the_answer_arrives(h: &Harness) {
    // Anyone on the bus can publish to a call's inbox: a listener on the endpoint's subject
    // sees each request's reply subject and sends junk there while the real answer streams.
    let (_rt, _served, _obs, ep) = serve_one(h).await;
    let rogue = h.bus().await;
    let mut sub = rogue.subscribe(ep.subject().into(), None).await.unwrap();
    rogue.flush().await.unwrap();
    let junk = tokio::spawn(async move {
        let reply = sub.next().await.unwrap().reply.unwrap();
        for junk in [&b"\xc1 never valid msgpack"[..], b"", b"\x93\x01\x02"] {
            rogue
                .publish(Outgoing::new(reply.clone(), Bytes::from_static(junk)))
                .await
                .unwrap();
        }
        rogue.flush().await.unwrap();
    });
    let caller = h.runtime().await;
    let items = call_all(&caller, Target::Any(ep), &echo("x", 3, 30))
        .await
        .unwrap();
    assert_eq!(items.len(), 3, "the whole answer: {items:?}");
    junk.await.unwrap();
}

async fn caller_cancellation_reaches_the_handler(h: &Harness) {
    let (_rt, served, mut observed, ep) = serve_one(h).await;
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
    drop_and_expect_prompt_cancel(s, &mut observed).await;
    wait_until_idle(&served).await;
}

/// Waits (up to 2 s) until `served` has no open request left: nothing leaks per request.
async fn wait_until_idle(served: &dynamo_runtime::ServedEndpoint) {
    let until = Instant::now() + Duration::from_secs(2);
    while served.open_requests() > 0 {
        assert!(
            Instant::now() < until,
            "{} requests still open",
            served.open_requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Drops `stream` and asserts that its handler saw the cancellation within a second.
async fn drop_and_expect_prompt_cancel(
    stream: dynamo_runtime::rpc::ResponseStream<TestResp>,
    observed: &mut tokio::sync::mpsc::UnboundedReceiver<Observed>,
) {
    let dropped = Instant::now();
    drop(stream);
    assert_eq!(observe(observed, 5).await, Observed::Cancelled);
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "cancelled promptly: {:?}",
        dropped.elapsed()
    );
}

async fn cancel_before_first_frame_reaches_the_handler(h: &Harness) {
    let (_rt, served, mut observed, ep) = serve_one(h).await;
    let caller = h.runtime().await;
    let s = caller
        .client()
        .call::<_, TestResp>(Target::Any(ep), &TestReq::Hang, CallOptions::default())
        .await
        .unwrap();
    // Give the request time to reach the handler, then drop before any frame arrived.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop_and_expect_prompt_cancel(s, &mut observed).await;
    wait_until_idle(&served).await;
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
    let timeout = crate::common::settings().rpc.heartbeat_timeout;
    assert!(
        died.elapsed() < timeout + Duration::from_millis(500),
        "detected in {:?}",
        died.elapsed()
    );
}

/// A caller whose heartbeat timeout (a minute) is past the tests' own limits: only a probe or
/// a gone notice can end its calls in time.
async fn patient_caller(h: &Harness, probes: bool) -> dynamo_runtime::Runtime {
    let mut settings = crate::common::settings();
    settings.rpc.heartbeat_interval = Duration::from_secs(20);
    settings.rpc.heartbeat_timeout = Duration::from_secs(60);
    if !probes {
        settings.rpc.probe_after = Duration::ZERO;
    }
    h.runtime_with(settings).await
}

/// Reads `s` to its error, which must be `Disconnected` and come within 20 s (`why`: what
/// ends it, well before the heartbeat timeout).
async fn ends_disconnected(s: &mut dynamo_runtime::rpc::ResponseStream<TestResp>, why: &str) {
    let err = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.next().await.expect("the stream ends with an error") {
                Ok(_) => continue,
                Err(e) => break e,
            }
        }
    })
    .await
    .expect(why);
    assert!(matches!(err, RpcError::Disconnected { .. }), "{err:?}");
}

/// The caller waits in silence far longer than its stream's pace: it asks the responder,
/// whose subscriptions are gone with it, and the bus's "no responders" ends the call as
/// `Disconnected`. The caller's heartbeat timeout is a minute, past the test's own limit, so
/// only the probe can end it; a live responder answers the probes and its stream goes on.
async fn a_probe_finds_a_vanished_responder_before_any_heartbeat_timeout(h: &Harness) {
    let (_rt, served, _observed, ep) = serve_one(h).await;
    let caller = patient_caller(h, true).await;
    // Alive but slower than the probes: the probes get heartbeats back, nothing ends.
    let slow = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep.clone()),
            &echo("slow", 3, 400),
            CallOptions::default(),
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(slow.len(), 3);
    let mut s = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep),
            &echo("then gone", 1000, 20),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    drop(served);
    ends_disconnected(
        &mut s,
        "a probe, not the one-minute heartbeat timeout, ends the call",
    )
    .await;
}

/// A supervisor that saw an instance's process die says so on `dyn.gone.{instance}`: a call
/// streaming from it ends `Disconnected` at once, with no probe (probes off here) and no
/// heartbeat timeout (a minute, past the test's limit). A notice for another instance
/// changes nothing.
async fn a_gone_notice_ends_the_calls_to_that_instance(h: &Harness) {
    let (_rt, _served, _observed, ep) = serve_one(h).await;
    let caller = patient_caller(h, false).await;
    let mut s = caller
        .client()
        .call::<_, TestResp>(
            Target::Any(ep),
            &echo("answering", 1000, 20),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    let responder = s.responder().unwrap();
    let notice = h.bus().await;
    let gone = |i| Outgoing::new(dynamo_runtime::subject::gone_subject(i), Bytes::new());
    notice
        .publish(gone(dynamo_runtime::InstanceId::new(
            responder.as_u64() ^ 1,
        )))
        .await
        .unwrap();
    notice.flush().await.unwrap();
    for _ in 0..3 {
        assert!(s.next().await.unwrap().is_ok(), "another instance's notice");
    }
    notice.publish(gone(responder)).await.unwrap();
    notice.flush().await.unwrap();
    ends_disconnected(
        &mut s,
        "the notice, not the one-minute heartbeat timeout, ends the call",
    )
    .await;
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
    let mut settings = crate::common::settings();
    settings.rpc.max_inflight = 2;
    let rt = h.runtime_with(settings).await;
    let (served, _obs) = crate::common::serve_test_actor(&rt, "small").await;
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
