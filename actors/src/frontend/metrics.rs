//! The frontend's Prometheus series (`dynamo_frontend_*`), recorded per request by a guard.
//!
//! Labels come from closed sets: `endpoint` and `status` are enums here; `model` is a name a
//! worker published (requests for unknown models count under `unknown`), never request text.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge, histogram, Histogram};

use super::stats::StatsWindow;

pub const REQUESTS: &str = "dynamo_frontend_requests_total";
pub const INFLIGHT: &str = "dynamo_frontend_inflight_requests";
pub const TTFT: &str = "dynamo_frontend_time_to_first_token_seconds";
pub const ITL: &str = "dynamo_frontend_inter_token_latency_seconds";
pub const DURATION: &str = "dynamo_frontend_request_duration_seconds";
pub const INPUT_TOKENS: &str = "dynamo_frontend_input_sequence_tokens";
pub const OUTPUT_TOKENS: &str = "dynamo_frontend_output_sequence_tokens";

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    TooLarge,
    RateLimited,
    Internal,
    Unavailable,
    Timeout,
    /// The client went away first.
    Cancelled,
}

impl Status {
    pub fn from_code(code: u16) -> Self {
        match code {
            200..=299 => Status::Ok,
            404 => Status::NotFound,
            413 => Status::TooLarge,
            429 => Status::RateLimited,
            503 => Status::Unavailable,
            504 => Status::Timeout,
            400..=499 => Status::BadRequest,
            _ => Status::Internal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "200",
            Status::BadRequest => "400",
            Status::NotFound => "404",
            Status::TooLarge => "413",
            Status::RateLimited => "429",
            Status::Internal => "500",
            Status::Unavailable => "503",
            Status::Timeout => "504",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Records one request's series; whatever is not set when it drops counts as cancelled.
pub struct RequestMetrics {
    model: String,
    endpoint: Endpoint,
    started: Instant,
    prompt_tokens: u32,
    output_tokens: u32,
    seen_tokens: u32,
    last_token: Option<Instant>,
    status: Option<Status>,
    cached_tokens: u32,
    /// The frontend's statistics for the planner, when it publishes them.
    stats: Option<Arc<StatsWindow>>,
    /// The ITL series of its model, looked up once: a streamed token records into it without
    /// building a key and searching the registry.
    itl: Option<Histogram>,
}

impl RequestMetrics {
    pub fn start(
        model: Option<&str>,
        endpoint: Endpoint,
        prompt_tokens: u32,
        started: Instant,
        stats: Option<Arc<StatsWindow>>,
    ) -> Self {
        let model = model.unwrap_or("unknown").to_string();
        gauge!(INFLIGHT, "model" => model.clone()).increment(1.0);
        Self {
            model,
            endpoint,
            started,
            prompt_tokens,
            output_tokens: 0,
            seen_tokens: 0,
            last_token: None,
            status: None,
            cached_tokens: 0,
            stats,
            itl: None,
        }
    }

    pub fn set_cached(&mut self, tokens: u32) {
        self.cached_tokens = tokens;
    }

    /// Ends now with `status`.
    pub fn finish(mut self, status: Status) {
        self.status = Some(status);
    }

    pub fn set_status(&mut self, status: Status) {
        self.status = Some(status);
    }

    pub fn set_output(&mut self, tokens: u32) {
        self.output_tokens = tokens;
    }

    /// `total` tokens generated so far: the first records TTFT, later ones ITL (per token).
    pub fn on_tokens(&mut self, total: u32) {
        if total <= self.seen_tokens {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => {
                let ttft = now.duration_since(self.started);
                histogram!(TTFT, "model" => self.model.clone()).record(ttft.as_secs_f64());
                if let Some(s) = &self.stats {
                    s.first_token(&self.model, ttft);
                }
            }
            Some(last) => {
                let n = total - self.seen_tokens;
                let per = now.duration_since(last) / n;
                let model = &self.model;
                self.itl
                    .get_or_insert_with(|| histogram!(ITL, "model" => model.clone()))
                    .record(per.as_secs_f64());
                if let Some(s) = &self.stats {
                    s.later_tokens(&self.model, per, n);
                }
            }
        }
        self.last_token = Some(now);
        self.seen_tokens = total;
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(Status::Cancelled);
        gauge!(INFLIGHT, "model" => self.model.clone()).decrement(1.0);
        counter!(REQUESTS, "model" => self.model.clone(), "endpoint" => self.endpoint.as_str(), "status" => status.as_str())
            .increment(1);
        histogram!(DURATION, "model" => self.model.clone(), "endpoint" => self.endpoint.as_str())
            .record(self.started.elapsed().as_secs_f64());
        if let Some(s) = &self.stats {
            s.ended(
                &self.model,
                status == Status::Ok,
                self.prompt_tokens,
                self.output_tokens,
                self.cached_tokens,
            );
        }
        if status == Status::Ok {
            histogram!(INPUT_TOKENS, "model" => self.model.clone())
                .record(self.prompt_tokens as f64);
            histogram!(OUTPUT_TOKENS, "model" => self.model.clone())
                .record(self.output_tokens as f64);
        }
    }
}
