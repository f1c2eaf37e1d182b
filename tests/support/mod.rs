//! What every property test shares: how long to run.

/// `RANKFEED_LONG=<factor>` multiplies the cases of every seeded property test (unset: 1, the
/// bounded run of CI; e.g. `RANKFEED_LONG=20 cargo test --release` for a longer one).
pub fn long() -> u64 {
    std::env::var("RANKFEED_LONG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}
