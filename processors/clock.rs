//! The shell's clock: wall-clock time for timestamps the shell writes (when a step was
//! recorded, when a webhook arrived). The core never reads it; decisions take stream time.

use crate::events::Millis;

/// Wall-clock milliseconds, for shell-side timestamps only (never for decisions).
pub fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
