"""Shared fixtures: the rankfeed binary and the real tokenizers fetched by tools/fetch_assets.sh."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = pathlib.Path(os.environ.get("RANKFEED_ASSETS", pathlib.Path.home() / ".cache/rankfeed/assets"))
TOKENIZERS = {
    "bert": ASSETS / "bert" / "tokenizer.json",
    "xlmr": ASSETS / "xlmr" / "tokenizer.json",
    "mistral": ASSETS / "mistral" / "tokenizer.json",
}


@pytest.fixture(scope="session")
def rankfeed_bin():
    path = pathlib.Path(os.environ.get("RANKFEED_BIN", ROOT / "target" / "release" / "rankfeed"))
    if not path.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "rankfeed-cli"], cwd=ROOT, check=True)
    return path


def tokenizer_path(name):
    path = TOKENIZERS[name]
    if not path.exists():
        msg = f"{path} missing: run tools/fetch_assets.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_rankfeed(bin_path, *args, check=True):
    proc = subprocess.run([str(bin_path), *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"rankfeed {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
