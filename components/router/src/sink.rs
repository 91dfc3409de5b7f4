//! [`DecisionSink`]: where a router's decision events go (a channel to whatever publishes
//! them; on the bus, the binding's publishing task).

use dynamo_protocols::router::RouterEvent;
use tokio::sync::mpsc;

/// Where decision events go (a channel to the publishing task); cheap to clone. Unbounded so
/// that routing never waits on publishing: three events per routed request at most.
#[derive(Clone)]
pub struct DecisionSink(mpsc::UnboundedSender<RouterEvent>);

impl DecisionSink {
    /// A sink and the receiving end of its channel (a publisher, or tests).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<RouterEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    pub fn send(&self, event: RouterEvent) {
        // The publisher ends only at shutdown; events after that have no one to tell.
        let _ = self.0.send(event);
    }
}
