"""Parquet interop: what rankfeed exports, pyarrow, Polars and Spark read with the documented
schema and the dataset's values; what Polars and Spark write, rankfeed imports; sharded
conversion run as Spark tasks, then merged."""

import os
import shutil
import subprocess

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rankfeed
from conftest import ROOT, run_rankfeed

SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("pq") / "ds"
    rankfeed.convert(FIXTURE, BERT, out, progress=False)
    return out


def expected_flat(ds):
    rows = []
    for i in range(len(ds)):
        g = ds.group(i)
        rows.append({
            "row": i,
            "query": g["query"].tolist(),
            "pos": [ds.passage(int(p)).tolist() for p in g["pos"]],
            "neg": [ds.passage(int(p)).tolist() for p in g["neg"]],
            "pos_scores": None if g["pos_scores"] is None else g["pos_scores"].tolist(),
            "neg_scores": None if g["neg_scores"] is None else g["neg_scores"].tolist(),
            "prompt": None if g["prompt"] is None else ds.prompt(g["prompt"]).tolist(),
            "source": g["source"],
        })
    return rows


def test_pyarrow_and_polars_read_the_flat_export(tmp_path, dataset):
    out = tmp_path / "flat"
    summary = rankfeed.export(dataset, out, rows_per_file=100)
    assert len(summary["files"]) == 2
    table = pq.read_table(out)
    element = lambda t: pa.list_(pa.field("element", t))  # noqa: E731
    assert table.schema.field("query").type == element(pa.int32())
    assert table.schema.field("pos").type == element(element(pa.int32()))
    assert table.schema.field("pos_scores").type == element(pa.float32())
    assert table.schema.field("prompt").type == element(pa.int32())
    assert table.schema.field("source").type == pa.int32() and table.schema.field("row").type == pa.int64()
    ds = rankfeed.Dataset(dataset)
    got = sorted(table.to_pylist(), key=lambda r: r["row"])
    assert got == expected_flat(ds)
    df = pl.read_parquet(out / "*.parquet")
    assert df.schema["pos"] == pl.List(pl.List(pl.Int32))
    assert df.sort("row")["query"].to_list() == [r["query"] for r in got]
    # The documented Polars analysis: passages per query, query lengths.
    stats = pl.scan_parquet(out / "*.parquet").select(
        pl.col("neg").list.len().alias("negs"), pl.col("query").list.len().alias("qlen")).collect()
    assert stats.height == len(ds)


def test_tables_export_and_polars_scan_ipc(tmp_path, dataset):
    out = tmp_path / "tables"
    rankfeed.export(dataset, out, layout="tables")
    ds = rankfeed.Dataset(dataset)
    passages = pl.read_parquet(out / "passages" / "*.parquet")
    groups = pl.read_parquet(out / "groups" / "*.parquet")
    assert passages.height == ds.num_passages and groups.height == len(ds)
    assert passages.schema == {"id": pl.Int32, "tokens": pl.List(pl.Int32)}
    for i in (0, 17, len(ds) - 1):
        assert passages["tokens"][i].to_list() == ds.passage(i).tolist()
        assert groups["neg"][i].to_list() == ds.group(i)["neg"].tolist()
    # Analysis straight on the .arrow files, as the README documents.
    lazy = pl.scan_ipc(dataset / "groups.arrow").select(pl.col("neg").list.len().mean()).collect()
    assert lazy.item() == pytest.approx(np.mean([len(ds.group(i)["neg"]) for i in range(len(ds))]))


def test_import_what_polars_writes_large_list_int64(tmp_path, dataset):
    ds = rankfeed.Dataset(dataset)
    rows = expected_flat(ds)
    df = pl.DataFrame({
        "query": [r["query"] for r in rows],
        "pos": [r["pos"] for r in rows],
        "neg": [r["neg"] for r in rows],
        "pos_scores": [r["pos_scores"] for r in rows],
    }, schema={"query": pl.List(pl.Int64), "pos": pl.List(pl.List(pl.Int64)), "neg": pl.List(pl.List(pl.Int64)),
               "pos_scores": pl.List(pl.Float64)})
    path = tmp_path / "polars.parquet"
    df.write_parquet(path)
    schema = pq.read_schema(path)
    assert schema.field("query").type == pa.large_list(pa.field("item", pa.int64())) or \
        pa.types.is_large_list(schema.field("query").type), schema
    out = tmp_path / "imported"
    # Regression (issue 11, observation 1): without metadata the tokenizer facts were lost.
    with pytest.raises(ValueError, match="tokenizer"):
        rankfeed.import_parquet(path, out)
    assert not out.exists()
    summary = rankfeed.import_parquet(path, out, tokenizer=BERT)
    assert summary["rows"] == len(ds)
    assert (out / "passages.arrow").read_bytes() == (dataset / "passages.arrow").read_bytes()
    back = rankfeed.Dataset(out)
    for i in range(0, len(ds), 7):
        a, b = ds.group(i), back.group(i)
        assert a["query"].tolist() == b["query"].tolist()
        assert [ds.passage(int(p)).tolist() for p in a["neg"]] == [back.passage(int(p)).tolist() for p in b["neg"]]
        if a["pos_scores"] is not None:
            assert a["pos_scores"].tolist() == b["pos_scores"].tolist()


def same_arrow(a, b):
    return all((a / n).read_bytes() == (b / n).read_bytes()
               for n in ("groups.arrow", "passages.arrow", "prompts.arrow"))


def same_batches(a, b):
    kw = dict(batch_size=4, group_size=4, seed=3)
    la, lb = rankfeed.Dataset(a).loader(**kw), rankfeed.Dataset(b).loader(**kw)
    return all(np.array_equal(x["input_ids"], y["input_ids"]) and
               np.array_equal(x["token_type_ids"], y["token_type_ids"]) for x, y in zip(la, lb))


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    df = pl.DataFrame({"query": [[101, 2000]], "pos": [[[7592, 999_999]]], "neg": [[[1, 2]]]})
    df.write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"row 0 field `pos`.*token id 999999 is outside"):
        rankfeed.import_parquet(tmp_path / "bad.parquet", tmp_path / "out", tokenizer=BERT)


def test_shuffled_rows_are_restored_to_row_order(tmp_path, dataset):
    # Regression (issue 11, observation 2): the `row` column was ignored.
    rankfeed.export(dataset, tmp_path / "flat")
    table = pq.read_table(tmp_path / "flat")
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.take(perm[:half]), shuffled / "part-0.parquet")
    pq.write_table(table.take(perm[half:]), shuffled / "part-1.parquet")
    rankfeed.import_parquet(shuffled, tmp_path / "back", tokenizer=BERT)
    assert same_arrow(dataset, tmp_path / "back")


def test_tables_layout_round_trip(tmp_path, dataset, rankfeed_bin):
    # Regression (issue 11, observation 3): the tables layout could not be imported.
    run_rankfeed(rankfeed_bin, "export", dataset, "-o", tmp_path / "tables", "--layout", "tables")
    run_rankfeed(rankfeed_bin, "import", tmp_path / "tables", "-o", tmp_path / "back")
    assert same_arrow(dataset, tmp_path / "back")


def test_export_import_round_trip_is_identical(tmp_path, dataset, rankfeed_bin):
    run_rankfeed(rankfeed_bin, "export", dataset, "-o", tmp_path / "flat")
    run_rankfeed(rankfeed_bin, "import", tmp_path / "flat", "-o", tmp_path / "back")
    for name in ("groups.arrow", "passages.arrow", "prompts.arrow"):
        assert (tmp_path / "back" / name).read_bytes() == (dataset / name).read_bytes(), name


# ---- Spark -------------------------------------------------------------------------------

def spark_session():
    pyspark = pytest.importorskip("pyspark", reason="pyspark is not installed")
    if shutil.which("java") is None:
        pytest.skip("no Java runtime for Spark")
    from pyspark.sql import SparkSession
    return (SparkSession.builder.master("local[2]").appName("rankfeed-tests")
            .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
            .config("spark.driver.memory", "1g").getOrCreate()), pyspark


@pytest.fixture(scope="module")
def spark():
    session, _ = spark_session()
    yield session
    session.stop()


def test_spark_reads_the_export(tmp_path, dataset, spark):
    out = tmp_path / "flat"
    rankfeed.export(dataset, out, rows_per_file=60)
    df = spark.read.parquet(str(out))
    ds = rankfeed.Dataset(dataset)
    assert df.count() == len(ds)
    types = dict(df.dtypes)
    assert types["query"] == "array<int>" and types["pos"] == "array<array<int>>"
    assert types["pos_scores"] == "array<float>" and types["row"] == "bigint"
    rows = {r["row"]: r for r in df.collect()}
    for i in (0, 5, len(ds) - 1):
        g = ds.group(i)
        assert list(rows[i]["query"]) == g["query"].tolist()
        assert [list(p) for p in rows[i]["neg"]] == [ds.passage(int(p)).tolist() for p in g["neg"]]
    total = df.selectExpr("sum(size(neg)) as n").collect()[0]["n"]
    assert total == sum(len(ds.group(i)["neg"]) for i in range(len(ds)))


def test_import_what_spark_writes(tmp_path, dataset, spark):
    from pyspark.sql.types import ArrayType, FloatType, IntegerType, LongType, StructField, StructType

    ds = rankfeed.Dataset(dataset)
    rows = expected_flat(ds)
    schema = StructType([
        StructField("query", ArrayType(IntegerType())),
        StructField("pos", ArrayType(ArrayType(LongType()))),
        StructField("neg", ArrayType(ArrayType(IntegerType()))),
        StructField("pos_scores", ArrayType(FloatType())),
        StructField("neg_scores", ArrayType(FloatType())),
    ])
    data = [(r["query"], r["pos"], r["neg"], r["pos_scores"], r["neg_scores"]) for r in rows]
    out = tmp_path / "spark-written"
    spark.createDataFrame(data, schema).coalesce(1).write.parquet(str(out))
    imported = tmp_path / "imported"
    rankfeed.import_parquet(out, imported, tokenizer=BERT)
    back = rankfeed.Dataset(imported)
    assert len(back) == len(ds)
    for i in range(0, len(ds), 5):
        assert back.group(i)["query"].tolist() == rows[i]["query"]
        assert [back.passage(int(p)).tolist() for p in back.group(i)["pos"]] == rows[i]["pos"]


def test_spark_round_trip_without_metadata_needs_the_tokenizer(tmp_path, dataset, spark, rankfeed_bin):
    # Regression (issue 11, observation 1): Spark drops the metadata; import then lost the
    # tokenizer facts silently.
    rankfeed.export(dataset, tmp_path / "flat", rows_per_file=60)
    df = spark.read.parquet(str(tmp_path / "flat")).repartition(3)
    df.write.parquet(str(tmp_path / "spark"))
    assert "rankfeed.manifest" not in (pq.read_metadata(next((tmp_path / "spark").glob("*.parquet"))).metadata or {})
    p = subprocess.run([rankfeed_bin, "import", tmp_path / "spark", "-o", tmp_path / "bad"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "--tokenizer" in p.stderr, p.stderr
    run_rankfeed(rankfeed_bin, "import", tmp_path / "spark", "-o", tmp_path / "back", "--tokenizer", BERT)
    assert same_arrow(dataset, tmp_path / "back")
    assert same_batches(dataset, tmp_path / "back")
    facts = lambda d: rankfeed.Dataset(d).manifest["tokenizer"]  # noqa: E731
    assert facts(tmp_path / "back") == facts(dataset)


def test_one_file_shards_four_ways_as_spark_tasks_and_with_the_cli(tmp_path, spark, rankfeed_bin):
    # Regression (issue 11, observation 4): one input file went whole to the last shard.
    from rankfeed.spark import convert_sharded

    whole = tmp_path / "whole"
    rankfeed.convert(FIXTURE, BERT, whole, progress=False)
    merged = tmp_path / "merged"
    convert_sharded(spark, [FIXTURE], BERT, merged, num_shards=4)
    assert same_arrow(whole, merged)
    m, w = rankfeed.Dataset(merged).manifest, rankfeed.Dataset(whole).manifest
    assert m["sources"] == w["sources"] and m["files"] == w["files"]
    shards = []
    for k in range(4):
        out = tmp_path / f"cli-{k}"
        run_rankfeed(rankfeed_bin, "convert", FIXTURE, "--tokenizer", BERT, "-o", out, "--shard", f"{k}/4")
        assert len(rankfeed.Dataset(out)) > 20
        shards.append(out)
    run_rankfeed(rankfeed_bin, "merge", *shards, "-o", tmp_path / "cli")
    assert same_arrow(whole, tmp_path / "cli")
    assert rankfeed.Dataset(tmp_path / "cli").manifest["sources"] == w["sources"]


def test_sharded_conversion_as_spark_tasks(tmp_path, spark):
    from rankfeed.spark import convert_sharded

    # Input: the fixture split into several files, as a Spark job would write them.
    src = tmp_path / "input"
    src.mkdir()
    lines = FIXTURE.read_text().splitlines()
    for k in range(6):
        (src / f"part-{k:05d}.jsonl").write_text("\n".join(lines[k * 29:(k + 1) * 29]))
    whole = tmp_path / "whole"
    rankfeed.convert(src, BERT, whole, progress=False)
    merged = tmp_path / "merged"
    counts = convert_sharded(spark, [src], BERT, merged, num_shards=4)
    assert counts["groups"] == len(lines)
    for name in ("groups.arrow", "passages.arrow", "prompts.arrow"):
        assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (tmp_path / "merged.shards").exists()


def test_convert_reads_text_parquet_as_polars_writes_it(tmp_path, dataset):
    import json
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    df = pl.DataFrame({
        "query": [r["query"] for r in rows],
        "pos": [r["pos"] for r in rows],
        "neg": [r["neg"] for r in rows],
        "pos_scores": [r.get("pos_scores") for r in rows],
        "neg_scores": [r.get("neg_scores") for r in rows],
        "prompt": [r.get("prompt") for r in rows],
        "query_prompt": [r.get("query_prompt") for r in rows],
        "passage_prompt": [r.get("passage_prompt") for r in rows],
    })
    path = tmp_path / "texts.parquet"
    df.write_parquet(path)
    out = tmp_path / "from-parquet"
    rankfeed.convert(path, BERT, out, progress=False)
    for name in ("groups.arrow", "passages.arrow", "prompts.arrow"):
        assert (out / name).read_bytes() == (dataset / name).read_bytes(), name


def test_import_says_when_the_facts_could_not_be_checked(tmp_path, dataset):
    """Without a tokenizer, carried facts are checked only against themselves: the summary
    says so; with the tokenizer, they are checked against it and nothing is said."""
    rankfeed.export(dataset, tmp_path / "flat")
    unchecked = rankfeed.import_parquet(tmp_path / "flat", tmp_path / "a")
    assert any("--tokenizer" in w for w in unchecked["warnings"]), unchecked
    checked = rankfeed.import_parquet(tmp_path / "flat", tmp_path / "b", tokenizer=BERT)
    assert checked["warnings"] == []
