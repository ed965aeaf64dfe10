//! From samples to model inputs: every image goes through the server's own preprocessing
//! ([`crate::preprocess::preprocess`]), then the per-dataset rules, then the colour
//! normalisation the card records; augmented views are drawn from the result; activations of
//! the frozen part of the network are computed once and cached (fp16), so only the trained
//! layers cost time per epoch.

use super::augment::Augmenter;
use super::data::{apply_rules, DatasetRules, Sample};
use super::model::{LeukNet, Stage};
use crate::color_norm::ColorNormalization;
use crate::preprocess::{preprocess, Limits};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Side of the model input.
pub const SIZE: usize = 224;

pub use crate::progress::{progress, LOG_PROGRESS_EVERY};

/// Preprocessed images (3 x 224 x 224 CHW, [0, 1]) stored as u8 to keep 3,000 images in
/// ~450 MB; `None` where the file could not be read or decoded (the caller reports it).
pub struct ImageSet {
    /// One entry per sample.
    pub images: Vec<Option<Vec<u8>>>,
}

impl ImageSet {
    /// The f32 tensor of image `i` (values k/255), if it decoded.
    pub fn chw(&self, i: usize) -> Option<Vec<f32>> {
        self.images[i]
            .as_ref()
            .map(|v| v.iter().map(|&b| b as f32 / 255.0).collect())
    }
}

fn to_u8(chw: &[f32]) -> Vec<u8> {
    chw.iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

/// Preprocesses every sample (server path + dataset rules), in parallel over the cores.
/// Colour normalisation is not applied here: it runs after augmentation, exactly where the
/// server applies it (after decoding), see [`finish_view`].
pub fn prepare_images(
    samples: &[Sample],
    rules: &HashMap<String, DatasetRules>,
) -> (ImageSet, Vec<(usize, String)>) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pb = progress(samples.len() as u64, "preprocess");
    let mut images: Vec<Option<Vec<u8>>> = vec![None; samples.len()];
    let mut problems = Vec::new();
    let chunk = samples.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = samples
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let pb = pb.clone();
                scope.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(k, s)| {
                            let i = c * chunk + k;
                            let out = std::fs::read(&s.path)
                                .map_err(|e| e.to_string())
                                .and_then(|b| {
                                    preprocess(&b, SIZE as u32, &Limits::default())
                                        .map_err(|e| e.to_string())
                                })
                                .map(|p| {
                                    let mut t = p.tensor;
                                    if let Some(r) = rules.get(&s.dataset) {
                                        apply_rules(r, &mut t, SIZE);
                                    }
                                    to_u8(&t)
                                });
                            pb.inc(1);
                            (i, out)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, out) in h.join().expect("preprocess thread") {
                match out {
                    Ok(v) => images[i] = Some(v),
                    Err(e) => problems.push((i, e)),
                }
            }
        }
    });
    pb.finish();
    (ImageSet { images }, problems)
}

/// The last step of every view, shared with serving: the card's colour normalisation.
pub fn finish_view(mut chw: Vec<f32>, norm: &ColorNormalization) -> Vec<f32> {
    norm.apply(&mut chw, SIZE);
    chw
}

/// View `v` of image `i`: view 0 is the image itself, views >= 1 are augmented.
pub fn view(
    set: &ImageSet,
    i: usize,
    v: usize,
    augmenter: &Augmenter,
    norm: &ColorNormalization,
    seed: u64,
) -> Option<Vec<f32>> {
    let chw = set.chw(i)?;
    let chw = if v == 0 {
        chw
    } else {
        augmenter.view(&chw, SIZE, seed, i as u64, v as u64)
    };
    Some(finish_view(chw, norm))
}

/// The views of a batch of `(sample, view)` keys, concatenated (`keys.len()` CHW tensors),
/// drawn on up to `available_parallelism` threads: the same values as [`view`] one key at a
/// time, so training on a many-core machine is not held back by augmentation on one core.
/// `None` if any sample did not decode.
pub fn view_batch(
    set: &ImageSet,
    keys: &[(usize, usize)],
    augmenter: &Augmenter,
    norm: &ColorNormalization,
    seed: u64,
) -> Option<Vec<f32>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(keys.len());
    if threads <= 1 || *augmenter == Augmenter::none() || keys.iter().all(|k| k.1 == 0) {
        let mut flat = Vec::with_capacity(keys.len() * 3 * SIZE * SIZE);
        for &(i, v) in keys {
            flat.extend(view(set, i, v, augmenter, norm, seed)?);
        }
        return Some(flat);
    }
    let chunk = keys.len().div_ceil(threads);
    let parts: Vec<Option<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut flat = Vec::with_capacity(part.len() * 3 * SIZE * SIZE);
                    for &(i, v) in part {
                        flat.extend(view(set, i, v, augmenter, norm, seed)?);
                    }
                    Some(flat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let mut flat = Vec::with_capacity(keys.len() * 3 * SIZE * SIZE);
    for p in parts {
        flat.extend(p?);
    }
    Some(flat)
}

/// Cached activations of the frozen part: row `r` holds view `views[r].1` of sample
/// `views[r].0`, at `stage`, as fp16 on the CPU.
pub struct ActivationCache {
    /// The stage the activations were taken at.
    pub stage: Stage,
    /// `(sample index, view index)` per row.
    pub views: Vec<(usize, usize)>,
    /// `[rows, ...]` fp16.
    pub acts: Tensor,
    /// Row of `(sample, view)`.
    pub row: HashMap<(usize, usize), usize>,
}

impl ActivationCache {
    /// Rows for a list of (sample, view) pairs, as f32 on `device`.
    pub fn batch(&self, keys: &[(usize, usize)], device: Device) -> Option<Tensor> {
        let rows: Option<Vec<i64>> = keys
            .iter()
            .map(|k| self.row.get(k).map(|&r| r as i64))
            .collect();
        let idx = Tensor::from_slice(&rows?);
        Some(
            self.acts
                .index_select(0, &idx)
                .to_kind(Kind::Float)
                .to_device(device),
        )
    }
}

/// Computes the activations at `stage` of `views_per_image` views of every decodable sample
/// (view 0 plain, the rest augmented), in batches, without gradients. Reuses `cache_file` when
/// it exists (the caller names it after everything that determines its content).
#[allow(clippy::too_many_arguments)]
pub fn build_cache(
    model: &LeukNet,
    stage: Stage,
    set: &ImageSet,
    views_per_image: usize,
    augmenter: &Augmenter,
    norm: &ColorNormalization,
    seed: u64,
    cache_file: Option<&Path>,
) -> Result<ActivationCache, tch::TchError> {
    let mut views = Vec::new();
    for i in 0..set.images.len() {
        if set.images[i].is_some() {
            for v in 0..views_per_image.max(1) {
                views.push((i, v));
            }
        }
    }
    let row = views.iter().enumerate().map(|(r, &k)| (k, r)).collect();
    if let Some(f) = cache_file {
        if f.exists() {
            let acts = Tensor::load(f)?;
            if acts.size()[0] == views.len() as i64 {
                tracing::info!(file = %f.display(), "activation cache reused");
                return Ok(ActivationCache {
                    stage,
                    views,
                    acts,
                    row,
                });
            }
        }
    }
    let pb = progress(views.len() as u64, "cache acts");
    let mut parts = Vec::new();
    for chunk in views.chunks(16) {
        let batch: Vec<f32> = chunk
            .iter()
            .flat_map(|&(i, v)| view(set, i, v, augmenter, norm, seed).unwrap_or_default())
            .collect();
        let x = Tensor::from_slice(&batch)
            .view([chunk.len() as i64, 3, SIZE as i64, SIZE as i64])
            .to_device(model.device());
        let a = tch::no_grad(|| model.forward_until(&x, stage));
        parts.push(a.to_kind(Kind::Half).to_device(Device::Cpu));
        pb.inc(chunk.len() as u64);
    }
    pb.finish();
    let acts = Tensor::cat(&parts, 0);
    if let Some(f) = cache_file {
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        acts.save(f)?;
    }
    Ok(ActivationCache {
        stage,
        views,
        acts,
        row,
    })
}
