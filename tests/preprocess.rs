//! Tests of `leuknet::preprocess` on real blood-smear images from the shared data set.
//!
//! The data folder is `$LEUKNET_DATA`, default `../shared/data` (relative to the crate root).
//! Tests that need it print "skipping: ..." and pass when it is absent; the others build their
//! inputs in memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{CpuExtensions, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use leuknet::preprocess::{
    preprocess, sniff_format, ImageFormat, Limits, PreprocessError, Preprocessed, RESIZE_METHOD,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u32 = 224;
const N: usize = 3 * (SIZE as usize) * (SIZE as usize);

// ---------------------------------------------------------------------------------------------
// Allocation accounting (per thread), to check that bombs are refused before allocating.

struct CountingAlloc;

thread_local! {
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get() + bytes as u64));
}

// SAFETY: forwards every call to `System` unchanged; only counts requested sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Bytes allocated on this thread so far.
fn allocated() -> u64 {
    ALLOCATED.with(|a| a.get())
}

// ---------------------------------------------------------------------------------------------
// Shared data helpers.

struct Row {
    dataset: String,
    path: String,
    width: u32,
    height: u32,
    format: String,
}

struct Data {
    dir: PathBuf,
    rows: Vec<Row>,
}

impl Data {
    /// The shared data set, or `None` (after printing "skipping") when it is not there.
    fn open(test: &str) -> Option<Data> {
        let found = Data::find();
        if found.is_none() {
            eprintln!(
                "skipping {test}: {} not found (set LEUKNET_DATA to the shared data folder)",
                Data::dir().join("MANIFEST.csv").display()
            );
        }
        found
    }

    /// Like [`Data::open`], for tests that fall back to synthetic images.
    fn open_or_synthetic(test: &str) -> Option<Data> {
        let found = Data::find();
        if found.is_none() {
            eprintln!("{test}: shared data not found, using synthetic images instead");
        }
        found
    }

    fn dir() -> PathBuf {
        match std::env::var_os("LEUKNET_DATA") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
        }
    }

    fn find() -> Option<Data> {
        let dir = Data::dir();
        let text = std::fs::read_to_string(dir.join("MANIFEST.csv")).ok()?;
        let rows = text
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split(',').collect();
                assert_eq!(
                    f.len(),
                    9,
                    "MANIFEST.csv line has a comma in a field: {line}"
                );
                Row {
                    dataset: f[0].to_owned(),
                    path: f[1].to_owned(),
                    width: f[6].parse().expect("width"),
                    height: f[7].parse().expect("height"),
                    format: f[8].to_owned(),
                }
            })
            .collect();
        Some(Data { dir, rows })
    }

    fn rows<'a>(&'a self, dataset: &str) -> impl Iterator<Item = &'a Row> + 'a {
        let dataset = dataset.to_owned();
        self.rows.iter().filter(move |r| r.dataset == dataset)
    }

    fn first(&self, dataset: &str) -> &Row {
        self.rows(dataset)
            .next()
            .unwrap_or_else(|| panic!("no {dataset} rows in MANIFEST.csv"))
    }

    fn read(&self, row: &Row) -> Vec<u8> {
        std::fs::read(self.dir.join(&row.path)).unwrap_or_else(|e| panic!("{}: {e}", row.path))
    }

    /// Decoded with the image crate (zune-jpeg for JPEG), as 8-bit RGB.
    fn rgb(&self, row: &Row) -> RgbImage {
        image::load_from_memory(&self.read(row))
            .expect("decode")
            .to_rgb8()
    }
}

fn limits() -> Limits {
    Limits::default()
}

fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn encode_jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .expect("jpeg encode");
    out
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// An independent reference: full-size RGB pixels -> fast_image_resize bilinear -> v/255 CHW.
fn reference_tensor(img: &RgbImage, size: u32) -> Vec<f32> {
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3).unwrap();
    let mut dst = Image::new(size, size, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).unwrap();
    chw(dst.buffer(), size)
}

/// Interleaved RGB8 `size`x`size` -> CHW v/255.
fn chw(rgb: &[u8], size: u32) -> Vec<f32> {
    let plane = (size * size) as usize;
    let mut t = vec![0.0; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            t[c * plane + i] = f32::from(px[c]) / 255.0;
        }
    }
    t
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Length, range, and "looks like an image": not constant, channels not all equal.
fn assert_plausible(p: &Preprocessed) {
    assert_eq!(p.tensor.len(), N);
    assert!(
        p.tensor.iter().all(|v| (0.0..=1.0).contains(v)),
        "values outside [0, 1]"
    );
    let mean = p.tensor.iter().sum::<f32>() / N as f32;
    let var = p
        .tensor
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum::<f32>()
        / N as f32;
    assert!(
        var.sqrt() > 0.03,
        "almost constant image (std {})",
        var.sqrt()
    );
    assert!((0.05..0.95).contains(&mean), "implausible mean {mean}");
    let plane = N / 3;
    assert_ne!(
        p.tensor[..plane],
        p.tensor[plane..2 * plane],
        "R == G: colour lost"
    );
}

fn planes(t: &[f32]) -> (&[f32], &[f32], &[f32]) {
    let plane = t.len() / 3;
    (&t[..plane], &t[plane..2 * plane], &t[2 * plane..])
}

fn assert_corrupt(result: Result<Preprocessed, PreprocessError>, what: &str) {
    match result {
        Err(PreprocessError::Corrupt(msg)) => {
            assert!(!msg.contains("panicked"), "{what}: decoder panicked: {msg}");
        }
        other => panic!(
            "{what}: expected Corrupt, got {:?}",
            other.map(|p| p.format)
        ),
    }
}

/// CRC-32 (IEEE), for patching PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small synthetic RGB image (for tests that need no data): smooth colours plus texture.
fn synthetic(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let r = (x * 255 / width.max(1)) as u8;
        let g = (y * 255 / height.max(1)) as u8;
        let b = ((x * 7 + y * 13) % 256) as u8;
        Rgb([r, g, b])
    })
}

/// 16x32 Adobe YCCK (CMYK) JPEG made by ImageMagick 6 (`-colorspace CMYK -sampling-factor 1x1
/// -quality 95`): top half red (left) and blue (right), bottom half rgb(0, 160, 0).
const CMYK_JPEG_HEX: &str = concat!(
    "ffd8ffee000e41646f626500640000000002ffdb004300020101010101020101010202020202040302020202",
    "0504040304060506060605060606070908060709070606080b08090a0a0a0a0a06080b0c0b0a0c090a0a0aff",
    "db004301020202020202050303050a0706070a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0affc0001408002000100401110002110103110104",
    "1100ffc400160001010100000000000000000000000000000809ffc400141001000000000000000000000000",
    "00000000ffc4001701010101010000000000000000000000000a000809ffc400141101000000000000000000",
    "00000000000000ffda000e040100021103110400003f00b31ab07fdbf8af054c9504865583562bc153254183",
    "66a0eac320c48120487fffd9",
);

/// 48x40 progressive 4:2:0 JPEG made by ImageMagick 6 (`-interlace JPEG -quality 85`):
/// a colour gradient multiplied by a radial gradient.
const PROGRESSIVE_JPEG_HEX: &str = concat!(
    "ffd8ffe000104a46494600010100000100010000ffdb0043000503040404030504040405050506070c080707",
    "07070f0b0b090c110f1212110f111113161c1713141a1511111821181a1d1d1f1f1f13172224221e241c1e1f",
    "1effdb0043010505050706070e08080e1e1411141e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e",
    "1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1effc200110800280030030122000211010311",
    "01ffc400190000030101010000000000000000000000000405030607ffc40017010003010000000000000000",
    "000000000001030402ffda000c03010002100310000001f196b3a85d895c3673cada9623d2bc4a8f5de112cd",
    "ad2284b8f18b209c36054a516099bfffc400191000030101010000000000000000000000000203011011ffda",
    "0008010100010502110c99b31d393c26a2a0c8514a612244bc29e152a4f49b0ae3394629bc473286d077e7ff",
    "c4001b11000203000300000000000000000000000001020311101214ffda0008010301013f01aa3a7458591c",
    "14f0f40e7a3e11ffc4001a110003000301000000000000000000000000011102031213ffda0008010201013f",
    "0194f36486a54e5436a860e33b70c9d67fffc40014100100000000000000000000000000000040ffda000801",
    "0100063f0277ffc4001b10000300030101000000000000000000000001111021614131ffda0008010100013f",
    "214ab2c7238101a8cb3c7744d1f724f3e8d9ab47b3d9278e68bac746271e0ec74c0dd67fffda000c03010002",
    "0003000000101302100a078283ffc4001811010101010100000000000000000000000111001021ffda000801",
    "0301013f10155e2254e5a9384534f7186fffc40017110101010100000000000000000000000001001021ffda",
    "0008010201013f101e05c2c608bc313f4bffc400191001010101010100000000000000000000010011214131",
    "ffda0008010100013f106c0b11cb52663333c9107cba8c48723f8429c8838b592cf2cf2e09d93131388c4676",
    "f72d4ec0ef6dc09b42cf9b604d866fa6c88b7fffd9",
);
// ---------------------------------------------------------------------------------------------
// Format detection and metadata.

#[test]
fn sniffing_and_content_types() {
    assert_eq!(
        sniff_format(b"\x89PNG\r\n\x1a\n...."),
        Some(ImageFormat::Png)
    );
    assert_eq!(
        sniff_format(&[0xFF, 0xD8, 0xFF, 0xE0]),
        Some(ImageFormat::Jpeg)
    );
    assert_eq!(sniff_format(b"II*\0\x08\0\0\0"), Some(ImageFormat::Tiff));
    assert_eq!(sniff_format(b"MM\0*\0\0\0\x08"), Some(ImageFormat::Tiff));
    assert_eq!(sniff_format(b"BM\0\0"), Some(ImageFormat::Bmp));
    assert_eq!(sniff_format(b"GIF89a"), None);
    assert_eq!(sniff_format(b""), None);
    assert_eq!(sniff_format(&[0xFF, 0xD8]), None);

    for (ct, f) in [
        ("image/png", ImageFormat::Png),
        ("image/jpeg", ImageFormat::Jpeg),
        ("image/jpg", ImageFormat::Jpeg),
        ("IMAGE/JPEG; charset=binary", ImageFormat::Jpeg),
        ("image/tiff", ImageFormat::Tiff),
        ("image/bmp", ImageFormat::Bmp),
        ("image/x-ms-bmp", ImageFormat::Bmp),
    ] {
        assert_eq!(ImageFormat::from_content_type(ct), Some(f), "{ct}");
    }
    for ct in [
        "image/gif",
        "application/octet-stream",
        "",
        "image/pngx",
        "text/plain",
    ] {
        assert_eq!(ImageFormat::from_content_type(ct), None, "{ct}");
    }
    let names: Vec<_> = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Tiff,
        ImageFormat::Bmp,
    ]
    .iter()
    .map(|f| f.as_str())
    .collect();
    assert_eq!(names, ["png", "jpeg", "tiff", "bmp"]);
    assert!(RESIZE_METHOD.contains("Bilinear") && RESIZE_METHOD.contains("DCT"));
}

// ---------------------------------------------------------------------------------------------
// Real images.

#[test]
fn real_jpeg_all_idb2() {
    let Some(data) = Data::open("real_jpeg_all_idb2") else {
        return;
    };
    let row = data
        .rows
        .iter()
        .find(|r| r.path == "ALL-IDB2/Im001_1.jpg")
        .expect("Im001_1");
    let p = preprocess(&data.read(row), SIZE, &limits()).unwrap();
    assert_eq!((p.width, p.height, p.format), (103, 103, ImageFormat::Jpeg));
    assert_plausible(&p);
    // Full-size path: agrees with an independent decoder (zune-jpeg) + the same resize.
    let reference = reference_tensor(&data.rgb(row), SIZE);
    let d = mean_abs_diff(&p.tensor, &reference);
    assert!(d < 0.01, "jpeg-decoder vs zune-jpeg mean abs diff {d}");
}

#[test]
fn real_jpeg_deepapl_and_aria() {
    let Some(data) = Data::open("real_jpeg_deepapl_and_aria") else {
        return;
    };
    for dataset in ["DeepAPL", "PBC-Acevedo2020", "ALL-Aria2021"] {
        for row in data.rows(dataset).take(3) {
            assert_eq!(row.format, "JPEG");
            let p = preprocess(&data.read(row), SIZE, &limits()).unwrap();
            assert_eq!((p.width, p.height), (row.width, row.height), "{}", row.path);
            assert_eq!(p.format, ImageFormat::Jpeg);
            assert_plausible(&p);
            let d = mean_abs_diff(&p.tensor, &reference_tensor(&data.rgb(row), SIZE));
            assert!(d < 0.01, "{}: vs zune-jpeg {d}", row.path);
        }
    }
}

#[test]
fn real_bmp_jtsc_and_cellavision() {
    let Some(data) = Data::open("real_bmp_jtsc_and_cellavision") else {
        return;
    };
    for dataset in ["JTSC-Zheng2018", "CellaVision-Zheng2018"] {
        for row in data.rows(dataset).take(3) {
            assert_eq!(row.format, "BMP");
            let p = preprocess(&data.read(row), SIZE, &limits()).unwrap();
            assert_eq!(
                (p.width, p.height, p.format),
                (row.width, row.height, ImageFormat::Bmp)
            );
            assert_plausible(&p);
            // BMP is lossless: exactly the reference resize of the source pixels.
            assert_eq!(
                p.tensor,
                reference_tensor(&data.rgb(row), SIZE),
                "{}",
                row.path
            );
        }
    }
}

#[test]
fn native_size_is_exactly_pixels_over_255_in_chw_rgb_order() {
    let Some(data) = Data::open("native_size_is_exactly_pixels_over_255") else {
        return;
    };
    let row = data.first("CellaVision-Zheng2018");
    assert_eq!((row.width, row.height), (300, 300));
    let p = preprocess(&data.read(row), 300, &limits()).unwrap();
    assert_eq!(p.tensor, chw(data.rgb(row).as_raw(), 300));
}

#[test]
fn png_and_tiff_from_a_real_bmp_give_the_identical_tensor() {
    let Some(data) = Data::open("png_and_tiff_from_a_real_bmp") else {
        return;
    };
    for row in [
        data.first("JTSC-Zheng2018"),
        data.first("CellaVision-Zheng2018"),
    ] {
        let bmp = data.read(row);
        let from_bmp = preprocess(&bmp, SIZE, &limits()).unwrap();
        let img = DynamicImage::ImageRgb8(data.rgb(row));
        for (format, expected) in [
            (image::ImageFormat::Png, ImageFormat::Png),
            (image::ImageFormat::Tiff, ImageFormat::Tiff),
        ] {
            let p = preprocess(&encode(&img, format), SIZE, &limits()).unwrap();
            assert_eq!(p.format, expected);
            assert_eq!((p.width, p.height), (row.width, row.height));
            assert_eq!(
                p.tensor, from_bmp.tensor,
                "{:?} of {} differs",
                format, row.path
            );
        }
    }
}

/// The ALL-IDB2 release format: 257x257 RGB TIFF.
#[test]
fn tiff_257x257_cell() {
    let Some(data) = Data::open("tiff_257x257_cell") else {
        return;
    };
    let small = data.rgb(data.first("ALL-IDB2"));
    let big = image::imageops::resize(&small, 257, 257, image::imageops::FilterType::Triangle);
    let img = DynamicImage::ImageRgb8(big);
    let tiff = encode(&img, image::ImageFormat::Tiff);
    let p = preprocess(&tiff, SIZE, &limits()).unwrap();
    assert_eq!((p.width, p.height, p.format), (257, 257, ImageFormat::Tiff));
    assert_plausible(&p);
    assert_eq!(p.tensor, reference_tensor(&img.to_rgb8(), SIZE));
}

// ---------------------------------------------------------------------------------------------
// Colour types and bit depths.

/// A real cell when the data is there, otherwise a synthetic image.
fn source_image(test: &str) -> RgbImage {
    match Data::open_or_synthetic(test) {
        Some(data) => data.rgb(data.first("CellaVision-Zheng2018")),
        None => synthetic(300, 280),
    }
}

#[test]
fn grayscale_png_and_jpeg() {
    let rgb = source_image("grayscale_png_and_jpeg");
    let gray: GrayImage = DynamicImage::ImageRgb8(rgb).to_luma8();
    let png = encode(
        &DynamicImage::ImageLuma8(gray.clone()),
        image::ImageFormat::Png,
    );
    let p = preprocess(&png, SIZE, &limits()).unwrap();
    let (r, g, b) = planes(&p.tensor);
    assert!(r == g && g == b, "gray must give R = G = B");
    // Same as the RGB image with R = G = B.
    let replicated = RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
        let v = gray.get_pixel(x, y)[0];
        Rgb([v, v, v])
    });
    let rgb_png = encode(
        &DynamicImage::ImageRgb8(replicated.clone()),
        image::ImageFormat::Png,
    );
    assert_eq!(
        p.tensor,
        preprocess(&rgb_png, SIZE, &limits()).unwrap().tensor
    );

    // Grayscale JPEG (one component).
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&gray)
        .unwrap();
    let pj = preprocess(&jpeg, SIZE, &limits()).unwrap();
    assert_eq!(pj.format, ImageFormat::Jpeg);
    let (r, g, b) = planes(&pj.tensor);
    assert!(r == g && g == b);
    let d = mean_abs_diff(&pj.tensor, &reference_tensor(&replicated, SIZE));
    assert!(d < 0.02, "gray JPEG vs source {d}");
}

#[test]
fn rgba_png_drops_alpha() {
    let rgb = source_image("rgba_png_drops_alpha");
    let rgba = RgbaImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        Rgba([r, g, b, ((x * 31 + y * 17) % 256) as u8])
    });
    let p = preprocess(
        &encode(&DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png),
        SIZE,
        &limits(),
    )
    .unwrap();
    let plain = encode(
        &DynamicImage::ImageRgb8(rgb.clone()),
        image::ImageFormat::Png,
    );
    assert_eq!(
        p.tensor,
        preprocess(&plain, SIZE, &limits()).unwrap().tensor
    );

    // Gray + alpha too.
    let gray = DynamicImage::ImageRgb8(rgb).to_luma8();
    let la = ImageBuffer::from_fn(gray.width(), gray.height(), |x, y| {
        image::LumaA([gray.get_pixel(x, y)[0], (x % 256) as u8])
    });
    let p = preprocess(
        &encode(&DynamicImage::ImageLumaA8(la), image::ImageFormat::Png),
        SIZE,
        &limits(),
    )
    .unwrap();
    let l = preprocess(
        &encode(&DynamicImage::ImageLuma8(gray), image::ImageFormat::Png),
        SIZE,
        &limits(),
    )
    .unwrap();
    assert_eq!(p.tensor, l.tensor);
}

#[test]
fn sixteen_bit_png_and_tiff() {
    let rgb = source_image("sixteen_bit_png_and_tiff");
    let eight = preprocess(
        &encode(
            &DynamicImage::ImageRgb8(rgb.clone()),
            image::ImageFormat::Png,
        ),
        SIZE,
        &limits(),
    )
    .unwrap();
    // v * 257 is the exact 16-bit value of v; it must round back to v.
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            Rgb([u16::from(r) * 257, u16::from(g) * 257, u16::from(b) * 257])
        });
    let img16 = DynamicImage::ImageRgb16(rgb16);
    for format in [image::ImageFormat::Png, image::ImageFormat::Tiff] {
        let p = preprocess(&encode(&img16, format), SIZE, &limits()).unwrap();
        assert_eq!(p.tensor, eight.tensor, "16-bit {format:?}");
    }
    // 16-bit gray.
    let gray = DynamicImage::ImageRgb8(rgb).to_luma8();
    let gray16: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(gray.width(), gray.height(), |x, y| {
            Luma([u16::from(gray.get_pixel(x, y)[0]) * 257])
        });
    let p16 = preprocess(
        &encode(&DynamicImage::ImageLuma16(gray16), image::ImageFormat::Png),
        SIZE,
        &limits(),
    )
    .unwrap();
    let p8 = preprocess(
        &encode(&DynamicImage::ImageLuma8(gray), image::ImageFormat::Png),
        SIZE,
        &limits(),
    )
    .unwrap();
    assert_eq!(p16.tensor, p8.tensor);
}

/// Adobe CMYK/YCCK JPEG (as written by Photoshop/ImageMagick) comes out in the right colours.
#[test]
fn cmyk_jpeg_becomes_rgb() {
    let bytes = hex(CMYK_JPEG_HEX);
    // 16 wide, 32 tall; squash to 32x32 so each colour block is 16x16.
    let p = preprocess(&bytes, 32, &limits()).unwrap();
    assert_eq!((p.width, p.height, p.format), (16, 32, ImageFormat::Jpeg));
    let mean = |x0: usize, x1: usize, y0: usize, y1: usize| -> [f32; 3] {
        let mut m = [0.0; 3];
        for (c, m) in m.iter_mut().enumerate() {
            let mut sum = 0.0;
            for y in y0..y1 {
                for x in x0..x1 {
                    sum += p.tensor[c * 1024 + y * 32 + x];
                }
            }
            *m = sum / ((x1 - x0) * (y1 - y0)) as f32;
        }
        m
    };
    let close = |got: [f32; 3], want: [f32; 3], what: &str| {
        for c in 0..3 {
            assert!(
                (got[c] - want[c]).abs() < 0.08,
                "{what}: got {got:?}, want {want:?}"
            );
        }
    };
    close(mean(3, 13, 3, 13), [1.0, 0.0, 0.0], "red block");
    close(mean(19, 29, 3, 13), [0.0, 0.0, 1.0], "blue block");
    close(
        mean(3, 29, 19, 29),
        [0.0, 160.0 / 255.0, 0.0],
        "green block",
    );
}

/// Progressive 4:2:0 JPEG, through the DCT-scaled path (48x40 -> 16: decoded at 1/2).
#[test]
fn progressive_jpeg_scaled() {
    let bytes = hex(PROGRESSIVE_JPEG_HEX);
    let p = preprocess(&bytes, 16, &limits()).unwrap();
    assert_eq!((p.width, p.height), (48, 40));
    let full = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let d = mean_abs_diff(&p.tensor, &reference_tensor(&full, 16));
    assert!(d < 0.03, "progressive scaled vs full {d}");
    // And at a size that needs the full decode.
    let p = preprocess(&bytes, SIZE, &limits()).unwrap();
    let d = mean_abs_diff(&p.tensor, &reference_tensor(&full, SIZE));
    assert!(d < 0.01, "progressive full vs zune {d}");
}

// ---------------------------------------------------------------------------------------------
// Large JPEGs: the DCT-scaled path.

/// A 2592x1944 smear field: an 8x6 mosaic of 324x324 centre crops of real single-cell images.
fn camera_field(data: &Data) -> RgbImage {
    let mut field = RgbImage::new(2592, 1944);
    let cells: Vec<&Row> = data
        .rows("DeepAPL")
        .take(24)
        .chain(data.rows("PBC-Acevedo2020").take(24))
        .collect();
    for (i, row) in cells.iter().enumerate() {
        let cell = data.rgb(row);
        let (x0, y0) = ((cell.width() - 324) / 2, (cell.height() - 324) / 2);
        let crop = image::imageops::crop_imm(&cell, x0, y0, 324, 324).to_image();
        let (tx, ty) = ((i % 8) as i64 * 324, (i / 8) as i64 * 324);
        image::imageops::replace(&mut field, &crop, tx, ty);
    }
    field
}

#[test]
fn dct_scaled_jpeg_is_close_to_full_decode() {
    let Some(data) = Data::open("dct_scaled_jpeg_is_close_to_full_decode") else {
        return;
    };
    let field = camera_field(&data);
    let jpeg = encode_jpeg(&field, 90);
    let p = preprocess(&jpeg, SIZE, &limits()).unwrap();
    assert_eq!(
        (p.width, p.height, p.format),
        (2592, 1944, ImageFormat::Jpeg)
    );
    assert_plausible(&p);
    // Reference: full decode by zune-jpeg, then the same resize.
    let full = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let d = mean_abs_diff(&p.tensor, &reference_tensor(&full, SIZE));
    eprintln!("2592x1944 (1/8 DCT) vs full decode: mean abs diff {d:.5}");
    assert!(d < 0.02, "DCT-scaled vs full decode: {d}");

    // A wide strip: 1/8 would make the short side 113 px < 224, so 1/4 must be used.
    let strip = image::imageops::crop_imm(&field, 0, 500, 2592, 900).to_image();
    let jpeg = encode_jpeg(&strip, 90);
    let p = preprocess(&jpeg, SIZE, &limits()).unwrap();
    assert_eq!((p.width, p.height), (2592, 900));
    let full = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let d = mean_abs_diff(&p.tensor, &reference_tensor(&full, SIZE));
    eprintln!("2592x900 (1/4 DCT) vs full decode: mean abs diff {d:.5}");
    assert!(d < 0.02, "DCT-scaled strip vs full decode: {d}");
}

#[test]
fn deterministic_across_calls_and_threads() {
    let Some(data) = Data::open("deterministic_across_calls_and_threads") else {
        return;
    };
    let field = encode_jpeg(&camera_field(&data), 90);
    let tiff = encode(
        &DynamicImage::ImageRgb8(data.rgb(data.first("ALL-IDB2"))),
        image::ImageFormat::Tiff,
    );
    let small = data.read(data.first("DeepAPL"));
    let inputs = [field, tiff, small];
    let first: Vec<Vec<f32>> = inputs
        .iter()
        .map(|b| preprocess(b, SIZE, &limits()).unwrap().tensor)
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    inputs
                        .iter()
                        .map(|b| preprocess(b, SIZE, &limits()).unwrap().tensor)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            assert!(
                h.join().unwrap() == first,
                "a thread got a different tensor"
            );
        }
    });
}

/// Train and serve may run on machines with different SIMD support; the resize must not care.
#[test]
fn resize_is_identical_across_cpu_extensions() {
    let rgb = source_image("resize_is_identical_across_cpu_extensions");
    let gray = DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let run = |ext: Option<CpuExtensions>, buf: &[u8], w: u32, h: u32, pt: PixelType, size: u32| {
        let src = ImageRef::new(w, h, buf, pt).unwrap();
        let mut dst = Image::new(size, size, pt);
        let mut resizer = Resizer::new();
        if let Some(ext) = ext {
            // SAFETY: only extensions the CPU reports as supported are set.
            unsafe { resizer.set_cpu_extensions(ext) };
        }
        resizer.resize(&src, &mut dst, &options).unwrap();
        dst.into_vec()
    };
    let mut extensions = vec![CpuExtensions::None];
    #[cfg(target_arch = "x86_64")]
    extensions.extend([CpuExtensions::Sse4_1, CpuExtensions::Avx2]);
    #[cfg(target_arch = "aarch64")]
    extensions.push(CpuExtensions::Neon);
    for size in [SIZE, 500] {
        let best_rgb = run(
            None,
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            PixelType::U8x3,
            size,
        );
        let best_gray = run(
            None,
            gray.as_raw(),
            gray.width(),
            gray.height(),
            PixelType::U8,
            size,
        );
        for &ext in extensions.iter().filter(|e| e.is_supported()) {
            let r = run(
                Some(ext),
                rgb.as_raw(),
                rgb.width(),
                rgb.height(),
                PixelType::U8x3,
                size,
            );
            assert!(r == best_rgb, "RGB resize to {size} differs with {ext:?}");
            let g = run(
                Some(ext),
                gray.as_raw(),
                gray.width(),
                gray.height(),
                PixelType::U8,
                size,
            );
            assert!(g == best_gray, "gray resize to {size} differs with {ext:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn empty_is_empty() {
    assert!(matches!(
        preprocess(&[], SIZE, &limits()),
        Err(PreprocessError::Empty)
    ));
}

#[test]
fn random_bytes_are_not_an_image() {
    let mut rng = StdRng::seed_from_u64(7);
    for len in [1usize, 2, 3, 10, 1000, 100_000] {
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        bytes[0] = 0x00; // no magic number starts with 0
        assert!(
            matches!(
                preprocess(&bytes, SIZE, &limits()),
                Err(PreprocessError::NotAnImage)
            ),
            "len {len}"
        );
    }
    assert!(matches!(
        preprocess(b"GIF89a\x01\0\x01\0", SIZE, &limits()),
        Err(PreprocessError::NotAnImage)
    ));
    assert!(matches!(
        preprocess(b"<html>", SIZE, &limits()),
        Err(PreprocessError::NotAnImage)
    ));
}

/// One small file per format (real when the data is there).
fn small_files(test: &str) -> Vec<(ImageFormat, Vec<u8>)> {
    let img = DynamicImage::ImageRgb8(match Data::open_or_synthetic(test) {
        Some(data) => data.rgb(data.first("JTSC-Zheng2018")),
        None => synthetic(120, 116),
    });
    vec![
        (ImageFormat::Jpeg, encode_jpeg(&img.to_rgb8(), 90)),
        (ImageFormat::Png, encode(&img, image::ImageFormat::Png)),
        (ImageFormat::Tiff, encode(&img, image::ImageFormat::Tiff)),
        (ImageFormat::Bmp, encode(&img, image::ImageFormat::Bmp)),
        (ImageFormat::Jpeg, hex(PROGRESSIVE_JPEG_HEX)),
        (ImageFormat::Jpeg, hex(CMYK_JPEG_HEX)),
    ]
}

#[test]
fn truncated_files_are_corrupt() {
    for (format, bytes) in small_files("truncated_files_are_corrupt") {
        assert!(
            preprocess(&bytes, SIZE, &limits()).is_ok(),
            "{format:?} intact must decode"
        );
        let len = bytes.len();
        // The last cut loses the end of the pixel data (PNG: the final IDAT's CRC; a PNG
        // missing only its IEND trailer still decodes, as its pixels are complete).
        let last = if format == ImageFormat::Png {
            len - 14
        } else {
            len - 1
        };
        for cut in [8, 20, 60, len / 3, len / 2, len - len / 10, last] {
            let what = format!("{format:?} of {len} bytes cut to {cut}");
            assert_corrupt(preprocess(&bytes[..cut], SIZE, &limits()), &what);
        }
    }
}

/// Camera-sized JPEGs are decoded at 1/8 through the DC-only fast path; damaged ones must
/// still be refused exactly as jpeg-decoder refuses them (the fast path declines and hands
/// them over) and must never panic.
#[test]
fn camera_sized_jpeg_truncated_or_damaged_is_corrupt_or_decoded() {
    let bytes = encode_jpeg(&synthetic(1800, 1792), 90);
    let intact = preprocess(&bytes, SIZE, &limits()).expect("intact camera-sized JPEG");
    assert_eq!((intact.width, intact.height), (1800, 1792));
    assert_plausible(&intact);
    let len = bytes.len();
    for cut in [
        8,
        200,
        700,
        len / 3,
        len / 2,
        len - len / 10,
        len - 3,
        len - 1,
    ] {
        let what = format!("JPEG of {len} bytes cut to {cut}");
        assert_corrupt(preprocess(&bytes[..cut], SIZE, &limits()), &what);
    }
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..40 {
        let mut m = bytes.clone();
        for _ in 0..rng.random_range(1..=4) {
            let at = rng.random_range(2..m.len());
            m[at] = rng.random();
        }
        match preprocess(&m, SIZE, &limits()) {
            Ok(p) => {
                assert!(p.tensor.len() == N && p.tensor.iter().all(|v| (0.0..=1.0).contains(v)))
            }
            Err(PreprocessError::Corrupt(msg)) => assert!(!msg.contains("panicked"), "{msg}"),
            Err(other) => panic!("unexpected error for a damaged JPEG: {other}"),
        }
    }
}

#[test]
fn corrupted_headers_and_data_are_corrupt() {
    let files = small_files("corrupted_headers_and_data_are_corrupt");
    // PNG: a flipped byte inside IDAT fails the CRC.
    let (_, png) = &files[1];
    let idat = png.windows(4).position(|w| w == b"IDAT").expect("IDAT");
    let mut bad = png.clone();
    bad[idat + 20] ^= 0x55;
    assert_corrupt(
        preprocess(&bad, SIZE, &limits()),
        "PNG with a flipped IDAT byte",
    );
    // JPEG: garbage in place of the tables and frame header.
    let (_, jpeg) = &files[0];
    let mut bad = jpeg.clone();
    for b in &mut bad[4..300] {
        *b = 0xA5;
    }
    assert_corrupt(
        preprocess(&bad, SIZE, &limits()),
        "JPEG with garbage tables",
    );
    // BMP: an impossible bits-per-pixel.
    let (_, bmp) = &files[3];
    let mut bad = bmp.clone();
    bad[28] = 13;
    assert_corrupt(
        preprocess(&bad, SIZE, &limits()),
        "BMP with 13 bits per pixel",
    );
    // TIFF: IFD offset past the end.
    let (_, tiff) = &files[2];
    let mut bad = tiff.clone();
    bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_corrupt(
        preprocess(&bad, SIZE, &limits()),
        "TIFF with IFD offset past the end",
    );
}

/// Random mutations of valid files: any result is fine except a panic (or a tensor of the
/// wrong shape).
#[test]
fn mutated_files_never_panic() {
    let files = small_files("mutated_files_never_panic");
    let small = Limits {
        max_pixels: 1_000_000,
    };
    let mut rng = StdRng::seed_from_u64(20240611);
    let (mut ok, mut errors) = (0, 0);
    for (format, bytes) in &files {
        for _ in 0..300 {
            let mut m = bytes.clone();
            match rng.random_range(0..4) {
                0 => {
                    for _ in 0..rng.random_range(1..8) {
                        let i = rng.random_range(0..m.len());
                        m[i] = rng.random();
                    }
                }
                1 => {
                    let i = rng.random_range(2..m.len().min(400));
                    m[i] ^= 1 << rng.random_range(0..8);
                }
                2 => m.truncate(rng.random_range(1..m.len())),
                _ => {
                    let i = rng.random_range(0..m.len());
                    let junk: Vec<u8> =
                        (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                    m.splice(i..i, junk);
                }
            }
            match preprocess(&m, SIZE, &small) {
                Ok(p) => {
                    assert_eq!(p.tensor.len(), N);
                    assert!(p.tensor.iter().all(|v| (0.0..=1.0).contains(v)));
                    ok += 1;
                }
                Err(PreprocessError::Corrupt(msg)) => {
                    assert!(
                        !msg.contains("panicked"),
                        "{format:?}: decoder panicked: {msg}"
                    );
                    errors += 1;
                }
                Err(_) => errors += 1,
            }
        }
    }
    eprintln!("mutations: {ok} decoded, {errors} refused");
}

// ---------------------------------------------------------------------------------------------
// Decompression bombs.

fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(
        &DynamicImage::ImageRgb8(synthetic(16, 16)),
        image::ImageFormat::Png,
    );
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = encode_jpeg(&synthetic(16, 16), 90);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

fn bmp_claiming(width: i32, height: i32) -> Vec<u8> {
    let mut bmp = encode(
        &DynamicImage::ImageRgb8(synthetic(16, 16)),
        image::ImageFormat::Bmp,
    );
    bmp[18..22].copy_from_slice(&width.to_le_bytes());
    bmp[22..26].copy_from_slice(&height.to_le_bytes());
    bmp
}

fn tiff_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut tiff = encode(
        &DynamicImage::ImageRgb8(synthetic(16, 16)),
        image::ImageFormat::Tiff,
    );
    assert_eq!(&tiff[..4], b"II*\0", "expected a little-endian TIFF");
    let ifd = u32::from_le_bytes(tiff[4..8].try_into().unwrap()) as usize;
    let entries = u16::from_le_bytes(tiff[ifd..ifd + 2].try_into().unwrap()) as usize;
    let mut patched = 0;
    for e in 0..entries {
        let at = ifd + 2 + 12 * e;
        let tag = u16::from_le_bytes(tiff[at..at + 2].try_into().unwrap());
        let kind = u16::from_le_bytes(tiff[at + 2..at + 4].try_into().unwrap());
        let value = match tag {
            256 => width,
            257 => height,
            // One strip for the whole (claimed) image keeps the strip table consistent.
            278 => height,
            _ => continue,
        };
        match kind {
            3 => {
                tiff[at + 8..at + 10].copy_from_slice(&u16::try_from(value).unwrap().to_le_bytes())
            }
            4 => tiff[at + 8..at + 12].copy_from_slice(&value.to_le_bytes()),
            _ => panic!("unexpected TIFF type {kind} for tag {tag}"),
        }
        patched += 1;
    }
    assert_eq!(patched, 3, "expected width, height and rows-per-strip tags");
    tiff
}

#[test]
fn bombs_are_refused_from_the_header_fast_and_without_allocating() {
    let cases = [
        (
            ImageFormat::Png,
            png_claiming(50_000, 50_000),
            50_000,
            50_000,
        ),
        (
            ImageFormat::Jpeg,
            jpeg_claiming(60_000, 60_000),
            60_000,
            60_000,
        ),
        (
            ImageFormat::Bmp,
            bmp_claiming(50_000, 50_000),
            50_000,
            50_000,
        ),
        (
            ImageFormat::Tiff,
            tiff_claiming(50_000, 50_000),
            50_000,
            50_000,
        ),
        (ImageFormat::Png, png_claiming(100_000, 401), 100_000, 401),
        // One side alone above the limit.
        (ImageFormat::Png, png_claiming(50_000_000, 1), 50_000_000, 1),
        (ImageFormat::Bmp, bmp_claiming(60_000, 1_000), 60_000, 1_000),
    ];
    let limits = Limits {
        max_pixels: 40_000_000,
    };
    for (format, bytes, w, h) in cases {
        let before = allocated();
        let start = Instant::now();
        let result = preprocess(&bytes, SIZE, &limits);
        let elapsed = start.elapsed();
        let used = allocated() - before;
        match result {
            Err(PreprocessError::TooManyPixels {
                width,
                height,
                max_pixels,
            }) => {
                assert_eq!(
                    (width, height, max_pixels),
                    (w, h, 40_000_000),
                    "{format:?}"
                );
            }
            other => panic!(
                "{format:?} bomb: expected TooManyPixels, got {:?}",
                other.map(|p| p.format)
            ),
        }
        assert!(
            elapsed < Duration::from_millis(100),
            "{format:?} bomb took {elapsed:?}"
        );
        assert!(used < 1 << 20, "{format:?} bomb allocated {used} bytes");
    }
    let msg = preprocess(&png_claiming(50_000, 50_000), SIZE, &limits)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("50000x50000") && msg.contains("40000000"),
        "{msg}"
    );
}

#[test]
fn pixel_limit_applies_to_real_images() {
    let Some(data) = Data::open("pixel_limit_applies_to_real_images") else {
        return;
    };
    let row = data.first("ALL-IDB2");
    let bytes = data.read(row);
    let exact = Limits {
        max_pixels: u64::from(row.width * row.height),
    };
    assert!(preprocess(&bytes, SIZE, &exact).is_ok());
    let one_less = Limits {
        max_pixels: exact.max_pixels - 1,
    };
    assert!(matches!(
        preprocess(&bytes, SIZE, &one_less),
        Err(PreprocessError::TooManyPixels {
            width: 103,
            height: 103,
            ..
        })
    ));
}
