//! `import` trusts nothing it can check (issue 17): the carried `rankfeed.manifest` metadata
//! of every file must agree and pass the facts checks (field by field against `--tokenizer`
//! when one is given), `row` and `source` columns are checked, and a seeded property test
//! mutates exports (metadata fields, `row`/`source`/score/token columns) and requires every
//! import to either refuse with an input error or reproduce the source dataset exactly.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int32Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow_schema::{Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rankfeed::convert::{convert, ConvertOptions, OnError, TextOptions};
use rankfeed::export::{export, ExportOptions, Layout};
use rankfeed::import::{import, ImportReport};
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::{Dataset, Error};
use serde_json::{json, Value};

const KEY: &str = rankfeed::format::PARQUET_MANIFEST_KEY;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bert() -> TextTokenizer {
    TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap()
}

/// A tokenizer like BERT's but with XLM-R's pair template (`[CLS] A [SEP] [SEP] B [SEP]`):
/// other facts, other fingerprint, the same vocabulary.
fn other_tokenizer(dir: &Path) -> TextTokenizer {
    let d = dir.join("other-tokenizer");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(root().join("data/sample/bert").join(f), d.join(f)).unwrap();
    }
    let mut t: Value = serde_json::from_slice(
        &std::fs::read(root().join("data/sample/bert/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let pair = t["post_processor"]["pair"].as_array_mut().unwrap();
    pair.insert(3, json!({"SpecialToken": {"id": "[SEP]", "type_id": 0}}));
    std::fs::write(d.join("tokenizer.json"), t.to_string()).unwrap();
    TextTokenizer::from_file(d.join("tokenizer.json")).unwrap()
}

/// The fixture in three source files (some rows with prompts, one bad row skipped), converted.
fn make_dataset(dir: &Path, name: &str, tok: &TextTokenizer, text: TextOptions) -> Dataset {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if i % 7 == 3 {
                v["prompt"] = format!("Judge {}.", i % 3).into();
            }
            v.to_string()
        })
        .collect();
    for (k, chunk) in lines.chunks(58).enumerate() {
        let mut text = chunk.join("\n");
        if k == 0 {
            text.push_str("\n{\"query\": \"q\", \"pos\": []}");
        }
        std::fs::write(src.join(format!("part-{k}.jsonl")), text).unwrap();
    }
    let out = dir.join(name);
    let options = ConvertOptions {
        text,
        on_error: OnError::Skip,
        ..ConvertOptions::default()
    };
    convert(&[src], tok, &out, &options, &mut |_| {}).unwrap();
    Dataset::open(&out).unwrap()
}

fn export_to(ds: &Dataset, out: &Path, layout: Layout, rows_per_file: usize) -> Vec<PathBuf> {
    let options = ExportOptions {
        layout,
        rows_per_file,
        overwrite: true,
        ..ExportOptions::default()
    };
    export(ds, out, &options).unwrap().files
}

fn group_files(export: &Path) -> Vec<PathBuf> {
    let dir = if export.join("groups").is_dir() {
        export.join("groups")
    } else {
        export.to_path_buf()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
}

fn read_meta(path: &Path) -> Option<String> {
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    b.metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == KEY))
        .and_then(|k| k.value.clone())
}

fn read_batch(path: &Path) -> RecordBatch {
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let batches: Vec<RecordBatch> = b
        .with_batch_size(1 << 20)
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1, "{}: one batch", path.display());
    batches.into_iter().next().unwrap()
}

/// Write `batches` (rows in this order) to `path` with `meta` as its `rankfeed.manifest`
/// (none: no metadata), the Arrow schema's own metadata dropped.
fn write_parquet(path: &Path, batches: &[RecordBatch], meta: Option<&str>) {
    let schema = Arc::new(Schema::new(batches[0].schema().fields().clone()));
    let props = WriterProperties::builder()
        .set_key_value_metadata(meta.map(|m| vec![KeyValue::new(KEY.to_string(), m.to_string())]))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema.clone(),
        Some(props),
    )
    .unwrap();
    for b in batches {
        w.write(&RecordBatch::try_new(schema.clone(), b.columns().to_vec()).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

/// Rewrite `path` in place: its batch through `edit`, its metadata through `meta`.
fn rewrite(
    path: &Path,
    edit: impl FnOnce(RecordBatch) -> Vec<RecordBatch>,
    meta: impl FnOnce(Option<String>) -> Option<String>,
) {
    let m = meta(read_meta(path));
    let batches = edit(read_batch(path));
    write_parquet(path, &batches, m.as_deref());
}

fn set_meta(path: &Path, f: impl FnOnce(&mut Value)) {
    rewrite(
        path,
        |b| vec![b],
        |m| {
            let mut v: Value = serde_json::from_str(&m.unwrap()).unwrap();
            f(&mut v);
            Some(v.to_string())
        },
    );
}

/// `b` with column `name` replaced by `a` (nullable), or removed when `a` is None.
fn with_column(b: &RecordBatch, name: &str, a: Option<ArrayRef>) -> RecordBatch {
    let i = b.schema().index_of(name).unwrap();
    let mut fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols = b.columns().to_vec();
    match a {
        Some(a) => {
            fields[i] = Field::new(name, a.data_type().clone(), true);
            cols[i] = a;
        }
        None => {
            fields.remove(i);
            cols.remove(i);
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn int64s(b: &RecordBatch, name: &str) -> Vec<Option<i64>> {
    let c = b.column_by_name(name).unwrap();
    (0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.as_primitive::<Int64Type>().value(i)))
        .collect()
}

fn int32s(b: &RecordBatch, name: &str) -> Vec<Option<i32>> {
    let c = b.column_by_name(name).unwrap();
    (0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.as_primitive::<Int32Type>().value(i)))
        .collect()
}

fn edit_rows(b: RecordBatch, f: impl FnOnce(&mut Vec<Option<i64>>)) -> Vec<RecordBatch> {
    let mut v = int64s(&b, "row");
    f(&mut v);
    vec![with_column(&b, "row", Some(Arc::new(Int64Array::from(v))))]
}

fn edit_sources(b: RecordBatch, f: impl FnOnce(&mut Vec<Option<i32>>)) -> Vec<RecordBatch> {
    let mut v = int32s(&b, "source");
    f(&mut v);
    vec![with_column(
        &b,
        "source",
        Some(Arc::new(Int32Array::from(v))),
    )]
}

/// `b` with one more score in row `k`'s `pos_scores` than it has positives.
fn extra_score(b: RecordBatch, k: usize) -> Vec<RecordBatch> {
    let pos = b.column_by_name("pos").unwrap().as_list::<i32>().clone();
    let scores = b
        .column_by_name("pos_scores")
        .unwrap()
        .as_list::<i32>()
        .clone();
    let mut out = ListBuilder::new(Float32Builder::new());
    for i in 0..b.num_rows() {
        if i == k {
            out.values()
                .append_slice(&vec![0.5; pos.value(i).len() + 1]);
            out.append(true);
        } else if scores.is_null(i) {
            out.append_null();
        } else {
            out.values()
                .append_slice(scores.value(i).as_primitive::<Float32Type>().values());
            out.append(true);
        }
    }
    vec![with_column(&b, "pos_scores", Some(Arc::new(out.finish())))]
}

/// `b` with the first query token of row `k` set to `id`.
fn query_token(b: RecordBatch, k: usize, id: i32) -> Vec<RecordBatch> {
    let q = b.column_by_name("query").unwrap().as_list::<i32>().clone();
    let mut out = ListBuilder::new(Int32Builder::new());
    for i in 0..b.num_rows() {
        let mut t = q.value(i).as_primitive::<Int32Type>().values().to_vec();
        if i == k {
            if t.is_empty() {
                t.push(id);
            } else {
                t[0] = id;
            }
        }
        out.values().append_slice(&t);
        out.append(true);
    }
    vec![with_column(&b, "query", Some(Arc::new(out.finish())))]
}

fn run_import(
    inputs: &[PathBuf],
    out: &Path,
    tok: Option<&TextTokenizer>,
) -> rankfeed::Result<ImportReport> {
    let options = WriterOptions {
        overwrite: true,
        ..WriterOptions::default()
    };
    import(inputs, out, tok, options)
}

fn refused(inputs: &[PathBuf], out: &Path, tok: Option<&TextTokenizer>) -> Error {
    match run_import(inputs, out, tok) {
        Ok(r) => panic!("imported {} rows: should have been refused", r.rows),
        Err(e) => e,
    }
}

fn input_error(e: &Error) -> (PathBuf, Option<u64>, String) {
    match e {
        Error::Input {
            path, row, field, ..
        } => (path.clone(), *row, field.clone().unwrap_or_default()),
        e => panic!("expected an input error, got {e:?}"),
    }
}

/// Everything a batch depends on, decoded: per group its query, passages' tokens, scores,
/// prompt tokens and source; the default prompts; the tokenizer facts and separator ids.
#[derive(Debug, PartialEq)]
struct Decoded {
    groups: Vec<DecodedGroup>,
    default_prompts: Vec<Vec<i32>>,
    facts: Option<rankfeed::format::TokenizerFacts>,
    sep_ids: Vec<i32>,
}

type Tokens = Vec<i32>;

#[derive(Debug, PartialEq)]
struct DecodedGroup {
    query: Tokens,
    pos: Vec<Tokens>,
    neg: Vec<Tokens>,
    scores: (Option<Vec<f32>>, Option<Vec<f32>>),
    prompt: Option<Tokens>,
    source: u32,
}

fn decode(ds: &Dataset) -> Decoded {
    let passages = |ids: &[i32]| -> Vec<Tokens> {
        ids.iter()
            .map(|&id| ds.referenced_passage(id).unwrap().to_vec())
            .collect()
    };
    Decoded {
        groups: (0..ds.len())
            .map(|r| {
                let g = ds.group(r).unwrap();
                DecodedGroup {
                    query: g.query.to_vec(),
                    pos: passages(g.pos),
                    neg: passages(g.neg),
                    scores: (
                        g.pos_scores.map(<[f32]>::to_vec),
                        g.neg_scores.map(<[f32]>::to_vec),
                    ),
                    prompt: g.prompt.map(|p| ds.prompt_tokens(p).unwrap().to_vec()),
                    source: g.source,
                }
            })
            .collect(),
        default_prompts: (0..2)
            .map(|p| ds.prompt_tokens(p).unwrap().to_vec())
            .collect(),
        facts: ds.manifest().tokenizer.clone(),
        sep_ids: ds.manifest().text.sep_ids.clone(),
    }
}

/// Finding 3: only the first file's metadata was read, so exports of two tokenizers (BERT,
/// and XLM-R's template) imported together, interleaved by their equal `row` numbers.
#[test]
fn import_refuses_files_with_different_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let other = other_tokenizer(d);
    let a = make_dataset(d, "bert", &bert(), TextOptions::default());
    let b = make_dataset(d, "other", &other, TextOptions::default());
    let fa = export_to(&a, &d.join("a.parquet"), Layout::Flat, 1_000_000);
    let fb = export_to(&b, &d.join("b.parquet"), Layout::Flat, 1_000_000);
    let inputs = [fa[0].clone(), fb[0].clone()];
    for tok in [None, Some(&other), Some(&bert())] {
        let e = refused(&inputs, &d.join("out"), tok);
        let (path, _, field) = input_error(&e);
        assert_eq!(path, fb[0], "{e}");
        assert_eq!(field, format!("{KEY}.tokenizer.fingerprint"), "{e}");
        assert!(
            e.to_string().contains(&fa[0].display().to_string()),
            "names both files: {e}"
        );
    }
}

/// Finding 3: a second file with other text settings was accepted too.
#[test]
fn import_refuses_files_with_different_text_settings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = make_dataset(d, "plain", &bert(), TextOptions::default());
    let q = TextOptions {
        query_instruction: Some("Q: ".into()),
        ..TextOptions::default()
    };
    let b = make_dataset(d, "instructed", &bert(), q);
    let fa = export_to(&a, &d.join("a.parquet"), Layout::Flat, 1_000_000);
    let fb = export_to(&b, &d.join("b.parquet"), Layout::Flat, 1_000_000);
    let e = refused(
        &[fa[0].clone(), fb[0].clone()],
        &d.join("out"),
        Some(&bert()),
    );
    let (path, _, field) = input_error(&e);
    assert_eq!(path, fb[0]);
    assert_eq!(field, format!("{KEY}.text.query_instruction"), "{e}");
    assert!(e.to_string().contains("\"Q: \""), "{e}");
}

/// Finding 3: a file with metadata beside one without is refused (the one without cannot be
/// checked against the other), whichever comes first and with or without `--tokenizer`.
#[test]
fn import_refuses_files_with_and_without_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let files = export_to(&ds, &d.join("flat"), Layout::Flat, 60);
    rewrite(&files[1], |b| vec![b], |_| None);
    for tok in [None, Some(&bert())] {
        let e = refused(&files, &d.join("out"), tok);
        let (path, _, field) = input_error(&e);
        assert_eq!((path, field.as_str()), (files[1].clone(), KEY), "{e}");
        let mut reversed = files.clone();
        reversed.reverse();
        let e = refused(&reversed, &d.join("out"), tok);
        assert!(
            e.to_string().contains(&files[0].display().to_string())
                || e.to_string().contains(&files[2].display().to_string()),
            "{e}"
        );
    }
    // All without metadata, with the tokenizer: accepted, the same dataset.
    for f in &files {
        rewrite(f, |b| vec![b], |_| None);
    }
    run_import(&files, &d.join("out"), Some(&bert())).unwrap();
    assert_eq!(decode(&Dataset::open(d.join("out")).unwrap()), decode(&ds));
}

/// A change of the metadata JSON.
type Forge = fn(&mut Value);
/// A change of a file's `row` values.
type RowEdit = fn(&mut Vec<Option<i64>>);

/// Finding 4: with `--tokenizer` only the fingerprint was compared: BERT's fingerprint with a
/// pair template starting with 103 ([MASK]) imported, and every batch started with 103.
#[test]
fn import_checks_carried_facts_against_the_tokenizer_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let forgeries: [(&str, Forge); 5] = [
        ("pair_template[0].special.ids[0]", |v| {
            v["tokenizer"]["pair_template"][0]["special"]["ids"][0] = 103.into()
        }),
        ("vocab_size", |v| {
            v["tokenizer"]["vocab_size"] = 2147483647u32.into()
        }),
        ("pad_id", |v| v["tokenizer"]["pad_id"] = 100.into()),
        ("has_token_type_ids", |v| {
            v["tokenizer"]["has_token_type_ids"] = false.into()
        }),
        ("padding_side", |v| {
            v["tokenizer"]["padding_side"] = "left".into()
        }),
    ];
    for (field, forge) in forgeries {
        let files = export_to(&ds, &d.join("flat"), Layout::Flat, 1_000_000);
        set_meta(&files[0], forge);
        let e = refused(&files, &d.join("out"), Some(&bert()));
        assert!(
            matches!(
                e,
                Error::Argument {
                    name: "tokenizer",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains(&format!("`{field}`")),
            "{field}: {e}"
        );
        if field.starts_with("pair") {
            // Without the tokenizer, a consistent forgery cannot be told from the real
            // facts: accepted, with a warning saying so.
            let r = run_import(&files, &d.join("out"), None).unwrap();
            assert!(
                r.warnings.iter().any(|w| w.contains("--tokenizer")),
                "{:?}",
                r.warnings
            );
        }
    }
    // Notes only say where a fact was read: they may differ.
    let files = export_to(&ds, &d.join("flat"), Layout::Flat, 1_000_000);
    set_meta(&files[0], |v| {
        v["tokenizer"]["notes"] = json!(["elsewhere"])
    });
    let r = run_import(&files, &d.join("out"), Some(&bert())).unwrap();
    assert!(r.warnings.is_empty());
    assert_eq!(r.manifest.tokenizer.as_ref(), Some(bert().facts()));
}

/// Findings 4 and 8: the facts check never ran on import, so out-of-vocabulary template, pad,
/// separator and default-prompt ids were published and served, and a pair template without
/// its second sequence passed until the loader failed.
#[test]
fn import_runs_the_facts_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let forgeries: [(&str, Forge); 6] = [
        ("tokenizer", |v| {
            v["tokenizer"]["pair_template"][0]["special"]["ids"][0] = 999999.into()
        }),
        ("tokenizer", |v| v["tokenizer"]["pad_id"] = 999999.into()),
        ("tokenizer", |v| {
            v["tokenizer"]["pair_template"]
                .as_array_mut()
                .unwrap()
                .remove(3);
        }),
        ("tokenizer", |v| v["tokenizer"]["pair_template"] = json!([])),
        ("text.sep_ids", |v| v["text"]["sep_ids"] = json!([999999])),
        ("default_prompts[1]", |v| {
            v["default_prompts"][1][0] = 999999.into()
        }),
    ];
    for (i, (field, forge)) in forgeries.into_iter().enumerate() {
        let files = export_to(&ds, &d.join("flat"), Layout::Flat, 1_000_000);
        set_meta(&files[0], forge);
        let e = refused(&files, &d.join("out"), None);
        let (path, _, f) = input_error(&e);
        assert_eq!(path, files[0]);
        assert_eq!(f, format!("{KEY}.{field}"), "forgery {i}: {e}");
        assert!(!d.join("out").exists());
    }
}

/// Finding 5: metadata without `default_prompts` shifted every prompt id (rows without a
/// prompt got another row's). Now: rebuilt from the tokenizer, or refused; and exactly two.
#[test]
fn import_without_default_prompts_rebuilds_them_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    for layout in [Layout::Flat, Layout::Tables] {
        let out = d.join(format!("{layout:?}"));
        export_to(&ds, &out, layout, 1_000_000);
        let all: Vec<PathBuf> = walk(&out);
        for f in &all {
            set_meta(f, |v| {
                v.as_object_mut().unwrap().remove("default_prompts");
            });
        }
        let e = refused(std::slice::from_ref(&out), &d.join("back"), None);
        assert_eq!(input_error(&e).2, format!("{KEY}.default_prompts"), "{e}");
        run_import(std::slice::from_ref(&out), &d.join("back"), Some(&bert())).unwrap();
        let back = Dataset::open(d.join("back")).unwrap();
        assert_eq!(
            decode(&back),
            decode(&ds),
            "{layout:?}: prompts rebuilt, not shifted"
        );
        for n in [1, 3] {
            for f in &all {
                set_meta(f, |v| {
                    v["default_prompts"] = json!(vec![vec![1996]; n]);
                });
            }
            for tok in [None, Some(&bert())] {
                let e = refused(std::slice::from_ref(&out), &d.join("back"), tok);
                assert!(e.to_string().contains(&format!("{n} prompts")), "{e}");
            }
        }
    }
}

/// Every Parquet file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|e| e == "parquet") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The tables layout's `prompts/` rows 0 and 1 must be the default prompts the metadata (or
/// the tokenizer) gives: consistently forged default prompts are caught there.
#[test]
fn import_tables_default_prompt_rows_must_match_the_default_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let out = d.join("tables");
    export_to(&ds, &out, Layout::Tables, 1_000_000);
    for f in walk(&out) {
        set_meta(&f, |v| v["default_prompts"][0][0] = 1996.into());
    }
    let e = refused(std::slice::from_ref(&out), &d.join("back"), None);
    let (path, _, field) = input_error(&e);
    assert!(path.starts_with(out.join("prompts")), "{e}");
    assert_eq!(field, "tokens", "{e}");
}

/// Finding 6: a `row` column in only some files was ignored (or reordered some rows).
#[test]
fn import_requires_row_in_every_file_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let files = export_to(&ds, &d.join("flat"), Layout::Flat, 60);
    rewrite(&files[1], |b| vec![with_column(&b, "row", None)], |m| m);
    let e = refused(&files, &d.join("out"), None);
    let (path, row, field) = input_error(&e);
    assert_eq!(
        (path, row, field.as_str()),
        (files[1].clone(), None, "row"),
        "{e}"
    );
    // In none: file order.
    for f in [&files[0], &files[2]] {
        rewrite(f, |b| vec![with_column(&b, "row", None)], |m| m);
    }
    run_import(&files, &d.join("out"), None).unwrap();
    assert_eq!(decode(&Dataset::open(d.join("out")).unwrap()), decode(&ds));
}

/// Finding 6: duplicate, null and negative `row` values were accepted (duplicates
/// interleaved two datasets). Errors name the file, the row in it, and `row`.
#[test]
fn import_refuses_duplicate_null_and_negative_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let export = d.join("flat");
    let cases: [(&str, usize, RowEdit); 5] = [
        ("repeats", 2, |v| v[7] = Some(3)),
        ("repeats", 1, |v| v[9] = v[4]),
        ("repeats", 0, |v| {
            v.swap(0, 1);
            v[2] = v[0];
        }),
        ("null", 1, |v| v[5] = None),
        ("negative", 2, |v| v[6] = Some(-4)),
    ];
    for (what, file, edit) in cases {
        let files = export_to(&ds, &export, Layout::Flat, 60);
        rewrite(&files[file], |b| edit_rows(b, edit), |m| m);
        let e = refused(&files, &d.join("out"), None);
        let (path, row, field) = input_error(&e);
        assert_eq!(path, files[file], "{e}");
        assert_eq!(field, "row", "{e}");
        assert!(row.is_some(), "names the row: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // Shuffled rows and files, each row once: restored to row order.
    let files = export_to(&ds, &export, Layout::Flat, 60);
    rewrite(
        &files[0],
        |b| (0..b.num_rows()).rev().map(|i| b.slice(i, 1)).collect(),
        |m| m,
    );
    let mut reversed = files.clone();
    reversed.reverse();
    run_import(&reversed, &d.join("out"), None).unwrap();
    assert_eq!(decode(&Dataset::open(d.join("out")).unwrap()), decode(&ds));
}

/// Finding 7a: `source` = 2^31-1 allocated 32 GiB (`per_source.resize(source + 1)`). Values
/// are bounded by the carried sources list, or numbered densely without one.
#[test]
fn import_bounds_source_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    assert_eq!(ds.manifest().sources.len(), 3);
    let export = d.join("flat");
    // Cheap values first: the commit before the fix allocated per value (i32::MAX: 32 GiB).
    for bad in [100_000, i32::MAX, -1] {
        let files = export_to(&ds, &export, Layout::Flat, 60);
        rewrite(
            &files[2],
            |b| edit_sources(b, |v| *v.last_mut().unwrap() = Some(bad)),
            |m| m,
        );
        let e = refused(&files, &d.join("out"), None);
        let (path, row, field) = input_error(&e);
        assert_eq!((path, field.as_str()), (files[2].clone(), "source"), "{e}");
        assert_eq!(
            row,
            Some(read_batch(&files[2]).num_rows() as u64 - 1),
            "{e}"
        );
    }
    // Without a sources list: numbered in order of first appearance, whatever the values.
    let files = export_to(&ds, &export, Layout::Flat, 60);
    let values = [7, 1_000_000, i32::MAX];
    for f in &files {
        rewrite(
            f,
            |b| {
                edit_sources(b, |v| {
                    v.iter_mut()
                        .for_each(|s| *s = s.map(|s| values[s as usize]))
                })
            },
            |_| None,
        );
    }
    let r = run_import(&files, &d.join("out"), Some(&bert())).unwrap();
    let sources = &r.manifest.sources;
    assert_eq!(sources.len(), 3);
    for (i, s) in sources.iter().enumerate() {
        assert_eq!(s.rows_accepted, ds.manifest().sources[i].rows_accepted);
        assert!(
            s.path.ends_with(&format!("(source {})", values[i])),
            "{}",
            s.path
        );
    }
    assert_eq!(decode(&Dataset::open(d.join("out")).unwrap()), decode(&ds));
    // A source coming back after another is refused.
    rewrite(
        &files[2],
        |b| edit_sources(b, |v| *v.last_mut().unwrap() = Some(7)),
        |m| m,
    );
    let e = refused(&files, &d.join("out"), Some(&bert()));
    assert!(e.to_string().contains("grouped by source"), "{e}");
}

/// Finding 8: a score list longer than its passage list was an "internal error (a bug in
/// rankfeed)" without file or row.
#[test]
fn import_score_length_mismatch_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    let files = export_to(&ds, &d.join("flat"), Layout::Flat, 60);
    rewrite(&files[1], |b| extra_score(b, 11), |m| m);
    let e = refused(&files, &d.join("out"), None);
    let (path, row, field) = input_error(&e);
    assert_eq!(
        (path, row, field.as_str()),
        (files[1].clone(), Some(11), "pos_scores"),
        "{e}"
    );
    assert!(e.to_string().contains("score_length_mismatch"), "{e}");
}

/// Finding 10: importing a subset of an export kept the carried `rows_read`, so
/// `rows_read != rows_accepted + rows_rejected`. Counts now describe the import, and every
/// carried source is listed.
#[test]
fn import_of_a_subset_counts_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    assert_eq!(ds.manifest().sources[0].rows_rejected, 1);
    let files = export_to(&ds, &d.join("flat"), Layout::Flat, 60);
    for subset in [&files[..1], &files[1..2], &files[..]] {
        let r = run_import(subset, &d.join("out"), None).unwrap();
        let rows: u64 = subset.iter().map(|f| read_batch(f).num_rows() as u64).sum();
        assert_eq!(r.rows, rows);
        let sources = &r.manifest.sources;
        assert_eq!(sources.len(), 3, "every carried source listed");
        for (s, carried) in sources.iter().zip(&ds.manifest().sources) {
            assert_eq!(s.rows_read, s.rows_accepted + s.rows_rejected, "{s:?}");
            assert_eq!(
                (s.path.as_str(), s.bytes),
                (carried.path.as_str(), carried.bytes)
            );
        }
        assert_eq!(sources.iter().map(|s| s.rows_accepted).sum::<u64>(), rows);
        Dataset::open(d.join("out")).unwrap().validate().unwrap();
    }
}

/// Finding 10: a metadata `format_version` of 99 was accepted.
#[test]
fn import_refuses_unsupported_format_versions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = make_dataset(d, "ds", &bert(), TextOptions::default());
    for version in [json!(99), json!(1), Value::Null] {
        let files = export_to(&ds, &d.join("flat"), Layout::Flat, 1_000_000);
        set_meta(&files[0], |v| match &version {
            Value::Null => {
                v.as_object_mut().unwrap().remove("format_version");
            }
            n => v["format_version"] = n.clone(),
        });
        let e = refused(&files, &d.join("out"), Some(&bert()));
        match (&version, &e) {
            (Value::Null, e) => assert_eq!(input_error(e).2, format!("{KEY}.format_version")),
            (
                _,
                Error::UnsupportedVersion {
                    found, supported, ..
                },
            ) => {
                assert_eq!(
                    (*found as u64, *supported),
                    (
                        version.as_u64().unwrap(),
                        rankfeed::format::SUPPORTED_VERSIONS
                    )
                );
                assert!(e.to_string().contains("[2]"), "{e}");
            }
            (_, e) => panic!("{e:?}"),
        }
    }
}

// ---- the property: mutated exports are refused or imported exactly -----------------------

/// A place in a JSON value.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                prefix.push(Seg::Key(k.clone()));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(Seg::Index(i));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Index(i) => &mut v[*i],
    })
}

/// One random change of the metadata JSON; returns the new text (None: strip it) and what
/// was done.
fn mutate_meta(json: &str, rng: &mut KeyedRng) -> (Option<String>, String) {
    let mut v: Value = serde_json::from_str(json).unwrap();
    let sections = [
        "format_version",
        "tokenizer",
        "text",
        "default_prompts",
        "sources",
    ];
    match rng.below(12) {
        0 => return (None, "strip".into()),
        1 => return (Some(json[..json.len() / 2].into()), "truncated JSON".into()),
        2 => {
            return (
                Some(serde_json::to_string_pretty(&v).unwrap()),
                "re-serialized".into(),
            )
        }
        _ => {}
    }
    let section = sections[rng.below(sections.len() as u64) as usize];
    let mut all = vec![vec![Seg::Key(section.into())]];
    paths(&v[section], &mut vec![Seg::Key(section.into())], &mut all);
    let path = all[rng.below(all.len() as u64) as usize].clone();
    let weird = [
        json!(null),
        json!(0),
        json!(-1),
        json!(1),
        json!(101),
        json!(103),
        json!(30521),
        json!(30522),
        json!(999999),
        json!(2147483647u32),
        json!("x"),
        json!(""),
        json!(true),
        json!([]),
        json!({}),
    ];
    let what = match rng.below(4) {
        0 => {
            let (parent, last) = path.split_at(path.len() - 1);
            match (&last[0], node(&mut v, parent)) {
                (Seg::Key(k), Value::Object(o)) => {
                    o.remove(k);
                }
                (Seg::Index(i), Value::Array(a)) => {
                    a.remove(*i);
                }
                _ => unreachable!(),
            }
            "removed"
        }
        1 => {
            *node(&mut v, &path) = weird[rng.below(weird.len() as u64) as usize].clone();
            "replaced"
        }
        _ => {
            let n = node(&mut v, &path);
            match n {
                Value::Number(x) => {
                    let x = x.as_i64().unwrap_or(0);
                    *n = json!(if rng.below(2) == 0 { x + 1 } else { x - 1 });
                }
                Value::String(s) => s.push('x'),
                Value::Bool(b) => *b = !*b,
                Value::Array(a) => match a.last().cloned() {
                    Some(last) if rng.below(2) == 0 => a.push(last),
                    _ => a.clear(),
                },
                Value::Object(o) => {
                    o.insert("extra".into(), json!(1));
                }
                Value::Null => *n = json!(0),
            }
            "changed"
        }
    };
    let at: Vec<String> = path
        .iter()
        .map(|s| match s {
            Seg::Key(k) => k.clone(),
            Seg::Index(i) => format!("[{i}]"),
        })
        .collect();
    (Some(v.to_string()), format!("{what} {}", at.join(".")))
}

#[derive(Default)]
struct Tally {
    cases: u64,
    flat: u64,
    refused: std::collections::BTreeMap<&'static str, u64>,
    identical: u64,
    expected_refusals: u64,
    expected_imports: u64,
}

/// The property: an export whose carried metadata (one field of one file, or of all files
/// with `--tokenizer`), `row`, `source`, score or token columns were mutated either fails to
/// import with an input, argument, version or corruption error, or imports into exactly the
/// groups, passages, prompts, default prompts, tokenizer facts and separator ids of the
/// source dataset: 0 laundered. Mutations the rules refuse (a metadata change in one file
/// among several, an out-of-range source, a repeated or negative row, a column in some files
/// only, a score list of the wrong length, an id outside the vocabulary) must be refused;
/// harmless ones (rows shuffled within a file, files in another order) must import.
/// Text strings other than `sep_ids` are not compared: ids bake them in.
#[test]
fn mutated_exports_are_refused_or_imported_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = bert();
    let ds = make_dataset(d, "ds", &tok, TextOptions::default());
    let original = decode(&ds);
    let exports = [Layout::Flat, Layout::Tables].map(|layout| {
        let out = d.join(format!("{layout:?}"));
        export_to(&ds, &out, layout, 60);
        (layout, out)
    });
    let cases = 500 * support::long();
    let mut t = Tally::default();
    let start = std::time::Instant::now();
    for case in 0..cases {
        let mut rng = KeyedRng::new(&[17, case]);
        let (layout, export) = &exports[rng.below(2) as usize];
        let case_dir = d.join(format!("case-{case}"));
        copy_tree(export, &case_dir);
        let all = walk(&case_dir);
        let groups = group_files(&case_dir);
        let mut inputs = vec![case_dir.clone()];
        let mut log = Vec::new();
        let mut must_refuse = false;
        let mut harmless = true;
        let mut use_tok = rng.below(2) == 0;
        let mut sources_kept = true;
        if rng.below(4) != 0 {
            let json = read_meta(&all[0]).unwrap();
            let (mutated, what) = mutate_meta(&json, &mut rng);
            let changed = match &mutated {
                None => true,
                Some(m) => {
                    serde_json::from_str::<Value>(m).ok() != serde_json::from_str(&json).ok()
                }
            };
            sources_kept = !what.contains("sources") && !what.contains("strip");
            harmless &= !changed;
            if rng.below(2) == 0 {
                let f = &all[rng.below(all.len() as u64) as usize];
                rewrite(f, |b| vec![b], |_| mutated.clone());
                must_refuse |= changed;
                log.push(format!("{what} in {}", f.display()));
            } else {
                // All files alike: only the tokenizer can tell.
                use_tok = true;
                for f in &all {
                    rewrite(f, |b| vec![b], |_| mutated.clone());
                }
                log.push(format!("{what} in every file"));
            }
        }
        if rng.below(2) == 0 {
            let k = rng.below(groups.len() as u64) as usize;
            let f = &groups[k];
            let n = read_batch(f).num_rows();
            let i = rng.below(n as u64) as usize;
            let kinds = if sources_kept { 11 } else { 8 };
            let kind = rng.below(kinds);
            let invalid = match kind {
                0 => {
                    let j = (i + 1 + rng.below(n as u64 - 1) as usize) % n;
                    rewrite(f, |b| edit_rows(b, |v| v[i] = v[j]), |m| m);
                    "row repeated"
                }
                1 => {
                    rewrite(f, |b| edit_rows(b, |v| v[i] = Some(-1 - i as i64)), |m| m);
                    "row negative"
                }
                2 => {
                    rewrite(f, |b| edit_rows(b, |v| v[i] = None), |m| m);
                    "row null"
                }
                3 if groups.len() > 1 => {
                    rewrite(f, |b| vec![with_column(&b, "row", None)], |m| m);
                    "row column dropped"
                }
                4 => {
                    rewrite(f, |b| extra_score(b, i), |m| m);
                    "score list too long"
                }
                5 => {
                    let id = [30522, 999_999, -1][rng.below(3) as usize];
                    rewrite(f, |b| query_token(b, i, id), |m| m);
                    "token outside the vocabulary"
                }
                6 => {
                    let mut order: Vec<usize> = (0..n).collect();
                    for a in (1..n).rev() {
                        order.swap(a, rng.below(a as u64 + 1) as usize);
                    }
                    rewrite(f, |b| order.iter().map(|&r| b.slice(r, 1)).collect(), |m| m);
                    log.push(format!("rows of {} shuffled", f.display()));
                    ""
                }
                7 if *layout == Layout::Flat => {
                    inputs = groups.iter().rev().cloned().collect();
                    log.push("files in reverse order".into());
                    ""
                }
                8 => {
                    let bad = [Some(-1), None, Some(i32::MAX), Some(1_000_000)];
                    let s = bad[rng.below(4) as usize];
                    rewrite(f, |b| edit_sources(b, |v| v[i] = s), |m| m);
                    "source out of range"
                }
                9 if groups.len() > 1 => {
                    rewrite(f, |b| vec![with_column(&b, "source", None)], |m| m);
                    "source column dropped"
                }
                _ => "",
            };
            if !invalid.is_empty() {
                log.push(format!("{invalid} in {} row {i}", f.display()));
                must_refuse = true;
                harmless = false;
            }
        }
        let out = case_dir.join("out");
        let result = run_import(&inputs, &out, use_tok.then_some(&tok));
        let context = format!("case {case} ({layout:?}, tokenizer: {use_tok}): {log:?}");
        t.cases += 1;
        t.flat += u64::from(*layout == Layout::Flat);
        t.expected_refusals += u64::from(must_refuse);
        t.expected_imports += u64::from(harmless);
        match result {
            Err(e) => {
                let kind = match e {
                    Error::Input { .. } => "input",
                    Error::Argument { .. } => "argument",
                    Error::UnsupportedVersion { .. } => "version",
                    Error::Corrupt { .. } => "corrupt",
                    e => panic!("{context}: refused with an unexpected kind of error: {e:?}"),
                };
                assert!(!harmless, "{context}: a harmless change was refused: {e}");
                *t.refused.entry(kind).or_default() += 1;
            }
            Ok(_) => {
                assert!(
                    !must_refuse,
                    "{context}: imported, but should have been refused"
                );
                let back = Dataset::open(&out).unwrap_or_else(|e| panic!("{context}: {e}"));
                back.validate().unwrap_or_else(|e| panic!("{context}: {e}"));
                assert!(
                    decode(&back) == original,
                    "{context}: laundered (imported, but not the source dataset)"
                );
                t.identical += 1;
            }
        }
        std::fs::remove_dir_all(&case_dir).unwrap();
    }
    let refused: u64 = t.refused.values().sum();
    println!(
        "import trust: {} mutated exports ({} flat, {} tables) in {:.1} s: {refused} refused {:?} \
         ({} had to be), {} imported identical ({} had to), 0 laundered",
        t.cases,
        t.flat,
        t.cases - t.flat,
        start.elapsed().as_secs_f64(),
        t.refused,
        t.expected_refusals,
        t.identical,
        t.expected_imports,
    );
    assert!(
        refused > t.cases / 4 && t.identical > t.cases / 10,
        "both outcomes occur"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}
