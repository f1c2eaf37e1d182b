//! Text formatting before tokenization, as FlagEmbedding does it.
//!
//! FlagEmbedding builds `query_instruction_format.format(prompt, query)` with Python's
//! `str.format`; we implement the subset that instruction formats use: `{}` (automatic
//! numbering), `{0}`/`{1}` (explicit), and `{{`/`}}` escapes. Anything else (format specs,
//! named fields) is rejected when the settings are checked, before any row is read.

use crate::error::{Error, Result};

/// A parsed Python format string with two positional fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyFormat {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Arg(usize),
}

impl PyFormat {
    /// Parse `fmt`, which may refer to arguments 0 and 1 only.
    pub fn parse(fmt: &str) -> Result<PyFormat> {
        let bad = |m: &str| Error::argument("instruction_format", format!("{fmt:?}: {m}"));
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut auto = 0usize;
        let (mut used_auto, mut used_manual) = (false, false);
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(bad("single '}' (write '}}' for a literal brace)")),
                '{' => {
                    let mut field = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => field.push(c),
                            None => return Err(bad("unclosed '{'")),
                        }
                    }
                    let index = if field.is_empty() {
                        used_auto = true;
                        auto += 1;
                        auto - 1
                    } else {
                        used_manual = true;
                        field.parse::<usize>().map_err(|_| {
                            bad(&format!(
                                "field {{{field}}} is not supported; use {{}}, {{0}} or {{1}}"
                            ))
                        })?
                    };
                    if used_auto && used_manual {
                        return Err(bad("cannot mix {} and {0}"));
                    }
                    if index > 1 {
                        return Err(bad("only two arguments (instruction, text) exist"));
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Arg(index));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(PyFormat { pieces })
    }

    /// `fmt.format(a, b)`.
    pub fn apply(&self, a: &str, b: &str) -> String {
        let mut out = String::with_capacity(a.len() + b.len() + 16);
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Arg(0) => out.push_str(a),
                Piece::Arg(_) => out.push_str(b),
            }
        }
        out
    }
}

/// FlagEmbedding turns a literal backslash-n in an instruction *format* into a newline.
pub fn unescape_format(fmt: &str) -> String {
    fmt.replace("\\n", "\n")
}

/// Formats queries or passages: `format(row_prompt or instruction, text)` when an instruction
/// is configured, the text unchanged otherwise.
#[derive(Debug, Clone)]
pub struct Formatter {
    instruction: Option<String>,
    format: PyFormat,
}

impl Formatter {
    /// A formatter for `instruction` (None: texts pass unchanged) and `format` (already
    /// unescaped).
    pub fn new(instruction: Option<String>, format: &str) -> Result<Formatter> {
        Ok(Formatter {
            instruction,
            format: PyFormat::parse(format)?,
        })
    }

    /// The formatted text. `row_prompt` (the row's `query_prompt`/`passage_prompt`) replaces
    /// the instruction, and is ignored when no instruction is configured, as in FlagEmbedding.
    pub fn apply<'a>(&self, text: &'a str, row_prompt: Option<&str>) -> std::borrow::Cow<'a, str> {
        match &self.instruction {
            None => std::borrow::Cow::Borrowed(text),
            Some(inst) => {
                std::borrow::Cow::Owned(self.format.apply(row_prompt.unwrap_or(inst), text))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format_subset() {
        let f = PyFormat::parse("{}{}").unwrap();
        assert_eq!(f.apply("A: ", "q"), "A: q");
        let f = PyFormat::parse("<instruct>{}\n<query>{}").unwrap();
        assert_eq!(f.apply("i", "q"), "<instruct>i\n<query>q");
        let f = PyFormat::parse("{1} {{x}} {0}").unwrap();
        assert_eq!(f.apply("a", "b"), "b {x} a");
        assert!(PyFormat::parse("{}{0}").is_err());
        assert!(PyFormat::parse("{name}").is_err());
        assert!(PyFormat::parse("{:>4}").is_err());
        assert!(PyFormat::parse("{2}").is_err());
        assert!(PyFormat::parse("{").is_err());
        assert!(PyFormat::parse("}").is_err());
    }

    #[test]
    fn backslash_n_in_format_becomes_newline() {
        assert_eq!(unescape_format("{}\\n{}"), "{}\n{}");
    }

    #[test]
    fn row_prompt_replaces_instruction_only_when_configured() {
        let f = Formatter::new(Some("Q: ".into()), "{}{}").unwrap();
        assert_eq!(f.apply("x", None), "Q: x");
        assert_eq!(f.apply("x", Some("R: ")), "R: x");
        let none = Formatter::new(None, "{}{}").unwrap();
        assert_eq!(none.apply("x", Some("R: ")), "x");
    }
}
