//! `leuknet-inputs`: makes benchmark and test input images from the shared blood-smear data.
//!
//! Reads `MANIFEST.csv` in the data folder (columns
//! `dataset,path,binary_label,label,patient_id,sha256,width,height,format`; no field contains a
//! comma, and every row is checked to have exactly 9 fields), checks the sha256 of every file it
//! uses, and writes `--count` files of one kind to `--out`, plus `index.csv` (file, kind, sources,
//! binary_label). The choice of sources is deterministic under `--seed`.
//!
//! Kinds:
//! - `cells`: 257x257 RGB 8-bit uncompressed TIFF single-cell images, the format of the original
//!   ALL-IDB2 release, made by enlarging the shared ALL-IDB2 JPEGs (about 103 px) with a
//!   Catmull-Rom filter (the aspect ratio of the few non-square crops is not kept).
//! - `fields`: 2592x1944 JPEG (quality 90) smear fields, the camera frame size of ALL-IDB1: an
//!   8x6 mosaic of 324x324 centre crops of DeepAPL and PBC single-cell images (360x363 px), no blur.
//! - `aria`: byte-for-byte copies of ALL-Aria2021 224x224 JPEG fields.
//!
//! Every flag can also be set by an environment variable `LEUKNET_INPUTS_*`.

use std::fmt::Write as _;
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::tiff::TiffEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

/// Side of a `cells` image (the original ALL-IDB2 TIFF size).
const CELL_SIDE: u32 = 257;
/// Size of a `fields` image (the ALL-IDB1 camera frame).
const FIELD_WIDTH: u32 = 2592;
const FIELD_HEIGHT: u32 = 1944;
/// Side of one mosaic tile: 2592 / 8 = 1944 / 6 = 324.
const TILE: u32 = 324;
const FIELD_JPEG_QUALITY: u8 = 90;
const MANIFEST_HEADER: &str =
    "dataset,path,binary_label,label,patient_id,sha256,width,height,format";

/// Makes benchmark/test input images from the shared blood-smear data set.
#[derive(Debug, Parser)]
#[command(name = "leuknet-inputs", version, about, long_about = None)]
struct Args {
    /// The shared data folder (holds MANIFEST.csv).
    #[arg(long, env = "LEUKNET_INPUTS_DATA", default_value = "../shared/data")]
    data: PathBuf,
    /// Output folder (created if missing; existing files of the same names are overwritten).
    #[arg(long, env = "LEUKNET_INPUTS_OUT")]
    out: PathBuf,
    /// What to make: 257x257 TIFF cells, 2592x1944 JPEG fields, or ALL-Aria2021 JPEG copies.
    #[arg(long, env = "LEUKNET_INPUTS_KIND", value_enum)]
    kind: Kind,
    /// How many files to write. Sources are reused (reshuffled) when there are fewer.
    #[arg(long, env = "LEUKNET_INPUTS_COUNT", value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Seed for the choice of source images.
    #[arg(long, env = "LEUKNET_INPUTS_SEED", default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// 257x257 RGB uncompressed TIFF single cells from ALL-IDB2.
    Cells,
    /// 2592x1944 JPEG (q90) mosaics of DeepAPL/PBC single cells.
    Fields,
    /// Copies of ALL-Aria2021 224x224 JPEG fields.
    Aria,
}

/// One row of MANIFEST.csv.
#[derive(Debug, Clone)]
struct Entry {
    dataset: String,
    path: String,
    binary_label: u8,
    sha256: String,
}

/// Parses MANIFEST.csv: plain comma splitting, exactly 9 fields per row (no quoting is used and
/// no field may contain a comma; a row that splits into another count is an error).
fn read_manifest(data: &Path) -> Result<Vec<Entry>> {
    let path = data.join("MANIFEST.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim_end() == MANIFEST_HEADER => {}
        Some((_, header)) => bail!(
            "{}: unexpected header {header:?}, want {MANIFEST_HEADER:?}",
            path.display()
        ),
        None => bail!("{} is empty", path.display()),
    }
    let mut entries = Vec::new();
    for (i, line) in lines {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let [dataset, file, binary_label, _label, _patient, sha256, _w, _h, _format] = fields[..]
        else {
            bail!(
                "{} line {}: {} comma-separated fields, want 9 (quoted fields with commas are not supported)",
                path.display(),
                i + 1,
                fields.len()
            );
        };
        let safe = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        ensure!(
            safe && !file.is_empty(),
            "{} line {}: path {file:?} must be relative, without '..'",
            path.display(),
            i + 1
        );
        let binary_label = match binary_label {
            "0" => 0,
            "1" => 1,
            other => bail!(
                "{} line {}: binary_label {other:?} is not 0 or 1",
                path.display(),
                i + 1
            ),
        };
        entries.push(Entry {
            dataset: dataset.to_owned(),
            path: file.to_owned(),
            binary_label,
            sha256: sha256.to_ascii_lowercase(),
        });
    }
    Ok(entries)
}

/// Reads a source file and checks its sha256 against the manifest.
fn read_checked(data: &Path, entry: &Entry) -> Result<Vec<u8>> {
    let path = data.join(&entry.path);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    ensure!(
        digest == entry.sha256,
        "{}: sha256 {digest} does not match MANIFEST.csv ({})",
        path.display(),
        entry.sha256
    );
    Ok(bytes)
}

fn decode_rgb(data: &Path, entry: &Entry) -> Result<RgbImage> {
    let bytes = read_checked(data, entry)?;
    let img =
        image::load_from_memory(&bytes).with_context(|| format!("cannot decode {}", entry.path))?;
    Ok(img.into_rgb8())
}

/// `count` picks from `pool`, deterministic under `rng`: a shuffled pass over the pool, then
/// another shuffled pass, and so on.
fn pick<'a>(pool: &[&'a Entry], count: usize, rng: &mut StdRng) -> Vec<&'a Entry> {
    let mut order: Vec<&Entry> = Vec::with_capacity(pool.len());
    let mut picked = Vec::with_capacity(count);
    while picked.len() < count {
        if order.is_empty() {
            order.extend_from_slice(pool);
            order.shuffle(rng);
            order.reverse(); // pop() then takes them in shuffled order
        }
        match order.pop() {
            Some(e) => picked.push(e),
            None => break, // empty pool; callers check beforehand
        }
    }
    picked
}

fn pool<'a>(entries: &'a [Entry], datasets: &[&str]) -> Result<Vec<&'a Entry>> {
    let pool: Vec<&Entry> = entries
        .iter()
        .filter(|e| datasets.contains(&e.dataset.as_str()))
        .collect();
    ensure!(
        !pool.is_empty(),
        "MANIFEST.csv lists no images of {}",
        datasets.join(", ")
    );
    Ok(pool)
}

/// Enlarges (or shrinks) to `side`x`side` with Catmull-Rom.
fn squash(img: &RgbImage, side: u32) -> Result<RgbImage> {
    let mut dst = Image::new(side, side, fast_image_resize::PixelType::U8x3);
    Resizer::new()
        .resize(
            img,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom)),
        )
        .context("resize")?;
    RgbImage::from_raw(side, side, dst.into_vec()).context("resized buffer has the wrong size")
}

/// The centre `TILE`x`TILE` crop, enlarging first if the cell is smaller than a tile.
fn tile(cell: &RgbImage) -> Result<RgbImage> {
    let cell = if cell.width() < TILE || cell.height() < TILE {
        squash(cell, TILE)?
    } else {
        cell.clone()
    };
    let (x, y) = ((cell.width() - TILE) / 2, (cell.height() - TILE) / 2);
    Ok(image::imageops::crop_imm(&cell, x, y, TILE, TILE).to_image())
}

fn write_tiff(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    TiffEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .context("TIFF encode")?;
    Ok(out.into_inner())
}

fn write_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .context("JPEG encode")?;
    Ok(out)
}

/// One written file, for the printout and index.csv.
struct Written {
    file: String,
    description: String,
    sources: Vec<String>,
    binary_label: Option<u8>,
    bytes: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let entries = read_manifest(&args.data)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let count = args.count as usize;
    let mut written = Vec::with_capacity(count);

    match args.kind {
        Kind::Cells => {
            let pool = pool(&entries, &["ALL-IDB2"])?;
            for (i, entry) in pick(&pool, count, &mut rng).into_iter().enumerate() {
                let cell = squash(&decode_rgb(&args.data, entry)?, CELL_SIDE)?;
                let bytes = write_tiff(&cell)?;
                let file = format!("cell-{i:05}.tiff");
                std::fs::write(args.out.join(&file), &bytes)?;
                written.push(Written {
                    file,
                    description: format!("{CELL_SIDE}x{CELL_SIDE} RGB TIFF"),
                    sources: vec![entry.path.clone()],
                    binary_label: Some(entry.binary_label),
                    bytes: bytes.len(),
                });
            }
        }
        Kind::Fields => {
            let pool = pool(&entries, &["DeepAPL", "PBC-Acevedo2020"])?;
            let (cols, rows) = (FIELD_WIDTH / TILE, FIELD_HEIGHT / TILE);
            let per_field = (cols * rows) as usize;
            let cells = pick(&pool, count * per_field, &mut rng);
            for (i, chosen) in cells.chunks(per_field).enumerate() {
                let mut field = RgbImage::new(FIELD_WIDTH, FIELD_HEIGHT);
                for (j, entry) in chosen.iter().enumerate() {
                    let t = tile(&decode_rgb(&args.data, entry)?)?;
                    let (x, y) = ((j as u32 % cols) * TILE, (j as u32 / cols) * TILE);
                    image::imageops::replace(&mut field, &t, i64::from(x), i64::from(y));
                }
                let bytes = write_jpeg(&field, FIELD_JPEG_QUALITY)?;
                let file = format!("field-{i:05}.jpg");
                std::fs::write(args.out.join(&file), &bytes)?;
                written.push(Written {
                    file,
                    description: format!(
                        "{FIELD_WIDTH}x{FIELD_HEIGHT} JPEG q{FIELD_JPEG_QUALITY}, {cols}x{rows} cells"
                    ),
                    sources: chosen.iter().map(|e| e.path.clone()).collect(),
                    binary_label: None,
                    bytes: bytes.len(),
                });
            }
        }
        Kind::Aria => {
            let pool = pool(&entries, &["ALL-Aria2021"])?;
            for (i, entry) in pick(&pool, count, &mut rng).into_iter().enumerate() {
                let bytes = read_checked(&args.data, entry)?;
                let file = format!("aria-{i:05}.jpg");
                std::fs::write(args.out.join(&file), &bytes)?;
                written.push(Written {
                    file,
                    description: "copy".to_owned(),
                    sources: vec![entry.path.clone()],
                    binary_label: Some(entry.binary_label),
                    bytes: bytes.len(),
                });
            }
        }
    }

    let mut index = String::from("file,kind,sources,binary_label\n");
    let kind = format!("{:?}", args.kind).to_lowercase();
    for w in &written {
        let path = args.out.join(&w.file);
        let first = w.sources.first().map(String::as_str).unwrap_or("");
        let more = match w.sources.len() {
            0 | 1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        println!(
            "wrote {} ({}, {} bytes) from {first}{more}",
            path.display(),
            w.description,
            w.bytes
        );
        let label = w.binary_label.map(|l| l.to_string()).unwrap_or_default();
        writeln!(index, "{},{kind},{},{label}", w.file, w.sources.join(";"))?;
    }
    let index_path = args.out.join("index.csv");
    std::fs::write(&index_path, index)?;
    println!(
        "wrote {} {kind} file(s) to {} (seed {}); index: {}",
        written.len(),
        args.out.display(),
        args.seed,
        index_path.display()
    );
    Ok(())
}
