//! The scheduler with a counting executor: batching, chunked prefill, prefix caching,
//! preemption, cancellation, refusal, and events that replay to the pool's cached set.

use std::collections::HashSet;

use dynamo_engine::scheduler::{Executor, Scheduler, SchedulerSettings, StepBatch, StepResult};
use dynamo_engine::EngineError;
use dynamo_protocols::kv::{KvEventData, SequenceHash};
use dynamo_protocols::llm::{
    EngineOutput, FinishReason, PreprocessedRequest, SamplingOptions, StopConditions,
};
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Samples 1000 + step number; records each step's (items, tokens).
#[derive(Default)]
struct Counting {
    steps: Vec<(usize, usize)>,
}

impl Executor for Counting {
    fn execute(&mut self, batch: &StepBatch<'_>) -> StepResult {
        self.steps
            .push((batch.items.len(), batch.items.iter().map(|i| i.len).sum()));
        StepResult {
            sampled: batch
                .items
                .iter()
                .filter(|i| i.samples)
                .map(|_| Ok(1000 + self.steps.len() as u32))
                .collect(),
            ..Default::default()
        }
    }
}

fn settings(num_blocks: usize, budget: usize) -> SchedulerSettings {
    SchedulerSettings::new(num_blocks, 4, 8, budget)
}

type Rx = mpsc::UnboundedReceiver<Result<EngineOutput, EngineError>>;

fn request(prompt: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: prompt,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

fn add(s: &mut Scheduler<Counting>, prompt: Vec<u32>, max_tokens: u32) -> (Rx, CancellationToken) {
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    s.add(request(prompt, max_tokens), tx, cancel.clone())
        .unwrap();
    (rx, cancel)
}

fn run(s: &mut Scheduler<Counting>) {
    let mut n = 0;
    while s.has_work() {
        s.step();
        s.deliver();
        n += 1;
        assert!(n < 10_000, "the scheduler does not finish");
    }
}

fn outputs(rx: &mut Rx) -> Vec<EngineOutput> {
    let mut v = Vec::new();
    while let Ok(o) = rx.try_recv() {
        v.push(o.unwrap());
    }
    v
}

#[test]
fn chunked_prefill_then_one_token_per_step_until_length() {
    let mut s = Scheduler::new(settings(64, 8), Counting::default());
    let (mut rx, _c) = add(&mut s, (0..20).collect(), 5);
    for _ in 0..2 {
        s.step();
        s.deliver();
    }
    assert!(
        outputs(&mut rx).is_empty(),
        "a 20-token prompt takes 3 steps of 8"
    );
    run(&mut s);
    let out = outputs(&mut rx);
    assert_eq!(out.len(), 5);
    assert_eq!(
        out.last().unwrap().finish_reason,
        Some(FinishReason::Length)
    );
    assert_eq!(out[0].cached_tokens, Some(0));
    assert!(out[1..].iter().all(|o| o.cached_tokens.is_none()));
}

#[test]
fn a_repeated_prompt_reuses_its_cached_prefix() {
    let mut s = Scheduler::new(settings(64, 64), Counting::default());
    let prompt: Vec<u32> = (0..18).collect();
    let (mut a, _c) = add(&mut s, prompt.clone(), 2);
    run(&mut s);
    let (mut b, _c) = add(&mut s, prompt, 2);
    run(&mut s);
    assert_eq!(outputs(&mut a)[0].cached_tokens, Some(0));
    // 18 tokens = 4 full blocks + 2; all 4 full blocks are reused.
    assert_eq!(outputs(&mut b)[0].cached_tokens, Some(16));
}

#[test]
fn batches_several_sequences_and_preempts_when_blocks_run_out() {
    // 10 blocks of 4 tokens; three 12-token prompts generating 12 tokens each need 18 blocks.
    let mut s = Scheduler::new(settings(10, 64), Counting::default());
    let mut rxs: Vec<Rx> = (0..3)
        .map(|i| add(&mut s, (i * 100..i * 100 + 12).collect(), 12).0)
        .collect();
    run(&mut s);
    for rx in &mut rxs {
        let out = outputs(rx);
        assert_eq!(out.len(), 12, "every request completes despite preemption");
        assert_eq!(
            out.last().unwrap().finish_reason,
            Some(FinishReason::Length)
        );
    }
    assert!(s.preemptions() > 0);
    assert_eq!(s.load().active_blocks, 0);
}

#[test]
fn a_request_the_pool_can_never_hold_is_refused() {
    let mut s = Scheduler::new(settings(4, 64), Counting::default());
    let (tx, _rx) = mpsc::unbounded_channel();
    match s.add(request((0..10).collect(), 10), tx, CancellationToken::new()) {
        Err(EngineError::BadRequest(m)) => assert!(m.contains("needs up to 20 tokens"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn cancellation_frees_the_blocks_at_the_next_step() {
    let mut s = Scheduler::new(settings(64, 64), Counting::default());
    let (_rx, cancel) = add(&mut s, (0..40).collect(), 100);
    s.step();
    s.step();
    assert!(s.load().active_blocks > 0);
    cancel.cancel();
    s.step();
    assert!(!s.has_work());
    assert_eq!(s.load().active_blocks, 0);
}

proptest! {
    /// Whatever the workload, replaying the events gives the cached set the dump shows, and
    /// every request gets exactly max_tokens tokens.
    #[test]
    fn events_replay_to_the_cached_set(prompts in proptest::collection::vec(
        (proptest::collection::vec(0u32..3, 1..30), 1u32..6), 1..12), blocks in 12usize..40) {
        let mut s = Scheduler::new(settings(blocks, 16), Counting::default());
        let mut rxs = Vec::new();
        for (p, m) in &prompts {
            rxs.push((add(&mut s, p.clone(), *m).0, *m));
        }
        let mut set: HashSet<SequenceHash> = HashSet::new();
        while s.has_work() {
            s.step();
            s.deliver();
            for e in s.take_events() {
                match e.data {
                    KvEventData::Stored { blocks, .. } => set.extend(blocks.iter().map(|b| b.block_hash)),
                    KvEventData::Removed { block_hashes } => for h in block_hashes { set.remove(&h); },
                    KvEventData::Cleared => set.clear(),
                }
            }
            let dumped: HashSet<SequenceHash> = s.dump().blocks.iter().map(|(_, b)| b.block_hash).collect();
            prop_assert_eq!(&set, &dumped);
        }
        for (rx, m) in &mut rxs {
            prop_assert_eq!(outputs(rx).len() as u32, *m);
        }
    }
}
