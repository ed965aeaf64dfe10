//! Optional input colour normalisation, shared by the trainer and the server.
//!
//! A [`ColorNormalization`] is applied to the preprocessed tensor (3 x `size` x `size` CHW
//! `f32`, RGB in [0, 1], see [`crate::preprocess`]) **after** preprocessing and **before** the
//! model, identically at training time (to every training and evaluation image, after
//! augmentation) and at serving time (to every uploaded image). The method and its parameters
//! are recorded in the model card (it serialises as JSON with a `"kind"` tag, e.g.
//! `{"kind":"reinhard","target_mean":[..],"target_std":[..]}`), so a served model always sees
//! its inputs normalised exactly as in training.
//!
//! The output is again a CHW tensor with values in [0, 1], so the LeukNet graph (which scales by
//! 255 and subtracts the ImageNet channel means) still receives sensible input.
//!
//! Why it exists: `reference/measurements.md` shows a classifier can name an image's source
//! dataset from its colours alone; normalising colour is one of the measured counter-measures.
//!
//! Methods:
//! - [`ColorNormalization::None`]: identity (the default; what the paper does).
//! - [`ColorNormalization::Grayscale`]: BT.601 luminance replicated to the three channels,
//!   optionally contrast-stretched (1st-99th percentile to [0, 1]).
//! - [`ColorNormalization::ChannelStandardize`]: per image and channel, `(x - mean) / std`,
//!   then mapped back as `z * 0.25 + 0.5` and clamped to [0, 1] (so +-2 std fill the range).
//! - [`ColorNormalization::Reinhard`]: Reinhard et al. (2001) colour transfer in CIE L\*a\*b\*
//!   (sRGB, D65): each Lab channel's per-image mean and standard deviation are moved to a
//!   target, typically computed from training images with [`reinhard_target_from`].

use serde::{Deserialize, Serialize};

/// Scale applied to standardised values by [`ColorNormalization::ChannelStandardize`].
pub const STANDARDIZE_SCALE: f32 = 0.25;
/// Offset added to scaled standardised values by [`ColorNormalization::ChannelStandardize`].
pub const STANDARDIZE_OFFSET: f32 = 0.5;
/// Lower percentile of the grayscale contrast stretch.
pub const STRETCH_LOW_PERCENTILE: f32 = 0.01;
/// Upper percentile of the grayscale contrast stretch.
pub const STRETCH_HIGH_PERCENTILE: f32 = 0.99;

/// Standard deviations below this are treated as zero (flat channel).
const STD_EPS: f32 = 1e-6;

/// ITU-R BT.601 luma weights (PIL's "L" mode).
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// Colour normalisation of one preprocessed image; see the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ColorNormalization {
    /// No change (the paper's input). JSON: `{"kind":"none"}`.
    #[default]
    None,
    /// Luminance `0.299 R + 0.587 G + 0.114 B` replicated to the three channels. With
    /// `contrast_stretch`, the image's 1st and 99th luminance percentiles are mapped to 0 and
    /// 1 (values beyond clamped; a flat image is left as it is).
    /// JSON: `{"kind":"grayscale","contrast_stretch":true}` (the flag defaults to false).
    Grayscale {
        /// Stretch the 1st-99th percentile range of the luminance to [0, 1].
        #[serde(default)]
        contrast_stretch: bool,
    },
    /// Per image and per channel `z = (x - mean) / std` (population std over the channel's
    /// pixels), then `z * 0.25 + 0.5` clamped to [0, 1]: the mean lands on 0.5 and +-2 std on
    /// 0 and 1. A flat channel becomes 0.5. JSON: `{"kind":"channel_standardize"}`.
    ChannelStandardize,
    /// Reinhard colour transfer in CIE L\*a\*b\* (sRGB primaries, D65 white; L in [0, 100]):
    /// each Lab channel `l` becomes `(l - mean) / std * target_std + target_mean` using the
    /// image's own mean and std over all pixels, then the image goes back to sRGB and is
    /// clamped to [0, 1] (so the target is met exactly only for colours inside the sRGB gamut).
    Reinhard {
        /// Target mean of L\*, a\*, b\*.
        target_mean: [f32; 3],
        /// Target standard deviation of L\*, a\*, b\*.
        target_std: [f32; 3],
    },
}

impl ColorNormalization {
    /// Short name, as the `"kind"` tag in JSON (`none`, `grayscale`, `channel_standardize`,
    /// `reinhard`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Grayscale { .. } => "grayscale",
            Self::ChannelStandardize => "channel_standardize",
            Self::Reinhard { .. } => "reinhard",
        }
    }

    /// Normalises one CHW image (3 x `size` x `size`, values in [0, 1]) in place; the result is
    /// again in [0, 1]. Deterministic, and depends only on this image.
    ///
    /// # Panics
    /// If `chw.len() != 3 * size * size`.
    pub fn apply(&self, chw: &mut [f32], size: usize) {
        assert_eq!(
            chw.len(),
            3 * size * size,
            "expected a 3 x {size} x {size} CHW tensor"
        );
        if size == 0 {
            return;
        }
        match self {
            Self::None => {}
            Self::Grayscale { contrast_stretch } => grayscale(chw, size, *contrast_stretch),
            Self::ChannelStandardize => channel_standardize(chw, size),
            Self::Reinhard {
                target_mean,
                target_std,
            } => reinhard(chw, size, target_mean, target_std),
        }
    }
}

fn grayscale(chw: &mut [f32], size: usize, stretch: bool) {
    let plane = size * size;
    let mut y: Vec<f32> = (0..plane)
        .map(|i| {
            (LUMA[0] * chw[i] + LUMA[1] * chw[plane + i] + LUMA[2] * chw[2 * plane + i])
                .clamp(0.0, 1.0)
        })
        .collect();
    if stretch {
        let mut sorted = y.clone();
        let lo = percentile(&mut sorted, STRETCH_LOW_PERCENTILE);
        let hi = percentile(&mut sorted, STRETCH_HIGH_PERCENTILE);
        if hi - lo > STD_EPS {
            for v in y.iter_mut() {
                *v = ((*v - lo) / (hi - lo)).clamp(0.0, 1.0);
            }
        }
    }
    for ch in 0..3 {
        chw[ch * plane..(ch + 1) * plane].copy_from_slice(&y);
    }
}

/// The `q`-quantile (nearest rank) of `values`, reordering them.
fn percentile(values: &mut [f32], q: f32) -> f32 {
    let k = ((values.len() - 1) as f32 * q).round() as usize;
    let (_, v, _) = values.select_nth_unstable_by(k, f32::total_cmp);
    *v
}

/// Mean and population standard deviation of `values` (f64 accumulation).
fn mean_std(values: impl Iterator<Item = f32> + Clone) -> (f32, f32) {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for v in values.clone() {
        n += 1;
        sum += f64::from(v);
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = values.map(|v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
    (mean as f32, var.sqrt() as f32)
}

fn channel_standardize(chw: &mut [f32], size: usize) {
    for plane in chw.chunks_exact_mut(size * size) {
        let (mean, std) = mean_std(plane.iter().copied());
        for v in plane.iter_mut() {
            let z = if std > STD_EPS {
                (*v - mean) / std
            } else {
                0.0
            };
            *v = (z * STANDARDIZE_SCALE + STANDARDIZE_OFFSET).clamp(0.0, 1.0);
        }
    }
}

fn reinhard(chw: &mut [f32], size: usize, target_mean: &[f32; 3], target_std: &[f32; 3]) {
    let plane = size * size;
    let mut lab = to_lab_planes(chw, size);
    for (ch, p) in lab.chunks_exact_mut(plane).enumerate() {
        let (mean, std) = mean_std(p.iter().copied());
        let gain = if std > STD_EPS {
            target_std[ch] / std
        } else {
            0.0
        };
        for v in p.iter_mut() {
            *v = (*v - mean) * gain + target_mean[ch];
        }
    }
    for i in 0..plane {
        let rgb = lab_to_rgb([lab[i], lab[plane + i], lab[2 * plane + i]]);
        for (ch, v) in rgb.into_iter().enumerate() {
            chw[ch * plane + i] = v;
        }
    }
}

/// CIE L\*a\*b\* of a whole CHW image, as three planes (L, a, b).
fn to_lab_planes(chw: &[f32], size: usize) -> Vec<f32> {
    let plane = size * size;
    let mut lab = vec![0.0f32; 3 * plane];
    for i in 0..plane {
        let l = rgb_to_lab([chw[i], chw[plane + i], chw[2 * plane + i]]);
        lab[i] = l[0];
        lab[plane + i] = l[1];
        lab[2 * plane + i] = l[2];
    }
    lab
}

/// Per-image mean and population standard deviation of L\*, a\*, b\* over all pixels of a CHW
/// image (the statistics [`ColorNormalization::Reinhard`] moves).
///
/// # Panics
/// If `chw.len() != 3 * size * size`.
pub fn lab_mean_std(chw: &[f32], size: usize) -> ([f32; 3], [f32; 3]) {
    assert_eq!(
        chw.len(),
        3 * size * size,
        "expected a 3 x {size} x {size} CHW tensor"
    );
    let mut mean = [0.0; 3];
    let mut std = [0.0; 3];
    if size == 0 {
        return (mean, std);
    }
    let lab = to_lab_planes(chw, size);
    for (ch, p) in lab.chunks_exact(size * size).enumerate() {
        (mean[ch], std[ch]) = mean_std(p.iter().copied());
    }
    (mean, std)
}

/// A Reinhard target from training images: the average over `images` of each image's Lab mean
/// and of each image's Lab standard deviation (per-image statistics averaged, not pooled over
/// all pixels, so differences between images do not inflate the target spread). Returns zeros
/// for an empty slice.
///
/// # Panics
/// If an image's length is not `3 * size * size`.
pub fn reinhard_target_from(images: &[&[f32]], size: usize) -> ([f32; 3], [f32; 3]) {
    let mut mean = [0.0f64; 3];
    let mut std = [0.0f64; 3];
    for img in images {
        let (m, s) = lab_mean_std(img, size);
        for ch in 0..3 {
            mean[ch] += f64::from(m[ch]);
            std[ch] += f64::from(s[ch]);
        }
    }
    let n = images.len().max(1) as f64;
    (mean.map(|v| (v / n) as f32), std.map(|v| (v / n) as f32))
}

/// D65 reference white (X, Y, Z), Y normalised to 1.
const WHITE: [f32; 3] = [0.950_47, 1.0, 1.088_83];
const DELTA: f32 = 6.0 / 29.0;

fn srgb_to_linear(c: f32) -> f32 {
    let c = c.clamp(0.0, 1.0);
    if c <= 0.040_45 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

fn linear_to_srgb(c: f32) -> f32 {
    let c = c.clamp(0.0, 1.0);
    if c <= 0.003_130_8 {
        12.92 * c
    } else {
        1.055 * c.powf(1.0 / 2.4) - 0.055
    }
}

fn lab_f(t: f32) -> f32 {
    if t > DELTA * DELTA * DELTA {
        t.cbrt()
    } else {
        t / (3.0 * DELTA * DELTA) + 4.0 / 29.0
    }
}

fn lab_f_inv(t: f32) -> f32 {
    if t > DELTA {
        t * t * t
    } else {
        3.0 * DELTA * DELTA * (t - 4.0 / 29.0)
    }
}

/// sRGB in [0, 1] (values outside are clamped) to CIE L\*a\*b\* (D65; L in [0, 100]).
pub fn rgb_to_lab(rgb: [f32; 3]) -> [f32; 3] {
    let [r, g, b] = rgb.map(srgb_to_linear);
    let x = 0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b;
    let y = 0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b;
    let z = 0.019_333_9 * r + 0.119_192 * g + 0.950_304_1 * b;
    let (fx, fy, fz) = (
        lab_f(x / WHITE[0]),
        lab_f(y / WHITE[1]),
        lab_f(z / WHITE[2]),
    );
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIE L\*a\*b\* (D65) to sRGB, clamped to [0, 1] (out-of-gamut colours are clipped).
pub fn lab_to_rgb(lab: [f32; 3]) -> [f32; 3] {
    let fy = (lab[0] + 16.0) / 116.0;
    let fx = fy + lab[1] / 500.0;
    let fz = fy - lab[2] / 200.0;
    let x = WHITE[0] * lab_f_inv(fx);
    let y = WHITE[1] * lab_f_inv(fy);
    let z = WHITE[2] * lab_f_inv(fz);
    let r = 3.240_454_2 * x - 1.537_138_5 * y - 0.498_531_4 * z;
    let g = -0.969_266 * x + 1.876_010_8 * y + 0.041_556 * z;
    let b = 0.055_643_4 * x - 0.204_025_9 * y + 1.057_225_2 * z;
    [r, g, b].map(linear_to_srgb)
}
