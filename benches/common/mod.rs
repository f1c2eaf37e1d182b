//! Synthetic datasets for the benches: random token ids written through the real writer.

use std::path::Path;

use rankfeed::sample::KeyedRng;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

/// Shape of a synthetic dataset; lengths are `min + uniform(0..spread)`.
pub struct Synthetic {
    pub groups: usize,
    pub passages: usize,
    pub passage_len: (u64, u64),
    pub query_len: (u64, u64),
    pub negatives: (u64, u64),
    pub seed: u64,
}

/// Write `spec` to `out` (replacing it), with teacher scores on every row.
pub fn write_synthetic(out: &Path, spec: &Synthetic) {
    let mut rng = KeyedRng::new(&[spec.seed]);
    let mut w = DatasetWriter::create(
        out,
        WriterOptions {
            overwrite: true,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    // BERT's facts, text settings and default prompts, as a conversion records them, so
    // that an export of this dataset imports (import refuses ids without tokenizer facts).
    let tok = rankfeed::tokenizer::TextTokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json"),
    )
    .unwrap();
    let text = rankfeed::format::TextSettings {
        sep_ids: tok.encode(rankfeed::format::DEFAULT_SEP_TOKEN).unwrap(),
        ..Default::default()
    };
    for p in [&text.default_prompt_llm, &text.default_prompt_matryoshka] {
        w.add_prompt(&tok.encode(p).unwrap()).unwrap();
    }
    let len = |rng: &mut KeyedRng, (min, spread): (u64, u64)| {
        min + if spread > 0 { rng.below(spread) } else { 0 }
    };
    let mut buf = Vec::new();
    for _ in 0..spec.passages {
        buf.clear();
        let n = len(&mut rng, spec.passage_len);
        buf.extend((0..n).map(|_| rng.below(30522) as i32));
        w.add_passage(&buf).unwrap();
    }
    let (mut q, mut neg, mut ns) = (vec![], vec![], vec![]);
    for _ in 0..spec.groups {
        q.clear();
        let n = len(&mut rng, spec.query_len);
        q.extend((0..n).map(|_| rng.below(30522) as i32));
        let pos = [rng.below(spec.passages as u64) as i32];
        neg.clear();
        let n = len(&mut rng, spec.negatives);
        neg.extend((0..n).map(|_| rng.below(spec.passages as u64) as i32));
        ns.clear();
        ns.extend(neg.iter().map(|_| rng.below(1000) as f32 / 1000.0));
        w.add_group(&GroupRecord {
            query: &q,
            pos: &pos,
            neg: &neg,
            pos_scores: Some(&[1.0]),
            neg_scores: Some(&ns),
            prompt: None,
            source: 0,
        })
        .unwrap();
    }
    w.finish(ManifestInfo {
        sources: vec![Default::default()],
        tokenizer: Some(tok.facts().clone()),
        text,
        shards: None,
    })
    .unwrap();
}
