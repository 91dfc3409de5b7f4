//! The frontend's request statistics per interval, published on the bus for the planner
//! ([`FrontendStats`] on `dyn.ev.{ns}.frontend.stats.{instance}`): what ended and what was
//! seen in each interval, per model. Latency samples are kept up to [`MAX_SAMPLES`] per
//! model and interval (a uniform reservoir beyond it), so memory stays bounded under any load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dynamo_protocols::stats::{
    FrontendStats, ModelStats, Percentiles, FRONTEND_COMPONENT, STATS_TOPIC,
};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::serve::encode_event;
use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
use dynamo_runtime::{InstanceId, Runtime};
use tokio_util::sync::CancellationToken;

/// Latency samples kept per model and interval.
pub const MAX_SAMPLES: usize = 4096;

/// Samples of one latency with a uniform reservoir past [`MAX_SAMPLES`].
#[derive(Default)]
struct Reservoir {
    seen: u64,
    kept: Vec<f64>,
}

impl Reservoir {
    fn add(&mut self, v: f64) {
        self.seen += 1;
        if self.kept.len() < MAX_SAMPLES {
            self.kept.push(v);
        } else {
            let i = rand::random_range(0..self.seen);
            if (i as usize) < MAX_SAMPLES {
                self.kept[i as usize] = v;
            }
        }
    }

    fn summary(&mut self) -> Percentiles {
        Percentiles::of(&mut self.kept, self.seen)
    }
}

#[derive(Default)]
struct Acc {
    stats: ModelStats,
    ttft: Reservoir,
    itl: Reservoir,
}

/// The current interval's figures; requests record into it, the publisher takes it.
#[derive(Default)]
pub struct StatsWindow {
    models: Mutex<HashMap<String, Acc>>,
}

impl StatsWindow {
    fn with<R>(&self, model: &str, f: impl FnOnce(&mut Acc) -> R) -> R {
        let mut m = self.models.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(model) {
            Some(acc) => f(acc),
            None => f(m.entry(model.to_string()).or_default()),
        }
    }

    pub fn first_token(&self, model: &str, ttft: Duration) {
        self.with(model, |a| a.ttft.add(ttft.as_secs_f64() * 1e3));
    }

    pub fn later_tokens(&self, model: &str, per_token: Duration, tokens: u32) {
        self.with(model, |a| {
            for _ in 0..tokens {
                a.itl.add(per_token.as_secs_f64() * 1e3);
            }
        });
    }

    /// A request ended: `ok`, with its token counts (counted only when it ended well).
    pub fn ended(&self, model: &str, ok: bool, input: u32, output: u32, cached: u32) {
        self.with(model, |a| {
            a.stats.requests += 1;
            if ok {
                a.stats.input_tokens += input as u64;
                a.stats.output_tokens += output as u64;
                a.stats.cached_tokens += cached as u64;
            } else {
                a.stats.errors += 1;
            }
        });
    }

    /// The interval's figures; the next interval starts empty. Models seen before stay listed
    /// (with zeros), so a reader sees a model go idle.
    pub fn take(&self) -> std::collections::BTreeMap<String, ModelStats> {
        let mut m = self.models.lock().unwrap_or_else(|p| p.into_inner());
        m.iter_mut()
            .map(|(model, acc)| {
                let mut taken = std::mem::take(acc);
                let stats = ModelStats {
                    ttft_ms: taken.ttft.summary(),
                    itl_ms: taken.itl.summary(),
                    ..taken.stats
                };
                (model.clone(), stats)
            })
            .collect()
    }
}

/// Publishes `window` every `interval` as a frontend of `namespace` (a random instance id),
/// and shows it on the status `board`, until `stop` or until `inflight` (the requests in
/// flight) says the frontend is gone.
pub(crate) fn spawn_publisher(
    runtime: &Runtime,
    namespace: &Namespace,
    window: Arc<StatsWindow>,
    inflight: impl Fn() -> Option<usize> + Send + 'static,
    interval: Duration,
    stop: CancellationToken,
    board: Option<Arc<super::status::Board>>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let subject = ComponentId::new(namespace.as_str(), FRONTEND_COMPONENT)
        .map_err(|e| e.to_string())?
        .event_subject(
            &Topic::new(STATS_TOPIC).map_err(|e| e.to_string())?,
            InstanceId::random(),
        );
    let bus = runtime.bus().clone();
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let Some(inflight) = inflight() else {
                return;
            };
            let now = Instant::now();
            let stats = FrontendStats {
                at_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default(),
                interval_ms: now.duration_since(last).as_millis() as u64,
                inflight: inflight as u64,
                models: window.take(),
            };
            last = now;
            if let Some(b) = &board {
                b.frontend(&stats);
            }
            let payload = match encode_event(&stats) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode the frontend's statistics");
                    continue;
                }
            };
            if let Err(e) = bus.publish(Outgoing::new(subject.clone(), payload)).await {
                tracing::debug!(error = %e, "cannot publish the frontend's statistics");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a request records lands in the interval it happened in; the next starts empty but
    /// still lists the model; samples past the bound are counted, not kept.
    #[test]
    fn a_window_summarizes_one_interval() {
        let w = StatsWindow::default();
        w.first_token("m", Duration::from_millis(20));
        w.first_token("m", Duration::from_millis(40));
        w.later_tokens("m", Duration::from_millis(5), 3);
        w.ended("m", true, 100, 8, 64);
        w.ended("m", false, 50, 0, 0);
        let s = &w.take()["m"];
        assert_eq!((s.requests, s.errors), (2, 1));
        assert_eq!(
            (s.input_tokens, s.output_tokens, s.cached_tokens),
            (100, 8, 64)
        );
        assert_eq!((s.ttft_ms.count, s.ttft_ms.max), (2, 40.0));
        assert_eq!((s.itl_ms.count, s.itl_ms.p50), (3, 5.0));
        assert_eq!(s.cached_ratio(), 0.64);
        let next = &w.take()["m"];
        assert_eq!(*next, ModelStats::default());
        for _ in 0..MAX_SAMPLES + 10 {
            w.first_token("m", Duration::from_millis(1));
        }
        assert_eq!(
            w.models.lock().unwrap()["m"].ttft.kept.len(),
            MAX_SAMPLES,
            "bounded"
        );
        let s = &w.take()["m"];
        assert_eq!(s.ttft_ms.count, (MAX_SAMPLES + 10) as u64);
    }
}
