"""Shared by the sentence-transformers tests (run in their own environment: sentence-transformers
6 needs transformers 5, the FlagEmbedding parity tests transformers<5): tiny random-weight models
built from configs with the real tokenizers fetched by tools/fetch_assets.sh, and datasets."""

import gzip
import json
import os
import pathlib
import random

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = pathlib.Path(os.environ.get("RANKFEED_ASSETS", pathlib.Path.home() / ".cache/rankfeed/assets"))
SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"


def asset(path):
    p = ASSETS / path
    if not p.exists():
        msg = f"{p} missing: run tools/fetch_assets.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def hf_tokenizer(family):
    """The real tokenizer of `family` ("bert": MiniLM's WordPiece; "xlmr": XLM-R's
    SentencePiece) as a transformers tokenizer, and its tokenizer.json."""
    import transformers as t
    if family == "bert":
        return t.AutoTokenizer.from_pretrained(asset("bert")), asset("bert/tokenizer.json")
    path = asset("xlmr/tokenizer.json")
    tok = t.PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=512)
    return tok, path


def tiny_model_dir(family, out, seed=0):
    """A tiny random-weight BERT or XLM-R sequence classifier (1 label) with its tokenizer,
    saved under `out` (CrossEncoder(out) and SentenceTransformer(out) load it)."""
    import torch
    import transformers as t
    tok, _ = hf_tokenizer(family)
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=1)
    if family == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(vocab_size=len(tok), **common))
    else:
        model = t.XLMRobertaForSequenceClassification(t.XLMRobertaConfig(
            vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, max_position_embeddings=514, type_vocab_size=1,
            **common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def sample_rows(n=None):
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if n is None else rows[:n]


WORDS = ("tree bark river stone light heavy small large wood leaf water green red blue "
         "swamp timber gum southern northern australian european american tall short "
         "medicinal oil lumber soil alluvial moist dark compact smooth white").split()


def random_rows(seed, n, max_words=40):
    """Seeded rows whose queries and passages range from empty-ish to long, so that every case
    of pair truncation occurs (query longer, passage longer, both cut)."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))

    rows = []
    for _ in range(n):
        rows.append({"query": text(), "pos": [text() for _ in range(rng.randint(1, 2))],
                     "neg": [text() for _ in range(rng.randint(1, 6))],
                     })
        k = len(rows[-1]["pos"]), len(rows[-1]["neg"])
        rows[-1]["pos_scores"] = [round(rng.random(), 3) for _ in range(k[0])]
        rows[-1]["neg_scores"] = [round(rng.random(), 3) for _ in range(k[1])]
    return rows


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
