//! Seeded data augmentation on CHW `f32` tensors, as the trainer feeds them to the model.
//!
//! Every function here works on one image in the layout [`crate::preprocess::preprocess`]
//! produces: [`CHANNELS`] (= 3, R, G, B) planes of `size x size` values in [0, 1], row-major,
//! one plane after the other. All randomness comes from a caller-supplied [`StdRng`], so a seed
//! fixes the output exactly (on a given `rand` version).
//!
//! Two families of transforms:
//!
//! - [`GeometricAug`]: the paper's augmentation (section III-B), with the semantics of the Keras
//!   `ImageDataGenerator` it was written for: one random affine transform per call (rotation,
//!   shift, shear, per-axis zoom, composed around the image centre exactly as Keras composes
//!   them), then random horizontal / vertical flips. Pixels are sampled bilinearly, and samples
//!   falling outside the image are taken from the image mirrored at its edges
//!   ([`reflect_coord`], half-sample symmetric, like Keras' `fill_mode="reflect"`), so there
//!   are never black corners.
//! - [`ColorAug`]: colour and acquisition augmentation meant to fight the "stain shortcut" that
//!   `reference/measurements.md` describes (a classifier can name an image's source from its
//!   colours): HED stain jitter ([`stain_jitter`]), brightness / contrast / saturation / hue
//!   jitter, random grayscale, random downscale-then-upscale ([`rescale_low_res`]) and random
//!   Gaussian blur ([`gaussian_blur`]).
//!
//! [`Augmenter`] combines the two and offers the paper's "enlarge the training set k times"
//! expansion as [`Augmenter::views`]: view `v` of image `i` under seed `s` depends only on
//! `(s, i, v)` ([`view_seed`]), so views can be generated lazily, in any order, on any thread.
//!
//! Speed: one 224 x 224 view with the paper's geometry plus [`ColorAug::default_stain`] costs a
//! few milliseconds on one core in an optimised build (see `tests/train_augment.rs`, which
//! prints the figure for 1000 views).

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::F32;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Number of colour planes in every tensor handled here (R, G, B).
pub const CHANNELS: usize = 3;

/// Checks that `chw` holds `CHANNELS * size * size` values.
fn check_len(chw: &[f32], size: usize) {
    assert_eq!(
        chw.len(),
        CHANNELS * size * size,
        "expected a 3 x {size} x {size} CHW tensor"
    );
}

/// A uniform draw from `[lo, hi]` (either order; `lo == hi` gives `lo`). Never panics.
fn uniform(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    lo + (hi - lo) * rng.random::<f32>()
}

/// `true` with probability `p` (clamped to [0, 1]); draws nothing when `p <= 0`.
fn chance(rng: &mut StdRng, p: f32) -> bool {
    p > 0.0 && rng.random::<f32>() < p
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

/// Ranges of the paper's random geometric augmentation (Keras `ImageDataGenerator` semantics).
///
/// Each call draws one transform ([`GeometricAug::sample`]): a rotation angle uniform in
/// `[-rotation_deg, rotation_deg]`, shifts uniform in `[-width_shift, width_shift] * size` and
/// `[-height_shift, height_shift] * size` pixels, a shear angle uniform in `[-shear, shear]`
/// radians, and two independent zoom factors (rows, columns) uniform in `[1 - zoom, 1 + zoom]`;
/// then a horizontal and a vertical flip, each with probability 1/2 when enabled.
///
/// **Shear units: radians.** The paper's numbers (rotation 40, shifts 0.2, shear 0.2, zoom 0.2,
/// flips, "reflect" fill) are those of the Keras 1.x / early 2.x `ImageDataGenerator`
/// examples, where `shear_range` was an angle in radians, so "shear 0.2" is about 11.5 degrees.
/// Keras >= 2.2 (`keras_preprocessing`) reads `shear_range` in degrees, which would make 0.2 a
/// negligible 0.2-degree shear; we keep the meaningful reading and say so here.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeometricAug {
    /// Largest rotation, degrees (paper: 40). The angle is drawn from `[-r, r]`.
    pub rotation_deg: f32,
    /// Largest horizontal shift as a fraction of the image width (paper: 0.2).
    pub width_shift: f32,
    /// Largest vertical shift as a fraction of the image height (paper: 0.2).
    pub height_shift: f32,
    /// Largest shear angle, **radians** (paper: 0.2, about 11.5 degrees; see the type's docs).
    pub shear: f32,
    /// Zoom range: each axis is scaled independently by a factor from `[1 - z, 1 + z]` (paper:
    /// 0.2). As in Keras the factor maps output to input coordinates, so > 1 zooms out.
    pub zoom: f32,
    /// Flip left-right with probability 1/2 (paper: yes).
    pub hflip: bool,
    /// Flip top-bottom with probability 1/2 (paper: yes).
    pub vflip: bool,
}

impl GeometricAug {
    /// The paper's settings: rotation 40 degrees, shifts 0.2, shear 0.2 rad, zoom 0.2, both flips.
    pub fn paper() -> Self {
        GeometricAug {
            rotation_deg: 40.0,
            width_shift: 0.2,
            height_shift: 0.2,
            shear: 0.2,
            zoom: 0.2,
            hflip: true,
            vflip: true,
        }
    }

    /// No geometric change at all (every range zero, no flips).
    pub fn identity() -> Self {
        GeometricAug {
            rotation_deg: 0.0,
            width_shift: 0.0,
            height_shift: 0.0,
            shear: 0.0,
            zoom: 0.0,
            hflip: false,
            vflip: false,
        }
    }

    /// Draws one concrete transform for a `size x size` image.
    pub fn sample(&self, size: usize, rng: &mut StdRng) -> GeometricParams {
        let n = size as f32;
        let mut p = GeometricParams::identity();
        if self.rotation_deg != 0.0 {
            p.rotation_deg = uniform(rng, -self.rotation_deg, self.rotation_deg);
        }
        if self.height_shift != 0.0 {
            p.shift_y = uniform(rng, -self.height_shift, self.height_shift) * n;
        }
        if self.width_shift != 0.0 {
            p.shift_x = uniform(rng, -self.width_shift, self.width_shift) * n;
        }
        if self.shear != 0.0 {
            p.shear = uniform(rng, -self.shear, self.shear);
        }
        if self.zoom != 0.0 {
            p.zoom_y = uniform(rng, 1.0 - self.zoom, 1.0 + self.zoom);
            p.zoom_x = uniform(rng, 1.0 - self.zoom, 1.0 + self.zoom);
        }
        p.hflip = self.hflip && rng.random::<bool>();
        p.vflip = self.vflip && rng.random::<bool>();
        p
    }
}

/// One concrete geometric transform, as drawn by [`GeometricAug::sample`] and applied by
/// [`warp`].
///
/// The affine part maps output to input coordinates around the image centre, composed as Keras
/// does: `input = R(rotation) * (T(shift) + Sh(shear) * Z(zoom) * (output - centre)) + centre`
/// in (row, column) coordinates. Flips are applied after the affine part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeometricParams {
    /// Rotation angle, degrees.
    pub rotation_deg: f32,
    /// Shift along columns, pixels (input coordinate offset, as Keras' `ty`).
    pub shift_x: f32,
    /// Shift along rows, pixels (input coordinate offset, as Keras' `tx`).
    pub shift_y: f32,
    /// Shear angle, radians.
    pub shear: f32,
    /// Zoom factor along columns (output to input; 1 = none).
    pub zoom_x: f32,
    /// Zoom factor along rows (output to input; 1 = none).
    pub zoom_y: f32,
    /// Mirror left-right after the affine part.
    pub hflip: bool,
    /// Mirror top-bottom after the affine part.
    pub vflip: bool,
}

impl GeometricParams {
    /// The identity transform (no rotation, shift, shear, zoom or flip).
    pub fn identity() -> Self {
        GeometricParams {
            rotation_deg: 0.0,
            shift_x: 0.0,
            shift_y: 0.0,
            shear: 0.0,
            zoom_x: 1.0,
            zoom_y: 1.0,
            hflip: false,
            vflip: false,
        }
    }

    /// The 2 x 3 output-to-input matrix in (row, column) coordinates relative to the centre:
    /// `[r_in, c_in] = M[.., 0..2] * [r_out, c_out] + M[.., 2]` (flips not included).
    pub fn matrix(&self) -> [[f32; 3]; 2] {
        type M3 = [[f64; 3]; 3];
        fn mul(a: &M3, b: &M3) -> M3 {
            let mut c = [[0.0; 3]; 3];
            for (i, row) in c.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|k| a[i][k] * b[k][j]).sum();
                }
            }
            c
        }
        let th = f64::from(self.rotation_deg).to_radians();
        let (s, c) = th.sin_cos();
        let rotation = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
        let shift = [
            [1.0, 0.0, f64::from(self.shift_y)],
            [0.0, 1.0, f64::from(self.shift_x)],
            [0.0, 0.0, 1.0],
        ];
        let sh = f64::from(self.shear);
        let shear = [[1.0, -sh.sin(), 0.0], [0.0, sh.cos(), 0.0], [0.0, 0.0, 1.0]];
        let zoom = [
            [f64::from(self.zoom_y), 0.0, 0.0],
            [0.0, f64::from(self.zoom_x), 0.0],
            [0.0, 0.0, 1.0],
        ];
        let m = mul(&mul(&mul(&rotation, &shift), &shear), &zoom);
        let mut out = [[0.0f32; 3]; 2];
        for i in 0..2 {
            for j in 0..3 {
                out[i][j] = m[i][j] as f32;
            }
        }
        out
    }
}

/// Maps a continuous pixel coordinate onto `[0, n - 1]` by mirroring the image at its edges
/// (half-sample symmetric: the mirror lies half a pixel outside the first and last pixel, so
/// the sequence continues `... b a | a b c ... y z | z y ...`, Keras/SciPy `"reflect"`).
///
/// Bilinear sampling at the returned coordinate equals bilinear sampling of the infinitely
/// mirrored image at `x`. `n` must be at least 1.
#[inline]
pub fn reflect_coord(x: f32, n: usize) -> f32 {
    let nf = n as f32;
    let period = 2.0 * nf;
    let mut y = (x + 0.5).rem_euclid(period);
    if y >= nf {
        y = period - y;
    }
    (y - 0.5).clamp(0.0, nf - 1.0)
}

/// Applies one geometric transform to a CHW tensor: bilinear sampling, reflection fill,
/// flips after the affine part. The identity affine part is an exact copy (flips then only
/// reorder pixels), so e.g. a pure flip gives exactly the mirrored tensor.
///
/// # Panics
/// If `chw.len() != 3 * size * size`.
pub fn warp(chw: &[f32], size: usize, params: &GeometricParams) -> Vec<f32> {
    check_len(chw, size);
    let n = size;
    let plane = n * n;
    let mut out = vec![0.0f32; chw.len()];
    if n == 0 {
        return out;
    }
    let m = params.matrix();
    let identity = m == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
    if identity {
        for ch in 0..CHANNELS {
            let src = &chw[ch * plane..(ch + 1) * plane];
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            for r in 0..n {
                let sr = if params.vflip { n - 1 - r } else { r };
                let srow = &src[sr * n..(sr + 1) * n];
                let drow = &mut dst[r * n..(r + 1) * n];
                if params.hflip {
                    for (d, s) in drow.iter_mut().zip(srow.iter().rev()) {
                        *d = *s;
                    }
                } else {
                    drow.copy_from_slice(srow);
                }
            }
        }
        return out;
    }
    let centre = (n as f32 - 1.0) / 2.0;
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    let (sr_, sg_, sb_) = (&chw[..plane], &chw[plane..2 * plane], &chw[2 * plane..]);
    for r in 0..n {
        // Output row after the flip is undone: flips act after the affine part.
        let ro = if params.vflip { n - 1 - r } else { r } as f32 - centre;
        let row_base = m[0][0] * ro + m[0][2] + centre;
        let col_base = m[1][0] * ro + m[1][2] + centre;
        for c in 0..n {
            let co = if params.hflip { n - 1 - c } else { c } as f32 - centre;
            let ri = reflect_coord(row_base + m[0][1] * co, n);
            let ci = reflect_coord(col_base + m[1][1] * co, n);
            let r0 = ri as usize; // ri >= 0, so truncation is floor
            let c0 = ci as usize;
            let fr = ri - r0 as f32;
            let fc = ci - c0 as f32;
            let r1 = (r0 + 1).min(n - 1);
            let c1 = (c0 + 1).min(n - 1);
            let (i00, i01, i10, i11) = (r0 * n + c0, r0 * n + c1, r1 * n + c0, r1 * n + c1);
            let w00 = (1.0 - fr) * (1.0 - fc);
            let w01 = (1.0 - fr) * fc;
            let w10 = fr * (1.0 - fc);
            let w11 = fr * fc;
            let o = r * n + c;
            r_plane[o] = w00 * sr_[i00] + w01 * sr_[i01] + w10 * sr_[i10] + w11 * sr_[i11];
            g_plane[o] = w00 * sg_[i00] + w01 * sg_[i01] + w10 * sg_[i10] + w11 * sg_[i11];
            b_plane[o] = w00 * sb_[i00] + w01 * sb_[i01] + w10 * sb_[i10] + w11 * sb_[i11];
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Colour, stain and acquisition
// ---------------------------------------------------------------------------------------------

/// Ranges of the random colour, stain and acquisition augmentation.
///
/// Applied in this fixed order, each step only when enabled (parameter or probability > 0),
/// values clamped to [0, 1] after each step:
/// 1. HED stain jitter ([`stain_jitter`]) with `alpha_j ~ U[1 - s, 1 + s]`,
///    `beta_j ~ U[-s, s]` for each stain `j` (H, E, DAB), `s = stain_jitter`
///    (Tellez et al. 2018 call 0.05 "light" and 0.2 "strong", with `beta` in scikit-image's
///    scaled density units; ours is log10 density, see [`stain_jitter`]).
/// 2. Brightness: multiply by a factor from `[max(0, 1 - b), 1 + b]` (torchvision semantics).
/// 3. Contrast: blend with the image's mean luminance, factor from `[max(0, 1 - c), 1 + c]`.
/// 4. Saturation: blend with the pixel's luminance, factor from `[max(0, 1 - s), 1 + s]`.
/// 5. Hue: rotate the HSV hue by a fraction of a turn from `[-h, h]` (`h <= 0.5`).
/// 6. Grayscale (luminance replicated to the 3 channels) with probability `grayscale_p`.
/// 7. Low-resolution simulation with probability `rescale_p` ([`rescale_low_res`], scale from
///    `rescale`).
/// 8. Gaussian blur with probability `blur_p` ([`gaussian_blur`], sigma in pixels from
///    `blur_sigma`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColorAug {
    /// Brightness jitter `b` (0 = off).
    pub brightness: f32,
    /// Contrast jitter `c` (0 = off).
    pub contrast: f32,
    /// Saturation jitter `s` (0 = off).
    pub saturation: f32,
    /// Hue jitter `h`, fraction of a full turn, at most 0.5 (0 = off).
    pub hue: f32,
    /// Probability of turning the image to grayscale.
    pub grayscale_p: f32,
    /// HED stain-space jitter sigma `s` (0 = off): see [`stain_jitter`].
    pub stain_jitter: f32,
    /// Probability of a Gaussian blur.
    pub blur_p: f32,
    /// Range of the blur's sigma, pixels of the `size x size` tensor.
    pub blur_sigma: (f32, f32),
    /// Probability of the downscale-then-upscale low-resolution simulation.
    pub rescale_p: f32,
    /// Range of the downscale factor (e.g. 0.3 = shrink to 30 % of the side, then back).
    pub rescale: (f32, f32),
}

impl ColorAug {
    /// No colour change at all.
    pub fn none() -> Self {
        ColorAug {
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            grayscale_p: 0.0,
            stain_jitter: 0.0,
            blur_p: 0.0,
            blur_sigma: (0.0, 0.0),
            rescale_p: 0.0,
            rescale: (1.0, 1.0),
        }
    }

    /// Our default against the source shortcut (not in the paper): HED jitter 0.05 ("light"),
    /// brightness / contrast / saturation 0.2, hue 0.04, grayscale 10 %, blur 30 % with sigma
    /// 0.3-1.5 px, low-resolution simulation 30 % with scale 0.3-0.8 (the ALL-IDB2 copy is a
    /// 103 px source, about 0.46 of 224).
    pub fn default_stain() -> Self {
        ColorAug {
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.2,
            hue: 0.04,
            grayscale_p: 0.1,
            stain_jitter: 0.05,
            blur_p: 0.3,
            blur_sigma: (0.3, 1.5),
            rescale_p: 0.3,
            rescale: (0.3, 0.8),
        }
    }

    /// Applies one random draw of this augmentation to `chw` in place.
    ///
    /// # Panics
    /// If `chw.len() != 3 * size * size`.
    pub fn apply_in_place(&self, chw: &mut [f32], size: usize, rng: &mut StdRng) {
        check_len(chw, size);
        if self.stain_jitter > 0.0 {
            let s = self.stain_jitter;
            let mut alpha = [1.0; 3];
            let mut beta = [0.0; 3];
            for j in 0..3 {
                alpha[j] = uniform(rng, 1.0 - s, 1.0 + s);
                beta[j] = uniform(rng, -s, s);
            }
            stain_jitter(chw, size, alpha, beta);
        }
        if self.brightness > 0.0 {
            let f = uniform(rng, (1.0 - self.brightness).max(0.0), 1.0 + self.brightness);
            for v in chw.iter_mut() {
                *v = (*v * f).clamp(0.0, 1.0);
            }
        }
        if self.contrast > 0.0 {
            let f = uniform(rng, (1.0 - self.contrast).max(0.0), 1.0 + self.contrast);
            adjust_contrast(chw, size, f);
        }
        if self.saturation > 0.0 {
            let f = uniform(rng, (1.0 - self.saturation).max(0.0), 1.0 + self.saturation);
            adjust_saturation(chw, size, f);
        }
        if self.hue > 0.0 {
            let h = self.hue.min(0.5);
            let shift = uniform(rng, -h, h);
            shift_hue(chw, size, shift);
        }
        if chance(rng, self.grayscale_p) {
            to_grayscale(chw, size);
        }
        if chance(rng, self.rescale_p) {
            let s = uniform(rng, self.rescale.0, self.rescale.1);
            rescale_low_res(chw, size, s);
        }
        if chance(rng, self.blur_p) {
            let sigma = uniform(rng, self.blur_sigma.0, self.blur_sigma.1);
            gaussian_blur(chw, size, sigma);
        }
        for v in chw.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
    }
}

/// ITU-R BT.601 luma weights (as PIL's "L" mode and torchvision's `rgb_to_grayscale`).
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// Replaces every pixel by its luminance (BT.601 weights) in all three channels.
pub fn to_grayscale(chw: &mut [f32], size: usize) {
    check_len(chw, size);
    let plane = size * size;
    let (r, rest) = chw.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let y = (LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b).clamp(0.0, 1.0);
        *r = y;
        *g = y;
        *b = y;
    }
}

/// Contrast: `x -> m + f (x - m)` with `m` the image's mean luminance, clamped to [0, 1].
fn adjust_contrast(chw: &mut [f32], size: usize, f: f32) {
    let plane = size * size;
    let mut sum = 0.0f64;
    for (ch, w) in LUMA.iter().enumerate() {
        let s: f64 = chw[ch * plane..(ch + 1) * plane]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        sum += f64::from(*w) * s;
    }
    let mean = (sum / plane.max(1) as f64) as f32;
    for v in chw.iter_mut() {
        *v = (mean + f * (*v - mean)).clamp(0.0, 1.0);
    }
}

/// Saturation: `x -> y + f (x - y)` with `y` the pixel's luminance, clamped to [0, 1].
fn adjust_saturation(chw: &mut [f32], size: usize, f: f32) {
    let plane = size * size;
    let (r, rest) = chw.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let y = LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b;
        *r = (y + f * (*r - y)).clamp(0.0, 1.0);
        *g = (y + f * (*g - y)).clamp(0.0, 1.0);
        *b = (y + f * (*b - y)).clamp(0.0, 1.0);
    }
}

/// Rotates the HSV hue of every pixel by `shift` turns (torchvision `adjust_hue` semantics).
pub fn shift_hue(chw: &mut [f32], size: usize, shift: f32) {
    check_len(chw, size);
    let plane = size * size;
    let (rp, rest) = chw.split_at_mut(plane);
    let (gp, bp) = rest.split_at_mut(plane);
    for ((r, g), b) in rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()) {
        let max = r.max(*g).max(*b);
        let min = r.min(*g).min(*b);
        let delta = max - min;
        if delta <= 0.0 || max <= 0.0 {
            continue; // gray: hue undefined, nothing to rotate
        }
        let mut h = if max == *r {
            (*g - *b) / delta
        } else if max == *g {
            2.0 + (*b - *r) / delta
        } else {
            4.0 + (*r - *g) / delta
        } / 6.0;
        h = (h + shift).rem_euclid(1.0);
        let s = delta / max;
        let v = max;
        let h6 = h * 6.0;
        let i = (h6.floor() as i32).rem_euclid(6);
        let f = h6 - h6.floor();
        let p = v * (1.0 - s);
        let q = v * (1.0 - s * f);
        let t = v * (1.0 - s * (1.0 - f));
        let (nr, ng, nb) = match i {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        *r = nr.clamp(0.0, 1.0);
        *g = ng.clamp(0.0, 1.0);
        *b = nb.clamp(0.0, 1.0);
    }
}

/// Stain vectors of Ruifrok & Johnston (2001) as used by scikit-image's `rgb2hed`: the optical
/// density (R, G, B) of one unit of haematoxylin, eosin and DAB, one stain per row.
pub const RGB_FROM_HED: [[f32; 3]; 3] =
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]];

/// Smallest intensity before taking the logarithm (optical density at most 6).
const OD_EPS: f32 = 1e-6;

/// Inverse of a 3 x 3 matrix (the stain matrix is well conditioned).
fn invert3(m: &[[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let m: [[f64; 3]; 3] = m.map(|r| r.map(f64::from));
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut inv = [[0.0f32; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            // cofactor of (j, i) over det
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, d) = ((i + 1) % 3, (i + 2) % 3);
            *v = ((m[a][c] * m[b][d] - m[a][d] * m[b][c]) / det) as f32;
        }
    }
    inv
}

/// HED stain-space jitter (Tellez et al. 2018) with given per-stain factors.
///
/// Each pixel's RGB is turned into optical density `od = -log10(max(x, 1e-6))` (Ruifrok &
/// Johnston's definition, incident light = 1), projected onto the haematoxylin, eosin and DAB
/// concentrations with the inverse of [`RGB_FROM_HED`]; each concentration `c_j` becomes
/// `alpha[j] * c_j + beta[j]`, and the result goes back to RGB (`x = 10^-od`) and is clamped to
/// [0, 1]. `alpha = [1; 3]`, `beta = [0; 3]` is the identity (up to rounding and the 1e-6
/// floor). Concentrations are not clipped at zero, so the projection is invertible.
///
/// Units: `beta` is in log10 optical density, so `beta_H = 0.05` darkens a white background by
/// about 7 % in R and G. (scikit-image's `rgb2hed` divides a natural-log density by
/// `-ln(1e-6)`; in those units the same numbers would be 6 times stronger, which on our images
/// moved channel means by up to 0.3 at sigma 0.05.)
pub fn stain_jitter(chw: &mut [f32], size: usize, alpha: [f32; 3], beta: [f32; 3]) {
    check_len(chw, size);
    let hed_from_rgb = invert3(&RGB_FROM_HED);
    // od' = od * H * diag(alpha) * R + beta * R  (row vectors), folded into k and offset.
    let mut k = [[0.0f32; 3]; 3];
    for (i, row) in k.iter_mut().enumerate() {
        for (o, v) in row.iter_mut().enumerate() {
            *v = (0..3)
                .map(|j| hed_from_rgb[i][j] * alpha[j] * RGB_FROM_HED[j][o])
                .sum();
        }
    }
    let mut offset = [0.0f32; 3];
    for (o, v) in offset.iter_mut().enumerate() {
        *v = (0..3).map(|j| beta[j] * RGB_FROM_HED[j][o]).sum();
    }
    let ln10 = std::f32::consts::LN_10;
    let plane = size * size;
    let (rp, rest) = chw.split_at_mut(plane);
    let (gp, bp) = rest.split_at_mut(plane);
    for ((r, g), b) in rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()) {
        let od = [
            -r.max(OD_EPS).ln() / ln10,
            -g.max(OD_EPS).ln() / ln10,
            -b.max(OD_EPS).ln() / ln10,
        ];
        let mut out = [0.0f32; 3];
        for (o, v) in out.iter_mut().enumerate() {
            let d = od[0] * k[0][o] + od[1] * k[1][o] + od[2] * k[2][o] + offset[o];
            *v = (-d * ln10).exp().clamp(0.0, 1.0);
        }
        *r = out[0];
        *g = out[1];
        *b = out[2];
    }
}

/// Gaussian blur of each channel with standard deviation `sigma` pixels (separable, kernel
/// radius `ceil(3 sigma)`, reflection at the borders like [`reflect_coord`]). `sigma <= 0`
/// does nothing.
pub fn gaussian_blur(chw: &mut [f32], size: usize, sigma: f32) {
    check_len(chw, size);
    if sigma <= 0.0 || size < 2 {
        return;
    }
    let n = size;
    let radius = ((3.0 * sigma).ceil() as usize).max(1);
    let mut kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|w| *w /= total);
    // Index of the mirrored neighbour for offsets in [-radius, n + radius).
    let mirror = |i: isize| -> usize { reflect_coord(i as f32, n) as usize };
    let mut padded = vec![0.0f32; n + 2 * radius];
    let mut tmp = vec![0.0f32; n * n];
    for plane in chw.chunks_exact_mut(n * n) {
        // Horizontal pass into tmp.
        for r in 0..n {
            let row = &plane[r * n..(r + 1) * n];
            for (i, p) in padded.iter_mut().enumerate() {
                *p = row[mirror(i as isize - radius as isize)];
            }
            let out = &mut tmp[r * n..(r + 1) * n];
            for (c, o) in out.iter_mut().enumerate() {
                *o = kernel
                    .iter()
                    .zip(&padded[c..c + kernel.len()])
                    .map(|(w, v)| w * v)
                    .sum();
            }
        }
        // Vertical pass back into the plane, a row at a time (vectorisable over columns).
        for r in 0..n {
            let out = &mut plane[r * n..(r + 1) * n];
            out.fill(0.0);
            for (k, w) in kernel.iter().enumerate() {
                let sr = mirror(r as isize + k as isize - radius as isize);
                let src = &tmp[sr * n..(sr + 1) * n];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        }
    }
}

/// Simulates a low-resolution source: shrinks each channel to `round(size * scale)` pixels
/// (antialiased triangle filter) and enlarges it back to `size` (bilinear), both with
/// fast_image_resize's `Convolution(Bilinear)`, the resampler [`crate::preprocess`] uses to
/// bring small sources up to 224. `scale >= 1` (or a target under 1 pixel) does nothing.
pub fn rescale_low_res(chw: &mut [f32], size: usize, scale: f32) {
    check_len(chw, size);
    if !(scale > 0.0 && scale < 1.0) || size == 0 {
        return;
    }
    let small = ((size as f32 * scale).round() as usize).max(1);
    if small >= size {
        return;
    }
    let (n, s) = (size as u32, small as u32);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let mut resizer = Resizer::new();
    let mut low = TypedImage::<F32>::new(s, s);
    let mut back = TypedImage::<F32>::new(n, n);
    let mut pixels: Vec<F32> = Vec::with_capacity(size * size);
    for plane in chw.chunks_exact_mut(size * size) {
        pixels.clear();
        pixels.extend(plane.iter().map(|&v| F32::new(v)));
        let src = TypedImageRef::<F32>::new(n, n, &pixels).expect("plane has size*size pixels");
        resizer
            .resize_typed(&src, &mut low, &options)
            .expect("f32 down-resize");
        resizer
            .resize_typed(&low, &mut back, &options)
            .expect("f32 up-resize");
        for (d, p) in plane.iter_mut().zip(back.pixels()) {
            *d = p.0.clamp(0.0, 1.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The augmenter
// ---------------------------------------------------------------------------------------------

/// Geometric and colour augmentation together: geometry first, then colour.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Augmenter {
    /// The random affine transform and flips; `None` = no geometric change.
    pub geometric: Option<GeometricAug>,
    /// The colour / stain / acquisition augmentation; `None` = no colour change.
    pub color: Option<ColorAug>,
}

impl Augmenter {
    /// No augmentation: [`Augmenter::apply`] returns a copy of its input.
    pub fn none() -> Self {
        Augmenter::default()
    }

    /// The paper's augmentation: [`GeometricAug::paper`], no colour change.
    pub fn paper() -> Self {
        Augmenter {
            geometric: Some(GeometricAug::paper()),
            color: None,
        }
    }

    /// The paper's geometry plus [`ColorAug::default_stain`].
    pub fn paper_with_stain() -> Self {
        Augmenter {
            geometric: Some(GeometricAug::paper()),
            color: Some(ColorAug::default_stain()),
        }
    }

    /// One random view of `chw` (3 x `size` x `size`, values in [0, 1]); the output has the same
    /// shape and values in [0, 1].
    ///
    /// # Panics
    /// If `chw.len() != 3 * size * size`.
    pub fn apply(&self, chw: &[f32], size: usize, rng: &mut StdRng) -> Vec<f32> {
        check_len(chw, size);
        let mut out = match &self.geometric {
            Some(g) => warp(chw, size, &g.sample(size, rng)),
            None => chw.to_vec(),
        };
        if let Some(c) = &self.color {
            c.apply_in_place(&mut out, size, rng);
        }
        for v in out.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
        out
    }

    /// View `view_index` of image `image_index` under `seed`: [`Augmenter::apply`] with an RNG
    /// seeded by [`view_seed`]`(seed, image_index, view_index)`.
    pub fn view(
        &self,
        chw: &[f32],
        size: usize,
        seed: u64,
        image_index: u64,
        view_index: u64,
    ) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(view_seed(seed, image_index, view_index));
        self.apply(chw, size, &mut rng)
    }

    /// The paper's k-fold expansion of one training image: `k` augmented views (views
    /// `0..k` of [`Augmenter::view`]). The original image is not among them; a caller that
    /// wants it adds it. The paper enlarged the training set 20x (`k = 20`).
    pub fn views(
        &self,
        chw: &[f32],
        size: usize,
        k: usize,
        seed: u64,
        image_index: u64,
    ) -> Vec<Vec<f32>> {
        (0..k as u64)
            .map(|v| self.view(chw, size, seed, image_index, v))
            .collect()
    }
}

/// The RNG seed of one view: a SplitMix64 mix of `(seed, image_index, view_index)`, so nearby
/// indices get unrelated streams.
pub fn view_seed(seed: u64, image_index: u64, view_index: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(splitmix(splitmix(seed) ^ image_index) ^ view_index.rotate_left(32))
}
