//! Training data: samples, bad-data reporting, deduplication, per-dataset rules and splits.
//!
//! **Pipeline.** Load the samples ([`load_manifest`] for the shared `MANIFEST.csv`,
//! [`load_folders`] for plain class folders), optionally check that every image decodes
//! ([`validate_images`]), remove byte-identical copies ([`dedup`]) and only then split
//! ([`lodo_splits`], [`stratified_kfold`], [`inner_source_folds`]). Training batches come from
//! [`balanced_batches`].
//!
//! **Bad data is never fatal and never silent.** A missing, unreadable or undecodable file, an
//! unknown label, a malformed manifest row or a sha256 that does not match the file is recorded
//! in the [`DataReport`] as a [`DataProblem`] (file and reason) and the sample is skipped; the
//! rest loads. Only problems with the input as a whole (an unreadable manifest, a header without
//! the required columns, a root that is not a folder, an invalid rules file) are [`DataError`]s.
//! Nothing in this module panics on bad data.
//!
//! **No leaks.** Splits are index lists into the deduplicated sample list. Leave-one-dataset-out
//! splits never put a dataset on both sides; k-fold keeps all images of one patient on one side.
//! Patient ids are scoped by dataset (`Patient_03` of one dataset is not `Patient_03` of
//! another). Because [`dedup`] runs before any split, no sha256 can be on both sides either.
//!
//! **Per-dataset rules** ([`DatasetRules`], `configs/datasets.json`) describe fixes such as
//! masking a burnt-in scale bar. They are keyed by dataset name in the config file only, so no
//! code path names a dataset; [`apply_rules`] works on the preprocessed CHW tensor.
//!
//! **Randomness** is a self-contained SplitMix64 stream derived from the caller's seed, so
//! splits and batches are reproducible across platforms and dependency updates.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::preprocess::{preprocess, Limits};

/// Side of the square tensor that [`validate_images`] decodes to (the LeukNet input size).
pub const VALIDATE_SIZE: u32 = 224;

/// Number of threads used by [`validate_images`] and for hashing files while loading.
pub const WORKER_THREADS: usize = 2;

/// File extensions (lower case) that the folder loader treats as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "tif", "tiff", "bmp"];

/// Folder names (compared case-insensitively) that [`load_folders`] maps to label 1 (leukemic).
pub const LEUKEMIC_FOLDER_NAMES: &[&str] = &[
    "1",
    "leukemic",
    "leukaemic",
    "leukemia",
    "leukaemia",
    "all",
    "aml",
    "apl",
    "cll",
    "cml",
    "blast",
    "blasts",
    "malignant",
    "pathological",
    "abnormal",
    "positive",
    "cancer",
];

/// Folder names (compared case-insensitively) that [`load_folders`] maps to label 0 (healthy).
pub const HEALTHY_FOLDER_NAMES: &[&str] = &[
    "0",
    "healthy",
    "normal",
    "benign",
    "hem",
    "negative",
    "non-pathological",
    "nonpathological",
    "non-leukemic",
    "nonleukemic",
    "non-leukaemic",
    "nonleukaemic",
];

/// File names the folder loader ignores without a report (besides names starting with `.`).
const IGNORED_FILE_NAMES: &[&str] = &["thumbs.db", "desktop.ini"];

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Name of the source dataset (the leave-one-dataset-out unit), e.g. `ALL-IDB2`.
    pub dataset: String,
    /// Path of the image file: the manifest's folder (or the folder root) joined with the
    /// relative path, so it is absolute or relative to the working directory exactly as the
    /// data root was given.
    pub path: PathBuf,
    /// Binary label: 1 = leukemic/pathological cell, 0 = healthy/non-pathological cell.
    pub label: u8,
    /// Finer label as the source states it (cell type, class folder name …); may be empty.
    pub fine_label: String,
    /// Patient id where the source has one (scoped by dataset), else `None`.
    pub patient: Option<String>,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
}

/// What kind of problem a [`DataProblem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The file does not exist.
    Missing,
    /// The file exists but could not be read.
    Unreadable,
    /// The label (column value, folder or file name) is not one this module knows.
    UnknownLabel,
    /// The file's sha256 differs from the one the manifest states.
    ShaMismatch,
    /// The file could not be decoded by [`crate::preprocess::preprocess`].
    Undecodable,
    /// A manifest row is malformed (wrong field count, empty dataset or path, broken quoting).
    BadRow,
    /// A file in a data folder that is not an image (by extension).
    NotAnImage,
}

/// One skipped input and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataProblem {
    /// The file concerned (for a malformed manifest row: the manifest itself).
    pub path: PathBuf,
    /// Human-readable reason, with the manifest line where there is one.
    pub reason: String,
    /// Machine-readable category of `reason`.
    pub kind: ProblemKind,
}

impl fmt::Display for DataProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// A byte-identical copy removed by [`dedup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Duplicate {
    /// The copy that was kept (the first in sample order).
    pub kept: PathBuf,
    /// The copy that was removed.
    pub removed: PathBuf,
    /// Dataset of the kept copy.
    pub kept_dataset: String,
    /// Dataset of the removed copy (differs from `kept_dataset` for a cross-dataset copy).
    pub removed_dataset: String,
    /// The shared sha256.
    pub sha256: String,
}

/// Everything skipped or removed on the way from files to samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    /// Inputs that were skipped, each with its file and reason.
    pub problems: Vec<DataProblem>,
    /// Copies removed by [`dedup`].
    pub duplicates: Vec<Duplicate>,
    /// Number of samples kept after the last step that took this report (a loader,
    /// [`validate_images`] or [`dedup`]).
    pub loaded: usize,
}

impl DataReport {
    /// Number of problems of one kind.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.problems.iter().filter(|p| p.kind == kind).count()
    }

    /// One line per problem and duplicate, for logs.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} samples kept, {} problems, {} duplicates removed\n",
            self.loaded,
            self.problems.len(),
            self.duplicates.len()
        );
        for p in &self.problems {
            out.push_str(&format!("problem: {p}\n"));
        }
        for d in &self.duplicates {
            out.push_str(&format!(
                "duplicate: {} ({}) removed, same bytes as {} ({})\n",
                d.removed.display(),
                d.removed_dataset,
                d.kept.display(),
                d.kept_dataset
            ));
        }
        out
    }

    fn push(&mut self, path: impl Into<PathBuf>, kind: ProblemKind, reason: impl Into<String>) {
        self.problems.push(DataProblem {
            path: path.into(),
            reason: reason.into(),
            kind,
        });
    }
}

/// Errors about an input as a whole (per-file problems go to [`DataReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A manifest, rules file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The manifest is empty or its header lacks required columns.
    #[error("{path}: bad manifest header: {reason}")]
    Header {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data root given to [`load_folders`] is not a folder.
    #[error("{path} is not a folder")]
    NotAFolder {
        /// The path given.
        path: PathBuf,
    },
    /// The rules file is not valid JSON of the expected shape.
    #[error("{path}: invalid dataset rules: {source}")]
    RulesJson {
        /// The rules file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A rule is out of range (e.g. a rectangle outside [0, 1] or with `x0 >= x1`).
    #[error("{path}: invalid rule for dataset {dataset:?}: {reason}")]
    InvalidRule {
        /// The rules file.
        path: PathBuf,
        /// The dataset whose rule is invalid.
        dataset: String,
        /// What is wrong.
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Hashing and parallel helpers
// ---------------------------------------------------------------------------------------------

/// Lower-case hex sha256 of `bytes` (the model card's function, re-exported for data code).
pub use crate::model_card::sha256_hex;

/// Maps `f` over `items` on up to `threads` scoped threads, keeping order. `None` marks an item
/// whose worker panicked (`f` itself should not panic; this keeps a bug from aborting a load).
fn par_map<T, R, F>(items: &[T], threads: usize, f: F) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    if items.is_empty() {
        return Vec::new();
    }
    let threads = threads.clamp(1, items.len());
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let handle = scope.spawn(move || {
                    part.iter()
                        .map(|item| catch_unwind(AssertUnwindSafe(|| f(item))).ok())
                        .collect::<Vec<_>>()
                });
                (part.len(), handle)
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for (len, handle) in handles {
            match handle.join() {
                Ok(results) => out.extend(results),
                Err(_) => out.extend((0..len).map(|_| None)),
            }
        }
        out
    })
}

/// Reads a file and hashes it, mapping I/O errors to report entries.
fn read_and_hash(path: &Path) -> Result<String, (ProblemKind, String)> {
    match fs::read(path) {
        Ok(bytes) => Ok(sha256_hex(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err((ProblemKind::Missing, "file not found".to_string()))
        }
        Err(e) => Err((ProblemKind::Unreadable, format!("cannot read file: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------------------------

/// One CSV record: the line it starts on and its fields (or why it is malformed).
struct CsvRecord {
    line: usize,
    fields: Result<Vec<String>, String>,
}

/// RFC 4180 CSV parsing by hand: fields may be quoted with `"`, a quoted field may hold commas,
/// newlines and `""` (an escaped quote); `\r\n` and `\n` both end a record; blank lines are
/// skipped. Lenient about stray quotes inside unquoted fields (kept literally); an unterminated
/// quoted field makes its record malformed.
fn parse_csv(text: &str) -> Vec<CsvRecord> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    loop {
        if chars.peek().is_none() {
            break;
        }
        let start_line = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut error = None;
        let mut ended = false;
        // Parse one record.
        loop {
            // At the start of a field.
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    if c == '"' {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            field.push('"');
                        } else {
                            closed = true;
                            break;
                        }
                    } else {
                        if c == '\n' {
                            line += 1;
                        }
                        field.push(c);
                    }
                }
                if !closed {
                    error = Some("unterminated quoted field".to_string());
                }
            }
            // Unquoted part (or text after a closing quote, kept leniently).
            let mut end_of_record = true;
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => {
                        chars.next();
                        end_of_record = false;
                        break;
                    }
                    '\n' => {
                        chars.next();
                        line += 1;
                        break;
                    }
                    '\r' => {
                        chars.next();
                        if chars.peek() == Some(&'\n') {
                            chars.next();
                        }
                        line += 1;
                        break;
                    }
                    _ => {
                        chars.next();
                        field.push(c);
                    }
                }
            }
            fields.push(std::mem::take(&mut field));
            if end_of_record {
                ended = true;
            }
            if ended {
                break;
            }
        }
        let blank = fields.len() == 1 && fields[0].trim().is_empty() && error.is_none();
        if !blank {
            records.push(CsvRecord {
                line: start_line,
                fields: match error {
                    Some(e) => Err(e),
                    None => Ok(fields),
                },
            });
        }
    }
    records
}

/// Column positions in the manifest header.
struct Columns {
    dataset: usize,
    path: usize,
    binary_label: usize,
    sha256: usize,
    label: Option<usize>,
    patient_id: Option<usize>,
    count: usize,
}

fn manifest_columns(csv: &Path, header: &[String]) -> Result<Columns, DataError> {
    let find = |name: &str| header.iter().position(|h| h.trim() == name);
    let required = ["dataset", "path", "binary_label", "sha256"];
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|n| find(n).is_none())
        .collect();
    match (
        find("dataset"),
        find("path"),
        find("binary_label"),
        find("sha256"),
    ) {
        (Some(dataset), Some(path), Some(binary_label), Some(sha256)) => Ok(Columns {
            dataset,
            path,
            binary_label,
            sha256,
            label: find("label"),
            patient_id: find("patient_id"),
            count: header.len(),
        }),
        _ => Err(DataError::Header {
            path: csv.to_path_buf(),
            reason: format!(
                "missing column(s) {}; found {}",
                missing.join(", "),
                header.join(",")
            ),
        }),
    }
}

/// A manifest row that passed the syntactic checks and waits for its file check.
struct PendingRow {
    line: usize,
    sample: Sample,
    expected_sha: String,
}

/// Loads the samples listed in a manifest CSV (the shared `MANIFEST.csv` format).
///
/// Columns are found by name in the header; `dataset`, `path`, `binary_label` and `sha256` are
/// required, `label` (the fine label) and `patient_id` are used when present, anything else
/// (`width`, `height`, `format` …) is ignored. Fields may be quoted (RFC 4180), so a label may
/// contain commas. Paths are relative to the CSV's folder. `binary_label` must be `0` or `1`.
///
/// Every file is read and hashed (on [`WORKER_THREADS`] threads) and its sha256 compared with
/// the manifest's (case-insensitively; an empty manifest value is filled in from the file).
/// Malformed rows, unknown labels, missing or unreadable files and sha256 mismatches are
/// recorded in the report and skipped. Images are not decoded here: call [`validate_images`].
///
/// # Errors
/// [`DataError::Io`] if the CSV cannot be read, [`DataError::Header`] if it is empty or lacks
/// a required column.
pub fn load_manifest(csv: &Path) -> Result<(Vec<Sample>, DataReport), DataError> {
    let text = fs::read_to_string(csv).map_err(|source| DataError::Io {
        path: csv.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let base = csv.parent().unwrap_or_else(|| Path::new(""));
    let mut records = parse_csv(text).into_iter();
    let header = match records.next() {
        Some(CsvRecord {
            fields: Ok(fields), ..
        }) => fields,
        Some(CsvRecord {
            fields: Err(e),
            line,
        }) => {
            return Err(DataError::Header {
                path: csv.to_path_buf(),
                reason: format!("line {line}: {e}"),
            })
        }
        None => {
            return Err(DataError::Header {
                path: csv.to_path_buf(),
                reason: "the file is empty".to_string(),
            })
        }
    };
    let cols = manifest_columns(csv, &header)?;
    let mut report = DataReport::default();
    let mut pending = Vec::new();
    for record in records {
        let line = record.line;
        let fields = match record.fields {
            Ok(f) => f,
            Err(e) => {
                report.push(csv, ProblemKind::BadRow, format!("line {line}: {e}"));
                continue;
            }
        };
        if fields.len() != cols.count {
            report.push(
                csv,
                ProblemKind::BadRow,
                format!(
                    "line {line}: {} fields, the header has {}",
                    fields.len(),
                    cols.count
                ),
            );
            continue;
        }
        let dataset = fields[cols.dataset].trim();
        let rel = fields[cols.path].trim();
        if dataset.is_empty() || rel.is_empty() {
            report.push(
                csv,
                ProblemKind::BadRow,
                format!("line {line}: empty dataset or path"),
            );
            continue;
        }
        let path = base.join(rel);
        let label = match fields[cols.binary_label].trim() {
            "1" => 1,
            "0" => 0,
            other => {
                report.push(
                    &path,
                    ProblemKind::UnknownLabel,
                    format!("line {line}: unknown binary_label {other:?} (expected 0 or 1)"),
                );
                continue;
            }
        };
        let fine_label = cols
            .label
            .map(|i| fields[i].trim().to_string())
            .unwrap_or_default();
        let patient = cols
            .patient_id
            .map(|i| fields[i].trim())
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        pending.push(PendingRow {
            line,
            sample: Sample {
                dataset: dataset.to_string(),
                path,
                label,
                fine_label,
                patient,
                sha256: String::new(),
            },
            expected_sha: fields[cols.sha256].trim().to_ascii_lowercase(),
        });
    }
    let hashes = par_map(&pending, WORKER_THREADS, |row| {
        read_and_hash(&row.sample.path)
    });
    let mut samples = Vec::with_capacity(pending.len());
    for (row, hash) in pending.into_iter().zip(hashes) {
        let line = row.line;
        match hash {
            None => report.push(
                &row.sample.path,
                ProblemKind::Unreadable,
                format!("line {line}: internal error while hashing"),
            ),
            Some(Err((kind, reason))) => {
                report.push(&row.sample.path, kind, format!("line {line}: {reason}"))
            }
            Some(Ok(actual)) => {
                if !row.expected_sha.is_empty() && row.expected_sha != actual {
                    report.push(
                        &row.sample.path,
                        ProblemKind::ShaMismatch,
                        format!(
                            "line {line}: sha256 mismatch: manifest {}, file {actual}",
                            row.expected_sha
                        ),
                    );
                    continue;
                }
                let mut sample = row.sample;
                sample.sha256 = actual;
                samples.push(sample);
            }
        }
    }
    report.loaded = samples.len();
    Ok((samples, report))
}

// ---------------------------------------------------------------------------------------------
// Folders
// ---------------------------------------------------------------------------------------------

/// Label of a class folder name, or `None` if it is not one of the accepted names.
///
/// Case-insensitive; spaces and underscores count as `-`. Accepted names are
/// [`LEUKEMIC_FOLDER_NAMES`] (label 1) and [`HEALTHY_FOLDER_NAMES`] (label 0).
pub fn folder_label(name: &str) -> Option<u8> {
    let norm: String = name
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c == '_' || c == ' ' { '-' } else { c })
        .collect();
    if LEUKEMIC_FOLDER_NAMES.contains(&norm.as_str()) {
        Some(1)
    } else if HEALTHY_FOLDER_NAMES.contains(&norm.as_str()) {
        Some(0)
    } else {
        None
    }
}

/// Label of an ALL-IDB style file name `ImNNN_L.ext` (`Im` in any case, one or more digits,
/// `_`, then `L` = `0` or `1`, an image extension), or `None`.
pub fn allidb_label(file_name: &str) -> Option<u8> {
    let (stem, ext) = file_name.rsplit_once('.')?;
    if !IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) {
        return None;
    }
    let rest = stem
        .strip_prefix("Im")
        .or_else(|| stem.strip_prefix("im"))
        .or_else(|| stem.strip_prefix("IM"))
        .or_else(|| stem.strip_prefix("iM"))?;
    let (digits, label) = rest.split_once('_')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match label {
        "1" => Some(1),
        "0" => Some(0),
        _ => None,
    }
}

fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || IGNORED_FILE_NAMES.contains(&name.to_ascii_lowercase().as_str())
}

/// Sorted entries of a folder as (path, is_dir); unreadable entries are reported.
fn list_dir(dir: &Path, report: &mut DataReport) -> Vec<(PathBuf, bool)> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            report.push(
                dir,
                ProblemKind::Unreadable,
                format!("cannot list folder: {e}"),
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                // Follow symlinks: a linked folder or file counts as what it points to.
                let is_dir = path.is_dir();
                out.push((path, is_dir));
            }
            Err(e) => report.push(
                dir,
                ProblemKind::Unreadable,
                format!("cannot read a folder entry: {e}"),
            ),
        }
    }
    out.sort();
    out
}

/// Collects image files under a class folder (recursively), reporting non-image files.
fn collect_images(
    dir: &Path,
    fine: &str,
    label: u8,
    depth: usize,
    out: &mut Vec<(PathBuf, u8, String)>,
    report: &mut DataReport,
) {
    if depth > 16 {
        report.push(
            dir,
            ProblemKind::Unreadable,
            "folders nested too deeply (more than 16 levels); skipped",
        );
        return;
    }
    for (path, is_dir) in list_dir(dir, report) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_ignored_name(&name) {
            continue;
        }
        if is_dir {
            collect_images(
                &path,
                &format!("{fine}/{name}"),
                label,
                depth + 1,
                out,
                report,
            );
        } else if is_image_name(&name) {
            out.push((path, label, fine.to_string()));
        } else {
            report.push(
                &path,
                ProblemKind::NotAnImage,
                format!(
                    "not an image file name (expected one of {}); skipped",
                    IMAGE_EXTENSIONS.join(", ")
                ),
            );
        }
    }
}

/// Loads one dataset from plain folders; every sample gets `dataset` as its dataset name.
///
/// Two layouts are accepted, also mixed:
/// - **class folders**: each sub-folder of `root` is one class, named (case-insensitively;
///   `_` and spaces count as `-`) one of [`LEUKEMIC_FOLDER_NAMES`] for label 1 — `1`,
///   `leukemic`, `leukaemic`, `leukemia`, `leukaemia`, `ALL`, `AML`, `APL`, `CLL`, `CML`,
///   `blast`, `blasts`, `malignant`, `pathological`, `abnormal`, `positive`, `cancer` — or
///   [`HEALTHY_FOLDER_NAMES`] for label 0 — `0`, `healthy`, `normal`, `benign`, `hem`,
///   `negative`, `non-pathological`, `nonpathological`, `non-leukemic`, `nonleukemic`,
///   `non-leukaemic`, `nonleukaemic`. Images are collected recursively inside a class folder;
///   the fine label is the folder path below `root` (e.g. `ALL/patient7`).
///   A sub-folder with any other name is reported ([`ProblemKind::UnknownLabel`]) and skipped.
/// - **ALL-IDB file names** directly in `root`: `ImNNN_L.ext` with `L` the label
///   (see [`allidb_label`]); the fine label is `ImNNN_L`. Other image files directly in `root`
///   are reported as unknown labels.
///
/// Images are files with an extension in [`IMAGE_EXTENSIONS`]; other files are reported
/// ([`ProblemKind::NotAnImage`]), except hidden files (`.…`), `Thumbs.db` and `desktop.ini`,
/// which are ignored. Files are hashed (sha256) on [`WORKER_THREADS`] threads; unreadable ones
/// are reported. Samples come in sorted path order; they have no patient id.
///
/// # Errors
/// [`DataError::NotAFolder`] if `root` is not a folder, [`DataError::Io`] if it cannot be
/// listed.
pub fn load_folders(root: &Path, dataset: &str) -> Result<(Vec<Sample>, DataReport), DataError> {
    if !root.is_dir() {
        return Err(DataError::NotAFolder {
            path: root.to_path_buf(),
        });
    }
    let mut report = DataReport::default();
    // Listing the root itself must work; errors below it are per-entry problems.
    fs::read_dir(root).map_err(|source| DataError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut found: Vec<(PathBuf, u8, String)> = Vec::new();
    for (path, is_dir) in list_dir(root, &mut report) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_ignored_name(&name) {
            continue;
        }
        if is_dir {
            match folder_label(&name) {
                Some(label) => collect_images(&path, &name, label, 0, &mut found, &mut report),
                None => report.push(
                    &path,
                    ProblemKind::UnknownLabel,
                    format!("folder name {name:?} is not a known class name; skipped"),
                ),
            }
        } else if let Some(label) = allidb_label(&name) {
            let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(&name);
            found.push((path.clone(), label, stem.to_string()));
        } else if is_image_name(&name) {
            report.push(
                &path,
                ProblemKind::UnknownLabel,
                "image outside a class folder whose name is not ImNNN_L.ext; skipped",
            );
        } else {
            report.push(
                &path,
                ProblemKind::NotAnImage,
                "not an image file name; skipped",
            );
        }
    }
    let hashes = par_map(&found, WORKER_THREADS, |(path, _, _)| read_and_hash(path));
    let mut samples = Vec::with_capacity(found.len());
    for ((path, label, fine_label), hash) in found.into_iter().zip(hashes) {
        match hash {
            None => report.push(
                &path,
                ProblemKind::Unreadable,
                "internal error while hashing",
            ),
            Some(Err((kind, reason))) => report.push(&path, kind, reason),
            Some(Ok(sha256)) => samples.push(Sample {
                dataset: dataset.to_string(),
                path,
                label,
                fine_label,
                patient: None,
                sha256,
            }),
        }
    }
    report.loaded = samples.len();
    Ok((samples, report))
}

/// Decodes every sample's file with [`crate::preprocess::preprocess`] at [`VALIDATE_SIZE`]
/// (default limits) on [`WORKER_THREADS`] threads and returns the samples that decode, in
/// order. The others are reported ([`ProblemKind::Undecodable`], or `Missing`/`Unreadable` if
/// the file is gone) and dropped; `report.loaded` becomes the number kept.
///
/// Separate from the loaders so that loading stays cheap and this check is explicit.
pub fn validate_images(samples: Vec<Sample>, report: &mut DataReport) -> Vec<Sample> {
    let results = par_map(&samples, WORKER_THREADS, |s| match fs::read(&s.path) {
        Ok(bytes) => preprocess(&bytes, VALIDATE_SIZE, &Limits::default())
            .map(|_| ())
            .map_err(|e| {
                (
                    ProblemKind::Undecodable,
                    format!("cannot decode image: {e}"),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err((ProblemKind::Missing, "file not found".to_string()))
        }
        Err(e) => Err((ProblemKind::Unreadable, format!("cannot read file: {e}"))),
    });
    let mut kept = Vec::with_capacity(samples.len());
    for (sample, result) in samples.into_iter().zip(results) {
        match result {
            Some(Ok(())) => kept.push(sample),
            Some(Err((kind, reason))) => report.push(&sample.path, kind, reason),
            None => report.push(
                &sample.path,
                ProblemKind::Undecodable,
                "internal error while decoding",
            ),
        }
    }
    report.loaded = kept.len();
    kept
}

/// Removes byte-identical copies (same sha256, compared case-insensitively), within and across
/// datasets, keeping the first in order; each removal is recorded in `report.duplicates`, and
/// `report.loaded` becomes the number kept. Call it before any split.
pub fn dedup(samples: Vec<Sample>, report: &mut DataReport) -> Vec<Sample> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut kept: Vec<Sample> = Vec::with_capacity(samples.len());
    for sample in samples {
        let key = sample.sha256.to_ascii_lowercase();
        if let Some(&i) = first.get(&key) {
            let k = &kept[i];
            report.duplicates.push(Duplicate {
                kept: k.path.clone(),
                removed: sample.path.clone(),
                kept_dataset: k.dataset.clone(),
                removed_dataset: sample.dataset.clone(),
                sha256: key,
            });
        } else {
            first.insert(key, kept.len());
            kept.push(sample);
        }
    }
    report.loaded = kept.len();
    kept
}

// ---------------------------------------------------------------------------------------------
// Per-dataset rules
// ---------------------------------------------------------------------------------------------

/// A rectangle in fractions of the image width (`x`) and height (`y`), origin top-left;
/// `0 <= x0 < x1 <= 1`, `0 <= y0 < y1 <= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRect {
    /// Left edge (fraction of the width).
    pub x0: f32,
    /// Top edge (fraction of the height).
    pub y0: f32,
    /// Right edge, exclusive (fraction of the width).
    pub x1: f32,
    /// Bottom edge, exclusive (fraction of the height).
    pub y1: f32,
}

impl MaskRect {
    /// Pixel bounds `(c0, r0, c1, r1)` (end-exclusive) in a `size`x`size` image: every pixel
    /// the rectangle touches (edges rounded outwards), clamped to the image.
    pub fn pixels(&self, size: usize) -> (usize, usize, usize, usize) {
        let s = size as f32;
        let lo = |v: f32| ((v * s).floor().max(0.0) as usize).min(size);
        let hi = |v: f32| ((v * s).ceil().max(0.0) as usize).min(size);
        (lo(self.x0), lo(self.y0), hi(self.x1), hi(self.y1))
    }

    fn check(&self) -> Result<(), String> {
        let vals = [self.x0, self.y0, self.x1, self.y1];
        if vals.iter().any(|v| !v.is_finite() || *v < 0.0 || *v > 1.0) {
            return Err(format!("mask rectangle {self:?} must lie within [0, 1]"));
        }
        if self.x0 >= self.x1 || self.y0 >= self.y1 {
            return Err(format!("mask rectangle {self:?} needs x0 < x1 and y0 < y1"));
        }
        Ok(())
    }
}

/// Fixes applied to every image of one dataset (configured in `configs/datasets.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRules {
    /// Rectangles filled with the image's per-channel median colour (computed over the pixels
    /// outside all rectangles), e.g. to hide a burnt-in scale bar that would identify the source.
    #[serde(default)]
    pub mask: Vec<MaskRect>,
    /// Why the rules exist (free text, not used by code).
    #[serde(default)]
    pub note: String,
}

impl DatasetRules {
    /// True if the rules change nothing.
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }
}

/// Loads per-dataset rules: a JSON object mapping dataset name to [`DatasetRules`]
/// (`{"ALL-Aria2021": {"mask": [{"x0": 0.84, "y0": 0.84, "x1": 1.0, "y1": 1.0}], "note": "…"}}`).
/// Top-level keys starting with `_` are comments and skipped. Datasets without an entry have
/// no rules.
///
/// # Errors
/// [`DataError::Io`] if the file cannot be read, [`DataError::RulesJson`] if it is not such a
/// JSON object (unknown fields are refused), [`DataError::InvalidRule`] for a rectangle outside
/// [0, 1] or with `x0 >= x1` / `y0 >= y1`.
pub fn load_rules(path: &Path) -> Result<HashMap<String, DatasetRules>, DataError> {
    let text = fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|source| DataError::RulesJson {
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = HashMap::new();
    for (dataset, value) in raw {
        if dataset.starts_with('_') {
            continue;
        }
        let rules: DatasetRules =
            serde_json::from_value(value).map_err(|source| DataError::RulesJson {
                path: path.to_path_buf(),
                source,
            })?;
        for rect in &rules.mask {
            rect.check().map_err(|reason| DataError::InvalidRule {
                path: path.to_path_buf(),
                dataset: dataset.clone(),
                reason,
            })?;
        }
        out.insert(dataset, rules);
    }
    Ok(out)
}

/// Applies `rules` to one preprocessed image: `chw` is the `3 * size * size` CHW tensor from
/// [`crate::preprocess::preprocess`] (values in [0, 1]). Each mask rectangle
/// ([`MaskRect::pixels`]) is filled with the per-channel median of the pixels outside all
/// rectangles (of the whole image if the rectangles cover everything). Pixels outside the
/// rectangles are untouched.
///
/// If `chw.len() != 3 * size * size` nothing is changed and a warning is logged (a caller bug,
/// not bad data; no panic).
pub fn apply_rules(rules: &DatasetRules, chw: &mut [f32], size: usize) {
    if rules.mask.is_empty() || size == 0 {
        return;
    }
    let plane = size * size;
    if chw.len() != 3 * plane {
        tracing::warn!(
            len = chw.len(),
            size,
            "apply_rules: tensor is not 3 x size x size; left unchanged"
        );
        return;
    }
    let rects: Vec<(usize, usize, usize, usize)> =
        rules.mask.iter().map(|r| r.pixels(size)).collect();
    let mut inside = vec![false; plane];
    for &(c0, r0, c1, r1) in &rects {
        for row in r0..r1 {
            inside[row * size + c0..row * size + c1].fill(true);
        }
    }
    let any_outside = inside.iter().any(|m| !m);
    for channel in chw.chunks_exact_mut(plane) {
        let mut values: Vec<f32> = channel
            .iter()
            .zip(&inside)
            .filter(|(_, m)| !any_outside || !**m)
            .map(|(v, _)| *v)
            .collect();
        let mid = values.len() / 2;
        let (_, median, _) = values.select_nth_unstable_by(mid, f32::total_cmp);
        let median = *median;
        for (v, m) in channel.iter_mut().zip(&inside) {
            if *m {
                *v = median;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a tiny, portable, seeded generator (reproducible independent of crate versions).
struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed` and a list of tags (so streams for different purposes differ).
    fn new(seed: u64, tags: &[u64]) -> Self {
        let mut state = mix(seed ^ 0x4c45_554b_4e45_5400); // "LEUKNET"
        for &t in tags {
            state = mix(state ^ mix(t.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        }
        SplitMix64(state)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------------------------

/// One train/test split, as indices into the (deduplicated) sample list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Name for reports: `lodo-<dataset>`, `fold-<i>of<k>` or `inner-<dataset>`.
    pub name: String,
    /// Training indices, ascending.
    pub train: Vec<usize>,
    /// Test indices, ascending.
    pub test: Vec<usize>,
    /// The held-out dataset for leave-one-source-out splits, `None` for k-fold.
    pub test_dataset: Option<String>,
}

/// Dataset names in order of first appearance among `indices`.
fn datasets_in(samples: &[Sample], indices: impl Iterator<Item = usize>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for i in indices {
        if let Some(s) = samples.get(i) {
            if seen.insert(s.dataset.as_str()) {
                out.push(s.dataset.clone());
            }
        }
    }
    out
}

/// True if the samples at `indices` hold both labels (out-of-range indices are ignored).
pub fn has_both_classes(samples: &[Sample], indices: &[usize]) -> bool {
    let mut seen = [false; 2];
    for &i in indices {
        if let Some(s) = samples.get(i) {
            seen[usize::from(s.label.min(1))] = true;
        }
    }
    seen[0] && seen[1]
}

/// Leave-one-dataset-out (LODOCV) splits, as in the paper: one split per dataset that holds
/// both classes (in order of first appearance), testing on that dataset and training on all
/// others. Datasets with one class are never test sets; they are always in training.
pub fn lodo_splits(samples: &[Sample]) -> Vec<Split> {
    let all: Vec<usize> = (0..samples.len()).collect();
    datasets_in(samples, 0..samples.len())
        .into_iter()
        .filter_map(|ds| {
            let (test, train): (Vec<usize>, Vec<usize>) =
                all.iter().partition(|&&i| samples[i].dataset == ds);
            has_both_classes(samples, &test).then(|| Split {
                name: format!("lodo-{ds}"),
                train,
                test,
                test_dataset: Some(ds),
            })
        })
        .collect()
}

/// Stratified k-fold over all samples, grouped by patient, seeded and reproducible.
///
/// Samples with a patient id form one group per (dataset, patient): a group is never split,
/// so no patient is on both sides. Groups are placed first (largest first, ties in seeded random
/// order), each in the fold whose (dataset, label) strata it fills least. Samples without a
/// patient id are then dealt, per label, so that every fold's count of that label differs from
/// every other fold's by at most 1 whenever the patient groups leave room for it (water-filling);
/// within a label the share of each dataset is spread over folds in proportion, so
/// (dataset, label) strata without patient ids are also even to within about ±1.
///
/// Returns `k` splits named `fold-<i>of<k>`; every sample is in exactly one test set. `k < 2`
/// gives no splits; a `k` larger than the number of groups gives some empty test sets.
pub fn stratified_kfold(samples: &[Sample], k: usize, seed: u64) -> Vec<Split> {
    if k < 2 {
        return Vec::new();
    }
    let mut fold_of = vec![usize::MAX; samples.len()];
    // Strata (dataset, label), indexed.
    let mut strata: HashMap<(&str, u8), usize> = HashMap::new();
    let stratum_of: Vec<usize> = samples
        .iter()
        .map(|s| {
            let n = strata.len();
            *strata.entry((s.dataset.as_str(), s.label)).or_insert(n)
        })
        .collect();
    let n_strata = strata.len();

    // Phase 1: patient groups.
    let mut groups: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    let mut group_order: Vec<(&str, &str)> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if let Some(p) = &s.patient {
            let key = (s.dataset.as_str(), p.as_str());
            groups
                .entry(key)
                .or_insert_with(|| {
                    group_order.push(key);
                    Vec::new()
                })
                .push(i);
        }
    }
    let mut rng = SplitMix64::new(seed, &[1]);
    rng.shuffle(&mut group_order);
    group_order.sort_by_key(|key| std::cmp::Reverse(groups[key].len()));
    let mut fill = vec![vec![0usize; n_strata]; k]; // per fold, per stratum
    let mut label_count = vec![[0usize; 256]; k]; // per fold, per label value
    let mut group_fold: Vec<usize> = Vec::with_capacity(group_order.len());
    let mut comps: Vec<Vec<usize>> = Vec::with_capacity(group_order.len());
    for key in &group_order {
        let members = &groups[key];
        let mut comp = vec![0usize; n_strata];
        for &i in members {
            comp[stratum_of[i]] += 1;
        }
        let best = (0..k)
            .min_by_key(|&f| {
                let overlap: usize = comp.iter().zip(&fill[f]).map(|(c, have)| c * have).sum();
                let total: usize = fill[f].iter().sum();
                (overlap, total, f)
            })
            .unwrap_or(0);
        for (f, c) in fill[best].iter_mut().zip(&comp) {
            *f += c;
        }
        group_fold.push(best);
        comps.push(comp);
    }
    refine_group_folds(&comps, &mut group_fold, &mut fill, k);
    for (key, &f) in group_order.iter().zip(&group_fold) {
        for &i in &groups[key] {
            fold_of[i] = f;
            label_count[f][usize::from(samples[i].label)] += 1;
        }
    }

    // Phase 2: samples without a patient id, per label.
    let mut labels: Vec<u8> = samples.iter().map(|s| s.label).collect();
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        // Their strata in order of first appearance, items shuffled within each.
        let mut per_stratum: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            if s.patient.is_some() || s.label != label {
                continue;
            }
            let st = stratum_of[i];
            match per_stratum.iter_mut().find(|(id, _)| *id == st) {
                Some((_, v)) => v.push(i),
                None => per_stratum.push((st, vec![i])),
            }
        }
        let total: usize = per_stratum.iter().map(|(_, v)| v.len()).sum();
        if total == 0 {
            continue;
        }
        // Water-filling: how many of this label each fold still needs.
        let li = usize::from(label);
        let mut level: Vec<usize> = (0..k).map(|f| label_count[f][li]).collect();
        let mut need = vec![0usize; k];
        for _ in 0..total {
            let f = (0..k).min_by_key(|&f| (level[f], f)).unwrap_or(0);
            level[f] += 1;
            need[f] += 1;
        }
        // Deal each stratum in proportion to the remaining needs.
        let mut remaining = total;
        for (st, mut items) in per_stratum {
            let mut srng = SplitMix64::new(seed, &[2, st as u64]);
            srng.shuffle(&mut items);
            let n = items.len();
            let mut take = vec![0usize; k];
            let mut fracs: Vec<(u128, usize)> = Vec::with_capacity(k);
            let mut given = 0usize;
            for f in 0..k {
                let num = need[f] as u128 * n as u128;
                let q = (num / remaining as u128) as usize;
                take[f] = q;
                given += q;
                fracs.push((num % remaining as u128, f));
            }
            // Largest remainders first; ties by fewest of this stratum so far, then fold index.
            fracs.sort_by(|a, b| b.0.cmp(&a.0).then(fill[a.1][st].cmp(&fill[b.1][st])));
            for &(_, f) in fracs.iter() {
                if given == n {
                    break;
                }
                if take[f] < need[f] {
                    take[f] += 1;
                    given += 1;
                }
            }
            let mut it = items.into_iter();
            for f in 0..k {
                for i in it.by_ref().take(take[f]) {
                    fold_of[i] = f;
                    fill[f][st] += 1;
                }
                need[f] -= take[f];
            }
            remaining -= n;
        }
    }

    (0..k)
        .map(|f| {
            let (test, train): (Vec<usize>, Vec<usize>) =
                (0..samples.len()).partition(|&i| fold_of[i] == f);
            Split {
                name: format!("fold-{}of{k}", f + 1),
                train,
                test,
                test_dataset: None,
            }
        })
        .collect()
}

/// Local search after the greedy placement of patient groups: moves one group to another fold,
/// or swaps two groups between folds, while that lowers
/// `Σ_folds Σ_strata (k * count - total)^2`; deterministic, at most 100 passes.
fn refine_group_folds(comps: &[Vec<usize>], fold: &mut [usize], fill: &mut [Vec<usize>], k: usize) {
    let n_strata = fill.first().map_or(0, Vec::len);
    let totals: Vec<i64> = (0..n_strata)
        .map(|s| fill.iter().map(|f| f[s] as i64).sum())
        .collect();
    let term = |v: i64, s: usize| {
        let d = k as i64 * v - totals[s];
        d * d
    };
    // Change of the cost when fold `a` loses `diff` and fold `b` gains it.
    let delta = |fill: &[Vec<usize>], a: usize, b: usize, diff: &[i64]| -> i64 {
        (0..n_strata)
            .filter(|&s| diff[s] != 0)
            .map(|s| {
                let (va, vb) = (fill[a][s] as i64, fill[b][s] as i64);
                term(va - diff[s], s) + term(vb + diff[s], s) - term(va, s) - term(vb, s)
            })
            .sum()
    };
    let apply = |fill: &mut [Vec<usize>], a: usize, b: usize, diff: &[i64]| {
        for (s, &d) in diff.iter().enumerate() {
            fill[a][s] = (fill[a][s] as i64 - d) as usize;
            fill[b][s] = (fill[b][s] as i64 + d) as usize;
        }
    };
    for _pass in 0..100 {
        let mut improved = false;
        for g in 0..comps.len() {
            let a = fold[g];
            let diff: Vec<i64> = comps[g].iter().map(|&c| c as i64).collect();
            let best_move = (0..k)
                .filter(|&b| b != a)
                .map(|b| (delta(fill, a, b, &diff), b))
                .min();
            if let Some((d, b)) = best_move {
                if d < 0 {
                    apply(fill, a, b, &diff);
                    fold[g] = b;
                    improved = true;
                    continue;
                }
            }
            for h in (g + 1)..comps.len() {
                let b = fold[h];
                if b == a {
                    continue;
                }
                let diff: Vec<i64> = comps[g]
                    .iter()
                    .zip(&comps[h])
                    .map(|(&x, &y)| x as i64 - y as i64)
                    .collect();
                if delta(fill, a, b, &diff) < 0 {
                    apply(fill, a, b, &diff);
                    fold[g] = b;
                    fold[h] = a;
                    improved = true;
                    break;
                }
            }
        }
        if !improved {
            break;
        }
    }
}

/// Leave-one-source-out folds INSIDE a training set, for model selection without touching the
/// outer test set: only indices in `train` are used (out-of-range ones are ignored).
///
/// Every dataset present in `train` is held out once, in order of first appearance: both-class
/// datasets, and also one-class datasets, because a source with one class still measures how
/// well the decision threshold transfers to an unseen source (report its specificity or
/// sensitivity; report balanced accuracy or AUC only for folds whose test side holds both
/// classes, see [`has_both_classes`]). A fold is produced only if its own training side still
/// holds both classes; otherwise that source is skipped (nothing could be trained on it).
pub fn inner_source_folds(samples: &[Sample], train: &[usize]) -> Vec<Split> {
    let valid: Vec<usize> = {
        let mut v: Vec<usize> = train
            .iter()
            .copied()
            .filter(|&i| i < samples.len())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    datasets_in(samples, valid.iter().copied())
        .into_iter()
        .filter_map(|ds| {
            let (test, inner_train): (Vec<usize>, Vec<usize>) =
                valid.iter().partition(|&&i| samples[i].dataset == ds);
            has_both_classes(samples, &inner_train).then(|| Split {
                name: format!("inner-{ds}"),
                train: inner_train,
                test,
                test_dataset: Some(ds),
            })
        })
        .collect()
}

/// Groups (dataset, label) of `indices`, in order of first appearance, with their members.
fn source_class_groups(samples: &[Sample], indices: &[usize]) -> Vec<Vec<usize>> {
    let mut pos: HashMap<(&str, u8), usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &i in indices {
        let Some(s) = samples.get(i) else { continue };
        let g = *pos.entry((s.dataset.as_str(), s.label)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// Per-batch, per-group slot counts of one epoch: batch sizes `batch` (the last may be
/// smaller), each split evenly over the groups with the remainder given to groups drawn
/// uniformly without replacement.
fn epoch_allocation(
    seed: u64,
    epoch: u64,
    n: usize,
    batch: usize,
    groups: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed, &[3, epoch]);
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let b = batch.min(left);
        left -= b;
        let mut counts = vec![b / groups; groups];
        let mut order: Vec<usize> = (0..groups).collect();
        // Partial Fisher-Yates: the first `b % groups` of `order` get one extra.
        for i in 0..(b % groups) {
            let j = i + rng.below(groups - i);
            order.swap(i, j);
            counts[order[i]] += 1;
        }
        out.push(counts);
    }
    out
}

/// Source-balanced batches for one epoch: every batch is balanced over the (dataset, label)
/// groups of `indices`, so no source or class dominates the gradient.
///
/// One epoch is `indices.len()` samples cut into batches of `batch` (the last may be smaller).
/// In each batch every group gets `⌊b / G⌋` slots and `b mod G` groups, drawn uniformly, get one
/// more, so group counts differ by at most 1. Within a group, items come from a stream of
/// seeded permutations of the group that continues across epochs: a large group is walked
/// through without repeats over consecutive epochs, a small one is repeated (with replacement
/// across permutations) as needed. Each batch is shuffled. The result depends only on `seed`,
/// `epoch` and the inputs. Out-of-range indices are ignored; `batch == 0` or no valid index
/// gives no batches.
pub fn balanced_batches(
    samples: &[Sample],
    indices: &[usize],
    batch: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let groups = source_class_groups(samples, indices);
    let n: usize = groups.iter().map(Vec::len).sum();
    if batch == 0 || n == 0 {
        return Vec::new();
    }
    let g = groups.len();
    // Where each group's stream stands at the start of this epoch.
    let mut drawn = vec![0u64; g];
    for e in 0..epoch {
        for counts in epoch_allocation(seed, e, n, batch, g) {
            for (d, c) in drawn.iter_mut().zip(counts) {
                *d += c as u64;
            }
        }
    }
    let mut streams: Vec<GroupStream> = groups
        .iter()
        .enumerate()
        .map(|(gi, members)| GroupStream::new(members, seed, gi as u64, drawn[gi]))
        .collect();
    let mut shuffle_rng = SplitMix64::new(seed, &[5, epoch]);
    epoch_allocation(seed, epoch, n, batch, g)
        .into_iter()
        .map(|counts| {
            let mut b: Vec<usize> = Vec::with_capacity(batch);
            for (stream, c) in streams.iter_mut().zip(counts) {
                for _ in 0..c {
                    b.push(stream.next());
                }
            }
            shuffle_rng.shuffle(&mut b);
            b
        })
        .collect()
}

/// An endless stream of seeded permutations of one group's members.
struct GroupStream<'a> {
    members: &'a [usize],
    seed: u64,
    group: u64,
    cycle: u64,
    perm: Vec<usize>,
    pos: usize,
}

impl<'a> GroupStream<'a> {
    /// A stream positioned after `skip` draws.
    fn new(members: &'a [usize], seed: u64, group: u64, skip: u64) -> Self {
        let len = members.len() as u64;
        let mut s = GroupStream {
            members,
            seed,
            group,
            cycle: skip / len,
            perm: Vec::new(),
            pos: (skip % len) as usize,
        };
        s.make_perm();
        s
    }

    fn make_perm(&mut self) {
        self.perm = self.members.to_vec();
        SplitMix64::new(self.seed, &[4, self.group, self.cycle]).shuffle(&mut self.perm);
    }

    fn next(&mut self) -> usize {
        if self.pos == self.perm.len() {
            self.cycle += 1;
            self.pos = 0;
            self.make_perm();
        }
        let v = self.perm[self.pos];
        self.pos += 1;
        v
    }
}

/// Keeps at most `per_class` samples per (dataset, label), in order.
pub fn limit_per_class(samples: Vec<Sample>, per_class: Option<usize>) -> Vec<Sample> {
    let Some(n) = per_class else { return samples };
    let mut count = HashMap::new();
    samples
        .into_iter()
        .filter(|s| {
            let c = count.entry((s.dataset.clone(), s.label)).or_insert(0usize);
            *c += 1;
            *c <= n
        })
        .collect()
}

/// A sample for unit tests: `<dataset>/<k>.png`, label `k % 2`, sha256 `<dataset>-<k>`.
#[cfg(test)]
pub(crate) fn test_sample(dataset: &str, k: usize) -> Sample {
    Sample {
        dataset: dataset.into(),
        path: PathBuf::from(format!("{dataset}/{k}.png")),
        label: (k % 2) as u8,
        fine_label: String::new(),
        patient: None,
        sha256: format!("{dataset}-{k}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_commas_and_newlines() {
        let recs =
            parse_csv("a,b,c\r\n\"x, y\",\"say \"\"hi\"\"\",\"two\nlines\"\n\n1,2,3\n\"open");
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].fields.as_ref().unwrap(), &["a", "b", "c"]);
        assert_eq!(
            recs[1].fields.as_ref().unwrap(),
            &["x, y", "say \"hi\"", "two\nlines"]
        );
        assert_eq!(recs[2].line, 5);
        assert_eq!(recs[2].fields.as_ref().unwrap(), &["1", "2", "3"]);
        assert!(recs[3].fields.is_err());
    }

    #[test]
    fn names() {
        assert_eq!(allidb_label("Im001_1.jpg"), Some(1));
        assert_eq!(allidb_label("im260_0.TIF"), Some(0));
        assert_eq!(allidb_label("Im001_2.jpg"), None);
        assert_eq!(allidb_label("Img01_1.jpg"), None);
        assert_eq!(allidb_label("Im001_1.txt"), None);
        assert_eq!(folder_label("Leukemic"), Some(1));
        assert_eq!(folder_label("ALL"), Some(1));
        assert_eq!(folder_label("non_leukemic"), Some(0));
        assert_eq!(folder_label("Early"), None);
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = SplitMix64::new(7, &[]);
        let mut c = [0usize; 3];
        for _ in 0..3000 {
            c[r.below(3)] += 1;
        }
        assert!(c.iter().all(|&x| (900..1100).contains(&x)), "{c:?}");
    }
}
