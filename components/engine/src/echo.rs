//! The echo engine: "generates" the prompt's own tokens, one per step, `delay_per_token` apart.
//!
//! It behaves like a real engine towards its caller: one token per output, stop tokens honoured
//! after `min_tokens` (so a chat prompt echoes up to the template's first end-of-turn token),
//! `max_tokens` gives `length`, running out of prompt gives `stop`, and cancellation takes
//! effect before the next token.

use std::time::Duration;

use dynamo_protocols::llm::{EngineOutput, FinishReason, PreprocessedRequest};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineError, EngineStream};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EchoSettings {
    /// Simulated time per generated token (zero: as fast as the consumer reads).
    pub delay_per_token: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct EchoEngine {
    settings: EchoSettings,
}

impl EchoEngine {
    pub fn new(settings: EchoSettings) -> Self {
        Self { settings }
    }
}

impl Engine for EchoEngine {
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        if request.stop.max_tokens == 0 {
            return Err(EngineError::BadRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        crate::refuse_without_logits(&request, "echo")?;
        let delay = self.settings.delay_per_token;
        let stop = request.stop;
        // A migrated request continues the echo where the failed worker left it: the prompt
        // is the original one followed by what was echoed of it.
        let mut tokens = request.token_ids;
        let resumed = (request.resumed_tokens as usize).min(tokens.len() / 2);
        tokens.truncate(tokens.len() - resumed);
        tokens.drain(..resumed);
        if tokens.is_empty() {
            let done = EngineOutput {
                finish_reason: Some(FinishReason::Stop),
                ..Default::default()
            };
            return Ok(futures::stream::iter([Ok(done)]).boxed());
        }
        let stream = futures::stream::unfold(0usize, move |i| {
            let cancel = cancel.clone();
            let stop = stop.clone();
            let token = tokens.get(i).copied();
            let remaining = tokens.len() - i.min(tokens.len());
            async move {
                if i > 0 && !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if cancel.is_cancelled() {
                    return None;
                }
                let token = token?;
                let generated = (i + 1) as u32;
                let finish = if generated > stop.min_tokens && stop.stop_token_ids.contains(&token)
                {
                    Some(FinishReason::Stop)
                } else if generated >= stop.max_tokens {
                    Some(FinishReason::Length)
                } else if remaining == 1 {
                    Some(FinishReason::Stop)
                } else {
                    None
                };
                let out = EngineOutput {
                    token_ids: vec![token],
                    finish_reason: finish,
                    cached_tokens: (i == 0 && resumed == 0).then_some(0),
                    ..Default::default()
                };
                // After a finish the next state is past the end: the stream ends.
                let next = if finish.is_some() { usize::MAX } else { i + 1 };
                Some((Ok(out), next))
            }
        });
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_protocols::llm::{SamplingOptions, StopConditions};

    fn req(
        tokens: Vec<u32>,
        max_tokens: u32,
        stop: Vec<u32>,
        min_tokens: u32,
    ) -> PreprocessedRequest {
        PreprocessedRequest {
            token_ids: tokens,
            sampling: SamplingOptions::default(),
            stop: StopConditions {
                max_tokens,
                min_tokens,
                stop_token_ids: stop,
            },
            remote_prefill: None,
            peer_prefix: None,
            resumed_tokens: 0,
        }
    }

    async fn run(r: PreprocessedRequest) -> Vec<EngineOutput> {
        let s = EchoEngine::default()
            .generate(r, CancellationToken::new())
            .unwrap();
        s.map(|o| o.unwrap()).collect().await
    }

    fn tokens(outs: &[EngineOutput]) -> Vec<u32> {
        outs.iter().flat_map(|o| o.token_ids.clone()).collect()
    }

    #[tokio::test]
    async fn echoes_until_prompt_ends_length_or_stop_token() {
        let all = run(req(vec![1, 2, 3], 10, vec![], 0)).await;
        assert_eq!(tokens(&all), vec![1, 2, 3]);
        assert_eq!(all.last().unwrap().finish_reason, Some(FinishReason::Stop));

        let cut = run(req(vec![1, 2, 3], 2, vec![], 0)).await;
        assert_eq!(tokens(&cut), vec![1, 2]);
        assert_eq!(
            cut.last().unwrap().finish_reason,
            Some(FinishReason::Length)
        );

        let stopped = run(req(vec![1, 9, 3, 9, 5], 10, vec![9], 0)).await;
        assert_eq!(tokens(&stopped), vec![1, 9]);
        // min_tokens: the first stop token is too early to count.
        let later = run(req(vec![1, 9, 3, 9, 5], 10, vec![9], 2)).await;
        assert_eq!(tokens(&later), vec![1, 9, 3, 9]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_before_the_next_token() {
        let cancel = CancellationToken::new();
        let engine = EchoEngine::new(EchoSettings {
            delay_per_token: Duration::from_millis(100),
        });
        let mut s = engine
            .generate(req(vec![1, 2, 3, 4], 10, vec![], 0), cancel.clone())
            .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().token_ids, vec![1]);
        cancel.cancel();
        assert!(s.next().await.is_none());
    }
}
