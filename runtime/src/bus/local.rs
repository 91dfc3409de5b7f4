//! The in-process bus: the embedded default, no server.
//!
//! Subscriptions live in one table behind a `std::sync::RwLock` (never held across an `.await`):
//! exact subjects in a hash map, wildcard patterns in a list scanned per publish. Publishing
//! takes the read lock and `try_send`s into each matching subscriber's bounded channel, so
//! a publisher never waits on a subscriber; a full channel drops the message for that subscriber
//! only (a slow consumer, as NATS does) and counts it in `dynamo_bus_dropped_messages_total`.
//! Queue groups: among matching members of one group, one is picked round-robin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    check_size, Bus, BusError, HandlerSubscription, Headers, Message, MessageHandler, Outgoing,
    Status, Subscription, Transport,
};
use crate::subject::{pattern_matches, QueueGroup, SubjectPattern};

/// The default message size limit, the same as nats-server's default `max_payload` (1 MiB),
/// so a message that fits locally also fits on NATS.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// In-process bus. Cheap to clone; clones share the same subscriptions.
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
}

struct Inner {
    table: RwLock<Table>,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    max_payload: usize,
    capacity: usize,
}

#[derive(Default)]
struct Table {
    exact: HashMap<String, Vec<Entry>>,
    wildcard: Vec<Entry>,
}

struct Entry {
    id: u64,
    pattern: String,
    /// A wildcard pattern's tokens before its first wildcard, with their dot: a subject
    /// that does not start with them is passed over without matching token by token.
    literal: String,
    queue: Option<String>,
    sink: Sink,
}

enum Sink {
    Channel(mpsc::Sender<Message>),
    Handler(MessageHandler),
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus")
            .field("max_payload", &self.inner.max_payload)
            .finish()
    }
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBus {
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_PAYLOAD, super::SUBSCRIPTION_CAPACITY)
    }

    /// A bus with a given message size limit and per-subscription buffer.
    pub fn with_limits(max_payload: usize, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                table: RwLock::new(Table::default()),
                next_id: AtomicU64::new(1),
                round_robin: AtomicUsize::new(0),
                max_payload,
                capacity: capacity.max(1),
            }),
        }
    }

    fn deliver(&self, msg: Message) {
        let table = self.inner.table.read().unwrap_or_else(|p| p.into_inner());
        let exact = table.exact.get(msg.subject.as_str());
        let matching = exact
            .into_iter()
            .flatten()
            .chain(table.wildcard.iter().filter(|e| {
                msg.subject.as_str().starts_with(&e.literal)
                    && pattern_matches(&e.pattern, msg.subject.as_str())
            }));
        let mut groups: Vec<(&str, Vec<&Entry>)> = Vec::new();
        let mut delivered_any = false;
        for entry in matching {
            match &entry.queue {
                None => {
                    delivered_any = true;
                    send(entry, msg.clone());
                }
                Some(q) => match groups.iter_mut().find(|(name, _)| name == q) {
                    Some((_, members)) => members.push(entry),
                    None => groups.push((q.as_str(), vec![entry])),
                },
            }
        }
        for (_, members) in &groups {
            let pick = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % members.len();
            delivered_any = true;
            send(members[pick], msg.clone());
        }
        drop(table);
        if !delivered_any {
            if let Some(reply) = msg.reply {
                self.deliver(Message {
                    subject: reply,
                    reply: None,
                    headers: Headers::new(),
                    payload: Bytes::new(),
                    status: Some(Status::NoResponders),
                });
            }
        }
    }

    fn insert(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
        sink: Sink,
    ) -> Unsubscribe {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let wildcard = pattern.has_wildcards();
        let literal = pattern
            .as_str()
            .split('.')
            .take_while(|t| *t != "*" && *t != ">")
            .map(|t| format!("{t}."))
            .collect();
        let entry = Entry {
            id,
            pattern: pattern.as_str().to_string(),
            literal,
            queue: queue.map(|q| q.as_str().to_string()),
            sink,
        };
        let mut table = self.inner.table.write().unwrap_or_else(|p| p.into_inner());
        if wildcard {
            table.wildcard.push(entry);
        } else {
            table
                .exact
                .entry(pattern.as_str().to_string())
                .or_default()
                .push(entry);
        }
        Unsubscribe {
            bus: self.clone(),
            id,
            pattern: pattern.as_str().to_string(),
            wildcard,
        }
    }

    fn remove(&self, id: u64, pattern: &str, wildcard: bool) {
        let mut table = self.inner.table.write().unwrap_or_else(|p| p.into_inner());
        if wildcard {
            table.wildcard.retain(|e| e.id != id);
        } else if let Some(list) = table.exact.get_mut(pattern) {
            list.retain(|e| e.id != id);
            if list.is_empty() {
                table.exact.remove(pattern);
            }
        }
    }
}

fn send(entry: &Entry, msg: Message) {
    let tx = match &entry.sink {
        Sink::Channel(tx) => tx,
        Sink::Handler(handler) => return handler(msg),
    };
    match tx.try_send(msg) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics::counter!("dynamo_bus_dropped_messages_total", "transport" => "local")
                .increment(1);
        }
        // The subscription is being dropped; its guard removes the entry.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Removes a subscription's table entry when the subscription is dropped.
struct Unsubscribe {
    bus: LocalBus,
    id: u64,
    pattern: String,
    wildcard: bool,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.bus.remove(self.id, &self.pattern, self.wildcard);
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn transport(&self) -> Transport {
        Transport::Local
    }

    fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        check_size(&msg, self.inner.max_payload)?;
        self.deliver(Message {
            subject: msg.subject,
            reply: msg.reply,
            headers: msg.headers,
            payload: msg.payload,
            status: None,
        });
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
    ) -> Result<Subscription, BusError> {
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        let guard = self.insert(pattern, queue, Sink::Channel(tx));
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|m| (m, (rx, guard)))
        });
        Ok(Subscription::new(stream))
    }

    async fn subscribe_handler(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
        handler: MessageHandler,
    ) -> Result<HandlerSubscription, BusError> {
        let guard = self.insert(pattern, queue, Sink::Handler(handler));
        Ok(HandlerSubscription::new(guard))
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::Subject;

    #[tokio::test]
    async fn slow_consumer_loses_messages_but_publisher_never_blocks() {
        let bus = LocalBus::with_limits(DEFAULT_MAX_PAYLOAD, 4);
        let s = Subject::parse("a.b").unwrap();
        let mut sub = bus.subscribe(SubjectPattern::from(&s), None).await.unwrap();
        for i in 0..10u8 {
            bus.publish(Outgoing::new(s.clone(), Bytes::from(vec![i])))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), sub.next()).await
        {
            got.push(m.payload[0]);
        }
        assert_eq!(got, vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn dropped_subscription_leaves_the_table() {
        let bus = LocalBus::new();
        let s = Subject::parse("a.b").unwrap();
        let sub = bus
            .subscribe(SubjectPattern::parse("a.*").unwrap(), None)
            .await
            .unwrap();
        drop(sub);
        assert!(bus.inner.table.read().unwrap().wildcard.is_empty());
        let sub = bus.subscribe(SubjectPattern::from(&s), None).await.unwrap();
        drop(sub);
        assert!(bus.inner.table.read().unwrap().exact.is_empty());
    }
}
