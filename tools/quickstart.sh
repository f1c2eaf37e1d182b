#!/usr/bin/env bash
# End to end on the bundled sample: convert real WordNet text with a real BERT tokenizer into a
# dataset, then open it and print its stats.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p rankfeed-cli
out=${1:-target/quickstart/wordnet-bert}
./target/release/rankfeed convert data/sample/wordnet-nouns.jsonl.gz \
  --tokenizer data/sample/bert/tokenizer.json -o "$out" --overwrite
./target/release/rankfeed inspect "$out" --verify
