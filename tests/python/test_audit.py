"""`rankfeed audit` and `Dataset.audit` (issue 22; also the README's `rankfeed mine` lines) on text converted with real tokenizers: a crafted
file with one defect of each kind gives the known counts in encoder and LLM modes (the LLM
layouts with the default prompt conversion stores), the CLI's --json equals Python's dict, the
README's `rankfeed audit` lines run as written, and `exclude_false_negatives` keeps every false
negative out of the batches."""

import json
import re
import subprocess

import pytest

import rankfeed
from conftest import ROOT, tokenizer_path

BERT = ROOT / "data/sample/bert/tokenizer.json"
CAT, DOGS = "a cat is a small feline", "dogs bark at night"
ROWS = [
    # 0: its positive also a negative (a false negative), scored above the positive.
    {"query": "what is a cat", "pos": [CAT], "neg": [CAT, DOGS], "pos_scores": [0.9], "neg_scores": [0.95, 0.1]},
    # 1: the same query labelled the other way round: conflicting, each passage positive elsewhere.
    {"query": "what is a cat", "pos": [DOGS], "neg": [CAT]},
    # 2: no negatives; a long positive that the budget cuts.
    {"query": "rivers", "pos": ["a river flows to the sea " * 40], "neg": []},
    # 3: its only negative is its positive.
    {"query": "only a false negative", "pos": ["x y z"], "neg": ["x y z"]},
]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    src = d / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = {}
    for name, tok in [("bert", BERT), ("mistral", tokenizer_path("mistral"))]:
        rankfeed.convert([str(src)], str(tok), str(d / name))
        out[name] = d / name
    return out


def finding(count, rows):
    return {"count": count, "rows": len(rows), "examples": rows}


@pytest.mark.parametrize("tok,mode", [("bert", "encoder"), ("bert", "embedder"), ("mistral", "llm")])
def test_the_crafted_rows_give_the_known_counts(crafted, rankfeed_bin, tok, mode):
    ds = rankfeed.Dataset(str(crafted[tok]))
    a = ds.audit(mode=mode, query_max_len=16, passage_max_len=64)
    assert (a["rows"], a["passage_refs"]) == (4, 8)
    assert a["passages"] == 4  # CAT, DOGS, the river, "x y z": each stored once
    assert a["false_negatives"] == finding(2, [0, 3])
    assert a["rows_without_true_negatives"] == finding(1, [3])
    assert a["rows_without_negatives"] == finding(1, [2])
    d = a["duplicate_queries"]
    assert (d["queries"], d["rows"]) == (1, 2)
    assert d["conflicting"] == finding(1, [0, 1]) and d["repeated_rows"] == finding(0, [])
    assert a["positive_elsewhere"] == finding(2, [0, 1])
    assert a["score_inversions"] == finding(1, [0])
    s = a["sources"][0]["scores"]
    assert (s["rows_with_scores"], s["rows_missing_scores"], s["constant"]) == (1, 3, False)
    t = a["truncation"]
    assert t["passages"]["cut"] == 1 and t["passages"]["tokens_lost"] > 0  # the river only
    if mode == "embedder":
        assert t["pairs"] is None
    else:
        assert t["pairs"]["of"] == 8 and t["pairs"]["cut"] == 1
    # The CLI's --json is the same report.
    cli = subprocess.run([rankfeed_bin, "audit", crafted[tok], "--json", "--mode", mode,
                          "--query-max-len", "16", "--passage-max-len", "64"],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout) == a
    text = subprocess.run([rankfeed_bin, "audit", crafted[tok], "--mode", mode],
                          capture_output=True, text=True, check=True).stdout
    assert re.search(r"false negatives .*: 2 negatives in 2 rows \(rows 0, 3\)", text), text


def test_against_another_tokenizer_is_refused_and_itself_overlaps(crafted):
    bert, mistral = (rankfeed.Dataset(str(crafted[k])) for k in ("bert", "mistral"))
    with pytest.raises(ValueError, match="another tokenizer"):
        bert.audit(against=mistral)
    o = bert.audit(against=bert)["against"]
    assert o["queries"] == finding(3, [0, 1, 2, 3]) and o["passages"]["count"] == 4
    with pytest.raises(ValueError, match="batchsize"):
        bert.audit(batchsize=2)


def test_excluded_false_negatives_never_reach_a_batch(crafted):
    ds = rankfeed.Dataset(str(crafted["bert"]))
    with pytest.raises(ValueError, match="exclude_false_negatives"):
        ds.loader(group_size=2, exclude_false_negatives=True)
    loader = ds.loader(group_size=3, batch_size=1, exclude_false_negatives=True,
                       skip_rows_without_negatives=True, prefetch_threads=0)
    for epoch in range(5):
        loader.set_epoch(epoch)
        rows = []
        for b in loader:
            row = int(b["rows"][0])
            rows.append(row)
            negs = [ROWS[row]["neg"][j] for j in b["neg"][0]]
            assert not set(negs) & set(ROWS[row]["pos"]), (epoch, row, negs)
        assert sorted(rows) == [0, 1]  # rows 2 (no negatives) and 3 (none left) are out
    # Without the option the false negative is drawn.
    plain = ds.loader(group_size=3, batch_size=1, skip_rows_without_negatives=True, prefetch_threads=0)
    drawn = [ROWS[int(b["rows"][0])]["neg"][j] for e in range(3) for b in (plain.set_epoch(e) or plain)
             for j in b["neg"][0] if int(b["rows"][0]) == 0]
    assert CAT in drawn


def test_the_readme_audit_and_mine_lines_run(tmp_path, rankfeed_bin):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [l.split("#")[0].strip() for b in blocks for l in b.splitlines()
             if l.startswith(("rankfeed audit", "rankfeed mine", "rankfeed merge data/train-mined",
                                   "rankfeed export data/train -o data/train-tables"))]
    assert len(lines) >= 8, lines
    rankfeed.convert([str(ROOT / "tests/fixtures/roundtrip.jsonl")], str(BERT), str(tmp_path / "data/train"))
    for line in lines:
        cmd = line.replace("rankfeed ", f"{rankfeed_bin} ", 1)
        p = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, (line, p.stderr)
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["against"]["queries"]["rows"] == report["rows"]
    # The shards mined and merged are the whole run, byte for byte.
    for f in ("groups.arrow", "passages.arrow", "prompts.arrow", "manifest.json"):
        assert (tmp_path / "data/train-mined-merged" / f).read_bytes() == (tmp_path / "data/train-mined" / f).read_bytes(), f
