//! Datasets in object storage (cargo feature `remote`): open through a verified local cache,
//! publish by upload with the manifest last.
//!
//! A dataset at a URL (`s3://bucket/prefix/ds`; `file:///abs/dir` reads a local directory
//! through the same code) has the on-disk layout, one object per file: `URL/manifest.json` and
//! the files it lists. Credentials and endpoints come from the environment the standard way:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
//! `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` for S3-compatible stores (MinIO, Ceph, R2; an
//! `http://` endpoint is allowed because it was named), `AWS_PROFILE` with
//! `~/.aws/credentials` and `~/.aws/config` when no key is set, then the instance's role.
//!
//! ## Reading: [`fetch`] and [`open`]
//! 1. `URL/manifest.json` is fetched (at most [`format::MAX_MANIFEST_BYTES`]) and checked as at
//!    every open: this format, a supported version, the seal. Its seal names the cache entry,
//!    so a cached copy of another version of the dataset (another seal) is never used.
//! 2. The cache directory holds, per seal `S`:
//!    ```text
//!    CACHE/S/                           a complete, verified copy (appears by one rename)
//!    CACHE/S.lock                       flock: exclusive to download or evict, shared to open;
//!                                       its mtime is the entry's last use (for eviction)
//!    CACHE/.S.rankfeed-tmp-PID-SEQ/     a download in progress
//!    ```
//!    An open takes the shared lock; when `CACHE/S` holds this manifest it opens the copy (a
//!    cache hit). Otherwise it takes the exclusive lock, so of the processes of a node opening
//!    the same dataset one downloads and the others wait and then share the copy.
//! 3. The download streams each listed file in ranged parts ([`PART_BYTES`], up to
//!    [`PARALLEL_PARTS`] at once, written and hashed in order), checks the object's size
//!    against the manifest on every part and the file's xxh3-64 as the last part arrives, and
//!    writes the manifest last. Only then is the staging directory fsynced and renamed to
//!    `CACHE/S`. A crashed or killed downloader leaves only a staging directory, removed by
//!    the next download once its process is gone, and its lock is released by the kernel.
//! 4. Transient errors (connection resets, timeouts, 5xx, a body cut short) are retried with
//!    exponential backoff, a cut body from where it stopped (object_store does this within a
//!    request; rankfeed retries a part [`ATTEMPTS`] times); a file whose checksum does not hold
//!    is downloaded again, [`ATTEMPTS`] times in all. A permanent error (no such object,
//!    access denied, an object of another size than the manifest says) names the object.
//! 5. With a size limit, whole entries are evicted, least recently used first, after a
//!    download; an entry another process holds (shared lock) is skipped. The entry just opened
//!    is kept even when it alone exceeds the limit.
//!
//! A copy is verified once, as it arrives; a cache hit is then an ordinary local open (its
//! O(1) checks). An entry that fails them (changed by hand) is downloaded again.
//!
//! ## Writing: [`upload`] and [`upload_tree`]
//! A dataset is uploaded file by file (multipart above [`PART_BYTES`]), each file hashed as it
//! is read and checked against its manifest first, and `manifest.json` last, so a reader never
//! sees a manifest whose files are not all in place. Replacing a dataset deletes the old
//! manifest first: while the new files go up the URL holds no dataset, and an interrupted
//! upload leaves none (never a mix; a reader that fetched the old manifest just before gets a
//! checksum error naming the replaced object, never wrong data in its cache). A Parquet
//! export is uploaded the same way with a `_SUCCESS` marker last (Spark's convention).

use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};

use crate::dataset::{manifest_too_large, parse_manifest, Dataset};
use crate::error::{Error, Result};
use crate::format::{self, Manifest};
use crate::publish::Staging;

/// Bytes per ranged GET of a download and per part of a multipart upload. Downloads use
/// `$RANKFEED_REMOTE_PART_BYTES` instead when it is set (tests make many small parts).
pub const PART_BYTES: u64 = 8 << 20;

fn download_part_bytes() -> u64 {
    std::env::var("RANKFEED_REMOTE_PART_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(PART_BYTES)
}
/// Parts of one file in flight at once.
pub const PARALLEL_PARTS: usize = 8;
/// Attempts per part and per file (a checksum that does not hold) before the error stands.
pub const ATTEMPTS: u32 = 4;
/// The marker uploaded last by [`upload_tree`].
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// The environment variable naming the default cache directory.
pub const CACHE_ENV: &str = "RANKFEED_CACHE";

/// Whether `s` names an object-store URL (`scheme://...`) rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+')
    })
}

/// The local cache of remote datasets.
#[derive(Debug, Clone)]
pub struct Cache {
    /// The cache directory.
    pub dir: PathBuf,
    /// Evict whole datasets, least recently used first, beyond this many bytes.
    pub max_bytes: Option<u64>,
}

impl Cache {
    /// The cache at `dir`, or at `$RANKFEED_CACHE`, `$XDG_CACHE_HOME/rankfeed/datasets` or
    /// `~/.cache/rankfeed/datasets`.
    pub fn new(dir: Option<PathBuf>, max_bytes: Option<u64>) -> Cache {
        let dir = dir
            .or_else(|| std::env::var_os(CACHE_ENV).map(PathBuf::from))
            .unwrap_or_else(|| {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(std::env::temp_dir);
                base.join("rankfeed").join("datasets")
            });
        Cache { dir, max_bytes }
    }
}

/// What a [`fetch`] did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// The dataset's seal (the cache entry's name).
    pub seal: String,
    /// Whether this call downloaded the files (false: a cache hit, possibly after waiting for
    /// another process's download).
    pub downloaded: bool,
    /// Files and bytes downloaded by this call.
    pub files: u64,
    /// Bytes downloaded by this call.
    pub bytes: u64,
    /// Requests this call made (manifest, parts, retries).
    pub requests: u64,
    /// Parts and files fetched again after a transient error or a checksum that did not hold.
    pub retries: u64,
    /// Seconds spent waiting for another process's download.
    pub waited_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
    /// Cache entries evicted after this call.
    pub evicted: Vec<String>,
}

/// A verified local copy of a remote dataset, kept from eviction while this value lives.
#[derive(Debug)]
pub struct Fetched {
    /// The copy's directory.
    pub dir: PathBuf,
    /// What the fetch did.
    pub report: FetchReport,
    _lock: Lock,
}

/// Open the dataset at `url` through `cache`: [`fetch`], then [`Dataset::open`] of the copy.
/// Keep the [`Fetched`] while the dataset is in use: it holds the entry's shared lock, so no
/// other process's eviction removes the copy meanwhile.
pub fn open(url: &str, cache: &Cache) -> Result<(Dataset, Fetched)> {
    let (fetched, ds) = fetch_and_open(url, cache)?;
    Ok((ds, fetched))
}

/// Resolve a dataset argument: a URL is fetched through `cache`; a local path is returned as
/// it is (and `None`, nothing to keep alive).
pub fn resolve(arg: &str, cache: &Cache) -> Result<(PathBuf, Option<Fetched>)> {
    if is_url(arg) {
        let f = fetch(arg, cache)?;
        Ok((f.dir.clone(), Some(f)))
    } else {
        Ok((PathBuf::from(arg), None))
    }
}

/// A store and the key prefix of one URL.
#[derive(Clone)]
struct Location {
    store: Arc<dyn ObjectStore>,
    /// The URL's path as a key (percent-decoded; the store encodes it again in requests).
    prefix: Key,
    url: String,
    /// `scheme://host`: object URLs are `{base}/{key}`.
    base: String,
}

impl Location {
    fn parse(url: &str) -> Result<Location> {
        let url = url.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&url)
            .map_err(|e| Error::argument("url", format!("{url}: not a URL ({e})")))?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => s3_store_cached(&parsed)?,
            "file" => Arc::new(object_store::local::LocalFileSystem::new()),
            other => {
                return Err(Error::argument(
                    "url",
                    format!(
                        "{url}: the scheme {other}:// is not supported (s3:// and file:// are)"
                    ),
                ))
            }
        };
        let prefix = Key::from_url_path(parsed.path()).map_err(|e| {
            Error::argument("url", format!("{url}: not a usable object path ({e})"))
        })?;
        let base = format!("{}://{}", parsed.scheme(), parsed.host_str().unwrap_or(""));
        Ok(Location {
            store,
            prefix,
            url,
            base,
        })
    }

    /// The key of `name` (`/`-separated) under the prefix.
    fn key(&self, name: &str) -> Key {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |k, p| k.join(p))
    }

    /// The prefix as a listing prefix (`None`: the whole bucket).
    fn list_prefix(&self) -> Option<&Key> {
        (!self.prefix.as_ref().is_empty()).then_some(&self.prefix)
    }

    fn object_url(&self, name: &str) -> String {
        self.key_url(&self.key(name))
    }

    fn key_url(&self, key: &Key) -> String {
        format!("{}/{}", self.base, key)
    }

    fn err(&self, name: &str, e: object_store::Error) -> Error {
        self.key_err(&self.key(name), e)
    }

    fn key_err(&self, key: &Key, e: object_store::Error) -> Error {
        let what = match &e {
            object_store::Error::NotFound { .. } => "no such object".to_string(),
            object_store::Error::PermissionDenied { .. } => format!("access denied: {e}"),
            object_store::Error::Unauthenticated { .. } => {
                format!("not authenticated (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE): {e}")
            }
            _ => e.to_string(),
        };
        Error::Remote {
            url: self.key_url(key),
            message: what,
        }
    }

    /// Refuse a destructive operation on a whole bucket.
    fn require_prefix(&self, what: &str) -> Result<()> {
        if self.prefix.as_ref().is_empty() {
            return Err(Error::argument(
                "url",
                format!("{}: {what} needs a prefix below the bucket", self.url),
            ));
        }
        Ok(())
    }
}

/// The S3 store of a bucket, built once per process and configuration: building a client
/// loads the system's CA certificates (milliseconds), which a warm open should not pay each
/// time. Keyed by the bucket URL and the `AWS_*` environment; a forked child builds its own.
fn s3_store_cached(url: &url::Url) -> Result<Arc<dyn ObjectStore>> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// Configuration key -> (the process that built it, the store).
    type Stores = HashMap<String, (u32, Arc<dyn ObjectStore>)>;
    static STORES: Mutex<Option<Stores>> = Mutex::new(None);
    let bucket = format!("s3://{}", url.host_str().unwrap_or(""));
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect();
    env.sort();
    let key = format!("{bucket}\n{env:?}");
    let pid = std::process::id();
    let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
    let map = stores.get_or_insert_with(HashMap::new);
    if let Some((p, store)) = map.get(&key) {
        if *p == pid {
            return Ok(store.clone());
        }
    }
    let store: Arc<dyn ObjectStore> = Arc::new(s3_store(&bucket)?);
    map.insert(key, (pid, store.clone()));
    Ok(store)
}

fn s3_store(url: &str) -> Result<object_store::aws::AmazonS3> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey as K};
    // reqwest is built without a bundled crypto provider: rustls's ring provider is the
    // process default (an `Err` only means some other code installed one first, which serves).
    static TLS: std::sync::Once = std::sync::Once::new();
    TLS.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut b = AmazonS3Builder::from_env().with_url(url);
    if b.get_config_value(&K::AccessKeyId).is_none() {
        for (k, v) in aws_profile() {
            b = b.with_config(k, v);
        }
    }
    let endpoint = b
        .get_config_value(&K::S3Endpoint)
        .or_else(|| b.get_config_value(&K::Endpoint));
    let client = object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(120));
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(120),
    };
    b = b.with_client_options(client).with_retry(retry);
    if endpoint.is_some_and(|e| e.starts_with("http://")) {
        b = b.with_allow_http(true);
    }
    b.build().map_err(|e| Error::Remote {
        url: url.to_string(),
        message: format!("cannot configure S3: {e}"),
    })
}

/// Credentials, region and endpoint of `AWS_PROFILE` (or `default`) from `~/.aws/credentials`
/// and `~/.aws/config` (or `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), for when no key
/// is set in the environment.
fn aws_profile() -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = |env: &str, name: &str| {
        std::env::var_os(env)
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws").join(name))
    };
    let mut out = Vec::new();
    let sections = [
        (
            path("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.clone(),
        ),
        (
            path("AWS_CONFIG_FILE", "config"),
            if profile == "default" {
                profile.clone()
            } else {
                format!("profile {profile}")
            },
        ),
    ];
    for (file, section) in sections {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let mut inside = false;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
            } else if let (true, Some((k, v))) = (inside, line.split_once('=')) {
                let key = match k.trim() {
                    "aws_access_key_id" => K::AccessKeyId,
                    "aws_secret_access_key" => K::SecretAccessKey,
                    "aws_session_token" => K::Token,
                    "region" => K::Region,
                    "endpoint_url" => K::Endpoint,
                    _ => continue,
                };
                out.push((key, v.trim().to_string()));
            }
        }
    }
    out
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One current-thread runtime per call: nothing to go stale across fork() (DataLoader and
    // Spark workers fork), and the I/O of one download needs no second thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))
}

/// The cache lock of one entry (an flock on `CACHE/S.lock`), released on drop.
#[derive(Debug)]
struct Lock {
    file: File,
    path: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Shared,
    Exclusive,
}

impl Lock {
    fn open(path: PathBuf) -> Result<Lock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Lock { file, path })
    }

    fn lock(&self, mode: Mode) -> Result<()> {
        use rustix::fs::FlockOperation as F;
        let op = match mode {
            Mode::Shared => F::LockShared,
            Mode::Exclusive => F::LockExclusive,
        };
        rustix::fs::flock(&self.file, op).map_err(|e| Error::io(&self.path, e.into()))
    }

    fn try_exclusive(&self) -> bool {
        rustix::fs::flock(
            &self.file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_ok()
    }

    fn unlock(&self) {
        let _ = rustix::fs::flock(&self.file, rustix::fs::FlockOperation::Unlock);
    }

    /// Record a use of the entry (its last-use time, for eviction).
    fn touch(&self) {
        let _ = self.file.set_modified(SystemTime::now());
    }
}

/// The files a manifest may list (anything else is refused before a path is made of it).
fn known_file(name: &str) -> bool {
    [
        format::PASSAGES_FILE,
        format::GROUPS_FILE,
        format::PROMPTS_FILE,
        format::REJECTS_FILE,
    ]
    .contains(&name)
}

/// The copy at `entry`, opened, when it is a complete copy of the dataset whose manifest
/// bytes are `manifest`.
fn complete(entry: &Path, manifest: &[u8]) -> Option<Dataset> {
    if std::fs::read(entry.join(format::MANIFEST_FILE)).ok()? != manifest {
        return None;
    }
    Dataset::open(entry).ok()
}

/// Fetch the dataset at `url` into `cache` (a no-op on a cache hit) and return the verified
/// local copy; see the module docs.
pub fn fetch(url: &str, cache: &Cache) -> Result<Fetched> {
    fetch_and_open(url, cache).map(|(f, _)| f)
}

fn fetch_and_open(url: &str, cache: &Cache) -> Result<(Fetched, Dataset)> {
    let start = Instant::now();
    let loc = Location::parse(url)?;
    let rt = runtime()?;
    let counters = Counters::default();
    let manifest_bytes = rt.block_on(get_manifest(&loc, &counters))?;
    let manifest = parse_manifest(
        Path::new(&loc.object_url(format::MANIFEST_FILE)),
        &manifest_bytes,
    )?;
    for name in manifest.files.keys() {
        if !known_file(name) {
            return Err(Error::corrupt(
                loc.object_url(format::MANIFEST_FILE),
                format!("lists {name:?}, which is not a file of the format"),
            ));
        }
    }
    let seal = manifest.checksum.clone();
    std::fs::create_dir_all(&cache.dir).map_err(|e| Error::io(&cache.dir, e))?;
    let entry = cache.dir.join(&seal);
    let lock = Lock::open(cache.dir.join(format!("{seal}.lock")))?;
    let mut report = FetchReport {
        seal: seal.clone(),
        ..Default::default()
    };
    lock.lock(Mode::Shared)?;
    let mut ds = complete(&entry, &manifest_bytes);
    if ds.is_none() {
        lock.unlock();
        let waiting = Instant::now();
        lock.lock(Mode::Exclusive)?;
        report.waited_seconds = waiting.elapsed().as_secs_f64();
        ds = complete(&entry, &manifest_bytes);
        if ds.is_none() {
            report.waited_seconds = 0.0;
            let staging = Staging::new(&entry, true)?;
            rt.block_on(download(&loc, &manifest, staging.path(), &counters))?;
            std::fs::write(staging.path().join(format::MANIFEST_FILE), &manifest_bytes)
                .map_err(|e| Error::io(staging.path(), e))?;
            // The copy passes the open's checks before it is published.
            Dataset::open(staging.path())?;
            staging.commit()?;
            report.downloaded = true;
            ds = Some(Dataset::open(&entry)?);
        }
        // Back to shared: the copy is complete and others may open it at once.
        lock.lock(Mode::Shared)?;
    }
    let ds = ds.ok_or_else(|| Error::Internal("no dataset after the fetch".into()))?;
    lock.touch();
    report.files = counters.files.load(Ordering::Relaxed);
    report.bytes = counters.bytes.load(Ordering::Relaxed);
    report.requests = counters.requests.load(Ordering::Relaxed);
    report.retries = counters.retries.load(Ordering::Relaxed);
    if let Some(max) = cache.max_bytes {
        // Another process may be evicting too: what it removed first is skipped, and an error
        // here never fails this fetch, whose copy is complete and locked.
        report.evicted = evict(&cache.dir, max, &seal).unwrap_or_default();
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok((
        Fetched {
            dir: entry,
            report,
            _lock: lock,
        },
        ds,
    ))
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    bytes: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

async fn get_manifest(loc: &Location, counters: &Counters) -> Result<Vec<u8>> {
    let name = format::MANIFEST_FILE;
    let key = loc.key(name);
    let mut attempt = 0;
    loop {
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let got = async {
            let r = loc.store.get_opts(&key, GetOptions::default()).await?;
            if r.meta.size > format::MAX_MANIFEST_BYTES {
                return Ok(None);
            }
            r.bytes().await.map(Some)
        }
        .await;
        match got {
            Ok(Some(b)) => return Ok(b.to_vec()),
            Ok(None) => return Err(manifest_too_large(Path::new(&loc.object_url(name)))),
            Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                attempt += 1;
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => return Err(loc.err(name, e)),
        }
    }
}

fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
    )
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(8))
}

/// Download every file of `manifest` into `dir`, verified (see the module docs).
async fn download(
    loc: &Location,
    manifest: &Manifest,
    dir: &Path,
    counters: &Counters,
) -> Result<()> {
    for (name, entry) in &manifest.files {
        let path = dir.join(name);
        let mut attempt = 0;
        loop {
            let sum =
                download_file(loc, &loc.key(name), entry.bytes, None, &path, counters).await?;
            if sum == entry.xxh3_64 {
                break;
            }
            attempt += 1;
            if attempt >= ATTEMPTS {
                return Err(Error::corrupt(
                    loc.object_url(name),
                    format!(
                        "xxh3-64 {sum} of the object, {ATTEMPTS} times downloaded, differs from the \
                         manifest's {} (the object is not the one sealed; was the dataset replaced \
                         while it was read?)",
                        entry.xxh3_64
                    ),
                ));
            }
            counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        counters.files.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(entry.bytes, Ordering::Relaxed);
    }
    Ok(())
}

/// Stream one object into `path` in ordered ranged parts; returns its xxh3-64. With `etag`
/// (from a listing), every part must come from that version of the object.
async fn download_file(
    loc: &Location,
    key: &Key,
    size: u64,
    etag: Option<&str>,
    path: &Path,
    counters: &Counters,
) -> Result<String> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let part = download_part_bytes();
    // Lazily: a manifest may claim any size; the first part's size check refuses a lie.
    let parts = (0..size.div_ceil(part)).map(move |i| {
        let start = i.saturating_mul(part);
        start..start.saturating_add(part).min(size)
    });
    if size == 0 {
        // An empty file: one plain GET (a zero-length range cannot be asked for).
        let b = get_part(loc, key, None, 0, etag, counters).await?;
        hasher.update(&b);
    }
    let mut stream = futures::stream::iter(parts)
        .map(|r| get_part(loc, key, Some(r), size, etag, counters))
        .buffered(PARALLEL_PARTS);
    while let Some(part) = stream.next().await {
        let part = part?;
        hasher.update(&part);
        file.write_all(&part).map_err(|e| Error::io(path, e))?;
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// One ranged GET (or the whole object for `None`), retried; the object's size must be `size`.
async fn get_part(
    loc: &Location,
    key: &Key,
    range: Option<Range<u64>>,
    size: u64,
    etag: Option<&str>,
    counters: &Counters,
) -> Result<bytes::Bytes> {
    let want = range.as_ref().map_or(0, |r| r.end - r.start);
    let mut attempt = 0;
    loop {
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let options = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            if_match: etag.map(str::to_string),
            ..Default::default()
        };
        let got = async {
            let r = loc.store.get_opts(key, options).await?;
            let total = r.meta.size;
            r.bytes().await.map(|b| (total, b))
        }
        .await;
        let failure = match got {
            Ok((total, _)) if total != size => {
                return Err(Error::corrupt(
                    loc.key_url(key),
                    format!(
                        "the object is {total} bytes, {size} were expected (not the sealed or \
                         listed object; was it replaced while it was read?)"
                    ),
                ))
            }
            Ok((_, b)) if b.len() as u64 == want => return Ok(b),
            Ok((_, b)) => format!("{} bytes arrived of {want}", b.len()),
            Err(object_store::Error::Precondition { .. }) => {
                return Err(Error::Remote {
                    url: loc.key_url(key),
                    message: "the object changed while it was read (its ETag no longer matches)"
                        .into(),
                })
            }
            Err(e) if transient(&e) => e.to_string(),
            Err(e) => return Err(loc.key_err(key, e)),
        };
        attempt += 1;
        if attempt >= ATTEMPTS {
            return Err(Error::Remote {
                url: loc.key_url(key),
                message: format!("gave up after {ATTEMPTS} attempts: {failure}"),
            });
        }
        counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Evict whole entries of `dir`, least recently used first, until at most `max` bytes remain;
/// `keep` and entries in use are skipped. Returns the evicted seals.
fn evict(dir: &Path, max: u64, keep: &str) -> Result<Vec<String>> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) || !e.path().is_dir() {
            continue;
        }
        let Ok(files) = std::fs::read_dir(e.path()) else {
            continue; // evicted by another process meanwhile
        };
        let size: u64 = files
            .filter_map(|f| f.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        let used = std::fs::metadata(dir.join(format!("{name}.lock")))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        total += size;
        entries.push((used, name, size));
    }
    entries.sort();
    let mut evicted = Vec::new();
    for (_, name, size) in entries {
        if total <= max {
            break;
        }
        if name == keep {
            continue;
        }
        let lock = Lock::open(dir.join(format!("{name}.lock")))?;
        if !lock.try_exclusive() || !dir.join(&name).is_dir() {
            continue; // open elsewhere, or evicted by another process meanwhile
        }
        // Out of the entry's name first (one rename), then removed: a crash in between leaves
        // a staging directory of a dead process, which the next download there removes.
        let staging = Staging::new(&dir.join(&name), true)?;
        let doomed = staging.path().to_path_buf();
        drop(staging);
        if std::fs::rename(dir.join(&name), &doomed).is_err() {
            continue;
        }
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        total -= size;
        evicted.push(name);
    }
    Ok(evicted)
}

/// What an upload did.
#[derive(Debug, Clone, Default)]
pub struct UploadReport {
    /// Files uploaded (the manifest or marker included).
    pub files: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Objects of a replaced dataset deleted.
    pub deleted: u64,
    /// Seconds in all.
    pub seconds: f64,
}

/// Upload the dataset directory `dir` to `url`, the manifest last (see the module docs). The
/// dataset is opened (its O(1) checks) and every file is checked against the manifest as it
/// is read, so a corrupt dataset is never sealed at the URL.
pub fn upload(dir: &Path, url: &str, overwrite: bool) -> Result<UploadReport> {
    let start = Instant::now();
    let ds = Dataset::open(dir)?;
    let manifest = ds.manifest().clone();
    drop(ds);
    let manifest_path = dir.join(format::MANIFEST_FILE);
    let manifest_bytes = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let loc = Location::parse(url)?;
    let rt = runtime()?;
    let mut report = rt.block_on(async {
        let mut report = UploadReport::default();
        let old = match loc.store.get(&loc.key(format::MANIFEST_FILE)).await {
            Ok(r) if r.meta.size > format::MAX_MANIFEST_BYTES => Some(bytes::Bytes::new()),
            Ok(r) => Some(
                r.bytes()
                    .await
                    .map_err(|e| loc.err(format::MANIFEST_FILE, e))?,
            ),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(loc.err(format::MANIFEST_FILE, e)),
        };
        let mut stale: Vec<String> = Vec::new();
        if let Some(old) = old {
            if !overwrite {
                return Err(Error::Exists {
                    path: PathBuf::from(&loc.url),
                });
            }
            // The old manifest goes first: from here until the new one is in place the URL
            // holds no dataset, never a mix.
            if let Ok(m) = serde_json::from_slice::<Manifest>(&old) {
                stale = m
                    .files
                    .keys()
                    .filter(|n| known_file(n) && !manifest.files.contains_key(*n))
                    .cloned()
                    .collect();
            }
            delete(&loc, format::MANIFEST_FILE).await?;
            report.deleted += 1;
        }
        for (name, entry) in &manifest.files {
            let path = dir.join(name);
            let (bytes, sum) = put_file(&loc, name, &path).await?;
            let expected = (entry.bytes, entry.xxh3_64.as_str());
            if (bytes, sum.as_str()) != expected {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "{bytes} bytes with xxh3-64 {sum} as read for upload; the manifest says \
                         {} bytes, {} (nothing sealed at {})",
                        entry.bytes, entry.xxh3_64, loc.url
                    ),
                ));
            }
            report.files += 1;
            report.bytes += bytes;
        }
        for name in &stale {
            delete(&loc, name).await?;
            report.deleted += 1;
        }
        put_bytes(&loc, format::MANIFEST_FILE, manifest_bytes.clone()).await?;
        report.files += 1;
        report.bytes += manifest_bytes.len() as u64;
        Ok(report)
    })?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Upload every file under `dir` (a Parquet export) to `url`, then a [`SUCCESS_MARKER`]
/// last. With `overwrite`, the objects under `url` are deleted first (the marker first of
/// all); without it, an existing object under `url` is an error.
pub fn upload_tree(dir: &Path, url: &str, overwrite: bool) -> Result<UploadReport> {
    let start = Instant::now();
    let loc = Location::parse(url)?;
    loc.require_prefix("uploading a tree of files")?;
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    let rt = runtime()?;
    let mut report = rt.block_on(async {
        let mut report = UploadReport::default();
        let existing: Vec<Key> = loc
            .store
            .list(loc.list_prefix())
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| loc.key_err(&loc.prefix, e))?;
        if !existing.is_empty() {
            if !overwrite {
                return Err(Error::Exists {
                    path: PathBuf::from(&loc.url),
                });
            }
            let marker = loc.key(SUCCESS_MARKER);
            let mut existing = existing;
            existing.sort_by_key(|k| *k != marker);
            for key in existing {
                loc.store
                    .delete(&key)
                    .await
                    .map_err(|e| loc.key_err(&key, e))?;
                report.deleted += 1;
            }
        }
        for rel in &files {
            let (bytes, _) = put_file(&loc, rel, &dir.join(rel)).await?;
            report.files += 1;
            report.bytes += bytes;
        }
        put_bytes(&loc, SUCCESS_MARKER, Vec::new()).await?;
        report.files += 1;
        Ok(report)
    })?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The files under `dir`, as `/`-separated paths relative to `root`, sorted.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push(
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
    }
    Ok(())
}

async fn delete(loc: &Location, name: &str) -> Result<()> {
    match loc.store.delete(&loc.key(name)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(loc.err(name, e)),
    }
}

async fn put_bytes(loc: &Location, name: &str, bytes: Vec<u8>) -> Result<()> {
    loc.store
        .put(&loc.key(name), PutPayload::from(bytes))
        .await
        .map(|_| ())
        .map_err(|e| loc.err(name, e))
}

/// Upload one local file (multipart above [`PART_BYTES`]); returns its size and xxh3-64 as
/// read.
async fn put_file(loc: &Location, name: &str, path: &Path) -> Result<(u64, String)> {
    let mut file = crate::storage::open_regular(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut read_part = |file: &mut File| -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(PART_BYTES as usize);
        Read::by_ref(file)
            .take(PART_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(path, e))?;
        hasher.update(&buf);
        Ok(buf)
    };
    let first = read_part(&mut file)?;
    let mut total = first.len() as u64;
    if (first.len() as u64) < PART_BYTES {
        put_bytes(loc, name, first).await?;
    } else {
        let key = loc.key(name);
        let upload = loc
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| loc.err(name, e))?;
        let mut writer =
            object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES as usize);
        writer.put(first.into());
        let parts: Result<()> = async {
            loop {
                writer
                    .wait_for_capacity(PARALLEL_PARTS)
                    .await
                    .map_err(|e| loc.err(name, e))?;
                let part = read_part(&mut file)?;
                if part.is_empty() {
                    return Ok(());
                }
                total += part.len() as u64;
                writer.put(part.into());
            }
        }
        .await;
        if let Err(e) = parts {
            // No orphaned parts left in the store.
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(|e| loc.err(name, e))?;
    }
    Ok((total, format!("{:016x}", hasher.digest())))
}

/// One input object to fetch: where it goes, and its placeholder's size.
struct Pending {
    loc: Location,
    key: Key,
    size: u64,
    etag: Option<String>,
    path: PathBuf,
}

/// List the input objects named by `urls` (objects, or prefixes of objects: "directories")
/// and lay them out under `dir` as placeholders of their sizes (sparse files). Returns, per
/// URL, the local path to read (a file, or a directory holding the prefix's objects under
/// their relative names) and the name to record for it (the URL), and what to download.
/// Per input URL, the local path to read and the name to record.
type Named = Vec<(PathBuf, String)>;

fn plan_inputs(urls: &[String], dir: &Path) -> Result<(Named, Vec<Pending>)> {
    let rt = runtime()?;
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let loc = Location::parse(url)?;
        let local_root = dir.join(i.to_string());
        let (single, listed) = rt.block_on(async {
            match loc.store.head(&loc.prefix).await {
                Ok(meta) => Ok((true, vec![meta])),
                Err(object_store::Error::NotFound { .. }) => {
                    let listed: Vec<object_store::ObjectMeta> = loc
                        .store
                        .list(loc.list_prefix())
                        .try_collect()
                        .await
                        .map_err(|e| loc.key_err(&loc.prefix, e))?;
                    if listed.is_empty() {
                        return Err(Error::Remote {
                            url: loc.url.clone(),
                            message: "no such object, and no objects under it".into(),
                        });
                    }
                    Ok((false, listed))
                }
                Err(e) => Err(loc.key_err(&loc.prefix, e)),
            }
        })?;
        for meta in listed {
            // Local names from the key's parts below the prefix (no `..` or empty part can
            // occur in a key); a single object keeps its last part.
            let parts: Vec<String> = if single {
                meta.location
                    .filename()
                    .map(|f| vec![f.to_string()])
                    .unwrap_or_else(|| vec!["input".into()])
            } else {
                match meta.location.prefix_match(&loc.prefix) {
                    Some(rest) => rest.map(|p| p.as_ref().to_string()).collect(),
                    None => continue,
                }
            };
            if parts.is_empty() {
                continue;
            }
            let path = parts
                .iter()
                .fold(local_root.clone(), |p, part| p.join(part));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            File::create(&path)
                .and_then(|f| f.set_len(meta.size))
                .map_err(|e| Error::io(&path, e))?;
            pending.push(Pending {
                loc: loc.clone(),
                key: meta.location,
                size: meta.size,
                etag: meta.e_tag,
                path,
            });
        }
        let local = match (single, pending.last()) {
            (true, Some(p)) => p.path.clone(),
            _ => local_root,
        };
        out.push((local, url.trim_end_matches('/').to_string()));
    }
    Ok((out, pending))
}

fn download_pending(pending: &[&Pending]) -> Result<()> {
    let rt = runtime()?;
    let counters = Counters::default();
    rt.block_on(async {
        for p in pending {
            download_file(
                &p.loc,
                &p.key,
                p.size,
                p.etag.as_deref(),
                &p.path,
                &counters,
            )
            .await?;
        }
        Ok(())
    })
}

/// A scratch directory in the cache (`CACHE/.work.rankfeed-tmp-PID-SEQ`), removed when dropped;
/// one left by a killed process is removed by the next one made.
#[derive(Debug)]
pub struct Scratch(Staging);

impl Scratch {
    /// A new scratch directory under `cache`.
    pub fn new(cache: &Cache) -> Result<Scratch> {
        Ok(Scratch(Staging::new(&cache.dir.join("work"), true)?))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Inputs of a conversion or an import, URLs among them downloaded into a scratch directory.
#[derive(Debug)]
pub struct Inputs {
    /// The local paths to read, in the order given.
    pub paths: Vec<PathBuf>,
    /// For each downloaded input, its local path and the URL to record for it.
    pub names: Vec<(PathBuf, String)>,
    _scratch: Option<Scratch>,
}

/// Resolve input arguments: local paths stay; URLs (objects, or prefixes read as directories)
/// are downloaded first. For shard `(k, n)` of a conversion, only the objects the shard opens
/// are downloaded (see [`crate::convert::source::shard_touches`]); the others are left as
/// placeholders of their sizes, which fix every shard's byte range as on the store.
pub fn inputs(args: &[String], cache: &Cache, shard: Option<(usize, usize)>) -> Result<Inputs> {
    let urls: Vec<String> = args.iter().filter(|a| is_url(a)).cloned().collect();
    if urls.is_empty() {
        return Ok(Inputs {
            paths: args.iter().map(PathBuf::from).collect(),
            names: Vec::new(),
            _scratch: None,
        });
    }
    let scratch = Scratch::new(cache)?;
    let (fetched, pending) = plan_inputs(&urls, scratch.path())?;
    let mut fetched = fetched.into_iter();
    let mut paths = Vec::new();
    let mut names = Vec::new();
    for a in args {
        if is_url(a) {
            let (local, url) = fetched
                .next()
                .ok_or_else(|| Error::Internal("an input URL was not listed".into()))?;
            paths.push(local.clone());
            names.push((local, url));
        } else {
            paths.push(PathBuf::from(a));
        }
    }
    let needed: Vec<&Pending> = match shard {
        Some((k, n)) if n > 0 && k < n => {
            // The converter's own expansion and order, on the placeholders (sizes only).
            let sources = crate::convert::source::discover(&paths)?;
            let sizes: Vec<u64> = sources.iter().map(|s| s.bytes).collect();
            let touched: std::collections::HashSet<&Path> = sources
                .iter()
                .zip(crate::convert::source::shard_touches(&sizes, k, n))
                .filter(|(_, t)| *t)
                .map(|(s, _)| s.path.as_path())
                .collect();
            pending
                .iter()
                .filter(|p| touched.contains(p.path.as_path()))
                .collect()
        }
        _ => pending.iter().collect(),
    };
    download_pending(&needed)?;
    Ok(Inputs {
        paths,
        names,
        _scratch: Some(scratch),
    })
}

/// What an output is: a dataset (manifest last) or a tree of files (a Parquet export, marker
/// last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A dataset directory: [`upload`].
    Dataset,
    /// Any files: [`upload_tree`].
    Tree,
}

/// Where a command writes: a local path, or a URL written into a scratch directory first and
/// uploaded by [`Output::finish`].
#[derive(Debug)]
pub struct Output {
    url: Option<String>,
    local: PathBuf,
    kind: OutputKind,
    overwrite: bool,
    _scratch: Option<Scratch>,
}

impl Output {
    /// Prepare to write `out`. For a URL, an existing output there is refused now, before any
    /// work, unless `overwrite`.
    pub fn new(out: &str, kind: OutputKind, overwrite: bool, cache: &Cache) -> Result<Output> {
        if !is_url(out) {
            return Ok(Output {
                url: None,
                local: PathBuf::from(out),
                kind,
                overwrite,
                _scratch: None,
            });
        }
        let loc = Location::parse(out)?;
        if !overwrite {
            let rt = runtime()?;
            let exists = rt.block_on(async {
                match kind {
                    OutputKind::Dataset => {
                        match loc.store.head(&loc.key(format::MANIFEST_FILE)).await {
                            Ok(_) => Ok(true),
                            Err(object_store::Error::NotFound { .. }) => Ok(false),
                            Err(e) => Err(loc.err(format::MANIFEST_FILE, e)),
                        }
                    }
                    OutputKind::Tree => {
                        let mut list = loc.store.list(loc.list_prefix());
                        match list.next().await {
                            None => Ok(false),
                            Some(Ok(_)) => Ok(true),
                            Some(Err(e)) => Err(loc.key_err(&loc.prefix, e)),
                        }
                    }
                }
            })?;
            if exists {
                return Err(Error::Exists {
                    path: PathBuf::from(&loc.url),
                });
            }
        }
        let scratch = Scratch::new(cache)?;
        let local = scratch.path().join("out");
        Ok(Output {
            url: Some(loc.url),
            local,
            kind,
            overwrite,
            _scratch: Some(scratch),
        })
    }

    /// The local path to write to.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// Whether the local write may replace what is at [`Output::path`].
    pub fn overwrite_local(&self) -> bool {
        self.url.is_none() && self.overwrite
    }

    /// The output as the user named it.
    pub fn name(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| self.local.display().to_string())
    }

    /// Upload what was written, for a URL; nothing for a local path.
    pub fn finish(self) -> Result<Option<UploadReport>> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let r = match self.kind {
            OutputKind::Dataset => upload(&self.local, url, self.overwrite)?,
            OutputKind::Tree => upload_tree(&self.local, url, self.overwrite)?,
        };
        Ok(Some(r))
    }
}

/// Delete every object under `url` (a dataset's manifest first, so no reader sees a partial
/// one); returns how many were deleted.
pub fn remove_tree(url: &str) -> Result<u64> {
    let loc = Location::parse(url)?;
    loc.require_prefix("removing")?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut keys: Vec<Key> = loc
            .store
            .list(loc.list_prefix())
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| loc.key_err(&loc.prefix, e))?;
        let manifest = loc.key(format::MANIFEST_FILE);
        keys.sort_by_key(|k| *k != manifest);
        for key in &keys {
            match loc.store.delete(key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(loc.key_err(key, e)),
            }
        }
        Ok(keys.len() as u64)
    })
}
