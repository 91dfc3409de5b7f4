//! A worker's KV events from an external engine's ZeroMQ stream (the publisher vLLM and SGLang
//! start with their KV-events setting): messages `[topic, sequence (8 bytes, big-endian),
//! MessagePack batch]`, translated by [`Translator`] into our events, which the worker fronting
//! that engine publishes as its own.
//!
//! A gap in the sequence (messages lost: ZeroMQ's PUB drops what a slow subscriber cannot take)
//! or a sequence that starts over (the engine restarted) clears what the router indexed for this
//! engine (`Cleared` on every tier) and starts again from the next events: the index misses the
//! blocks stored before until the engine stores them again, and never holds one the engine
//! dropped. No dump is asked of the engine (it has none), so nothing can loop on resyncs: a
//! router that resyncs gets the translator's own view of the engine's cache
//! ([`Translator::dump`]), consistent with the events published so far.
//! Messages that do not parse are counted (`dynamo_worker_external_kv_total{outcome}`) and
//! skipped.

use dynamo_kv::external::Translator;
use dynamo_protocols::kv::{KvDump, KvEvent};
use tokio::sync::{broadcast, mpsc, oneshot};
use zeromq::{Socket, SocketRecv};

use crate::EngineError;

/// Publishes our events from the engine's stream on `events`, in order, and answers `dumps`
/// with the translator's view, until the returned task is aborted. `block_size` is the
/// engine's (the model card's).
pub async fn subscribe(
    endpoint: &str,
    topic: &str,
    block_size: usize,
    events: broadcast::Sender<Vec<KvEvent>>,
    mut dumps: mpsc::Receiver<oneshot::Sender<KvDump>>,
) -> Result<tokio::task::JoinHandle<()>, EngineError> {
    let mut socket = zeromq::SubSocket::new();
    socket.connect(endpoint).await.map_err(|e| {
        EngineError::Internal(format!(
            "cannot connect to the engine's KV events at {endpoint}: {e}; is its KV-events publisher on?"
        ))
    })?;
    socket
        .subscribe(topic)
        .await
        .map_err(|e| EngineError::Internal(format!("cannot subscribe to {endpoint}: {e}")))?;
    let endpoint = endpoint.to_string();
    let published = events;
    let task = tokio::spawn(async move {
        let mut translator = Translator::new(block_size);
        let mut last: Option<u64> = None;
        let count = |outcome: &'static str| metrics::counter!("dynamo_worker_external_kv_total", "outcome" => outcome);
        loop {
            let received = tokio::select! {
                m = socket.recv() => m,
                Some(reply) = dumps.recv() => {
                    let _ = reply.send(translator.dump());
                    continue;
                }
            };
            let message = match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(endpoint, error = %e, "the engine's KV event stream ended");
                    return;
                }
            };
            let frames = message.into_vec();
            let (seq, payload) = match frames.as_slice() {
                [_topic, seq, payload] if seq.len() == 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(seq);
                    (u64::from_be_bytes(b), payload.clone())
                }
                _ => {
                    count("malformed").increment(1);
                    continue;
                }
            };
            let mut events = Vec::new();
            if last.is_some_and(|l| seq != l.wrapping_add(1)) {
                let outcome = if last.is_some_and(|l| seq <= l) {
                    "restart"
                } else {
                    "gap"
                };
                count(outcome).increment(1);
                tracing::warn!(endpoint, seq, last = ?last, "{outcome} in the engine's KV events: its indexed blocks are dropped and rebuilt from what follows");
                events.extend(translator.clear_all());
            }
            last = Some(seq);
            match translator.translate(&payload) {
                Ok(t) => {
                    count("batch").increment(1);
                    let d = t.dropped;
                    for (reason, n) in [
                        ("unknown_event", d.unknown_events),
                        ("malformed_event", d.malformed_events),
                        ("unknown_parent", d.unknown_parent),
                        ("unsupported_block", d.unsupported),
                        ("unknown_removal", d.unknown_removals),
                    ] {
                        if n > 0 {
                            count(reason).increment(n as u64);
                        }
                    }
                    events.extend(t.events);
                }
                Err(e) => {
                    count("malformed").increment(1);
                    tracing::debug!(endpoint, error = %e, "skipped a KV event batch");
                }
            }
            // No subscriber yet (the worker publishes once it serves): nothing to keep, the
            // dump has it.
            if !events.is_empty() {
                let _ = published.send(events);
            }
        }
    });
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_protocols::kv::{KvEventData, StorageTier};
    use rmpv::Value;
    use zeromq::SocketSend;

    fn batch(events: Vec<Value>) -> Vec<u8> {
        let mut out = Vec::new();
        let v = Value::Array(vec![Value::from(0.0), Value::Array(events), Value::from(0)]);
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    fn stored(hash: u64, parent: Option<u64>, tokens: &[u64]) -> Value {
        Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![Value::from(hash)]),
            parent.map_or(Value::Nil, Value::from),
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
            Value::from(4u64),
            Value::Nil,
            Value::from("GPU"),
        ])
    }

    fn message(seq: u64, payload: Vec<u8>) -> zeromq::ZmqMessage {
        let mut m = zeromq::ZmqMessage::from("kv");
        m.push_back(seq.to_be_bytes().to_vec().into());
        m.push_back(payload.into());
        m
    }

    /// A real ZeroMQ PUB socket publishing vLLM-format batches: translated events arrive in
    /// order; a gap in the sequence clears every tier first; junk is skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_from_a_zeromq_publisher_arrive_translated_and_a_gap_clears() {
        let mut publisher = zeromq::PubSocket::new();
        let at = publisher
            .bind("tcp://127.0.0.1:0")
            .await
            .unwrap()
            .to_string();
        let (events, mut rx) = broadcast::channel(64);
        let (dumps, dump_rx) = mpsc::channel(1);
        let task = subscribe(&at, "", 4, events, dump_rx).await.unwrap();
        // A subscription takes a moment to reach the publisher: publish until one arrives.
        let mut seq = 0;
        let first = loop {
            publisher
                .send(message(seq, batch(vec![stored(1, None, &[1, 2, 3, 4])])))
                .await
                .unwrap();
            seq += 1;
            match tokio::time::timeout(std::time::Duration::from_millis(50), rx.recv()).await {
                Ok(Ok(e)) => break e,
                Ok(Err(e)) => panic!("the subscriber ended: {e}"),
                Err(_) => continue,
            }
        };
        assert!(
            matches!(first[0].data, KvEventData::Stored { .. }),
            "{first:?}"
        );
        // Junk, then a child of block 1, in sequence.
        let mut junk = zeromq::ZmqMessage::from("kv");
        junk.push_back(vec![1u8, 2].into());
        publisher.send(junk).await.unwrap();
        publisher
            .send(message(seq, batch(vec![stored(2, Some(1), &[5, 6, 7, 8])])))
            .await
            .unwrap();
        // (Joining messages published before the first arrived may still come first.)
        let mut seen = first.clone();
        let next = loop {
            let batch = rx.recv().await.unwrap();
            seen.extend(batch.iter().cloned());
            if matches!(
                &batch[0].data,
                KvEventData::Stored {
                    parent_hash: Some(_),
                    ..
                }
            ) {
                break batch;
            }
        };
        let want = dynamo_kv::block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        match &next[..] {
            [e] => match &e.data {
                KvEventData::Stored {
                    parent_hash,
                    blocks,
                } => {
                    assert_eq!(*parent_hash, Some(want[0].1));
                    assert_eq!(blocks[0].block_hash, want[1].1);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // Two messages lost: every tier cleared, then the new block (whose parent is gone).
        publisher
            .send(message(
                seq + 3,
                batch(vec![stored(3, None, &[9, 9, 9, 9])]),
            ))
            .await
            .unwrap();
        let after = rx.recv().await.unwrap();
        let tiers: Vec<StorageTier> = after
            .iter()
            .filter(|e| e.data == KvEventData::Cleared)
            .map(|e| e.tier)
            .collect();
        assert_eq!(
            tiers,
            [StorageTier::Device, StorageTier::Host, StorageTier::Disk]
        );
        assert!(matches!(after[3].data, KvEventData::Stored { .. }));
        let ids: Vec<u64> = seen.iter().chain(&after).map(|e| e.event_id).collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive ids: {ids:?}"
        );
        // A router's resync gets what the engine holds now: the block stored after the gap.
        let (reply, answer) = oneshot::channel();
        dumps.send(reply).await.unwrap();
        let dump = answer.await.unwrap();
        assert_eq!(dump.last_event_id, ids.last().copied());
        assert_eq!(dump.blocks.len(), 1);
        assert_eq!(
            dump.blocks[0].1.block_hash,
            dynamo_kv::block_hashes(&[9, 9, 9, 9], 4)[0].1
        );
        task.abort();
    }
}
