//! A compact, self-contained copy of the training data and the ImageNet initialisation, made
//! to travel to a GPU machine whose calls carry at most 64 MiB each (see `docs/gpu-mdft.md`).
//!
//! [`pack`] reads a manifest and the per-dataset rules, deduplicates by sha256, preprocesses
//! every image with the server's own function ([`crate::preprocess::preprocess`]: same
//! decoder, same antialiased bilinear resize to 224x224), applies the rules (masking) and
//! writes each result as a 224x224 JPEG (4:4:4, quality 95 by default) or PNG. The pack has its
//! own `MANIFEST.csv` (same columns as `../shared/data/MANIFEST.csv`, plus `source_sha256`)
//! and an empty rules file, so nothing is masked twice. Images are spread over part folders
//! `p1`, `p2`, ... of at most a given size, so that one call can carry each part. The ImageNet
//! conv weights are stored as fp16 safetensors ([`to_fp16_safetensors`]) in the first part and
//! widened back to f32 on the GPU machine ([`widen_safetensors`]).
//!
//! [`write_parts`] / [`join_parts`] cut any file into numbered parts of a bounded size and put
//! it back together, checking its sha256 (for the trained weights coming back).

use super::data::{self, apply_rules, DatasetRules};
use crate::model_card::sha256_hex;
use crate::preprocess::{preprocess, Limits};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Side of the packed images (the model input).
pub const PACK_SIZE: u32 = 224;

/// File name of the fp16 ImageNet weights inside part 1.
pub const IMAGENET_FP16: &str = "vgg16-imagenet-fp16.safetensors";

/// File name of the pack's rules file (no rule: the images are already masked).
pub const EMPTY_RULES: &str = "rules-none.json";

/// File name of the pack's description.
pub const PACK_JSON: &str = "pack.json";

/// Why packing (or splitting, joining, converting weights) failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The manifest or the rules could not be read.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be read, converted or written.
    #[error("safetensors {path}: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An image could not be encoded.
    #[error("encoding {path}: {message}")]
    Encode {
        /// The source image.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Parts missing, of the wrong size or hash, or a bad request.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How packed images are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PackFormat {
    /// Baseline JPEG, 4:4:4 (no chroma subsampling), at the chosen quality.
    Jpeg,
    /// Lossless PNG (about 3x larger).
    Png,
}

/// What [`pack`] reads and writes.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Source manifest (`../shared/data/MANIFEST.csv` format).
    pub manifest: PathBuf,
    /// Per-dataset rules applied before encoding (`configs/datasets.json`).
    pub rules: PathBuf,
    /// Output folder (created; must be empty or absent).
    pub out: PathBuf,
    /// Image encoding.
    pub format: PackFormat,
    /// JPEG quality (1-100).
    pub quality: u8,
    /// Largest size of one part folder, in bytes.
    pub part_bytes: u64,
    /// ImageNet f32 safetensors to store as fp16 in part 1 (none: no weights packed).
    pub imagenet: Option<PathBuf>,
    /// Keep at most this many images per dataset and class (tiny packs for tests).
    pub limit_per_class: Option<usize>,
}

/// One part folder of a pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Folder name inside the pack (`p1`, `p2`, ...).
    pub name: String,
    /// Images in it.
    pub images: usize,
    /// Bytes of every file in it (images and weights).
    pub bytes: u64,
}

/// What [`pack`] wrote (also saved as `pack.json` in the pack).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackReport {
    /// The source manifest.
    pub source_manifest: PathBuf,
    /// The rules applied before encoding.
    pub rules_applied: BTreeMap<String, DatasetRules>,
    /// Encoding and quality.
    pub format: PackFormat,
    /// JPEG quality (meaningless for PNG).
    pub quality: u8,
    /// Images packed.
    pub images: usize,
    /// Images per dataset and binary label (`dataset/label`).
    pub per_dataset: BTreeMap<String, usize>,
    /// Duplicates removed by sha256.
    pub duplicates_removed: usize,
    /// Rows of the source manifest that could not be used (unreadable, bad row, ...).
    pub problems: Vec<String>,
    /// Bytes of the fp16 ImageNet weights (0 when none were packed).
    pub weights_bytes: u64,
    /// The part folders, in order.
    pub parts: Vec<PartInfo>,
    /// Bytes of the whole pack (parts, manifest, rules, this file excluded).
    pub total_bytes: u64,
    /// Mean and largest change of a pixel value (in 1/255) between the preprocessed image and
    /// its packed form decoded again by the same preprocessing (0 for PNG).
    pub mean_abs_error_255: f64,
    /// Largest such change.
    pub max_abs_error_255: f64,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The preprocessed, masked image as interleaved RGB u8 (`PACK_SIZE`^2 * 3), and the CHW u8
/// planes it came from.
fn prepare_one(bytes: &[u8], rules: Option<&DatasetRules>) -> Result<(Vec<u8>, Vec<u8>), String> {
    let p = preprocess(bytes, PACK_SIZE, &Limits::default()).map_err(|e| e.to_string())?;
    let mut t = p.tensor;
    if let Some(r) = rules {
        apply_rules(r, &mut t, PACK_SIZE as usize);
    }
    let chw: Vec<u8> = t
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let plane = (PACK_SIZE * PACK_SIZE) as usize;
    let mut rgb = vec![0u8; 3 * plane];
    for k in 0..plane {
        rgb[3 * k] = chw[k];
        rgb[3 * k + 1] = chw[plane + k];
        rgb[3 * k + 2] = chw[2 * plane + k];
    }
    Ok((rgb, chw))
}

fn encode(rgb: &[u8], format: PackFormat, quality: u8) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match format {
        PackFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
                .encode(rgb, PACK_SIZE, PACK_SIZE, image::ExtendedColorType::Rgb8)
                .map_err(|e| e.to_string())?;
        }
        PackFormat::Png => {
            image::ImageEncoder::write_image(
                image::codecs::png::PngEncoder::new_with_quality(
                    &mut out,
                    image::codecs::png::CompressionType::Best,
                    image::codecs::png::FilterType::Adaptive,
                ),
                rgb,
                PACK_SIZE,
                PACK_SIZE,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// One encoded image, with the error the encoding introduced.
struct Encoded {
    bytes: Vec<u8>,
    sum_abs_255: f64,
    max_abs_255: f64,
}

fn encode_checked(
    path: &Path,
    rules: Option<&DatasetRules>,
    format: PackFormat,
    quality: u8,
) -> Result<Encoded, String> {
    let src = std::fs::read(path).map_err(|e| e.to_string())?;
    let (rgb, chw) = prepare_one(&src, rules)?;
    let bytes = encode(&rgb, format, quality)?;
    // Decode the packed file exactly as training will (no rules) and measure the change.
    let (_, back) = prepare_one(&bytes, None)?;
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    for (a, b) in chw.iter().zip(&back) {
        let d = (f64::from(*a) - f64::from(*b)).abs();
        sum += d;
        max = max.max(d);
    }
    Ok(Encoded {
        bytes,
        sum_abs_255: sum / chw.len().max(1) as f64,
        max_abs_255: max,
    })
}

/// Packs the deduplicated, masked, 224x224 images of a manifest (and optionally the ImageNet
/// weights as fp16) into `opts.out`: `MANIFEST.csv`, `rules-none.json`, `pack.json` and part
/// folders `p1`, `p2`, ... of at most `opts.part_bytes` each. Returns what it wrote.
///
/// Images that cannot be read or decoded are left out and listed in `problems`.
pub fn pack(opts: &PackOptions) -> Result<PackReport, PackError> {
    if opts.part_bytes == 0 {
        return Err(PackError::Invalid("part size must be positive".into()));
    }
    if opts.out.exists()
        && std::fs::read_dir(&opts.out)
            .map_err(io(&opts.out))?
            .next()
            .is_some()
    {
        return Err(PackError::Invalid(format!(
            "{} exists and is not empty; remove it first",
            opts.out.display()
        )));
    }
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let (samples, mut report) = data::load_manifest(&opts.manifest)?;
    let samples = data::dedup(samples, &mut report);
    let samples = data::limit_per_class(samples, opts.limit_per_class);
    let rules = data::load_rules(&opts.rules)?;
    let mut problems: Vec<String> = report
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.path.display(), p.reason))
        .collect();

    // Encode in parallel, keep manifest order.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = samples.len().div_ceil(threads).max(1);
    let mut encoded: Vec<Option<Result<Encoded, String>>> =
        (0..samples.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = samples
            .chunks(chunk)
            .map(|part| {
                let rules = &rules;
                scope.spawn(move || {
                    part.iter()
                        .map(|s| {
                            encode_checked(
                                &s.path,
                                rules.get(&s.dataset),
                                opts.format,
                                opts.quality,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut i = 0;
        for h in handles {
            for r in h.join().unwrap_or_default() {
                encoded[i] = Some(r);
                i += 1;
            }
        }
    });

    let mut parts: Vec<PartInfo> = vec![PartInfo {
        name: "p1".into(),
        images: 0,
        bytes: 0,
    }];
    let part_dir = |name: &str| opts.out.join(name);
    std::fs::create_dir_all(part_dir("p1")).map_err(io(&opts.out))?;
    let mut weights_bytes = 0;
    if let Some(src) = &opts.imagenet {
        let dst = part_dir("p1").join(IMAGENET_FP16);
        weights_bytes = to_fp16_safetensors(src, &dst)?;
        parts[0].bytes += weights_bytes;
    }
    let ext = match opts.format {
        PackFormat::Jpeg => "jpg",
        PackFormat::Png => "png",
    };
    let mut csv = String::from(
        "dataset,path,binary_label,label,patient_id,sha256,width,height,format,source_sha256\n",
    );
    let mut per_dataset = BTreeMap::new();
    let (mut sum_err, mut max_err, mut packed) = (0.0f64, 0.0f64, 0usize);
    for (s, e) in samples.iter().zip(encoded) {
        let e = match e {
            Some(Ok(e)) => e,
            Some(Err(why)) => {
                problems.push(format!("{}: {why}", s.path.display()));
                continue;
            }
            None => {
                problems.push(format!("{}: not encoded", s.path.display()));
                continue;
            }
        };
        let len = e.bytes.len() as u64;
        let last = parts.len() - 1;
        if parts[last].bytes + len > opts.part_bytes && parts[last].bytes > 0 {
            let name = format!("p{}", parts.len() + 1);
            std::fs::create_dir_all(part_dir(&name)).map_err(io(&opts.out))?;
            parts.push(PartInfo {
                name,
                images: 0,
                bytes: 0,
            });
        }
        let part = parts.last_mut().expect("at least one part");
        let rel = format!(
            "{}/{}/{}.{ext}",
            part.name,
            safe_name(&s.dataset),
            &s.sha256[..s.sha256.len().min(24)]
        );
        let path = opts.out.join(&rel);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        std::fs::write(&path, &e.bytes).map_err(io(&path))?;
        part.bytes += len;
        part.images += 1;
        *per_dataset
            .entry(format!("{}/{}", s.dataset, s.label))
            .or_insert(0) += 1;
        sum_err += e.sum_abs_255;
        max_err = max_err.max(e.max_abs_255);
        packed += 1;
        csv.push_str(&format!(
            "{},{},{},{},{},{},{PACK_SIZE},{PACK_SIZE},{},{}\n",
            csv_field(&s.dataset),
            csv_field(&rel),
            s.label,
            csv_field(&s.fine_label),
            csv_field(s.patient.as_deref().unwrap_or("")),
            sha256_hex(&e.bytes),
            match opts.format {
                PackFormat::Jpeg => "JPEG",
                PackFormat::Png => "PNG",
            },
            s.sha256
        ));
    }
    if parts.iter().any(|p| p.bytes > opts.part_bytes) {
        return Err(PackError::Invalid(format!(
            "a part is larger than {} bytes (the ImageNet weights alone are {weights_bytes}); \
             give a larger part size",
            opts.part_bytes
        )));
    }
    let manifest = opts.out.join("MANIFEST.csv");
    std::fs::write(&manifest, csv).map_err(io(&manifest))?;
    let rules_file = opts.out.join(EMPTY_RULES);
    std::fs::write(
        &rules_file,
        "{\n  \"_comment\": \"Packed images are already preprocessed and masked with the rules recorded in pack.json; nothing more is applied.\"\n}\n",
    )
    .map_err(io(&rules_file))?;
    let out = PackReport {
        source_manifest: opts.manifest.clone(),
        rules_applied: rules.into_iter().collect(),
        format: opts.format,
        quality: opts.quality,
        images: packed,
        per_dataset,
        duplicates_removed: report.duplicates.len(),
        problems,
        weights_bytes,
        total_bytes: parts.iter().map(|p| p.bytes).sum(),
        parts,
        mean_abs_error_255: sum_err / packed.max(1) as f64,
        max_abs_error_255: max_err,
    };
    let json = opts.out.join(PACK_JSON);
    let text = serde_json::to_string_pretty(&out)
        .map_err(|e| PackError::Invalid(format!("serialising pack.json: {e}")))?;
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    Ok(out)
}

/// Tensors of a safetensors file as (name, dtype, shape, little-endian bytes), plus its
/// metadata.
type Tensors = (
    Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    HashMap<String, String>,
);

/// Reads every tensor of a safetensors buffer.
pub fn read_tensors(bytes: &[u8], path: &Path) -> Result<Tensors, PackError> {
    let werr = |m: String| PackError::Weights {
        path: path.to_path_buf(),
        message: m,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| werr(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| werr(e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let t = st.tensor(&n).map_err(|e| werr(e.to_string()))?;
        out.push((n, t.dtype(), t.shape().to_vec(), t.data().to_vec()));
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Serialises tensors (name, dtype, shape, bytes) with metadata to a safetensors buffer;
/// `path` only names the file in errors.
pub fn serialize_tensors(
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>, PackError> {
    let werr = |m: String| PackError::Weights {
        path: path.to_path_buf(),
        message: m,
    };
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| werr(e.to_string()))?;
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| werr(e.to_string()))
}

/// [`serialize_tensors`] to `path` (parent folders created). Returns the bytes written.
pub fn write_tensors(
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<u64, PackError> {
    let encoded = serialize_tensors(tensors, metadata, path)?;
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    std::fs::write(path, &encoded).map_err(io(path))?;
    Ok(encoded.len() as u64)
}

/// Writes `src` (f32 safetensors) to `dst` with every F32 tensor stored as F16 (metadata
/// kept, `storage: fp16` added). Returns the bytes written.
pub fn to_fp16_safetensors(src: &Path, dst: &Path) -> Result<u64, PackError> {
    let bytes = std::fs::read(src).map_err(io(src))?;
    let (tensors, mut meta) = read_tensors(&bytes, src)?;
    let converted: Vec<_> = tensors
        .into_iter()
        .map(|(n, d, s, b)| {
            if d == safetensors::Dtype::F32 {
                let h: Vec<u8> = b
                    .chunks_exact(4)
                    .flat_map(|c| {
                        half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .to_le_bytes()
                    })
                    .collect();
                (n, safetensors::Dtype::F16, s, h)
            } else {
                (n, d, s, b)
            }
        })
        .collect();
    meta.insert("storage".into(), "fp16".into());
    meta.insert("source_sha256".into(), sha256_hex(&bytes));
    write_tensors(&converted, meta, dst)
}

/// Writes `src` to `dst` with every F16 tensor widened to F32 (what
/// [`crate::train::model::Init::ImageNet`] loads). Returns the bytes written.
pub fn widen_safetensors(src: &Path, dst: &Path) -> Result<u64, PackError> {
    let bytes = std::fs::read(src).map_err(io(src))?;
    let (tensors, mut meta) = read_tensors(&bytes, src)?;
    let converted: Vec<_> = tensors
        .into_iter()
        .map(|(n, d, s, b)| {
            if d == safetensors::Dtype::F16 {
                let f: Vec<u8> = b
                    .chunks_exact(2)
                    .flat_map(|c| {
                        half::f16::from_le_bytes([c[0], c[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect();
                (n, safetensors::Dtype::F32, s, f)
            } else {
                (n, d, s, b)
            }
        })
        .collect();
    meta.insert("storage".into(), "fp32 (widened from fp16)".into());
    write_tensors(&converted, meta, dst)
}

/// The index of a file cut into parts by [`write_parts`] (`<stem>.parts.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartsIndex {
    /// The original file name.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// Its sha256.
    pub sha256: String,
    /// Part file names, in order.
    pub parts: Vec<String>,
}

/// Cuts `bytes` into `dir/<file>.partNN` files of at most `max_part` bytes each and writes
/// `dir/<file>.parts.json`. Returns the index.
pub fn write_parts(
    bytes: &[u8],
    dir: &Path,
    file: &str,
    max_part: u64,
) -> Result<PartsIndex, PackError> {
    if max_part == 0 {
        return Err(PackError::Invalid("part size must be positive".into()));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut parts = Vec::new();
    for (k, chunk) in bytes.chunks(max_part as usize).enumerate() {
        let name = format!("{file}.part{:02}", k + 1);
        let p = dir.join(&name);
        std::fs::write(&p, chunk).map_err(io(&p))?;
        parts.push(name);
    }
    let index = PartsIndex {
        file: file.to_string(),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        parts,
    };
    let p = dir.join(format!("{file}.parts.json"));
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| PackError::Invalid(format!("serialising {}: {e}", p.display())))?;
    std::fs::write(&p, text + "\n").map_err(io(&p))?;
    Ok(index)
}

/// Reads `dir/<file>.parts.json` and puts the parts back together, checking size and sha256.
pub fn join_parts(dir: &Path, file: &str) -> Result<(PartsIndex, Vec<u8>), PackError> {
    let p = dir.join(format!("{file}.parts.json"));
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    let index: PartsIndex = serde_json::from_str(&text)
        .map_err(|e| PackError::Invalid(format!("{}: {e}", p.display())))?;
    let bytes = join_indexed(dir, &index)?;
    Ok((index, bytes))
}

/// Puts the parts named by `index` (in `dir`) back together, checking size and sha256.
pub fn join_indexed(dir: &Path, index: &PartsIndex) -> Result<Vec<u8>, PackError> {
    let file = &index.file;
    let mut bytes = Vec::with_capacity(index.bytes as usize);
    for name in &index.parts {
        let part = dir.join(name);
        let b = std::fs::read(&part).map_err(io(&part))?;
        bytes.extend_from_slice(&b);
    }
    if bytes.len() as u64 != index.bytes || sha256_hex(&bytes) != index.sha256 {
        return Err(PackError::Invalid(format!(
            "{file}: joined parts give {} bytes with another sha256 than the index's {} bytes \
             ({}); a part is missing or damaged",
            bytes.len(),
            index.bytes,
            index.sha256
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|v| (v % 251) as u8).collect();
        let index = write_parts(&data, dir.path(), "w.safetensors", 300).unwrap();
        assert_eq!(index.parts.len(), 4);
        let (_, back) = join_parts(dir.path(), "w.safetensors").unwrap();
        assert_eq!(back, data);
        std::fs::write(dir.path().join(&index.parts[1]), b"x").unwrap();
        assert!(join_parts(dir.path(), "w.safetensors").is_err());
    }

    #[test]
    fn fp16_then_widen_keeps_values_to_half_precision() {
        let dir = tempfile::tempdir().unwrap();
        let vals: Vec<f32> = vec![0.1, -2.5, 3.0e-3, 1234.5];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let src = dir.path().join("a.safetensors");
        write_tensors(
            &[(
                "x.weight".into(),
                safetensors::Dtype::F32,
                vec![2, 2],
                bytes,
            )],
            HashMap::new(),
            &src,
        )
        .unwrap();
        let half_file = dir.path().join("h.safetensors");
        let wide = dir.path().join("w.safetensors");
        to_fp16_safetensors(&src, &half_file).unwrap();
        widen_safetensors(&half_file, &wide).unwrap();
        let (t, meta) = read_tensors(&std::fs::read(&wide).unwrap(), &wide).unwrap();
        assert_eq!(t[0].1, safetensors::Dtype::F32);
        assert!(meta["storage"].contains("fp16"));
        let back: Vec<f32> = t[0]
            .3
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (a, b) in vals.iter().zip(&back) {
            assert_eq!(half::f16::from_f32(*a).to_f32(), *b);
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("x\"y"), "\"x\"\"y\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
