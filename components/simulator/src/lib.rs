//! A virtual-time cluster simulator: the real KV router, mocker schedulers (block pool and
//! timing model) and the planner's core, driven by a request trace in discrete-event time
//! ([`sim::simulate`]), with what it takes and gives ([`trace`], [`plot`]).
#![forbid(unsafe_code)]

pub mod plot;
pub mod sim;
pub mod trace;

pub use sim::{simulate, PlannerSim, RequestRecord, SimConfig, SimReport, Stepping};
pub use trace::{generate, parse_mooncake, LoadCurve, Shape, TraceRequest};
