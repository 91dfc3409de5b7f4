//! A worker's KV events from an external engine's ZeroMQ stream (the publisher vLLM and SGLang
//! start with their KV-events setting): messages `[topic, sequence (8 bytes, big-endian),
//! MessagePack batch]`, translated by [`Translator`] into our events, which the worker fronting
//! that engine publishes as its own.
//!
//! A gap in the sequence (messages lost: ZeroMQ's PUB drops what a slow subscriber cannot take)
//! is filled from the engine's replay socket when one is configured (vLLM's `replay_endpoint`:
//! a ROUTER that resends the messages it still buffers); a gap it cannot fill, or a sequence
//! that starts over (the engine restarted), clears what the router indexed for this
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

/// A `[topic or empty, sequence (8 bytes, big-endian), payload]` message's sequence and payload.
fn sequenced(frames: &[bytes::Bytes]) -> Option<(u64, &bytes::Bytes)> {
    match frames {
        [_, seq, payload] => Some((u64::from_be_bytes(seq[..].try_into().ok()?), payload)),
        _ => None,
    }
}

/// The end-of-replay marker of vLLM's replay socket (the sequence -1).
const END_SEQ: u64 = u64::MAX;

/// How long a replay may take before the gap is handled as unrecoverable.
const REPLAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where an engine publishes its KV events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventSource {
    /// Its ZeroMQ PUB socket, e.g. `tcp://127.0.0.1:5557`.
    pub endpoint: String,
    /// The topic it publishes on ("" takes every topic).
    pub topic: String,
    /// Its replay socket (vLLM's `replay_endpoint`, a ROUTER), if configured: a gap is filled
    /// from it instead of clearing this engine's blocks in the index.
    pub replay: Option<String>,
}

/// The messages `from..until` (sequence numbers) the engine's replay socket still buffers, in
/// order: asked as `[empty, from (8 bytes, big-endian)]`, answered `[empty, sequence, payload]`
/// per message and an end marker (sequence -1).
async fn replay(endpoint: &str, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
    use zeromq::SocketSend;
    let mut socket = zeromq::DealerSocket::new();
    socket
        .connect(endpoint)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut ask = zeromq::ZmqMessage::from(Vec::<u8>::new());
    ask.push_back(from.to_be_bytes().to_vec().into());
    socket.send(ask).await.map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    loop {
        let frames = socket
            .recv()
            .await
            .map_err(|e| format!("receive: {e}"))?
            .into_vec();
        let Some((seq, payload)) = sequenced(&frames) else {
            return Err("a malformed replay message".into());
        };
        if seq == END_SEQ {
            return Ok(out);
        }
        if (from..until).contains(&seq) {
            out.push((seq, payload.to_vec()));
        }
    }
}

/// Publishes our events from the engine's stream on `events`, in order, and answers `dumps`
/// with the translator's view, until the returned task is aborted. `block_size` is the
/// engine's (the model card's).
pub async fn subscribe(
    source: &EventSource,
    block_size: usize,
    events: broadcast::Sender<Vec<KvEvent>>,
    mut dumps: mpsc::Receiver<oneshot::Sender<KvDump>>,
) -> Result<tokio::task::JoinHandle<()>, EngineError> {
    let endpoint = source.endpoint.clone();
    let mut socket = zeromq::SubSocket::new();
    socket.connect(&endpoint).await.map_err(|e| {
        EngineError::Internal(format!(
            "cannot connect to the engine's KV events at {endpoint}: {e}; is its KV-events publisher on?"
        ))
    })?;
    socket
        .subscribe(&source.topic)
        .await
        .map_err(|e| EngineError::Internal(format!("cannot subscribe to {endpoint}: {e}")))?;
    let replay_at = source.replay.clone();
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
            let Some((seq, payload)) = sequenced(&frames) else {
                count("malformed").increment(1);
                continue;
            };
            let mut batches: Vec<Vec<u8>> = Vec::new();
            let mut events = Vec::new();
            match last {
                Some(l) if seq <= l => {
                    // The engine started over: what it held is gone.
                    count("restart").increment(1);
                    tracing::warn!(endpoint, seq, last = l, "the engine's KV event sequence restarted: its indexed blocks are dropped and rebuilt from what follows");
                    events.extend(translator.clear_all());
                }
                Some(l) if seq != l.wrapping_add(1) => {
                    let missed = l + 1..seq;
                    let filled = match &replay_at {
                        Some(at) => match tokio::time::timeout(
                            REPLAY_TIMEOUT,
                            replay(at, missed.start, missed.end),
                        )
                        .await
                        {
                            Ok(Ok(got)) if got.iter().map(|(s, _)| *s).eq(missed.clone()) => {
                                batches.extend(got.into_iter().map(|(_, p)| p));
                                true
                            }
                            Ok(Ok(got)) => {
                                tracing::warn!(endpoint, missed = ?missed, replayed = got.len(), "the engine's replay no longer holds every missed message");
                                false
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(endpoint, error = %e, "the engine's KV event replay failed");
                                false
                            }
                            Err(_) => {
                                tracing::warn!(endpoint, "the engine's KV event replay timed out");
                                false
                            }
                        },
                        None => false,
                    };
                    if filled {
                        count("replayed").increment(missed.end - missed.start);
                    } else {
                        count("gap").increment(1);
                        tracing::warn!(endpoint, seq, last = l, "gap in the engine's KV events: its indexed blocks are dropped and rebuilt from what follows");
                        events.extend(translator.clear_all());
                    }
                }
                _ => {}
            }
            last = Some(seq);
            batches.push(payload.to_vec());
            for payload in &batches {
                match translator.translate(payload) {
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
        let source = EventSource {
            endpoint: at.clone(),
            ..Default::default()
        };
        let task = subscribe(&source, 4, events, dump_rx).await.unwrap();
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

    /// A gap filled from the engine's replay socket (a ROUTER resending what it buffers, as
    /// vLLM's does): the missed batches are translated in order, nothing is cleared, and a
    /// block whose parent was only in a missed batch still chains.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gap_is_filled_from_the_replay_socket() {
        let mut publisher = zeromq::PubSocket::new();
        let at = publisher
            .bind("tcp://127.0.0.1:0")
            .await
            .unwrap()
            .to_string();
        let mut router = zeromq::RouterSocket::new();
        let replay_at = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let payloads: Vec<Vec<u8>> = vec![
            batch(vec![stored(1, None, &[1, 2, 3, 4])]),
            batch(vec![stored(2, Some(1), &[5, 6, 7, 8])]),
            batch(vec![stored(3, Some(2), &[9, 10, 11, 12])]),
            batch(vec![stored(4, Some(3), &[13, 14, 15, 16])]),
        ];
        // The engine's replay side: answers [identity, empty, from] with what it buffers.
        let buffered = payloads.clone();
        let served = tokio::spawn(async move {
            let ask = router.recv().await.unwrap().into_vec();
            let mut from = [0u8; 8];
            from.copy_from_slice(&ask[2]);
            let from = u64::from_be_bytes(from);
            for (seq, p) in buffered.iter().enumerate().skip(from as usize) {
                let mut m = zeromq::ZmqMessage::from(ask[0].to_vec());
                m.push_back(Vec::<u8>::new().into());
                m.push_back((seq as u64).to_be_bytes().to_vec().into());
                m.push_back(p.clone().into());
                router.send(m).await.unwrap();
            }
            let mut end = zeromq::ZmqMessage::from(ask[0].to_vec());
            end.push_back(Vec::<u8>::new().into());
            end.push_back(END_SEQ.to_be_bytes().to_vec().into());
            end.push_back(Vec::<u8>::new().into());
            router.send(end).await.unwrap();
            from
        });
        let (events, mut rx) = broadcast::channel(64);
        let (_dumps, dump_rx) = mpsc::channel(1);
        let source = EventSource {
            endpoint: at,
            topic: String::new(),
            replay: Some(replay_at),
        };
        let task = subscribe(&source, 4, events, dump_rx).await.unwrap();
        // Message 0 until the subscription is up (each resend is a restart: cleared, then
        // block 1 again).
        loop {
            publisher
                .send(message(0, payloads[0].clone()))
                .await
                .unwrap();
            if tokio::time::timeout(std::time::Duration::from_millis(50), rx.recv())
                .await
                .is_ok()
            {
                break;
            }
        }
        while let Ok(Ok(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
        {}
        // 1 and 2 are lost; 3 arrives.
        publisher
            .send(message(3, payloads[3].clone()))
            .await
            .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(
            served.await.unwrap(),
            1,
            "the replay was asked from the first missed"
        );
        assert!(
            got.iter().all(|e| e.data != KvEventData::Cleared),
            "nothing cleared: {got:?}"
        );
        let want = dynamo_kv::block_hashes(&(1..=16).collect::<Vec<u32>>(), 4);
        let stored: Vec<_> = got
            .iter()
            .flat_map(|e| match &e.data {
                KvEventData::Stored { blocks, .. } => blocks.iter().map(|b| b.block_hash).collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(stored, [want[1].1, want[2].1, want[3].1]);
        task.abort();
    }
}
