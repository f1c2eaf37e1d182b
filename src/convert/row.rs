//! One input row: JSON bytes -> a checked [`InputRow`], or a [`RowError`] saying why not.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{InputPosition, RejectReason, RowError};

/// The fields rankfeed reads; everything else is counted as unknown and ignored.
pub const KNOWN_FIELDS: [&str; 9] = [
    "query",
    "pos",
    "neg",
    "pos_scores",
    "neg_scores",
    "prompt",
    "query_prompt",
    "passage_prompt",
    "batch_size",
];

/// A checked input row; texts borrow from the input line where JSON escapes allow.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow<'a> {
    /// The query text.
    pub query: Cow<'a, str>,
    /// Positive passages (non-empty).
    pub pos: Vec<Cow<'a, str>>,
    /// Negative passages (may be empty).
    pub neg: Vec<Cow<'a, str>>,
    /// Teacher scores, as long as `pos`.
    pub pos_scores: Option<Vec<f32>>,
    /// Teacher scores, as long as `neg`.
    pub neg_scores: Option<Vec<f32>>,
    /// The LLM prompt of this row.
    pub prompt: Option<Cow<'a, str>>,
    /// Replaces the query instruction for this row.
    pub query_prompt: Option<Cow<'a, str>>,
    /// Replaces the passage instruction for this row.
    pub passage_prompt: Option<Cow<'a, str>>,
    /// The batch size of this row's file in same-source batches (FlagEmbedding reads the
    /// first row's): an integer in `1..=`[`crate::limits::BATCH_SIZE`].
    pub batch_size: Option<u64>,
}

/// Sentinel standing for a bare NaN/Infinity literal (which Python's json module writes), or a
/// number literal too large for a double (`1e400`: Python reads it as inf).
const NONFINITE: &str = "\u{0}rankfeed-nonfinite";

/// The UTF-8 byte order mark, which Windows tools put at the start of a file.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parse and check one row. `unknown` counts unknown top-level field names. A leading UTF-8
/// byte order mark is skipped (files made on Windows, and files concatenated from them).
///
/// A fast path deserializes straight into borrowed strings; any row it does not accept as is
/// (wrong types, NaN, duplicate keys, ...) goes through the slow path, which builds a JSON
/// value to say exactly what is wrong. Both accept the same rows with the same result
/// (duplicate keys: the last one wins, as in Python's json).
pub fn parse_row<'a>(
    bytes: &'a [u8],
    position: &InputPosition,
    unknown: &mut BTreeMap<String, u64>,
) -> Result<InputRow<'a>, RowError> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    // The whole row must be UTF-8, as Python's json requires: serde_json does not check the
    // strings it skips (unknown fields), so check here, once, before the fast path.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return parse_row_slow(bytes, position, unknown);
    };
    if let Ok(FastRow(row, fields)) = serde_json::from_str::<FastRow<'a>>(text) {
        if row.is_valid() {
            for f in fields {
                *unknown.entry(f).or_default() += 1;
            }
            return Ok(row);
        }
    }
    parse_row_slow(bytes, position, unknown)
}

/// The reference path alone: what [`parse_row`] must agree with on every row it accepts
/// (the fuzzer checks this). Slower: it builds a JSON value.
pub fn parse_row_reference<'a>(
    bytes: &[u8],
    position: &InputPosition,
    unknown: &mut BTreeMap<String, u64>,
) -> Result<InputRow<'a>, RowError> {
    parse_row_slow(bytes.strip_prefix(BOM).unwrap_or(bytes), position, unknown)
}

fn parse_row_slow<'a>(
    bytes: &[u8],
    position: &InputPosition,
    unknown: &mut BTreeMap<String, u64>,
) -> Result<InputRow<'a>, RowError> {
    let err = |field: Option<&str>, reason, message: String| RowError {
        position: position.clone(),
        field: field.map(String::from),
        reason,
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        err(
            None,
            RejectReason::InvalidUtf8,
            format!("invalid UTF-8 at byte {} of the row", e.valid_up_to()),
        )
    })?;
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            match replace_nonfinite_literals(text).and_then(|t| serde_json::from_str(&t).ok()) {
                Some(v) => v,
                None => {
                    return Err(err(
                        None,
                        RejectReason::InvalidJson,
                        format!("invalid JSON: {e}"),
                    ));
                }
            }
        }
    };
    let Value::Object(mut obj) = value else {
        return Err(err(
            None,
            RejectReason::NotAnObject,
            format!("expected a JSON object, found {}", kind(&value)),
        ));
    };
    for key in obj.keys() {
        if !KNOWN_FIELDS.contains(&key.as_str()) {
            *unknown.entry(key.clone()).or_default() += 1;
        }
    }
    let query = match obj.remove("query") {
        Some(Value::String(s)) => Cow::Owned(s),
        None => {
            return Err(err(
                Some("query"),
                RejectReason::MissingField,
                "missing".into(),
            ))
        }
        Some(v) => {
            return Err(err(
                Some("query"),
                RejectReason::WrongType,
                format!("expected a string, found {}", kind(&v)),
            ));
        }
    };
    let pos = strings(&mut obj, "pos").map_err(|(f, r, m)| err(Some(&f), r, m))?;
    if pos.is_empty() {
        return Err(err(
            Some("pos"),
            RejectReason::EmptyPos,
            "empty list: a group needs at least one positive".into(),
        ));
    }
    let neg = strings(&mut obj, "neg").map_err(|(f, r, m)| err(Some(&f), r, m))?;
    let pos_scores =
        scores(&mut obj, "pos_scores", pos.len()).map_err(|(f, r, m)| err(Some(&f), r, m))?;
    let neg_scores =
        scores(&mut obj, "neg_scores", neg.len()).map_err(|(f, r, m)| err(Some(&f), r, m))?;
    let mut opt_string = |name: &str| match obj.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Cow::Owned(s))),
        Some(v) => Err(err(
            Some(name),
            RejectReason::WrongType,
            format!("expected a string or null, found {}", kind(&v)),
        )),
    };
    let prompt = opt_string("prompt")?;
    let query_prompt = opt_string("query_prompt")?;
    let passage_prompt = opt_string("passage_prompt")?;
    let batch_size = match obj.remove("batch_size") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(batch_size_ok) => n.as_u64(),
        Some(v) => {
            return Err(err(
                Some("batch_size"),
                RejectReason::WrongType,
                format!(
                    "expected an integer in 1..={} or null, found {}",
                    crate::limits::BATCH_SIZE,
                    match &v {
                        Value::Number(n) => n.to_string(),
                        v => kind(v).to_string(),
                    }
                ),
            ))
        }
    };
    Ok(InputRow {
        prompt,
        query_prompt,
        passage_prompt,
        batch_size,
        query,
        pos,
        neg,
        pos_scores,
        neg_scores,
    })
}

type FieldError = (String, RejectReason, String);

fn strings<'a>(obj: &mut Map<String, Value>, name: &str) -> Result<Vec<Cow<'a, str>>, FieldError> {
    match obj.remove(name) {
        None => Err((name.into(), RejectReason::MissingField, "missing".into())),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(Cow::Owned(s)),
                v => Err((
                    format!("{name}[{i}]"),
                    RejectReason::WrongType,
                    format!("expected a string, found {}", kind(&v)),
                )),
            })
            .collect(),
        Some(v) => Err((
            name.into(),
            RejectReason::WrongType,
            format!("expected a list of strings, found {}", kind(&v)),
        )),
    }
}

fn scores(
    obj: &mut Map<String, Value>,
    name: &str,
    want: usize,
) -> Result<Option<Vec<f32>>, FieldError> {
    let items = match obj.remove(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err((
                name.into(),
                RejectReason::WrongType,
                format!("expected a list of numbers, found {}", kind(&v)),
            ));
        }
    };
    if items.len() != want {
        let passages = if name == "pos_scores" { "pos" } else { "neg" };
        return Err((
            name.into(),
            RejectReason::ScoreLengthMismatch,
            format!(
                "has {} scores but `{passages}` has {want} passages",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = || format!("{name}[{i}]");
            match v {
                Value::Number(n) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    let y = x as f32;
                    if y.is_finite() {
                        Ok(y)
                    } else {
                        Err((
                            at(),
                            RejectReason::NonFiniteScore,
                            format!("{n} is not a finite float32"),
                        ))
                    }
                }
                Value::String(s) if s == NONFINITE => Err((
                    at(),
                    RejectReason::NonFiniteScore,
                    "NaN, Infinity, or beyond the range of a double".into(),
                )),
                Value::Bool(b) => Err((
                    at(),
                    RejectReason::BooleanScore,
                    format!("boolean {b} is not a score"),
                )),
                v => Err((
                    at(),
                    RejectReason::NonNumericScore,
                    format!("expected a number, found {}", kind(v)),
                )),
            }
        })
        .collect::<Result<Vec<f32>, _>>()
        .map(Some)
}

impl InputRow<'_> {
    /// What the fast path must check that deserialization did not.
    fn is_valid(&self) -> bool {
        let scores_ok = |s: &Option<Vec<f32>>, n: usize| {
            s.as_ref()
                .is_none_or(|s| s.len() == n && s.iter().all(|x| x.is_finite()))
        };
        !self.pos.is_empty()
            && self.batch_size.is_none_or(batch_size_ok)
            && scores_ok(&self.pos_scores, self.pos.len())
            && scores_ok(&self.neg_scores, self.neg.len())
    }
}

/// A `batch_size` field within the loader's limit (a larger one would abort same-source
/// batching on allocation).
pub(crate) fn batch_size_ok(b: u64) -> bool {
    (1..=crate::limits::BATCH_SIZE as u64).contains(&b)
}

/// A string that borrows from the input when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Scores as float32; rejects anything but numbers (booleans included).
struct Scores(Vec<f32>);

impl<'de> Deserialize<'de> for Scores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        Ok(Scores(v.into_iter().map(|x| x as f32).collect()))
    }
}

/// The fast path: a valid row plus the names of its unknown fields.
struct FastRow<'a>(InputRow<'a>, Vec<String>);

impl<'de> Deserialize<'de> for FastRow<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FastRow<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a row object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FastRow<'de>, A::Error> {
                let mut query = None;
                let (mut pos, mut neg) = (None, None);
                let (mut pos_scores, mut neg_scores) = (None, None);
                let (mut prompt, mut query_prompt, mut passage_prompt) = (None, None, None);
                let mut batch_size = None;
                let mut unknown = Vec::new();
                let mut seen = 0u16;
                fn once<E: de::Error>(seen: &mut u16, bit: u16) -> Result<(), E> {
                    if *seen & bit != 0 {
                        return Err(E::custom("duplicate key"));
                    }
                    *seen |= bit;
                    Ok(())
                }
                let texts = |v: Vec<Text<'de>>| v.into_iter().map(|t| t.0).collect::<Vec<_>>();
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    match key.0.as_ref() {
                        "query" => {
                            once(&mut seen, 1)?;
                            query = Some(map.next_value::<Text<'de>>()?.0);
                        }
                        "pos" => {
                            once(&mut seen, 2)?;
                            pos = Some(texts(map.next_value()?));
                        }
                        "neg" => {
                            once(&mut seen, 4)?;
                            neg = Some(texts(map.next_value()?));
                        }
                        "pos_scores" => {
                            once(&mut seen, 8)?;
                            pos_scores = map.next_value::<Option<Scores>>()?.map(|s| s.0);
                        }
                        "neg_scores" => {
                            once(&mut seen, 16)?;
                            neg_scores = map.next_value::<Option<Scores>>()?.map(|s| s.0);
                        }
                        "prompt" => {
                            once(&mut seen, 32)?;
                            prompt = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                        }
                        "query_prompt" => {
                            once(&mut seen, 64)?;
                            query_prompt = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                        }
                        "passage_prompt" => {
                            once(&mut seen, 128)?;
                            passage_prompt = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                        }
                        "batch_size" => {
                            once(&mut seen, 256)?;
                            batch_size = map.next_value::<Option<u64>>()?;
                        }
                        other => {
                            if unknown.iter().any(|u| u == other) {
                                return Err(de::Error::custom("duplicate key"));
                            }
                            unknown.push(other.to_string());
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let missing = || de::Error::custom("missing field");
                Ok(FastRow(
                    InputRow {
                        query: query.ok_or_else(missing)?,
                        pos: pos.ok_or_else(missing)?,
                        neg: neg.ok_or_else(missing)?,
                        pos_scores,
                        neg_scores,
                        prompt,
                        query_prompt,
                        passage_prompt,
                        batch_size,
                    },
                    unknown,
                ))
            }
        }
        d.deserialize_map(V)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(s) if s == NONFINITE => "NaN/Infinity/an out-of-range number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Replace bare `NaN`, `Infinity` and `-Infinity` literals outside strings, and number
/// literals beyond the range of a double (`1e400`, an integer of a million digits), with a
/// sentinel string, so a row Python's json module reads (as nan/inf) gets "non-finite score"
/// rather than "invalid JSON". `None` when there is none. Works on bytes: the text outside
/// strings may hold any UTF-8 (it is then invalid JSON, reported by the parser).
fn replace_nonfinite_literals(text: &str) -> Option<String> {
    const SENTINEL: &[u8] = b"\"\\u0000rankfeed-nonfinite\"";
    let b = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len() + 32);
    let (mut i, mut last, mut in_str, mut found) = (0, 0, false, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let rest = &b[i..];
        let len = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|lit| rest.starts_with(lit.as_bytes()))
            .map(|lit| lit.len())
            .or_else(|| huge_number(rest));
        match len {
            Some(len) => {
                out.extend_from_slice(&b[last..i]);
                out.extend_from_slice(SENTINEL);
                i += len;
                last = i;
                found = true;
            }
            None => i += number_len(rest).max(1),
        }
    }
    if !found {
        return None;
    }
    out.extend_from_slice(&b[last..]);
    // Only ASCII was spliced in, at ASCII positions, into valid UTF-8.
    String::from_utf8(out).ok()
}

/// Length of the JSON number literal at the start of `b` (`-?digits(.digits)?([eE][+-]?digits)?`),
/// 0 when there is none.
fn number_len(b: &[u8]) -> usize {
    let digits = |from: usize| {
        b[from.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut n = usize::from(b.first() == Some(&b'-'));
    let int = digits(n);
    if int == 0 {
        return 0;
    }
    n += int;
    if b.get(n) == Some(&b'.') && digits(n + 1) > 0 {
        n += 1 + digits(n + 1);
    }
    if matches!(b.get(n), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(n + 1), Some(b'+' | b'-')));
        let exp = digits(n + 1 + sign);
        if exp > 0 {
            n += 1 + sign + exp;
        }
    }
    n
}

/// Length of the number literal at the start of `b` when it overflows a double.
fn huge_number(b: &[u8]) -> Option<usize> {
    let n = number_len(b);
    let text = std::str::from_utf8(&b[..n]).ok()?;
    (n > 0 && text.parse::<f64>().is_ok_and(|x| x.is_infinite())).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<InputRow<'_>, RowError> {
        let pos = InputPosition {
            path: "t.jsonl".into(),
            line: 7,
            element: None,
        };
        parse_row(s.as_bytes(), &pos, &mut BTreeMap::new())
    }

    fn reason(s: &str) -> (RejectReason, Option<String>) {
        let e = parse(s).unwrap_err();
        assert_eq!(e.position.line, 7);
        (e.reason, e.field)
    }

    /// Regression (issue 18, finding 5): `"batch_size": 1000000000000000000` was accepted,
    /// and same-source batching then aborted the process allocating such a batch. Above the
    /// loader's batch size limit it is a reject naming the field, on both paths.
    #[test]
    fn batch_size_beyond_the_limit_is_a_reject_naming_the_field() {
        let pos = InputPosition {
            path: "t.jsonl".into(),
            line: 7,
            element: None,
        };
        let limit = crate::limits::BATCH_SIZE as u64;
        for (b, ok) in [
            (1, true),
            (limit, true),
            (limit + 1, false),
            (1_000_000_000_000_000_000, false),
            (u64::MAX, false),
        ] {
            let row = format!(r#"{{"query":"q","pos":["a"],"neg":[],"batch_size":{b}}}"#);
            let fast = parse_row(row.as_bytes(), &pos, &mut BTreeMap::new());
            let slow = parse_row_reference(row.as_bytes(), &pos, &mut BTreeMap::new());
            for got in [fast, slow] {
                match got {
                    Ok(r) => assert!(ok && r.batch_size == Some(b), "{b}"),
                    Err(e) => {
                        assert!(!ok, "{b}: {e:?}");
                        assert_eq!(e.field.as_deref(), Some("batch_size"));
                        assert!(e.message.contains(&b.to_string()), "{}", e.message);
                    }
                }
            }
        }
    }

    #[test]
    fn accepts_a_full_row() {
        let r = parse(r#"{"query":"q","pos":["a"],"neg":["b","c"],"pos_scores":[1],"neg_scores":[0.5,-2e3],"prompt":"p","extra":1}"#).unwrap();
        assert_eq!(r.pos, vec!["a"]);
        assert_eq!(r.neg_scores, Some(vec![0.5, -2000.0]));
        assert_eq!(r.prompt.as_deref(), Some("p"));
    }

    #[test]
    fn rejects_each_class() {
        use RejectReason::*;
        assert_eq!(reason("{").0, InvalidJson);
        assert_eq!(
            parse_row(
                b"{\"query\":\"\xff\"}",
                &InputPosition {
                    path: "x".into(),
                    line: 7,
                    element: None
                },
                &mut BTreeMap::new()
            )
            .unwrap_err()
            .reason,
            InvalidUtf8
        );
        assert_eq!(reason("[1]").0, NotAnObject);
        assert_eq!(
            reason(r#"{"pos":["a"],"neg":[]}"#),
            (MissingField, Some("query".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","neg":[]}"#),
            (MissingField, Some("pos".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"]}"#),
            (MissingField, Some("neg".into()))
        );
        assert_eq!(
            reason(r#"{"query":1,"pos":["a"],"neg":[]}"#),
            (WrongType, Some("query".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":null,"neg":[]}"#),
            (WrongType, Some("pos".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a",null],"neg":[]}"#),
            (WrongType, Some("pos[1]".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":[],"neg":[]}"#),
            (EmptyPos, Some("pos".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":["b"],"neg_scores":[]}"#).0,
            ScoreLengthMismatch
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":["1"]}"#).0,
            NonNumericScore
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":[true]}"#).0,
            BooleanScore
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":[NaN]}"#),
            (NonFiniteScore, Some("pos_scores[0]".into()))
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":[-Infinity]}"#).0,
            NonFiniteScore
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":[1e300]}"#).0,
            NonFiniteScore
        );
        assert_eq!(
            reason(r#"{"query":"q","pos":["a"],"neg":[],"prompt":3}"#).0,
            WrongType
        );
    }

    /// Regression (issue 9, observation 1): non-ASCII bytes outside strings made the
    /// NaN/Infinity pre-pass slice a `str` inside a character, a panic that killed the whole
    /// conversion even under the skip policy.
    #[test]
    fn non_ascii_outside_strings_is_invalid_json_not_a_panic() {
        for row in [
            r#"{"query": café, "pos": ["a"], "neg": []}"#,
            "{\u{201c}query\u{201d}: \u{201c}q\u{201d}, \"pos\": [\"a\"], \"neg\": []}",
            "{\"query\": \"q\", \"pos\": [\"a\"], \"neg\": [], \"pos_scores\": [NaN\u{e9}]}",
            "\u{feff}\u{feff}{\"query\": \"q\", \"pos\": [\"a\"], \"neg\": []}",
            "{\"query\": \"q\", \u{feff}\"pos\": [\"a\"], \"neg\": []}",
        ] {
            assert_eq!(reason(row).0, RejectReason::InvalidJson, "{row}");
        }
    }

    /// Regression (found by tests/fuzz_rows.rs): invalid UTF-8 inside an unknown field's
    /// string was accepted by the fast path (serde_json skips ignored strings unchecked) while
    /// the reference path rejected the row.
    #[test]
    fn invalid_utf8_in_an_ignored_field_is_rejected() {
        let row = b"{\"query\":\"q\",\"pos\":[\"a\"],\"neg\":[],\"extra\":\"\xe9t\xe9\"}";
        let pos = InputPosition {
            path: "t.jsonl".into(),
            line: 3,
            element: None,
        };
        let e = parse_row(row, &pos, &mut BTreeMap::new()).unwrap_err();
        assert_eq!((e.reason, e.position.line), (RejectReason::InvalidUtf8, 3));
    }

    /// A byte order mark before the row (Windows files) is skipped.
    #[test]
    fn leading_bom_is_skipped() {
        let r = parse("\u{feff}{\"query\": \"q\", \"pos\": [\"a\"], \"neg\": []}").unwrap();
        assert_eq!(r.query, "q");
    }

    /// Regression (issue 9, observation 8): numbers beyond a double are scores Python reads as
    /// inf, so they are `non_finite_score`, not `invalid_json`.
    #[test]
    fn numbers_beyond_a_double_are_non_finite_scores() {
        let million = "9".repeat(1_000_000);
        for score in ["1e400", "-1e400", "1E+999", million.as_str()] {
            let row = format!(r#"{{"query":"q","pos":["a"],"neg":[],"pos_scores":[{score}]}}"#);
            assert_eq!(
                reason(&row),
                (RejectReason::NonFiniteScore, Some("pos_scores[0]".into())),
                "{}",
                &score[..score.len().min(10)]
            );
        }
        // Elsewhere they are ignored like any unknown field's value, as Python would.
        let r = parse(r#"{"query":"q","pos":["a"],"neg":[],"extra":1e400}"#).unwrap();
        assert_eq!(r.query, "q");
        assert_eq!(number_len(b"-12.5e-3,"), 8);
        assert_eq!(number_len(b"1.e5"), 1);
        assert_eq!(number_len(b"-x"), 0);
    }

    #[test]
    fn nan_inside_strings_is_text() {
        let r = parse(r#"{"query":"NaN Infinity","pos":["a"],"neg":[]}"#).unwrap();
        assert_eq!(r.query, "NaN Infinity");
        assert!(replace_nonfinite_literals(r#"{"a":"NaN \" NaN"}"#).is_none());
    }

    #[test]
    fn fast_and_slow_paths_agree() {
        let pos = InputPosition {
            path: "t.jsonl".into(),
            line: 1,
            element: None,
        };
        for row in [
            r#"{"query":"q \"x\" \u00e9","pos":["a\nb"],"neg":["c"],"pos_scores":[1],"neg_scores":[0.25],"prompt":"p","query_prompt":null,"z":[1,{"a":2}]}"#,
            r#"{"neg":[],"pos":["a"],"query":""}"#,
            r#"{"query":"q","pos":["a"],"neg":["b"],"query":"last wins"}"#,
            r#"{"query":"q","pos":["a"],"neg":["b"],"zz":1,"zz":2}"#,
        ] {
            let (mut u1, mut u2) = (BTreeMap::new(), BTreeMap::new());
            let fast = parse_row(row.as_bytes(), &pos, &mut u1).unwrap();
            let slow = parse_row_slow(row.as_bytes(), &pos, &mut u2).unwrap();
            assert_eq!(fast, slow, "{row}");
            assert_eq!(u1, u2, "{row}");
        }
        let mut u = BTreeMap::new();
        let r = parse_row(
            br#"{"query":"q","pos":["a"],"neg":["b"],"query":"last"}"#,
            &pos,
            &mut u,
        )
        .unwrap();
        assert_eq!(r.query, "last");
    }

    #[test]
    fn null_scores_and_prompts_are_absent() {
        let r =
            parse(r#"{"query":"q","pos":["a"],"neg":[],"pos_scores":null,"prompt":null}"#).unwrap();
        assert_eq!(r.pos_scores, None);
        assert_eq!(r.prompt, None);
    }
}
