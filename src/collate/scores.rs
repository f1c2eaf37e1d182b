//! Teacher scores of a selection.

use super::pick;
use crate::dataset::Group;
use crate::error::{Error, Result};
use crate::sample::Selection;

/// Append the teacher scores of `sel` from its `group`: by index, or with `seed` as the
/// Matryoshka seed code looks them up: by text (passages are deduplicated by text, so the
/// score of the first index in the list holding the same passage id), and 1 when the row has
/// no scores.
pub(super) fn push_scores(
    group: &Group<'_>,
    sel: &Selection,
    seed: bool,
    out: &mut Vec<f32>,
) -> Result<()> {
    let missing = |what: &str| {
        Error::argument(
            "knowledge_distillation",
            format!("row {}: needs {what}, the row has none", sel.row),
        )
    };
    let score = |list: &[i32], scores: Option<&[f32]>, i: u32, what: &str| -> Result<f32> {
        let id = pick(list, i, sel.row, what)?;
        match (scores, seed) {
            (None, true) => Ok(1.0),
            (None, false) => Err(missing(if what == "positive" {
                "pos_scores"
            } else {
                "neg_scores"
            })),
            (Some(s), false) => Ok(s[i as usize]),
            (Some(s), true) => {
                let first = list.iter().position(|&x| x == id).unwrap_or(i as usize);
                Ok(s[first])
            }
        }
    };
    out.push(score(group.pos, group.pos_scores, sel.pos, "positive")?);
    for &j in &sel.neg {
        out.push(score(group.neg, group.neg_scores, j, "negative")?);
    }
    Ok(())
}
