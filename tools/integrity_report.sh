#!/usr/bin/env bash
# The integrity figures of the README: the row fuzzer, the corruption suite, the regression
# tests of the write path, the derivation, sharding and import property tests, the crash and kill -9 tests of publishing, and the hostile-input
# table (exit, seconds, peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p rankfeed-cli
# --workspace (as tools/test builds): the same features, so nothing is compiled again.
cargo test --release --workspace --exclude rankfeed-python --test fuzz_rows --test corruption --test integrity \
  --test derive --test shards --test import_trust -- --nocapture 2>&1 \
  | grep --line-buffered -E '^(fuzz|corruption|derivation|shards level|import trust|  |200 MB|test result)'
cargo test --release --workspace --exclude rankfeed-python --test crash -- --nocapture --test-threads 1 2>&1 \
  | grep --line-buffered -E '(crash points|kill -9|test result)'
python3 tools/bounded_inputs.py target/release/rankfeed
