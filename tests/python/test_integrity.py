"""Integrity from Python: corrupt data is always CorruptDatasetError; hostile inputs end with a
clear error within seconds in bounded memory (figures printed by tools/bounded_inputs.py)."""

import json
import shutil
import struct
import sys

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import rankfeed
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bounded_inputs  # noqa: E402

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
ROW = '{"query": "q", "pos": ["a cat"], "neg": ["a dog"]}'


def test_hostile_inputs_end_quickly_in_bounded_memory(rankfeed_bin, capsys):
    results = bounded_inputs.run_all(rankfeed_bin)
    with capsys.disabled():
        print()
        for r in results:
            print(f"  {r['name']:<28} exit {r['code']!s:>7} {r['seconds']:6.2f} s "
                  f"max RSS {r['max_rss_mb']:7.1f} MB")
    for r in results:
        assert r["code"] != "timeout", r["name"]
        assert r["seconds"] < 10, r
        assert r["max_rss_mb"] < 512, r
        assert r["expect"] in r["output"], (r["name"], r["output"])


def pos_value_offset(path):
    """File offset of the first value of groups.arrow's `pos` column (read zero-copy)."""
    with pa.memory_map(str(path)) as mm:
        base = mm.read_buffer().address
        mm.seek(0)
        values = ipc.open_file(mm).get_batch(0).column("pos").values
        return values.buffers()[1].address - base + values.offset * 4


def test_a_corrupt_passage_id_is_corrupt_dataset_error(tmp_path):
    # Regression (issue 9): a passage id out of range raised IndexError.
    ds_dir = tmp_path / "ds"
    rankfeed.convert(FIXTURE, BERT, ds_dir, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(ds_dir, bad)
    groups = bytearray((bad / "groups.arrow").read_bytes())
    at = pos_value_offset(bad / "groups.arrow")
    groups[at:at + 4] = struct.pack("<i", 2**31 - 1)
    (bad / "groups.arrow").write_bytes(bytes(groups))
    ds = rankfeed.Dataset(bad)  # same size: open's O(1) checks pass
    loader = ds.loader(group_size=2)
    with pytest.raises(rankfeed.CorruptDatasetError, match="passage id 2147483647"):
        loader.collate([(0, 0, [0])])
    with pytest.raises(rankfeed.CorruptDatasetError, match="groups.arrow"):
        ds.validate()


def test_bom_and_non_ascii_rows_are_rejected_not_internal_errors(tmp_path):
    # Regression (issue 9, observation 1): `RuntimeError: rankfeed internal error`.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\ufeff" + ROW + '\n{"query": café}\n{\u201cquery\u201d: 1}\n', encoding="utf-8")
    summary = rankfeed.convert(rows, BERT, tmp_path / "out", on_error="skip", progress=False)
    source = summary["sources"][0]
    assert (source["rows_accepted"], source["rows_rejected"]) == (1, 2)
    rejects = [json.loads(l) for l in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "invalid_json"), (3, "invalid_json")]
    with pytest.raises(ValueError, match=r"rows.jsonl:2.*invalid_json"):
        rankfeed.convert(rows, BERT, tmp_path / "out2", progress=False)


def test_existing_output_is_file_exists_error(tmp_path):
    rankfeed.convert(FIXTURE, BERT, tmp_path / "ds", progress=False)
    with pytest.raises(FileExistsError):
        rankfeed.convert(FIXTURE, BERT, tmp_path / "ds", progress=False)
