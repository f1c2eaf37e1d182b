#!/usr/bin/env bash
# The integrity figures of the README: the row fuzzer, the corruption suite, the regression
# tests of the write path, the crash and kill -9 tests of publishing, and the hostile-input
# table (exit, seconds, peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p rankfeed-cli
cargo test --release -p rankfeed --test fuzz_rows --test corruption --test integrity -- --nocapture 2>&1 \
  | grep -E '^(fuzz|corruption|  |200 MB|test result)'
cargo test --release -p rankfeed-cli --test crash -- --nocapture --test-threads 1 2>&1 \
  | grep -E '(crash points|kill -9|test result)'
python3 tools/bounded_inputs.py target/release/rankfeed
