"""Round trip: the ids rankfeed stores equal what the Python `tokenizers` package gives for the
same formatted text (formatted here with Python's own str.format, as FlagEmbedding does), with
real BERT WordPiece and XLM-R SentencePiece tokenizers. Also: pyarrow and polars open every file."""

import pathlib

import polars as pl
import pyarrow.ipc as ipc
import pytest
from tokenizers import Tokenizer

from conftest import ROOT, read_jsonl, run_rankfeed, tokenizer_path

FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"

SETTINGS = {
    "plain": dict(),
    "instructions": dict(
        query_instruction="Represent this query for reranking: ",
        query_instruction_format="<instruct>{}\\n<query>{}",
        passage_instruction="Passage: ",
        passage_instruction_format="{}{}",
    ),
}


def reference_format(instruction, fmt, row_prompt, text):
    """FlagEmbedding: fmt.format(row.get(prompt_key) or instruction, text) when configured."""
    if instruction is None:
        return text
    fmt = fmt.replace("\\n", "\n")
    return fmt.format(row_prompt if row_prompt is not None else instruction, text)


def load_ids(path):
    return ipc.open_file(path).read_all().to_pylist()


@pytest.mark.parametrize("tok_name", ["bert", "xlmr"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_ids_equal_python_tokenizers(tmp_path, rankfeed_bin, tok_name, setting):
    tok_file = tokenizer_path(tok_name)
    s = SETTINGS[setting]
    out = tmp_path / "ds"
    args = ["convert", FIXTURE, "--tokenizer", tok_file, "-o", out]
    for key, value in s.items():
        args += ["--" + key.replace("_", "-"), value]
    run_rankfeed(rankfeed_bin, *args)

    tok = Tokenizer.from_file(str(tok_file))
    tok.no_truncation()
    tok.no_padding()

    def ids(text):
        return tok.encode(text, add_special_tokens=False).ids

    rows = read_jsonl(FIXTURE)
    groups = load_ids(out / "groups.arrow")
    passages = [r["tokens"] for r in load_ids(out / "passages.arrow")]
    prompts = [r["tokens"] for r in load_ids(out / "prompts.arrow")]
    assert len(groups) == len(rows)
    checked = 0
    distinct = set()
    for i, (row, g) in enumerate(zip(rows, groups)):
        q = reference_format(s.get("query_instruction"), s.get("query_instruction_format", "{}{}"),
                             row.get("query_prompt"), row["query"])
        assert g["query"] == ids(q), f"row {i} query {q!r}"
        for key in ("pos", "neg"):
            assert len(g[key]) == len(row[key])
            for text, pid in zip(row[key], g[key]):
                p = reference_format(s.get("passage_instruction"), s.get("passage_instruction_format", "{}{}"),
                                     row.get("passage_prompt"), text)
                assert passages[pid] == ids(p), f"row {i} {key} {p!r}"
                distinct.add(p)
                checked += 1
        if "prompt" in row:
            assert prompts[g["prompt"]] == ids(row["prompt"])
        else:
            assert g["prompt"] is None
        for key in ("pos_scores", "neg_scores"):
            if key in row:
                assert g[key] == pytest.approx(row[key], rel=1e-6)
    assert checked > 1000
    # Dedup: exactly one stored passage per distinct formatted text.
    assert len(passages) == len(distinct) < checked


def test_pyarrow_and_polars_open_every_file(tmp_path, rankfeed_bin):
    tok_file = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
    out = tmp_path / "ds"
    run_rankfeed(rankfeed_bin, "convert", ROOT / "data/sample/wordnet-nouns.jsonl.gz",
                 "--tokenizer", tok_file, "-o", out)
    files = sorted(pathlib.Path(out).glob("*.arrow"))
    assert [f.name for f in files] == ["groups.arrow", "passages.arrow", "prompts.arrow"]
    for f in files:
        with ipc.open_file(f) as reader:  # memory-mapped, zero-copy on the pyarrow side too
            table = reader.read_all()
        df = pl.read_ipc(f)
        lazy = pl.scan_ipc(f).collect()
        assert table.num_rows == df.height == lazy.height > 0
        assert df.columns == table.column_names
    groups = pl.read_ipc(out / "groups.arrow")
    assert groups.schema["query"] in (pl.List(pl.Int32),)
    passages = pl.read_ipc(out / "passages.arrow")
    # Every passage id referenced by a group exists.
    ids = groups.select(pl.concat_list("pos", "neg").alias("ids")).explode("ids")["ids"]
    assert ids.min() >= 0 and ids.max() < passages.height
