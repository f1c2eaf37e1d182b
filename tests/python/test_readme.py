"""The README is a contract: every ```python block in it runs, in order, in one namespace, in a
directory holding `train.jsonl` and `tokenizer.json`, for a BERT tokenizer (token_type_ids)
and an XLM-R one (none). The prelude gives the blocks what the README says the user brings:
`model` (a tiny randomly initialised cross-encoder) and `optimizer`; `spark` (local); and an S3
API server (moto's, on 127.0.0.1) holding the bucket `rankfeed-test`, reached through the
standard AWS environment variables."""

import pathlib
import re
import shutil
import textwrap

import pytest

from conftest import ROOT, tokenizer_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)


def python_blocks():
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(m.group(2)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.fixture(scope="module")
def spark():
    pyspark = pytest.importorskip("pyspark.sql")
    session = (pyspark.SparkSession.builder.master("local[2]").appName("readme")
               .config("spark.ui.enabled", "false").getOrCreate())
    yield session
    session.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from s3support import MotoServer
    server = MotoServer(str(tmp_path_factory.mktemp("moto")))
    yield server
    server.stop()


@pytest.mark.parametrize("tok", ["bert", "xlmr"])
def test_readme_python_blocks_run(tok, tmp_path, monkeypatch, spark, s3):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    tokenizer = pathlib.Path(tokenizer_path(tok)) if tok == "xlmr" else ROOT / "data/sample/bert/tokenizer.json"
    shutil.copy(ROOT / "tests/fixtures/roundtrip.jsonl", tmp_path / "train.jsonl")
    lines = (tmp_path / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train").mkdir()
    for k in range(2):  # a directory of part files, as Spark writes them
        (tmp_path / "train" / f"part-{k:05d}.jsonl").write_text("".join(lines[k::2]))
    shutil.copy(tokenizer, tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=250_002 if tok == "xlmr" else 30_522, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     num_labels=1, max_position_embeddings=512)
    model = transformers.BertForSequenceClassification(config)
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3), "spark": spark}
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    assert (tmp_path / "data/train/manifest.json").exists()
    assert (tmp_path / "out/reranker").is_dir()


def test_quickstart_shows_build_progress():
    # Regression (issue 10, observation 8): `cargo build -q` was minutes of silence.
    script = (ROOT / "tools" / "quickstart.sh").read_text()
    build = [l for l in script.splitlines() if l.strip().startswith("cargo build")]
    assert build and all(" -q" not in l and "--quiet" not in l for l in build), build
    assert "about 5 minutes" in script
