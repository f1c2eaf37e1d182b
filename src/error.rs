//! One error type for the library, carrying where things went wrong: the file, the line (or
//! array element), the field, the row.

use std::fmt;
use std::path::PathBuf;

/// Result alias used throughout rankfeed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an input row was rejected. The snake_case name is what the manifest, the rejects file
/// and the CLI report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The line (or array element) is not valid JSON.
    InvalidJson,
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The row is valid JSON but not an object.
    NotAnObject,
    /// `query`, `pos` or `neg` is absent.
    MissingField,
    /// A field has the wrong JSON type (e.g. `pos` is a string, or `null`).
    WrongType,
    /// `pos` is an empty list: no positive to train on.
    EmptyPos,
    /// `pos_scores`/`neg_scores` has a different length than `pos`/`neg`.
    ScoreLengthMismatch,
    /// A score is a string, null, list or object.
    NonNumericScore,
    /// A score is `true`/`false` (Python would take it as 1/0; we do not guess).
    BooleanScore,
    /// A score is NaN, infinite, or does not fit in a float32.
    NonFiniteScore,
    /// The line (or array element) is longer than `max_line_bytes`; it was not held in memory.
    LineTooLong,
}

impl RejectReason {
    /// All reasons, in a stable order.
    pub const ALL: [RejectReason; 11] = [
        RejectReason::InvalidJson,
        RejectReason::InvalidUtf8,
        RejectReason::NotAnObject,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::EmptyPos,
        RejectReason::ScoreLengthMismatch,
        RejectReason::NonNumericScore,
        RejectReason::BooleanScore,
        RejectReason::NonFiniteScore,
        RejectReason::LineTooLong,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::EmptyPos => "empty_pos",
            RejectReason::ScoreLengthMismatch => "score_length_mismatch",
            RejectReason::NonNumericScore => "non_numeric_score",
            RejectReason::BooleanScore => "boolean_score",
            RejectReason::NonFiniteScore => "non_finite_score",
            RejectReason::LineTooLong => "line_too_long",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in an input file a row came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPosition {
    /// The input file.
    pub path: PathBuf,
    /// 1-based line number of the row (JSON lines), or of the start of the array element;
    /// 0 for Parquet rows.
    pub line: u64,
    /// 0-based index of the element when the file is one JSON array, or of the Parquet row.
    pub element: Option<u64>,
}

impl fmt::Display for InputPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.element) {
            (0, Some(row)) => write!(f, "{} row {row}", self.path.display()),
            (line, Some(e)) => write!(f, "{}:{line} (array element {e})", self.path.display()),
            (line, None) => write!(f, "{}:{line}", self.path.display()),
        }
    }
}

/// A rejected input row: where, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// File and line.
    pub position: InputPosition,
    /// The offending field, when one field is to blame.
    pub field: Option<String>,
    /// The class of problem.
    pub reason: RejectReason,
    /// A human-readable explanation.
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.position)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{} ({})", self.message, self.reason)
    }
}

/// Every error rankfeed returns. Each variant says what happened and where; lower-level
/// errors are kept as `source`s so the whole chain can be printed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A bad input row under the `fail` policy.
    #[error("bad input row at {0}")]
    Row(Box<RowError>),
    /// Input that is not usable as a whole, or a bad row of a pre-tokenized input (import):
    /// an empty file, a path that is not a regular file, a Parquet column of the wrong type.
    #[error("{}{}{}: {message}", path.display(), at_row(*row), at_field(field.as_deref()))]
    Input {
        /// The input file or directory.
        path: PathBuf,
        /// The 0-based row (Parquet) or 1-based line (JSON) concerned, when one is.
        row: Option<u64>,
        /// The field (column) concerned, when one is.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A Parquet file could not be read or written.
    #[error("parquet {}: {source}", path.display())]
    Parquet {
        /// The Parquet file (or output directory).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer.json path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A dataset file is corrupt, truncated, replaced or inconsistent with the manifest.
    #[error("corrupt dataset file {}: {message}", path.display())]
    Corrupt {
        /// The file that failed validation.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The dataset was written by an incompatible format version.
    #[error("{}: dataset format version {found} is not supported (this build reads versions {supported:?})", path.display())]
    UnsupportedVersion {
        /// The manifest path.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// Versions this build reads.
        supported: &'static [u32],
    },
    /// An index asked for by the caller (row, passage id, prompt id) outside its table.
    #[error("{what} {index} is out of range (the dataset has {len})")]
    OutOfRange {
        /// What kind of index.
        what: &'static str,
        /// The index asked for.
        index: u64,
        /// The table size.
        len: u64,
    },
    /// A bad argument or setting, named.
    #[error("{name}: {message}")]
    Argument {
        /// The argument (option) name, as the library spells it.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// An object-store request that failed for good (after retries), naming the object.
    #[error("{url}: {message}")]
    Remote {
        /// The object's URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The output path exists and overwriting was not asked for.
    #[error("{} already exists (pass --overwrite on the command line, or overwrite=True in Python, to replace it)", path.display())]
    Exists {
        /// The output path.
        path: PathBuf,
    },
    /// The caller asked the operation to stop (a cancel flag, an exception in a callback).
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A broken internal invariant or a panicked worker thread: a bug in rankfeed.
    #[error("internal error (a bug in rankfeed, please report it): {0}")]
    Internal(String),
    /// An error from the Arrow writer.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
}

fn at_row(row: Option<u64>) -> String {
    row.map(|r| format!(" row {r}")).unwrap_or_default()
}

fn at_field(field: Option<&str>) -> String {
    field.map(|f| format!(" field `{f}`")).unwrap_or_default()
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A bad-argument error.
    pub fn argument(name: &'static str, message: impl Into<String>) -> Self {
        Error::Argument {
            name,
            message: message.into(),
        }
    }

    /// An input error on `path` as a whole.
    pub fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            row: None,
            field: None,
            message: message.into(),
        }
    }

    /// A Parquet error on `path`.
    pub fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }

    /// Whether the error says that stored data is corrupt (as opposed to a bad argument or
    /// an I/O failure): Python raises `CorruptDatasetError` for exactly these.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. } | Error::UnsupportedVersion { .. }
        )
    }

    /// A corrupt-file error on `path`.
    pub fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<RowError> for Error {
    fn from(e: RowError) -> Self {
        Error::Row(Box::new(e))
    }
}
