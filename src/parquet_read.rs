//! Reading values out of Arrow arrays decoded from Parquet, with one rule per kind of value,
//! shared by every Parquet reader (`import` of token ids, `convert` of text columns):
//!
//! - lists: `list` or `large_list`, any child field name (Spark writes `element`, arrow-rs
//!   `item`, Polars `large_list`);
//! - ids: `int32`, or `int64` within int32; no nulls;
//! - scores: `float`, `double`, `int32` or `int64` (Python's json reads `1` as a score too),
//!   each a finite float32 once converted; no nulls, no booleans.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;

use crate::error::RejectReason;

/// The list at row `i` of a list or large_list column; None when null or not a list.
pub fn list_at(a: &dyn Array, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::List(_) => Some(a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(a.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// Integer ids as i32 (int32, or int64 within int32; no nulls). `Err` says why not.
pub fn ids(a: &dyn Array) -> Result<Vec<i32>, String> {
    if a.null_count() > 0 {
        return Err("null id".into());
    }
    match a.data_type() {
        DataType::Int32 => Ok(a.as_primitive::<Int32Type>().values().to_vec()),
        DataType::Int64 => a
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|&v| i32::try_from(v).map_err(|_| format!("id {v} does not fit int32")))
            .collect(),
        t => Err(format!("ids must be int32 or int64, found {t}")),
    }
}

/// Scores as finite float32s (see the module docs); `Err` gives the message and the reason a
/// JSON row with the same problem would be rejected for.
pub fn scores(a: &dyn Array) -> Result<Vec<f32>, (String, RejectReason)> {
    if a.null_count() > 0 {
        return Err(("null score".into(), RejectReason::NonNumericScore));
    }
    let wide: Vec<f64> = match a.data_type() {
        DataType::Float32 => a
            .as_primitive::<Float32Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        DataType::Float64 => a.as_primitive::<Float64Type>().values().to_vec(),
        DataType::Int32 => a
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        DataType::Int64 => a
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        DataType::Boolean => {
            return Err(("booleans are not scores".into(), RejectReason::BooleanScore))
        }
        t => {
            return Err((
                format!("scores must be numbers, found {t}"),
                RejectReason::NonNumericScore,
            ))
        }
    };
    wide.into_iter()
        .map(|x| {
            let y = x as f32;
            if y.is_finite() {
                Ok(y)
            } else {
                Err((
                    format!("{x} is not a finite float32"),
                    RejectReason::NonFiniteScore,
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{BooleanArray, Float64Array, Int64Array};

    #[test]
    fn one_rule_for_scores_and_ids() {
        assert_eq!(
            scores(&Int64Array::from(vec![1, 2])).unwrap(),
            vec![1.0, 2.0]
        );
        assert_eq!(
            scores(&Float64Array::from(vec![1e300])).unwrap_err().1,
            RejectReason::NonFiniteScore
        );
        assert_eq!(
            scores(&BooleanArray::from(vec![true])).unwrap_err().1,
            RejectReason::BooleanScore
        );
        assert_eq!(
            scores(&Float64Array::from(vec![Some(1.0), None]))
                .unwrap_err()
                .1,
            RejectReason::NonNumericScore
        );
        assert_eq!(ids(&Int64Array::from(vec![5])).unwrap(), vec![5]);
        assert!(ids(&Int64Array::from(vec![1 << 40])).is_err());
    }
}
