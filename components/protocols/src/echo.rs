//! The echo endpoint: the runtime's demonstration and smoke-test service.

use serde::{Deserialize, Serialize};

/// Most chunks one echo request may ask for.
pub const MAX_REPEAT: u32 = 10_000;

/// Ask for `text` back, `repeat` times, `delay_ms` apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoRequest {
    pub text: String,
    #[serde(default = "one")]
    pub repeat: u32,
    #[serde(default)]
    pub delay_ms: u64,
}

fn one() -> u32 {
    1
}

/// One streamed chunk of an echo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoChunk {
    pub index: u32,
    pub text: String,
}
