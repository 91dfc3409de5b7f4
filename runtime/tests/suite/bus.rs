//! The `Bus` trait: both transports keep the same semantics.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use dynamo_runtime::bus::{BusError, Headers, Outgoing};

use super::{next_within, pat, subj, subscribe_elsewhere, Harness, SECOND};
use crate::transport_suite;

transport_suite!(
    publish_reaches_exact_and_wildcard_subscribers,
    flush_makes_subscriptions_visible_to_other_connections,
    queue_group_delivers_each_message_to_one_member,
    messages_arrive_in_publish_order,
    request_streams_every_reply,
    request_without_responders_is_a_typed_error,
    oversize_payload_is_refused_before_sending,
    dropping_a_subscription_unsubscribes,
);

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
