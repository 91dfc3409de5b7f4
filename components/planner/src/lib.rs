//! The planner's core, without a bus: capacity profiles ([`profile`]), load predictors
//! ([`predict`]) and the replica decision with its policy ([`decide`]). The planner role
//! (observing the bus, carrying decisions out through a connector) and the simulator build on
//! it.

pub mod decide;
pub mod plan;
pub mod predict;
pub mod profile;

pub use decide::{
    need, Decided, Limits, Load, Need, Policy, PolicySettings, Pools, Replicas, Targets, Unmeetable,
};
pub use plan::{Planner, PlannerConfig, PoolRole, Step};
pub use predict::{Predictor, PredictorKind};
pub use profile::{DecodePoint, PrefillPoint, Profile, ProfileError, PROFILE_VERSION};
