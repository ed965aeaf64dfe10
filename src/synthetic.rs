//! Images that are not blood-smear cells, made to measure the out-of-distribution score
//! (`leuknet-card fit-ood`): noise, flat colours, text, synthetic natural-looking scenes, and
//! smear images seen at other magnifications (zoomed out into a mosaic, zoomed into a crop).
//! Deterministic under a seed; every image is returned encoded (PNG), so it goes through the
//! same decoding and preprocessing as an upload.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{imageops, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kinds of generated image, with the name used in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Uniform RGB noise, sometimes blurred.
    Noise,
    /// One flat colour.
    Flat,
    /// Dark words on a light background.
    Text,
    /// "Dead leaves": overlapping discs with power-law sizes over a colour gradient, blurred,
    /// a standard stand-in for natural image statistics.
    Scene,
    /// A 4 x 4 mosaic of smear images shrunk into one (cells at a quarter of their size).
    ZoomedOut,
    /// The central third of a smear image enlarged to full size (cells three times larger).
    ZoomedIn,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 6] = [
        Kind::Noise,
        Kind::Flat,
        Kind::Text,
        Kind::Scene,
        Kind::ZoomedOut,
        Kind::ZoomedIn,
    ];

    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Noise => "noise",
            Kind::Flat => "flat colour",
            Kind::Text => "text",
            Kind::Scene => "synthetic scene",
            Kind::ZoomedOut => "smear zoomed out (4x4 mosaic)",
            Kind::ZoomedIn => "smear zoomed in (centre third)",
        }
    }

    /// Whether the kind is made from real smear images.
    pub fn needs_smears(self) -> bool {
        matches!(self, Kind::ZoomedOut | Kind::ZoomedIn)
    }
}

const SIDE: u32 = 224;
const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const WORDS: &[&str] = &[
    "specimen", "report", "patient", "blood", "count", "sample", "lab", "result", "date", "normal",
    "review", "page", "total", "value", "unit", "index", "table", "note",
];

/// Makes image `index` of `kind`; `smears` are decoded smear images (needed by the zoom kinds,
/// ignored otherwise). Returns PNG bytes.
pub fn make(kind: Kind, index: u64, seed: u64, smears: &[RgbImage]) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ (index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let img = match kind {
        Kind::Noise => noise(&mut rng),
        Kind::Flat => {
            let c = Rgb([rng.random(), rng.random(), rng.random()]);
            RgbImage::from_pixel(SIDE, SIDE, c)
        }
        Kind::Text => text(&mut rng),
        Kind::Scene => scene(&mut rng),
        Kind::ZoomedOut => zoomed_out(&mut rng, smears),
        Kind::ZoomedIn => zoomed_in(&mut rng, smears),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    // Encoding an in-memory RGB buffer as PNG does not fail.
    let _ = img.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

fn noise(rng: &mut StdRng) -> RgbImage {
    let img = RgbImage::from_fn(SIDE, SIDE, |_, _| {
        Rgb([rng.random(), rng.random(), rng.random()])
    });
    if rng.random_bool(0.5) {
        imageops::blur(&img, rng.random_range(0.5..3.0))
    } else {
        img
    }
}

fn text(rng: &mut StdRng) -> RgbImage {
    let light: u8 = rng.random_range(215..=255);
    let mut img =
        RgbImage::from_pixel(SIDE, SIDE, Rgb([light, light, rng.random_range(200..=255)]));
    let font = match FontRef::try_from_slice(FONT) {
        Ok(f) => f,
        Err(_) => return img,
    };
    let px = rng.random_range(12.0..30.0f32);
    let scaled = font.as_scaled(PxScale::from(px));
    let ink = rng.random_range(0..80u8);
    let mut y = px;
    while y < SIDE as f32 {
        let mut x = rng.random_range(2.0..12.0f32);
        while x < SIDE as f32 {
            let word = WORDS[rng.random_range(0..WORDS.len())];
            for ch in word.chars().chain(std::iter::once(' ')) {
                let glyph = scaled.scaled_glyph(ch);
                let advance = scaled.h_advance(glyph.id);
                let glyph = ab_glyph::Glyph {
                    position: ab_glyph::point(x, y),
                    ..glyph
                };
                if let Some(outlined) = font.outline_glyph(glyph) {
                    let bounds = outlined.px_bounds();
                    outlined.draw(|gx, gy, coverage| {
                        let px_x = bounds.min.x as i64 + gx as i64;
                        let px_y = bounds.min.y as i64 + gy as i64;
                        if (0..SIDE as i64).contains(&px_x) && (0..SIDE as i64).contains(&px_y) {
                            let p = img.get_pixel_mut(px_x as u32, px_y as u32);
                            for c in p.0.iter_mut() {
                                let v = *c as f32 * (1.0 - coverage) + ink as f32 * coverage;
                                *c = v.round() as u8;
                            }
                        }
                    });
                }
                x += advance;
            }
        }
        y += px * rng.random_range(1.2..1.8);
    }
    img
}

fn scene(rng: &mut StdRng) -> RgbImage {
    let top: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    let bottom: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    let mut img = RgbImage::from_fn(SIDE, SIDE, |_, y| {
        let t = y as f32 / SIDE as f32;
        Rgb(std::array::from_fn(|c| {
            ((top[c] * (1.0 - t) + bottom[c] * t) * 255.0) as u8
        }))
    });
    for _ in 0..rng.random_range(30..120) {
        // Power-law radii: many small discs, few large ones.
        let u: f32 = rng.random_range(0.02..1.0);
        let r = (4.0 / u.powf(0.8)).min(90.0);
        let (cx, cy) = (
            rng.random_range(0.0..SIDE as f32),
            rng.random_range(0.0..SIDE as f32),
        );
        let colour = Rgb([rng.random(), rng.random(), rng.random()]);
        let (x0, x1) = ((cx - r).max(0.0) as u32, ((cx + r) as u32).min(SIDE - 1));
        let (y0, y1) = ((cy - r).max(0.0) as u32, ((cy + r) as u32).min(SIDE - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                if dx * dx + dy * dy <= r * r {
                    img.put_pixel(x, y, colour);
                }
            }
        }
    }
    imageops::blur(&img, rng.random_range(0.6..2.0))
}

fn zoomed_out(rng: &mut StdRng, smears: &[RgbImage]) -> RgbImage {
    let mut img = RgbImage::new(SIDE, SIDE);
    if smears.is_empty() {
        return img;
    }
    let tile = SIDE / 4;
    for ty in 0..4 {
        for tx in 0..4 {
            let src = &smears[rng.random_range(0..smears.len())];
            let small = imageops::resize(src, tile, tile, imageops::FilterType::Triangle);
            imageops::replace(&mut img, &small, (tx * tile) as i64, (ty * tile) as i64);
        }
    }
    img
}

fn zoomed_in(rng: &mut StdRng, smears: &[RgbImage]) -> RgbImage {
    if smears.is_empty() {
        return RgbImage::new(SIDE, SIDE);
    }
    let src = &smears[rng.random_range(0..smears.len())];
    let (w, h) = src.dimensions();
    let (cw, ch) = ((w / 3).max(1), (h / 3).max(1));
    let crop = imageops::crop_imm(src, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
    imageops::resize(&crop, SIDE, SIDE, imageops::FilterType::CatmullRom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_decodes_at_224_and_is_deterministic() {
        let smear = RgbImage::from_fn(90, 60, |x, y| Rgb([x as u8, y as u8, 200]));
        for kind in Kind::ALL {
            let a = make(kind, 3, 11, std::slice::from_ref(&smear));
            let b = make(kind, 3, 11, std::slice::from_ref(&smear));
            assert_eq!(a, b, "{}", kind.name());
            let img = image::load_from_memory(&a).unwrap();
            assert_eq!((img.width(), img.height()), (SIDE, SIDE), "{}", kind.name());
        }
    }

    #[test]
    fn text_images_have_ink() {
        let img = image::load_from_memory(&make(Kind::Text, 0, 1, &[]))
            .unwrap()
            .to_rgb8();
        let dark = img.pixels().filter(|p| p.0[0] < 120).count();
        assert!(dark > 200, "only {dark} dark pixels");
    }
}
