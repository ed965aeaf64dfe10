//! Image preprocessing: encoded upload bytes -> `size`x`size` RGB tensor in [0, 1], CHW f32.
//!
//! **Why one shared function.** The server ([`crate::http`]) and the trainer both call
//! [`preprocess`], so the model sees the same tensor for the same file at training and at
//! serving time. Any change here (decoder, JPEG pre-scaling rule, resize filter, rounding) is a
//! change of the model's input distribution. It must be recorded in the model card
//! ([`RESIZE_METHOD`]) and normally means retraining.
//!
//! **Untrusted input.** Uploads come from untrusted clients, so:
//! - the format is taken from the file's magic bytes ([`sniff_format`]), never from a name or
//!   a client-declared content type;
//! - the dimensions are read from the header first and checked against
//!   [`Limits::max_pixels`] before any pixel buffer is allocated (decompression bombs);
//!   the decoders' own limits (`image::Limits`, jpeg-decoder's buffer limit) are a second guard;
//! - no input can make [`preprocess`] panic: errors become [`PreprocessError`], and a panic
//!   inside a third-party decoder is caught and reported as [`PreprocessError::Corrupt`].
//!
//! **Pipeline** (see [`RESIZE_METHOD`] for the words that go into the model card):
//! 1. JPEG: jpeg-decoder with DCT-domain downscaling (1/8, 1/4, 1/2 or 1/1; only as far as
//!    both sides stay >= `size`), then YCbCr/gray/CMYK -> RGB. At 1/8 (both sides >= 8 x
//!    `size`, e.g. camera frames), baseline files go through a DC-only fast path
//!    (`preprocess/jpeg_dc.rs`) whose output is byte-identical to jpeg-decoder's and which
//!    leaves anything it does not handle exactly to jpeg-decoder. PNG, TIFF, BMP: the `image`
//!    crate at full size; any colour type or bit depth -> 8-bit RGB (gray replicated, alpha
//!    dropped, 16-bit rounded to 8-bit).
//! 2. Resize to `size`x`size`, aspect ratio not kept (as in the paper), with
//!    fast_image_resize `Convolution(Bilinear)` (antialiased when shrinking), 8-bit output.
//! 3. `v / 255` as f32, planes R, G, B (CHW).
//!
//! Not applied: EXIF/TIFF orientation, embedded ICC profiles, gamma. Only the first image of a
//! multi-page TIFF is used.
//!
//! Cost: [`preprocess`] is synchronous and CPU-bound (release build, one core, measured by
//! `bench/preprocess` on a shared machine, `bench/results/preprocess-20261128T171833Z.json`:
//! about 0.5 ms for a 257x257 TIFF, 1.1 ms for a 224x224 JPEG, 20 ms for a 2592x1944 JPEG,
//! which is mostly entropy decoding; 33 ms before the DC-only path); run it on a blocking
//! thread pool.

mod jpeg_dc;

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::bmp::BmpDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::tiff::TiffDecoder;
use image::{DynamicImage, ImageDecoder};

/// The exact preprocessing, in words, for the model card's input description.
pub const RESIZE_METHOD: &str = "Decode, then squash to size x size (224 x 224 for LeukNet), then scale to [0, 1]. \
JPEG: jpeg-decoder 0.3 with DCT-domain downscaling by the smallest factor s/8 (s in 1, 2, 4, 8) \
for which both decoded sides ceil(side*s/8) are >= min(size, original side); \
i.e. the decoder never goes below the target size, and images smaller than the target are decoded at full size. \
Grayscale JPEG replicated to R=G=B; CMYK/YCCK (Adobe) converted as R = (255-C)(255-K)/255 (rounded). \
PNG, TIFF, BMP: decoded at full size by the image crate 0.25; gray replicated to RGB, alpha dropped (no compositing), \
16-bit samples rounded to 8-bit. No EXIF orientation, ICC profile or gamma handling. \
Resize: fast_image_resize 6 ResizeAlg::Convolution(FilterType::Bilinear), i.e. a triangle filter whose support \
widens with the downscale factor (antialiased; plain bilinear when enlarging), separable, 8-bit fixed point, \
output rounded to u8 per channel; aspect ratio not kept (no crop, no padding). \
Tensor: f32 value v/255 for each u8 v, layout CHW with channels R, G, B (batched as NCHW).";

/// Default pixel limit of [`Limits::default`]: 40 megapixels (e.g. 7300 x 5475).
///
/// A 2592x1944 camera field is 5 MP. At the limit, one image in flight needs about 120 MB for
/// a full-size 8-bit RGB decode (PNG, TIFF, BMP), up to 320 MB for 16-bit RGBA, and up to
/// 240 MB of DCT coefficients for a progressive 4:4:4 JPEG (baseline JPEGs with DCT scaling
/// need far less).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Room given to a decoder for buffers besides its output image (compressed strips,
/// row buffers, metadata), for the `image::Limits::max_alloc` second guard.
const DECODER_SCRATCH_BYTES: u64 = 64 * 1024 * 1024;

/// An accepted input image format, as recognised from the file's magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// PNG (any colour type and bit depth the `image` crate reads).
    Png,
    /// Baseline or progressive JPEG (JFIF/EXIF/Adobe), 8-bit gray, YCbCr, RGB, CMYK or YCCK.
    Jpeg,
    /// TIFF or BigTIFF, first image only.
    Tiff,
    /// Windows BMP.
    Bmp,
}

impl ImageFormat {
    /// Lower-case short name: `"png"`, `"jpeg"`, `"tiff"` or `"bmp"` (for logs, metrics, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Bmp => "bmp",
        }
    }

    /// Maps a MIME type to a format: `image/png`, `image/jpeg` (also `image/jpg`, `image/pjpeg`),
    /// `image/tiff`, `image/bmp` (also `image/x-ms-bmp`, `image/x-bmp`).
    ///
    /// Case-insensitive; parameters after `;` and surrounding spaces are ignored. Returns `None`
    /// for anything else. This only says what the client *claims*; [`preprocess`] trusts the
    /// magic bytes.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        const TABLE: [(&str, ImageFormat); 8] = [
            ("image/png", ImageFormat::Png),
            ("image/jpeg", ImageFormat::Jpeg),
            ("image/jpg", ImageFormat::Jpeg),
            ("image/pjpeg", ImageFormat::Jpeg),
            ("image/tiff", ImageFormat::Tiff),
            ("image/bmp", ImageFormat::Bmp),
            ("image/x-ms-bmp", ImageFormat::Bmp),
            ("image/x-bmp", ImageFormat::Bmp),
        ];
        TABLE
            .iter()
            .find(|(name, _)| essence.eq_ignore_ascii_case(name))
            .map(|&(_, format)| format)
    }

    /// Human-readable upper-case name for messages: `"PNG"`, `"JPEG"`, `"TIFF"`, `"BMP"`.
    fn label(self) -> &'static str {
        match self {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Tiff => "TIFF",
            ImageFormat::Bmp => "BMP",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Recognises the format from the first bytes of the file (magic numbers), or `None`.
///
/// PNG `89 50 4E 47 0D 0A 1A 0A`; JPEG `FF D8 FF`; TIFF `II*\0` / `MM\0*` (BigTIFF
/// `II+\0` / `MM\0+`); BMP `BM`.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.starts_with(PNG) {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        Some(ImageFormat::Tiff)
    } else if bytes.starts_with(b"BM") {
        Some(ImageFormat::Bmp)
    } else {
        None
    }
}

/// Resource limits for one [`preprocess`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `width * height` of the encoded image (as its header states), checked
    /// before any pixel buffer is allocated.
    pub max_pixels: u64,
}

impl Default for Limits {
    /// [`DEFAULT_MAX_PIXELS`].
    fn default() -> Self {
        Limits {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// The result of [`preprocess`]: the model input for one image plus facts about the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// `3 * size * size` values in [0, 1]: the R plane, then G, then B, each row-major
    /// (CHW; one image of an NCHW batch).
    pub tensor: Vec<f32>,
    /// Width of the original image, from its header.
    pub width: u32,
    /// Height of the original image, from its header.
    pub height: u32,
    /// Format recognised from the magic bytes.
    pub format: ImageFormat,
}

/// Why an upload could not be turned into a tensor. All are the client's fault (HTTP 4xx).
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Zero bytes were uploaded.
    #[error("empty upload: no image bytes")]
    Empty,
    /// The bytes are not a PNG, JPEG, TIFF or BMP file (unknown magic bytes).
    #[error(
        "not a supported image: expected PNG, JPEG, TIFF or BMP (unrecognised file signature)"
    )]
    NotAnImage,
    /// The format was recognised but the file is corrupt, truncated, or uses a variant the
    /// decoders do not support (e.g. arithmetic-coded or 12-bit JPEG, palette TIFF).
    #[error("corrupt, truncated or unsupported image: {0}")]
    Corrupt(String),
    /// The header declares more than [`Limits::max_pixels`] pixels; nothing was decoded.
    #[error("image too large: {width}x{height} is more than the limit of {max_pixels} pixels")]
    TooManyPixels {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit in force.
        max_pixels: u64,
    },
}

/// Decodes `bytes` (PNG, JPEG, TIFF or BMP, recognised by magic bytes) and returns the
/// `size`x`size` RGB tensor in [0, 1], CHW f32, exactly as described in [`RESIZE_METHOD`].
///
/// The header is read first and images over `limits.max_pixels` are refused before any pixel
/// buffer is allocated. Deterministic: the same bytes and `size` give the same tensor.
/// Never panics on any input bytes. `size` is chosen by the caller (224 for LeukNet); `0`
/// gives an empty tensor.
pub fn preprocess(
    bytes: &[u8],
    size: u32,
    limits: &Limits,
) -> Result<Preprocessed, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let format = sniff_format(bytes).ok_or(PreprocessError::NotAnImage)?;
    let run = || -> Result<Preprocessed, PreprocessError> {
        let decoded = match format {
            ImageFormat::Jpeg => decode_jpeg(bytes, size, limits)?,
            ImageFormat::Png => {
                let cursor = Cursor::new(bytes);
                let decoder = PngDecoder::with_limits(cursor, image_limits(limits, None))
                    .map_err(|e| image_error(format, e))?;
                decode_with_image(decoder, format, limits)?
            }
            ImageFormat::Tiff => {
                let decoder =
                    TiffDecoder::new(Cursor::new(bytes)).map_err(|e| image_error(format, e))?;
                decode_with_image(decoder, format, limits)?
            }
            ImageFormat::Bmp => {
                let decoder =
                    BmpDecoder::new(Cursor::new(bytes)).map_err(|e| image_error(format, e))?;
                decode_with_image(decoder, format, limits)?
            }
        };
        let tensor = resize_to_tensor(&decoded, size)?;
        Ok(Preprocessed {
            tensor,
            width: decoded.source_width,
            height: decoded.source_height,
            format,
        })
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(PreprocessError::Corrupt(format!(
                "{} decoder panicked: {why}",
                format.label()
            )))
        }
    }
}

/// Decoded 8-bit pixels, interleaved, before the resize.
enum Pixels {
    /// One byte per pixel; stands for R = G = B.
    Gray(Vec<u8>),
    /// Three bytes per pixel, R G B.
    Rgb(Vec<u8>),
}

struct Decoded {
    /// Size of the original image (header).
    source_width: u32,
    source_height: u32,
    /// Size of `pixels` (smaller than the source after JPEG DCT scaling).
    width: u32,
    height: u32,
    pixels: Pixels,
}

/// Refuses `width x height` above the limit (and empty images) before anything is allocated.
fn check_pixels(width: u32, height: u32, limits: &Limits) -> Result<(), PreprocessError> {
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::Corrupt(format!(
            "image header declares {width}x{height} pixels"
        )));
    }
    Ok(())
}

/// `image::Limits` for the second guard.
///
/// Before the header is known (`output_bytes` None) only the allocation cap is set, assuming
/// the widest pixel type (16 bytes: RGBA f32), so that an over-wide header still reaches
/// [`check_pixels`] and gives [`PreprocessError::TooManyPixels`]. After the header, the cap is
/// the output buffer plus scratch, and no side may exceed `max_pixels`.
fn image_limits(limits: &Limits, output_bytes: Option<u64>) -> image::Limits {
    let mut l = image::Limits::default();
    if output_bytes.is_some() {
        let side = u32::try_from(limits.max_pixels).unwrap_or(u32::MAX);
        l.max_image_width = Some(side);
        l.max_image_height = Some(side);
    }
    let output = output_bytes.unwrap_or_else(|| limits.max_pixels.saturating_mul(16));
    l.max_alloc = Some(output.saturating_add(DECODER_SCRATCH_BYTES));
    l
}

fn image_error(format: ImageFormat, e: image::ImageError) -> PreprocessError {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Corrupt(format!(
                "{} is truncated (unexpected end of data)",
                format.label()
            ))
        }
        other => PreprocessError::Corrupt(format!("{}: {other}", format.label())),
    }
}

/// PNG, TIFF, BMP through the `image` crate, at full size, to 8-bit gray or RGB.
fn decode_with_image<D: ImageDecoder>(
    mut decoder: D,
    format: ImageFormat,
    limits: &Limits,
) -> Result<Decoded, PreprocessError> {
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    decoder
        .set_limits(image_limits(limits, Some(decoder.total_bytes())))
        .map_err(|e| image_error(format, e))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(format, e))?;
    let (w, h) = (img.width(), img.height());
    let pixels = match img {
        // No copy for the common cases.
        DynamicImage::ImageRgb8(buf) => Pixels::Rgb(buf.into_raw()),
        DynamicImage::ImageLuma8(buf) => Pixels::Gray(buf.into_raw()),
        // Gray with alpha and/or 16 bits: keep it one channel (alpha dropped, 16 -> 8 rounded).
        img @ (DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)) => Pixels::Gray(img.into_luma8().into_raw()),
        // RGBA, 16-bit, float: to RGB8 (alpha dropped, values rounded and clamped).
        other => Pixels::Rgb(other.into_rgb8().into_raw()),
    };
    Ok(Decoded {
        source_width: width,
        source_height: height,
        width: w,
        height: h,
        pixels,
    })
}

/// `ceil(len * s / 8)`: a side after jpeg-decoder's IDCT scaling by `s/8`.
fn idct_scaled(len: u32, s: u32) -> u32 {
    let scaled = (u64::from(len) * u64::from(s)).div_ceil(8);
    u32::try_from(scaled).unwrap_or(u32::MAX)
}

/// The IDCT scale numerator `s` (1, 2, 4 or 8, i.e. 1/8 .. 8/8) for a JPEG of
/// `width x height`: the smallest whose output keeps both sides >= `min(size, side)`.
fn jpeg_idct_scale(width: u32, height: u32, size: u32) -> u32 {
    let (tw, th) = (size.min(width), size.min(height));
    [1, 2, 4]
        .into_iter()
        .find(|&s| idct_scaled(width, s) >= tw && idct_scaled(height, s) >= th)
        .unwrap_or(8)
}

/// The `(requested_width, requested_height)` that makes jpeg-decoder's `scale` (which picks
/// the smallest factor meeting the request in *either* axis) pick exactly scale `s`.
/// Only the binding axis gets a real request; the other is out of reach (u16::MAX).
fn jpeg_scale_request(width: u32, height: u32, size: u32, s: u32) -> (u16, u16) {
    let (tw, th) = (size.min(width), size.min(height));
    // For s > 1, at least one axis fails at s/2; that axis binds (its scaled size is strictly
    // below the target at every smaller scale and reaches it at s).
    let width_binds = s == 1 || idct_scaled(width, s / 2) < tw;
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    if width_binds {
        (clamp(tw), u16::MAX)
    } else {
        (u16::MAX, clamp(th))
    }
}

fn jpeg_error(e: jpeg_decoder::Error) -> PreprocessError {
    match e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Corrupt("JPEG is truncated (unexpected end of data)".to_owned())
        }
        other => PreprocessError::Corrupt(format!("JPEG: {other}")),
    }
}

/// JPEG through jpeg-decoder with DCT-domain downscaling, to 8-bit gray or RGB.
fn decode_jpeg(bytes: &[u8], size: u32, limits: &Limits) -> Result<Decoded, PreprocessError> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    // Reads markers up to and including the frame header (SOF) only.
    decoder.read_info().map_err(jpeg_error)?;
    let info = decoder
        .info()
        .ok_or_else(|| PreprocessError::Corrupt("JPEG has no frame header".to_owned()))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_pixels(width, height, limits)?;

    if info.coding_process != jpeg_decoder::CodingProcess::Lossless {
        let s = jpeg_idct_scale(width, height, size);
        if s == 1 && info.coding_process == jpeg_decoder::CodingProcess::DctSequential {
            // 1/8 scale: the DC-only fast path gives jpeg-decoder's exact output in about a
            // third of the time; it declines (None) anything it does not handle exactly.
            if let Some((w, h, pixels)) = jpeg_dc::decode_dc_only(bytes) {
                return Ok(Decoded {
                    source_width: width,
                    source_height: height,
                    width: w,
                    height: h,
                    pixels,
                });
            }
        }
        if s < 8 {
            let (rw, rh) = jpeg_scale_request(width, height, size, s);
            decoder.scale(rw, rh).map_err(jpeg_error)?;
        }
    }
    // Second guard: the decoder refuses an output buffer above the limit (4 bytes/pixel).
    decoder.set_max_decoding_buffer_size(
        usize::try_from(limits.max_pixels.saturating_mul(4)).unwrap_or(usize::MAX),
    );
    let data = decoder.decode().map_err(jpeg_error)?;
    let info = decoder
        .info()
        .ok_or_else(|| PreprocessError::Corrupt("JPEG has no frame header".to_owned()))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    let n = w as usize * h as usize;
    let pixels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 if data.len() == n => Pixels::Gray(data),
        jpeg_decoder::PixelFormat::RGB24 if data.len() == 3 * n => Pixels::Rgb(data),
        jpeg_decoder::PixelFormat::CMYK32 if data.len() == 4 * n => Pixels::Rgb(cmyk_to_rgb(&data)),
        // 16-bit output only comes from lossless JPEG with more than 8 bits per sample, whose
        // precision jpeg-decoder does not report; refuse rather than guess the scaling.
        _ => {
            return Err(PreprocessError::Corrupt(
                "unsupported JPEG: lossless with more than 8 bits per sample".to_owned(),
            ))
        }
    };
    Ok(Decoded {
        source_width: width,
        source_height: height,
        width: w,
        height: h,
        pixels,
    })
}

/// jpeg-decoder's CMYK32 output (for Adobe CMYK and YCCK files) is ink amounts, 0 = no ink.
/// RGB = (255 - C) * (255 - K) / 255, rounded.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = 255 - u32::from(px[3]);
        for &ink in &px[..3] {
            let v = (255 - u32::from(ink)) * k;
            rgb.push(((v + 127) / 255) as u8);
        }
    }
    rgb
}

/// `v / 255` for every byte value, computed once at compile time.
static U8_TO_UNIT: [f32; 256] = {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as f32 / 255.0;
        i += 1;
    }
    table
};

/// Squashes the decoded pixels to `size`x`size` (bilinear, antialiased) and lays them out as
/// R, G, B planes of `v / 255`.
fn resize_to_tensor(decoded: &Decoded, size: u32) -> Result<Vec<f32>, PreprocessError> {
    let (buffer, pixel_type) = match &decoded.pixels {
        Pixels::Gray(b) => (b.as_slice(), PixelType::U8),
        Pixels::Rgb(b) => (b.as_slice(), PixelType::U8x3),
    };
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        PreprocessError::Corrupt(format!("internal error while {what}: {e}"))
    };
    let src = ImageRef::new(decoded.width, decoded.height, buffer, pixel_type)
        .map_err(|e| internal("wrapping the decoded pixels", &e))?;
    let resized;
    let out: &[u8] = if (decoded.width, decoded.height) == (size, size) {
        // fast_image_resize would only copy the pixels (same size, no crop): use them as they are.
        buffer
    } else {
        let mut dst = Image::new(size, size, pixel_type);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| internal("resizing", &e))?;
        resized = dst.into_vec();
        &resized
    };

    let plane = size as usize * size as usize;
    let mut tensor = vec![0.0f32; 3 * plane];
    let (r, gb) = tensor.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    match &decoded.pixels {
        Pixels::Gray(_) => {
            for (((&v, r), g), b) in out.iter().zip(r).zip(g).zip(b) {
                let x = U8_TO_UNIT[usize::from(v)];
                (*r, *g, *b) = (x, x, x);
            }
        }
        Pixels::Rgb(_) => {
            // One pass over the interleaved pixels, writing the three planes.
            for (((px, r), g), b) in out.chunks_exact(3).zip(r).zip(g).zip(b) {
                *r = U8_TO_UNIT[usize::from(px[0])];
                *g = U8_TO_UNIT[usize::from(px[1])];
                *b = U8_TO_UNIT[usize::from(px[2])];
            }
        }
    }
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idct_scale_keeps_both_sides_at_least_the_target() {
        // Camera frame: 1/8 gives 324x243, both >= 224.
        assert_eq!(jpeg_idct_scale(2592, 1944, 224), 1);
        // 1/8 would give 375x125; the short side needs 1/4 (250).
        assert_eq!(jpeg_idct_scale(3000, 1000, 224), 2);
        // Smaller than the target in one axis: that axis must stay full size.
        assert_eq!(jpeg_idct_scale(2000, 100, 224), 8);
        assert_eq!(jpeg_idct_scale(103, 103, 224), 8);
        assert_eq!(jpeg_idct_scale(360, 363, 224), 8);
        assert_eq!(jpeg_idct_scale(448, 448, 224), 4);
        assert_eq!(jpeg_idct_scale(446, 448, 224), 8);
        assert_eq!(jpeg_idct_scale(1792, 1792, 224), 1);
        // ceil: 447/2 -> 224, 1785/8 -> 224.
        assert_eq!(jpeg_idct_scale(447, 448, 224), 4);
        assert_eq!(jpeg_idct_scale(1785, 1792, 224), 1);
        assert_eq!(jpeg_idct_scale(1784, 1792, 224), 2);
        assert_eq!(jpeg_idct_scale(224, 224, 224), 8);
    }

    /// Mirrors jpeg-decoder's own choice (either axis meets the request) to check that our
    /// request makes it pick exactly our scale.
    fn decoder_choice(width: u32, height: u32, req: (u16, u16)) -> u32 {
        [1, 2, 4]
            .into_iter()
            .find(|&s| {
                idct_scaled(width, s) >= u32::from(req.0)
                    || idct_scaled(height, s) >= u32::from(req.1)
            })
            .unwrap_or(8)
    }

    #[test]
    fn scale_request_makes_the_decoder_pick_our_scale() {
        for &(w, h) in &[
            (2592, 1944),
            (3000, 1000),
            (1000, 3000),
            (448, 448),
            (449, 2000),
            (1, 65535),
            (65535, 1),
            (65535, 65535),
            (1791, 1792),
            (9, 5000),
        ] {
            for size in [1, 8, 64, 224, 299, 512] {
                let s = jpeg_idct_scale(w, h, size);
                if s < 8 {
                    let req = jpeg_scale_request(w, h, size, s);
                    assert_eq!(decoder_choice(w, h, req), s, "{w}x{h} size {size}");
                }
            }
        }
    }

    #[test]
    fn cmyk_conversion() {
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0]), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 0]), vec![255, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), vec![0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 128]), vec![127, 127, 127]);
    }

    #[test]
    fn lut_is_exact_division() {
        for v in 0..=255u8 {
            assert_eq!(U8_TO_UNIT[usize::from(v)], f32::from(v) / 255.0);
        }
        assert_eq!(U8_TO_UNIT[255], 1.0);
    }
}
