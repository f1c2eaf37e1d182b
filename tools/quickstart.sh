#!/usr/bin/env bash
# End to end on the bundled sample: convert real WordNet text with a real BERT tokenizer into a
# dataset, then open it and print its stats.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x target/release/rankfeed ]; then
  echo "Building rankfeed (release). The first build compiles arrow, parquet and tokenizers:" >&2
  echo "about 5 minutes on 2 cores; later builds take seconds." >&2
fi
cargo build --release -p rankfeed-cli   # cargo prints each crate as it compiles
out=${1:-target/quickstart/wordnet-bert}
./target/release/rankfeed convert data/sample/wordnet-nouns.jsonl.gz \
  --tokenizer data/sample/bert/tokenizer.json -o "$out" --overwrite
./target/release/rankfeed inspect "$out" --verify
# Stream batches as a cross-encoder trainer would take them (B=4, G=8), on one core.
./target/release/rankfeed bench "$out" --mode encoder --batch-size 4 --group-size 8 \
  --query-max-len 32 --passage-max-len 128 --batches 20000 --prefetch-threads 0
./target/release/rankfeed show "$out" --row 0 --group-size 3 --tokenizer data/sample/bert/tokenizer.json
