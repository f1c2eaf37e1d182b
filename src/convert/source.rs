//! Input files: discovery, decompression, and streaming rows with their positions.
//!
//! Accepted: `.jsonl`; `.json` holding JSON lines or one JSON array (decided by the first
//! byte after a byte order mark and whitespace); either compressed as `.gz` or `.zst`;
//! directories contribute their `.json`/`.jsonl` (compressed or not) files in sorted order, not
//! recursively. Files are streamed: memory holds one row (one array element) at a time.
//!
//! Positions: JSON lines report the 1-based line; array elements report the line where the
//! element starts and the element index. Blank (empty or whitespace-only) lines are not rows
//! (they are counted). A UTF-8 byte order mark at the start of a file is skipped; it belongs
//! to the first line, which starts at byte 0 (for sharding: see [`plan_shard`]).
//!
//! JSON arrays are held to what Python's `json` accepts, one element at a time, so one bad
//! element is one rejected row and never hides the elements after it (see `read_array`):
//! an empty element (`[,`, `,,`, a trailing `,]`) is a rejected `invalid_json` row at its
//! line, an error under the default `fail` policy; a malformed element is one rejected row,
//! and reading resumes at the next `,` at the array's level. A truncated array, or data after
//! its closing `]`, ends the file with one rejected row.
//!
//! Bounded: only regular files are read (a FIFO, device or socket is an error before any
//! read); a line or array element longer than `max_line_bytes` is not held in memory but
//! skipped to its end and reported as a `line_too_long` row.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, InputPosition, RejectReason, Result, RowError};

/// Compression of an input file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain.
    None,
    /// `.gz`.
    Gzip,
    /// `.zst`.
    Zstd,
}

/// How rows are laid out in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One JSON object per line (`.jsonl`).
    JsonLines,
    /// `.json`: JSON lines, or one array (decided from the content).
    Json,
    /// `.parquet` with text columns.
    Parquet,
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The path.
    pub path: PathBuf,
    /// Size on disk.
    pub bytes: u64,
    /// Compression.
    pub compression: Compression,
    /// Layout.
    pub layout: Layout,
    /// What a sharded conversion reads of it (everything otherwise).
    pub part: Part,
}

/// The part of a source that one shard of a conversion reads (see [`plan_shard`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// The whole file.
    All,
    /// The lines that start in bytes `start..end` of an uncompressed JSON lines file.
    Lines {
        /// First byte (a line starting here or later is read).
        start: u64,
        /// A line starting at or after this byte is left to the next shard.
        end: u64,
    },
    /// These row groups of a Parquet file.
    RowGroups(Vec<usize>),
    /// Nothing: another shard reads this file.
    Nothing,
}

/// Assign each shard a part of the inputs, by bytes, so one large file shards evenly. The
/// inputs are seen as one stream of bytes, cut into `n` equal ranges (`total * j / n` rounded down
/// starts range `j`); shard `k` reads
/// - of an uncompressed JSON lines file (`.jsonl`, or `.json` holding lines): the lines that
///   start in its range (line-aligned: each line is read by exactly one shard; a byte order
///   mark belongs to the first line, which starts at byte 0);
/// - of a Parquet file: the row groups that start in its range;
/// - a compressed file or a JSON array, which cannot be cut: whole, by the shard whose range
///   holds its first byte; a warning says so.
///
/// Every shard keeps every source (with its own counts), so source ids and paths are the same
/// in every shard and in a single conversion, and `merge` adds the counts up. The cost does
/// not depend on `n`: O(files + row groups), and only the files that overlap the shard's
/// range are opened.
pub fn plan_shard(sources: &mut [SourceFile], k: usize, n: usize) -> Result<Vec<String>> {
    if k >= n {
        return Err(Error::argument(
            "shard",
            format!("{k}/{n}: need 0 <= k < n"),
        ));
    }
    let sizes: Vec<u64> = sources.iter().map(|s| s.bytes).collect();
    let touched = shard_touches(&sizes, k, n);
    let bounds = ShardBounds {
        total: sizes.iter().sum(),
        n,
    };
    let (lo, hi) = (bounds.bound(k), bounds.bound(k + 1));
    let mut warnings = Vec::new();
    let mut offset = 0u64;
    for (src, touched) in sources.iter_mut().zip(touched) {
        let start = offset;
        offset += src.bytes;
        if !touched {
            src.part = Part::Nothing;
            continue;
        }
        src.part = match splittable(src)? {
            Split::Lines => {
                let (a, b) = (lo.max(start) - start, hi.min(offset).max(start) - start);
                if a < b {
                    Part::Lines { start: a, end: b }
                } else {
                    Part::Nothing
                }
            }
            Split::RowGroups(groups) => {
                let mine: Vec<usize> = (0..groups)
                    .filter(|&g| {
                        let at = src.bytes as u128 * g as u128 / groups as u128;
                        bounds.owner(start + at as u64) == k
                    })
                    .collect();
                if mine.is_empty() {
                    Part::Nothing
                } else {
                    Part::RowGroups(mine)
                }
            }
            Split::Whole(why) if bounds.owner(start) == k => {
                if n > 1 {
                    warnings.push(format!(
                        "{}: {why}: it cannot be split, so shard {k}/{n} converts it whole",
                        src.path.display()
                    ));
                }
                Part::All
            }
            Split::Whole(_) => Part::Nothing,
        };
    }
    Ok(warnings)
}

/// Which of the input files of these sizes (in input order) shard `k` of `n` opens: the
/// others have no line, row group or first byte in its range and are never opened (an empty
/// file is always classified: its first byte may be owned at the very end). Inputs fetched
/// from object storage for one shard are downloaded only where this holds.
pub fn shard_touches(sizes: &[u64], k: usize, n: usize) -> Vec<bool> {
    let bounds = ShardBounds {
        total: sizes.iter().sum(),
        n: n.max(1),
    };
    let (lo, hi) = (bounds.bound(k), bounds.bound(k + 1));
    let mut offset = 0u64;
    sizes
        .iter()
        .map(|&bytes| {
            let start = offset;
            offset += bytes;
            bytes == 0 || (offset > lo && start < hi)
        })
        .collect()
}

/// The `n` byte ranges of a sharded conversion: shard `j` holds bytes
/// `bound(j)..bound(j + 1)` of the `total` input bytes, `bound(j) = total * j / n` (rounded
/// down, in 128-bit arithmetic), so the ranges are contiguous, disjoint, cover everything, and
/// differ in size by at most one byte (many are empty when `n > total`).
#[derive(Debug, Clone, Copy)]
struct ShardBounds {
    total: u64,
    /// Positive.
    n: usize,
}

impl ShardBounds {
    /// The first byte of shard `j` (`0 <= j <= n`; `bound(n)` is the total).
    fn bound(&self, j: usize) -> u64 {
        (self.total as u128 * j as u128 / self.n as u128) as u64
    }

    /// The shard whose range holds byte `at`, in O(1): the largest `j` with
    /// `bound(j) <= at`, i.e. with `total * j < (at + 1) * n`. A byte at or past the end
    /// (the start of an empty last file, or anything when `total` is 0) belongs to the last
    /// shard.
    fn owner(&self, at: u64) -> usize {
        if at >= self.total {
            return self.n - 1;
        }
        let j = ((at as u128 + 1) * self.n as u128 - 1) / self.total as u128;
        j.min(self.n as u128 - 1) as usize
    }
}

enum Split {
    Lines,
    RowGroups(usize),
    Whole(&'static str),
}

fn splittable(src: &SourceFile) -> Result<Split> {
    if src.compression != Compression::None {
        return Ok(Split::Whole("compressed"));
    }
    match src.layout {
        Layout::JsonLines => Ok(Split::Lines),
        Layout::Parquet => {
            let file = crate::storage::open_regular(&src.path)?;
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| Error::parquet(&src.path, e))?;
            Ok(Split::RowGroups(builder.metadata().num_row_groups()))
        }
        Layout::Json if holds_array(src)? => Ok(Split::Whole("a JSON array")),
        Layout::Json => Ok(Split::Lines),
    }
}

/// Whether a `.json` file holds one JSON array: its first byte after a byte order mark and
/// whitespace is `[`. The one test that both the shard planner and the reader apply.
fn holds_array(src: &SourceFile) -> Result<bool> {
    let io = |e: std::io::Error| Error::io(&src.path, e);
    let mut reader = open(src, Arc::default())?;
    skip_bom(&mut *reader).map_err(io)?;
    loop {
        let buf = reader.fill_buf().map_err(io)?;
        if buf.is_empty() {
            return Ok(false);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => return Ok(buf[i] == b'['),
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

impl SourceFile {
    /// Bytes this conversion reads of the file (for progress).
    pub fn part_bytes(&self) -> u64 {
        match &self.part {
            Part::All => self.bytes,
            Part::Lines { start, end } => end - start,
            Part::RowGroups(g) => self.bytes * g.len() as u64 / g.len().max(1) as u64,
            Part::Nothing => 0,
        }
    }
}

/// Split `name` into (layout, compression), or `None` when it is not an input file.
fn classify(path: &Path) -> Option<(Layout, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst") {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    if stem.ends_with(".parquet") && compression == Compression::None {
        Some((Layout::Parquet, compression))
    } else if stem.ends_with(".jsonl") {
        Some((Layout::JsonLines, compression))
    } else if stem.ends_with(".json") {
        Some((Layout::Json, compression))
    } else {
        None
    }
}

/// Expand the given paths into input files, in order. Errors: a missing path, a file that is
/// not `.json`/`.jsonl` (optionally `.gz`/`.zst`), a directory without such files.
pub fn discover(inputs: &[PathBuf]) -> Result<Vec<SourceFile>> {
    crate::discover::expand(
        inputs,
        |p| classify(p).is_some(),
        ".json, .jsonl (optionally .gz/.zst) or .parquet files",
    )?
    .iter()
    .map(|p| source_file(p))
    .collect()
}

/// Default `max_line_bytes`: far above any real row (a group of 16 long passages is < 1 MB),
/// below what tokenizing one line could cost in memory (~40x its size for a single text).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

fn source_file(path: &Path) -> Result<SourceFile> {
    let (layout, compression) = classify(path).ok_or_else(|| {
        Error::input(
            path,
            "not an input file (expected .json or .jsonl, optionally .gz or .zst, or .parquet)",
        )
    })?;
    // Checks the kind of file without reading (or blocking on) it.
    let bytes = crate::storage::open_regular(path)?
        .metadata()
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(SourceFile {
        path: path.to_path_buf(),
        bytes,
        compression,
        layout,
        part: Part::All,
    })
}

/// Counts raw bytes read, for progress.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open(src: &SourceFile, counter: Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file: File = crate::storage::open_regular(&src.path)?;
    let raw = Counting {
        inner: file,
        counter,
    };
    const CAP: usize = 1 << 20;
    Ok(match src.compression {
        Compression::None => Box::new(BufReader::with_capacity(CAP, raw)),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            CAP,
            flate2::read::MultiGzDecoder::new(BufReader::new(raw)),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            CAP,
            zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(&src.path, e))?,
        )),
    })
}

/// What a source yields: a row's bytes with its position, a blank line, or a row that could
/// not even be delimited.
pub enum Record<'a> {
    /// The bytes of one row.
    Row(&'a [u8], InputPosition),
    /// A blank line (JSON lines only).
    Blank,
    /// A row found broken while delimiting rows (`invalid_json`): an empty JSON array
    /// element, read past; or a truncated array or data after its closing `]`, which end the
    /// file.
    Broken(RowError),
    /// A line (array element) longer than the limit, skipped: its position and length.
    TooLong(InputPosition, u64),
}

impl Record<'_> {
    /// The row error of a [`Record::TooLong`].
    pub fn too_long(position: InputPosition, len: u64, max: usize) -> RowError {
        RowError {
            position,
            field: None,
            reason: RejectReason::LineTooLong,
            message: format!("{len} bytes, longer than max_line_bytes ({max}); not read"),
        }
    }
}

/// Stream the records of `src` (of its [`Part`]) into `f`, stopping early when `f` returns
/// `false`. `counter` is advanced by the raw bytes read; no record longer than
/// `max_line_bytes` is held in memory. Parquet row groups are read by
/// [`crate::convert::parquet_rows::read_parquet_rows`], not here.
pub fn read_records(
    src: &SourceFile,
    counter: Arc<AtomicU64>,
    max_line_bytes: usize,
    f: &mut dyn FnMut(Record<'_>) -> bool,
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(&src.path, e);
    match src.part {
        Part::Nothing | Part::RowGroups(_) => Ok(()),
        Part::Lines { start, end } => read_line_range(src, counter, start, end, max_line_bytes, f),
        Part::All => {
            let array = src.layout == Layout::Json && holds_array(src)?;
            let mut reader = open(src, counter)?;
            let bom = skip_bom(&mut *reader).map_err(io)?;
            if array {
                read_array(&mut *reader, src, 1, max_line_bytes, f)
            } else {
                read_lines(&mut *reader, src, 0, bom, max_line_bytes, u64::MAX, f)
            }
            .map_err(io)
        }
    }
}

/// Consume a UTF-8 byte order mark at the start of `reader`; its length (0 when none).
fn skip_bom(reader: &mut dyn BufRead) -> std::io::Result<u64> {
    let bom = crate::convert::row::BOM;
    if reader.fill_buf()?.starts_with(bom) {
        reader.consume(bom.len());
        return Ok(bom.len() as u64);
    }
    Ok(0)
}

/// The lines of an uncompressed file that start in bytes `start..end`, numbered as in the
/// whole file (the newlines before `start` are counted). The first line starts at byte 0, its
/// byte order mark included: the shard whose range holds byte 0 reads it, and a range that
/// starts inside the mark starts inside that line.
fn read_line_range(
    src: &SourceFile,
    counter: Arc<AtomicU64>,
    start: u64,
    end: u64,
    max_line_bytes: usize,
    f: &mut dyn FnMut(Record<'_>) -> bool,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| Error::io(&src.path, e);
    let mut file = crate::storage::open_regular(&src.path)?;
    // Count the lines before `start`, and see whether `start` begins a line.
    let (mut newlines, mut at_line_start, mut pos) = (0u64, true, 0u64);
    {
        let mut prefix = BufReader::with_capacity(buffer_for(start), &file);
        while pos < start {
            let buf = prefix.fill_buf().map_err(io)?;
            if buf.is_empty() {
                return Ok(());
            }
            let n = buf.len().min((start - pos) as usize);
            newlines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
            at_line_start = buf[n - 1] == b'\n';
            prefix.consume(n);
            pos += n as u64;
        }
    }
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut reader = BufReader::with_capacity(
        buffer_for(end - start),
        Counting {
            inner: file,
            counter,
        },
    );
    let reader: &mut dyn BufRead = &mut reader;
    let mut budget = end - start;
    let bom = if start == 0 {
        skip_bom(reader).map_err(io)?
    } else {
        0
    };
    if !at_line_start {
        // The line that straddles `start` belongs to the shard before.
        let mut skipped = Vec::new();
        let len = read_line_bounded(reader, &mut skipped, 0).map_err(io)?;
        newlines += 1;
        budget = budget.saturating_sub(len);
        if len == 0 || budget == 0 {
            return Ok(());
        }
    }
    read_lines(reader, src, newlines, bom, max_line_bytes, budget, f).map_err(io)
}

/// A read buffer for `bytes` bytes: 1 MiB for large reads, less for a small shard's range
/// (a line past the range's end is read on with more fills).
fn buffer_for(bytes: u64) -> usize {
    bytes.clamp(8 << 10, 1 << 20) as usize
}

/// Read up to and including the next `\n` into `line`, keeping at most `max` bytes: returns
/// the line's full length (0 at the end of input); when it is above `max`, `line` is empty.
fn read_line_bounded(
    reader: &mut dyn BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<u64> {
    line.clear();
    let mut total = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (n, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        total += n as u64;
        if total <= max as u64 + 2 {
            line.extend_from_slice(&buf[..n]);
        } else if !line.is_empty() {
            *line = Vec::new();
        }
        reader.consume(n);
        if done {
            return Ok(total);
        }
    }
}

/// Lines until the end of input, or until `budget` bytes of lines have been read (a line
/// starting before the budget ends is read whole). `lead` bytes already consumed (a byte
/// order mark) are part of the first line: they count against the budget, not towards its
/// length or content.
fn read_lines(
    reader: &mut dyn BufRead,
    src: &SourceFile,
    first_line: u64,
    mut lead: u64,
    max_line_bytes: usize,
    mut budget: u64,
    f: &mut dyn FnMut(Record<'_>) -> bool,
) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(1 << 16);
    let mut number = first_line;
    while budget > 0 {
        let len = read_line_bounded(reader, &mut line, max_line_bytes)?;
        if len == 0 {
            return Ok(());
        }
        budget = budget.saturating_sub(len + lead);
        lead = 0;
        number += 1;
        let mut end = line.len();
        while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        let row = &line[..end];
        let pos = || InputPosition {
            path: src.path.clone(),
            line: number,
            element: None,
        };
        let keep_going = if row.len() > max_line_bytes || len > max_line_bytes as u64 + 2 {
            f(Record::TooLong(pos(), len))
        } else if row.iter().all(|b| b.is_ascii_whitespace()) {
            f(Record::Blank)
        } else {
            f(Record::Row(row, pos()))
        };
        if !keep_going {
            return Ok(());
        }
    }
    Ok(())
}

/// Where the scan of a JSON array is.
#[derive(PartialEq, Clone, Copy)]
enum ArrayState {
    /// Before the opening `[`.
    BeforeOpen,
    /// Right after `[`: a `]` closes an empty array, a `,` ends an empty element.
    AfterOpen,
    /// After a `,`: a `,` or `]` ends an empty element.
    AfterComma,
    /// Inside an element.
    InElement,
    /// After the closing `]`.
    AfterClose,
}

impl ArrayState {
    /// The state after an element (empty or not) ended by `c`, a `,` or the closing `]`.
    fn after_element(c: u8) -> ArrayState {
        if c == b']' {
            ArrayState::AfterClose
        } else {
            ArrayState::AfterComma
        }
    }
}

/// Open brackets tracked exactly, beyond which a closer is assumed to match (serde_json
/// rejects anything nested deeper than 128 anyway): bounds the memory of a hostile element.
const MAX_TRACKED_DEPTH: usize = 4096;

/// Strings, escapes and open brackets inside one array element: enough to see where it ends,
/// leniently enough that a malformed element does not swallow the ones after it. On valid
/// JSON none of the lenient rules ever applies (see [`read_array`]).
#[derive(Default)]
struct Nesting {
    /// The open brackets (`{` or `[`), innermost last.
    open: Vec<u8>,
    /// Brackets opened beyond [`MAX_TRACKED_DEPTH`].
    deep: u64,
    in_str: bool,
    escaped: bool,
    /// The offset in the element of a `,` inside an object followed so far by whitespace only.
    comma: Option<u64>,
}

/// What one byte of an element does.
enum Step {
    /// Part of the element.
    Inside,
    /// A `,` or `]` that ends the element (and is not part of it).
    End,
    /// A `{` or `[` that starts the next element: this one ended at its `,` at this offset.
    Split(u64),
}

impl Nesting {
    /// Account for byte `c`, at offset `at` of the element.
    fn feed(&mut self, c: u8, at: u64) -> Step {
        if self.in_str {
            if c == b'\n' {
                // A raw newline cannot be inside a JSON string: the string was not closed.
                (self.in_str, self.escaped) = (false, false);
            } else if self.escaped {
                self.escaped = false;
            } else if c == b'\\' {
                self.escaped = true;
            } else if c == b'"' {
                self.in_str = false;
            }
            return Step::Inside;
        }
        if let Some(comma) = self.comma {
            if c.is_ascii_whitespace() {
                return Step::Inside;
            }
            self.comma = None;
            if c == b'{' || c == b'[' {
                return Step::Split(comma);
            }
        }
        match c {
            b',' | b']' if self.open.is_empty() && self.deep == 0 => return Step::End,
            b'"' => self.in_str = true,
            b'{' | b'[' if self.open.len() < MAX_TRACKED_DEPTH => self.open.push(c),
            b'{' | b'[' => self.deep += 1,
            b'}' | b']' if self.deep > 0 => self.deep -= 1,
            b'}' | b']' => {
                // Close up to the matching bracket; a closer without one is left to the
                // element's parse to reject.
                let opener = if c == b'}' { b'{' } else { b'[' };
                if let Some(i) = self.open.iter().rposition(|&o| o == opener) {
                    self.open.truncate(i);
                }
            }
            b',' if self.deep == 0 && self.open.last() == Some(&b'{') => self.comma = Some(at),
            _ => {}
        }
        Step::Inside
    }
}

/// The element being collected: its bytes (up to the limit), its length, where it started.
struct Element {
    bytes: Vec<u8>,
    len: u64,
    line: u64,
    index: u64,
}

impl Element {
    fn push(&mut self, c: u8, max: usize) {
        self.len += 1;
        if self.len <= max as u64 {
            self.bytes.push(c);
        }
    }

    /// The element as a record (trailing whitespace trimmed), or `TooLong`.
    fn record(&mut self, path: &Path, max: usize) -> Record<'_> {
        let pos = InputPosition {
            path: path.to_path_buf(),
            line: self.line,
            element: Some(self.index),
        };
        if self.len > max as u64 {
            self.bytes = Vec::new();
            return Record::TooLong(pos, self.len);
        }
        while self.bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            self.bytes.pop();
        }
        Record::Row(&self.bytes, pos)
    }
}

/// Split a top-level JSON array into its elements without parsing them: track strings,
/// escapes and brackets. Each element is then parsed on its own, so one bad element is one
/// rejected row, and the elements after it are read as usual:
/// - an element ends at a `,` or `]` outside strings and brackets;
/// - an empty element (`[,`, `,,`, a trailing `,]`) is a rejected `invalid_json` row at the
///   line of the `,` or `]` that ends it (Python's `json` rejects them);
/// - leniency for malformed elements, none of which applies to valid JSON: a closing bracket
///   closes up to its matching opener (one without is ignored); a raw newline ends a string;
///   a `,` inside an object followed by `{` or `[` (only a key may follow a `,` there) was
///   the array's separator after an element missing its closing brackets, so the element
///   ends at that `,`.
///
/// What no reader can tell: an element left open inside a list (`{"pos": ["a", {...}, ...`)
/// or inside a string on one line reads as the start of valid JSON, and runs on, with the
/// elements after it, until its brackets close (or the file ends): one rejected row.
///
/// A file that ends before the closing `]`, or has data after it, ends with one broken row.
fn read_array(
    reader: &mut dyn BufRead,
    src: &SourceFile,
    first_line: u64,
    max_line_bytes: usize,
    f: &mut dyn FnMut(Record<'_>) -> bool,
) -> std::io::Result<()> {
    let mut state = ArrayState::BeforeOpen;
    let mut line = first_line;
    let mut nesting = Nesting::default();
    let mut cur = Element {
        bytes: Vec::new(),
        len: 0,
        line: first_line,
        index: 0,
    };
    let broken = |line: u64, element: Option<u64>, msg: &str| {
        Record::Broken(RowError {
            position: InputPosition {
                path: src.path.clone(),
                line,
                element,
            },
            field: None,
            reason: RejectReason::InvalidJson,
            message: msg.into(),
        })
    };
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        for &c in buf {
            line += u64::from(c == b'\n');
            match state {
                ArrayState::BeforeOpen if c == b'[' => state = ArrayState::AfterOpen,
                ArrayState::BeforeOpen => {}
                ArrayState::AfterClose if c.is_ascii_whitespace() => {}
                ArrayState::AfterClose => {
                    f(broken(line, None, "unexpected data after the closing ']'"));
                    return Ok(());
                }
                ArrayState::AfterOpen if c == b']' => state = ArrayState::AfterClose,
                ArrayState::AfterOpen | ArrayState::AfterComma if c == b',' || c == b']' => {
                    let what = match (state, c) {
                        (ArrayState::AfterOpen, _) => "empty array element (',' right after '[')",
                        (_, b',') => "empty array element (two ',' in a row)",
                        _ => "empty array element (a trailing ',' before ']')",
                    };
                    if !f(broken(line, Some(cur.index), what)) {
                        return Ok(());
                    }
                    cur.index += 1;
                    state = ArrayState::after_element(c);
                }
                ArrayState::AfterOpen | ArrayState::AfterComma if c.is_ascii_whitespace() => {}
                ArrayState::AfterOpen | ArrayState::AfterComma => {
                    state = ArrayState::InElement;
                    start_element(&mut cur, &mut nesting, c, line, max_line_bytes);
                }
                ArrayState::InElement => match nesting.feed(c, cur.len) {
                    Step::Inside => cur.push(c, max_line_bytes),
                    Step::End => {
                        if !f(cur.record(&src.path, max_line_bytes)) {
                            return Ok(());
                        }
                        cur.index += 1;
                        state = ArrayState::after_element(c);
                    }
                    Step::Split(comma) => {
                        cur.len = comma;
                        cur.bytes.truncate(comma as usize);
                        if !f(cur.record(&src.path, max_line_bytes)) {
                            return Ok(());
                        }
                        cur.index += 1;
                        start_element(&mut cur, &mut nesting, c, line, max_line_bytes);
                    }
                },
            }
        }
        reader.consume(n);
    }
    if state != ArrayState::AfterClose {
        let inside = state == ArrayState::InElement;
        f(broken(
            if inside { cur.line } else { line },
            inside.then_some(cur.index),
            "file ends inside the JSON array (truncated?)",
        ));
    }
    Ok(())
}

/// Start element `cur.index` with its first byte `c` (not whitespace, `,` or `]`).
fn start_element(cur: &mut Element, nesting: &mut Nesting, c: u8, line: u64, max: usize) {
    (cur.len, cur.line) = (0, line);
    cur.bytes.clear();
    nesting.open.clear();
    (nesting.deep, nesting.in_str, nesting.escaped, nesting.comma) = (0, false, false, None);
    nesting.feed(c, 0);
    cur.push(c, max);
}

#[cfg(test)]
mod tests {
    use super::ShardBounds;
    use crate::sample::KeyedRng;

    /// The closed-form owner is the linear scan it replaced (the first shard whose range ends
    /// after the byte, else the last), on every byte of small inputs for every n up to well
    /// past the total (empty ranges); and on huge values it names the range holding the byte.
    #[test]
    fn the_owner_of_a_byte_is_the_shard_whose_range_holds_it() {
        let mut checked = 0u64;
        for total in 0..48u64 {
            for n in 1..120usize {
                let b = ShardBounds { total, n };
                for at in 0..=total + 1 {
                    let scan = (0..n).find(|&j| at < b.bound(j + 1)).unwrap_or(n - 1);
                    assert_eq!(b.owner(at), scan, "total {total}, n {n}, byte {at}");
                    checked += 1;
                }
            }
        }
        let mut rng = KeyedRng::new(&[17, 2]);
        for i in 0..100_000u64 {
            let total = match i % 3 {
                0 => rng.next_u64(),
                1 => u64::MAX - rng.below(4),
                _ => 1 + rng.below(1 << 20),
            };
            let n = match i % 4 {
                0 => usize::MAX - rng.below(4) as usize,
                1 => 1 + rng.next_u64() as usize % usize::MAX,
                _ => 1 + rng.below(1 << 40) as usize,
            };
            let b = ShardBounds { total, n };
            let at = rng.below(total.max(1));
            let j = b.owner(at);
            assert!(j < n, "total {total}, n {n}, byte {at}: shard {j}");
            assert!(
                b.bound(j) <= at && at < b.bound(j + 1),
                "total {total}, n {n}, byte {at}: shard {j} holds {}..{}",
                b.bound(j),
                b.bound(j + 1)
            );
            checked += 1;
        }
        println!("shard owner: {checked} bytes checked");
    }
}
