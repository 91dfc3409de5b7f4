//! Conditional disaggregation: where a request's prompt is prefilled once its decode worker
//! is chosen.
//!
//! Remote prefill pays a transfer and a hop; it wins when the prompt's uncached part on the
//! decode worker is long (that prefill would stall the worker's running decodes) and a
//! prefill worker has room. So, in order:
//! 1. the chosen worker is not a decode worker, or no prefill worker serves the model: local;
//! 2. fewer than `disagg_min_remote_tokens` prompt tokens are uncached on the decode worker
//!    (device hits only: the decode worker computes from its device cache) and no prefill
//!    worker is idle: local (an idle prefill worker takes even a short prompt: the decode
//!    worker's running requests are spared the prefill, at no cost to anyone);
//! 3. every prefill worker has more than `disagg_max_prefill_queue` prompt tokens pending
//!    (its last report beyond the router's own accounting, plus that accounting): local;
//! 4. otherwise the prefill worker of lowest cost among those under the bound (the same cost
//!    as whole requests: uncached blocks there plus its pending prefill), whose lease counts
//!    the prompt as its prefill work until the first token.

use std::sync::Arc;

use dynamo_kv::Overlap;
use dynamo_protocols::kv::WorkerId;
use dynamo_protocols::llm::TokenId;

use crate::{KvRouter, RouteLease};

/// A prefill worker as the router knows it.
#[derive(Debug, Clone)]
pub(crate) struct PrefillWorker {
    model: String,
    block_size: usize,
    endpoint: String,
}

/// Why a prompt is prefilled on its decode worker; a closed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    /// The chosen worker is not a decode worker (an aggregated one prefills its own).
    NotDecode,
    NoPrefillWorkers,
    Short,
    Saturated,
}

impl LocalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::NotDecode => "local_not_decode",
            LocalReason::NoPrefillWorkers => "local_no_prefill",
            LocalReason::Short => "local_short",
            LocalReason::Saturated => "local_saturated",
        }
    }
}

/// Where a prompt is prefilled.
pub enum PrefillPlan {
    Local(LocalReason),
    Remote {
        worker: WorkerId,
        /// The prefill worker's prefill endpoint (`namespace.component.endpoint`).
        endpoint: String,
        /// The prefill worker's accounting for this prompt (drop it at the first token).
        lease: RouteLease,
    },
}

impl PrefillPlan {
    /// The decision's metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PrefillPlan::Local(r) => r.as_str(),
            PrefillPlan::Remote { .. } => "remote",
        }
    }
}

impl KvRouter {
    /// Records that prefill worker `worker` serves `model` on `endpoint`.
    pub fn add_prefill_worker(
        &self,
        worker: WorkerId,
        model: String,
        block_size: usize,
        endpoint: String,
    ) {
        self.prefill.insert(
            worker,
            PrefillWorker {
                model,
                block_size,
                endpoint,
            },
        );
    }

    /// Records that `worker` is a decode worker (takes requests prefilled elsewhere).
    pub fn add_decode_worker(&self, worker: WorkerId) {
        self.decode.insert(worker, ());
    }

    /// Prefill workers known for `model`.
    pub fn prefill_workers(&self, model: &str) -> usize {
        self.prefill.iter().filter(|p| p.model == model).count()
    }

    /// Where the prompt `tokens` of a request for `model`, routed to `worker` holding
    /// `overlap` of it, is prefilled (see the module).
    pub fn plan_prefill(
        self: &Arc<Self>,
        model: &str,
        worker: WorkerId,
        overlap: Overlap,
        tokens: &[TokenId],
    ) -> PrefillPlan {
        if !self.decode.contains_key(&worker) {
            return PrefillPlan::Local(LocalReason::NotDecode);
        }
        let plan = self.plan(model, overlap, tokens);
        // Counted where prefill workers exist (an aggregated deployment has no decision).
        if !matches!(plan, PrefillPlan::Local(LocalReason::NoPrefillWorkers)) {
            metrics::counter!("dynamo_disagg_decisions_total", "decision" => plan.label())
                .increment(1);
        }
        plan
    }

    fn plan(
        self: &Arc<Self>,
        model: &str,
        decode_overlap: Overlap,
        tokens: &[TokenId],
    ) -> PrefillPlan {
        let mut candidates: Vec<(WorkerId, usize)> = self
            .prefill
            .iter()
            .filter(|p| p.model == model)
            .map(|p| (*p.key(), p.block_size.max(1)))
            .collect();
        if candidates.is_empty() {
            return PrefillPlan::Local(LocalReason::NoPrefillWorkers);
        }
        candidates.sort_unstable();
        let bs = candidates[0].1;
        let s = self.settings();
        let uncached = tokens
            .len()
            .saturating_sub(decode_overlap.device as usize * bs);
        let (open, all_busy) = {
            let loads = self.loads.read();
            let pending = |w: &WorkerId| loads.get(w).map_or(0, |a| a.pending_prefill_tokens());
            let open: Vec<WorkerId> = candidates
                .iter()
                .map(|c| c.0)
                .filter(|w| pending(w) <= s.disagg_max_prefill_queue)
                .collect();
            let all_busy = open.iter().all(|w| pending(w) > 0);
            (open, all_busy)
        };
        // A short prompt stays where it decodes, unless a prefill worker is idle (then moving
        // it costs the decode worker nothing and the prefill worker nothing it had to do).
        if uncached < s.disagg_min_remote_tokens && all_busy {
            return PrefillPlan::Local(LocalReason::Short);
        }
        if open.is_empty() {
            return PrefillPlan::Local(LocalReason::Saturated);
        }
        match self.route_as(&open, tokens, bs, false, false) {
            Ok(d) => match self.prefill.get(&d.worker) {
                Some(p) => PrefillPlan::Remote {
                    worker: d.worker,
                    endpoint: p.endpoint.clone(),
                    lease: d.lease,
                },
                // Left between the two reads: the decode worker prefills.
                None => PrefillPlan::Local(LocalReason::NoPrefillWorkers),
            },
            Err(_) => PrefillPlan::Local(LocalReason::Saturated),
        }
    }
}
