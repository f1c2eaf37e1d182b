"""The README's "With sentence-transformers" blocks (```python st) run, in order, in one
namespace, from a directory holding the bundled sample; the prelude gives them what the README
says the user brings: `model_path`, a model directory (a tiny random-weight BERT here)."""

import re

from conftest import ROOT, tiny_model_dir

BLOCK = re.compile(r"^( *)```python st\n(.*?)^\1```", re.M | re.S)


def test_readme_sentence_transformers_blocks_run(tmp_path, monkeypatch):
    blocks = [b for _, b in BLOCK.findall((ROOT / "README.md").read_text())]
    assert len(blocks) >= 2
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(ROOT / "data" / "sample")
    monkeypatch.chdir(tmp_path)
    ns = {"model_path": tiny_model_dir("bert", tmp_path / "model")}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python st block {i}", "exec"), ns)
    assert (tmp_path / "out" / "ce" / "checkpoint-20" / "rankfeed_state.json").exists()
