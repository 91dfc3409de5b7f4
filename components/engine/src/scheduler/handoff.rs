//! Hand-offs between workers of a disaggregated deployment, on the scheduler.
//!
//! - Prefill side ([`KvCommand::PrefillExport`](super::KvCommand)): a request computed to its
//!   first token like any other, whose prompt blocks (the last, partial one included) are
//!   read out at its finish, while they are still its own: no eviction can race the export.
//! - Decode side: [`Scheduler::reserve_prompt`] pins the prompt's cached leading blocks and
//!   allocates the rest in one step (so nothing cached can vanish before the KV lands);
//!   [`Scheduler::add_prefilled`] writes the arrived contents into the reserved blocks,
//!   registers the prompt's full blocks as cached and queues the request as computed up to
//!   its prompt, with its first token (sampled by the prefill worker) as its first generated
//!   token: it only decodes. Checked whole before anything is written; a bad hand-off
//!   releases the blocks and fails the request.

use dynamo_protocols::kv::SequenceHash;
use dynamo_protocols::llm::{PreprocessedRequest, TokenId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Executor, OutputSender, Scheduler, Seq};
use crate::EngineError;

/// A request whose prompt was computed elsewhere, its KV arrived (see the module).
pub struct Prefilled {
    pub reservation: u64,
    /// Leading blocks of the reservation that were cached here (no data for them).
    pub cached: usize,
    pub request: PreprocessedRequest,
    pub first: TokenId,
    /// Contents of the reservation's blocks after `cached`, in order.
    pub data: Vec<Vec<u8>>,
    pub out: OutputSender,
    pub cancel: CancellationToken,
}

impl<E: Executor> Scheduler<E> {
    /// Queues a prefill whose prompt blocks go to `blocks` at its finish.
    pub(super) fn add_export(
        &mut self,
        mut request: PreprocessedRequest,
        out: OutputSender,
        cancel: CancellationToken,
        blocks: oneshot::Sender<Vec<Vec<u8>>>,
    ) {
        request.stop.max_tokens = 1;
        request.stop.min_tokens = 0;
        match self.add(request, out.clone(), cancel) {
            Ok(()) => {
                if let Some(seq) = self.waiting.back_mut() {
                    seq.export = Some(blocks);
                }
            }
            Err(e) => {
                let _ = out.send(Err(e));
            }
        }
    }

    /// Pins the cached leading blocks among `hashes` (the prompt's full blocks) and allocates
    /// the rest of `total` blocks; returns the reservation and how many were cached.
    pub fn reserve_prompt(
        &mut self,
        hashes: &[SequenceHash],
        total: usize,
    ) -> Result<(u64, usize), EngineError> {
        if total == 0 || hashes.len() > total {
            return Err(EngineError::BadRequest(format!(
                "{} full blocks for a prompt of {total} blocks",
                hashes.len()
            )));
        }
        let mut blocks = self.pool.acquire_prefix(hashes);
        let cached = blocks.len();
        match self.pool.allocate(total - cached) {
            Ok(new) => blocks.extend(new),
            Err(e) => {
                self.pool.release(&blocks);
                return Err(EngineError::Overloaded(format!(
                    "cannot reserve {} blocks: {e}",
                    total - cached
                )));
            }
        }
        let id = self.hold(blocks);
        // Blocks just evicted for this still hold their contents.
        self.offer_evicted();
        Ok((id, cached))
    }

    /// Gives back a reservation's blocks (one not used by [`Scheduler::add_prefilled_tagged`]).
    pub fn release_reservation(&mut self, reservation: u64) {
        if let Some(blocks) = self.reservations.remove(&reservation) {
            self.pool.release(&blocks);
        }
    }

    /// Queues a request computed elsewhere (see the module); a bad one fails on its stream.
    pub(super) fn add_prefilled(&mut self, p: Prefilled) {
        self.add_prefilled_tagged(p, 0)
    }

    /// [`Scheduler::add_prefilled`], naming the request `tag` for
    /// [`Scheduler::deliver_tagged`].
    pub fn add_prefilled_tagged(&mut self, p: Prefilled, tag: u64) {
        let Prefilled {
            reservation,
            cached,
            request,
            first,
            data,
            out,
            cancel,
        } = p;
        let Some(blocks) = self.reservations.remove(&reservation) else {
            let _ = out.send(Err(EngineError::BadRequest(format!(
                "no reservation {reservation} (released, used, or from another engine)"
            ))));
            return;
        };
        let bs = self.settings.block_size;
        let prompt_len = request.token_ids.len();
        let total = prompt_len.div_ceil(bs);
        let bytes = self.executor.block_bytes();
        let capacity = self.settings.num_blocks * bs;
        let problem = if prompt_len == 0 {
            Some("the prompt has no tokens".to_string())
        } else if blocks.len() != total || cached > total {
            Some(format!(
                "a reservation of {} blocks ({cached} cached) for a prompt of {total} blocks",
                blocks.len()
            ))
        } else if data.len() != total - cached {
            Some(format!(
                "{} blocks of data for {} uncached blocks",
                data.len(),
                total - cached
            ))
        } else if let Some(b) = data.iter().position(|d| d.len() != bytes) {
            Some(format!(
                "block {b} has {} bytes; this engine's blocks have {bytes}",
                data[b].len()
            ))
        } else if prompt_len + request.stop.max_tokens as usize > capacity {
            Some(format!(
                "the request needs up to {} tokens of KV cache but this worker holds {capacity}",
                prompt_len + request.stop.max_tokens as usize
            ))
        } else {
            None
        };
        if let Some(why) = problem {
            self.pool.release(&blocks);
            let _ = out.send(Err(EngineError::BadRequest(format!(
                "cannot continue a prefilled request: {why}"
            ))));
            return;
        }
        for (block, d) in blocks[cached..].iter().zip(&data) {
            self.executor.write_block(*block, d);
        }
        let output_start = prompt_len.saturating_sub(request.resumed_tokens as usize);
        let mut tokens = request.token_ids;
        tokens.push(first);
        let mut seq = Seq {
            tokens,
            prompt_len,
            output_start,
            computed: prompt_len,
            blocks,
            hashes: Vec::new(),
            registered: cached,
            stop: request.stop,
            sampling: request.sampling,
            generated: 1,
            cached_tokens: Some((cached * bs) as u32),
            // The worker reported the first token (and the cached count) itself.
            cached_reported: true,
            out,
            cancel,
            export: None,
            tag,
            guide: Default::default(),
        };
        seq.extend_hashes(bs);
        let full = prompt_len / bs;
        for b in cached..full {
            let parent = b.checked_sub(1).map(|p| seq.hashes[p].1);
            let (local, hash) = seq.hashes[b];
            self.pool
                .register(seq.blocks[b], parent, local, hash, b as u32);
        }
        seq.registered = full.max(cached);
        self.prefilled.push_back(seq);
    }
}
