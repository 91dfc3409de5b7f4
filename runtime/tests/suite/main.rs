//! The transport suite: every test runs once over the in-process bus (`*::local::*`) and once
//! over a real nats-server (`*::nats::*`), with the same assertions.
//! - `bus`: the `Bus` trait itself;
//! - `rpc`: streaming request/response through hosted actors;
//! - `hosting`: discovery, the service protocol, shutdown, and NATS-only restarts.

#[path = "../common/mod.rs"]
mod common;

mod bus;
mod hosting;
mod rpc;

use std::time::Duration;

use bytes::Bytes;
use common::{spawn_actor, Harness, Observed, TestReq, TestResp};
use dynamo_runtime::rpc::RpcError;
use dynamo_runtime::subject::{Subject, SubjectPattern};
use dynamo_runtime::{CallOptions, Target};

pub(crate) const SECOND: Duration = Duration::from_secs(1);

/// Makes a call and reads it to the end.
pub(crate) async fn call_all(
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
pub(crate) async fn subscribe_elsewhere(
    h: &Harness,
    pattern: &str,
    queue: Option<dynamo_runtime::subject::QueueGroup>,
) -> dynamo_runtime::bus::Subscription {
    let bus = h.bus().await;
    let sub = bus.subscribe(pat(pattern), queue).await.unwrap();
    bus.flush().await.unwrap();
    sub
}

pub(crate) fn subj(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

pub(crate) fn pat(s: &str) -> SubjectPattern {
    SubjectPattern::parse(s).unwrap()
}

pub(crate) async fn next_within(
    sub: &mut dynamo_runtime::bus::Subscription,
    ms: u64,
) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_millis(ms), sub.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.payload)
}

pub(crate) fn echo(text: &str, times: u32, delay_ms: u64) -> TestReq {
    TestReq::Echo {
        text: text.into(),
        times,
        delay_ms,
    }
}

/// Serves the test actor on `test.echo.generate` in a fresh runtime; returns what callers need.
pub(crate) async fn serve_one(
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
