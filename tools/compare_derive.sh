#!/usr/bin/env bash
# Merge and export time of two rankfeed binaries, interleaved, on the same data: wall and CPU
# seconds, medians and the ratio's quartiles over RUNS runs (default 9).
#   tools/compare_derive.sh OLD_BIN NEW_BIN [ROWS]
# Data: WordNet noun glosses (tools/make_sample.py; Debian's wordnet-base), ROWS rows (default
# 0 = all, ~76k), converted whole and as 2 shards by each binary with the bundled BERT tokenizer.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=$(realpath "$1"); new=$(realpath "$2"); rows=${3:-0}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
tok=$here/data/sample/bert/tokenizer.json
python3 "$here/tools/make_sample.py" --rows "$rows" --out wn.jsonl >/dev/null
for side in old new; do
  bin=${!side}
  for k in 0 1; do "$bin" convert wn.jsonl --tokenizer "$tok" -o $side-shard-$k --shard $k/2 >/dev/null; done
  "$bin" convert wn.jsonl --tokenizer "$tok" -o $side-whole >/dev/null
done
t() { /usr/bin/time -f "%e %U %S" "$@" 2>&1 >/dev/null | tail -1; }
for i in $(seq "${RUNS:-9}"); do
  for side in old new; do
    bin=${!side}; rm -rf m e
    echo "merge $side $(t "$bin" merge $side-shard-0 $side-shard-1 -o m)"
    echo "export $side $(t "$bin" export $side-whole -o e)"
  done
done > times.txt
python3 - times.txt <<'PY'
import collections, statistics as st, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    op, side, wall, user, sys_ = line.split()
    d[op, side].append((float(wall), float(user) + float(sys_)))
for op in ("merge", "export"):
    o, n = d[op, "old"], d[op, "new"]
    for i, name in ((0, "wall"), (1, "cpu")):
        r = sorted(b[i] / max(a[i], 1e-3) for a, b in zip(o, n))
        print(f"{op} {name}: old {st.median(a[i] for a in o):.3f} s, new {st.median(b[i] for b in n):.3f} s,"
              f" new/old median {st.median(r):.2f} (quartiles {r[len(r)//4]:.2f}-{r[3*len(r)//4]:.2f})")
PY
