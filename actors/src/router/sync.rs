//! Shared routing decisions: every router publishes the life of each request it routed
//! (routed → first token → finished) on `dyn.ev.{ns}.router.router_decisions.{publisher}`, and
//! applies what the others publish to its own load accounting, so that router replicas (two
//! frontends, or router components) agree on the load each worker carries between its reports.
//! A frontend whose router is a remote component publishes the first token and the end of its
//! requests there too.
//!
//! Publishing never blocks a routing decision: events go through an unbounded channel to one
//! publishing task per router. Bus ordering holds per publisher only, so a request's end can
//! reach a replica before the decision it ends; [`super::KvRouter::apply_decision`] keeps such
//! early ends for a while and drops the decision when it arrives.

use dynamo_protocols::router::{RouterEvent, DECISIONS_TOPIC, ROUTER_COMPONENT};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::serve::{decode_event, encode_event};
use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
use dynamo_runtime::{InstanceId, Runtime};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{DecisionSink, KvRouter};
use std::sync::Arc;

fn component(namespace: &Namespace) -> ComponentId {
    ComponentId::new(namespace.as_str(), ROUTER_COMPONENT).expect("valid component name")
}

fn topic() -> Topic {
    Topic::new(DECISIONS_TOPIC).expect("valid topic")
}

/// The task publishing one router's decision events.
pub struct Publisher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How long closing a publisher may take to send what is queued.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

impl Publisher {
    /// Publishes what is queued (the last requests' ends, so replicas release their load),
    /// then stops; never longer than 2 s.
    pub async fn close(self) {
        self.stop.cancel();
        if tokio::time::timeout(CLOSE_WITHIN, self.task).await.is_err() {
            tracing::warn!("routing decisions still queued at shutdown were dropped");
        }
    }
}

/// Starts the task publishing decision events as `publisher`.
pub fn spawn_publisher(
    runtime: &Runtime,
    namespace: &Namespace,
    publisher: u64,
) -> (DecisionSink, Publisher) {
    let (sink, mut rx) = DecisionSink::channel();
    let subject = component(namespace).event_subject(&topic(), InstanceId::new(publisher));
    let bus = runtime.bus().clone();
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    let task = tokio::spawn(async move {
        let mut warned = false;
        loop {
            let event = tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                _ = stopping.cancelled() => match rx.try_recv() {
                    Ok(e) => e,
                    Err(_) => return,
                },
            };
            let sent = match encode_event(&event) {
                Ok(payload) => bus
                    .publish(Outgoing::new(subject.clone(), payload))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                metrics::counter!("dynamo_router_decision_publish_errors_total").increment(1);
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "cannot publish a routing decision; replicas' load accounting drifts until reports correct it");
                }
            }
        }
    });
    (sink, Publisher { stop, task })
}

/// Subscribes `router` to every other publisher's decision events.
pub async fn spawn_subscriber(
    runtime: &Runtime,
    namespace: &Namespace,
    router: Arc<KvRouter>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let pattern = component(namespace).event_pattern(&topic());
    let mut sub = runtime
        .bus()
        .subscribe(pattern, None)
        .await
        .map_err(|e| format!("cannot subscribe to routing decisions: {e}"))?;
    let me = InstanceId::new(router.id()).to_string();
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if m.subject.last_token() == me {
                continue;
            }
            match decode_event::<RouterEvent>(&m.payload) {
                Ok(event) => router.apply_decision(event),
                Err(e) => {
                    metrics::counter!("dynamo_router_bad_events_total", "reason" => "malformed_decision")
                        .increment(1);
                    dynamo_runtime::telemetry::malformed(
                        "decision",
                        &format_args!("routing decision on {}: {e}", m.subject),
                    );
                }
            }
        }
    }))
}
