//! Training one LeukNet on a set of samples (paper IV-B: SGD, BCE), from cached activations
//! when the mode freezes the first layers, with source-balanced batches, class weighting,
//! per-epoch safetensors checkpoints and resume.

use super::augment::Augmenter;
use super::data::{balanced_batches, Sample};
use super::model::{FineTuneMode, Init, LeukNet, ModelError, Stage};
use super::pipeline::{progress, view_batch, ActivationCache, ImageSet, SIZE};
use super::report::EpochRow;
use crate::color_norm::ColorNormalization;
use crate::onnx::LeukNetSpec;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Reduction, Tensor};

/// Every choice that shapes one training run (recorded in reports and cards).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// The paper's fine-tuning mode.
    pub mode: FineTuneMode,
    /// Overrides how many leading conv blocks stay frozen (e.g. 4 = train block 5 + head
    /// with the new head: a partial mDFT affordable on a CPU). `None` = the mode's own rule.
    pub frozen_blocks: Option<usize>,
    /// Hidden sizes of the head.
    pub head: Vec<usize>,
    /// Width divisor (1 = the real network; larger only for tests).
    pub width_div: usize,
    /// Epochs.
    pub epochs: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Batch size.
    pub batch: usize,
    /// Weight the positive class by negatives / positives in the loss.
    pub class_weighting: bool,
    /// Batches balanced over dataset x class (else plain shuffled batches).
    pub balanced: bool,
    /// Views per image: view 0 is the image, views 1.. are augmented.
    pub views: usize,
    /// The augmentation drawing views 1...
    pub augmenter: Augmenter,
    /// Colour normalisation (applied identically when serving).
    pub color_norm: ColorNormalization,
    /// Seed of the head initialisation, views and batch order.
    pub seed: u64,
    /// Weight λ of a domain-adversarial loss (0 = off): a linear classifier predicts each
    /// training image's source (dataset) from the penultimate features through a gradient
    /// reversal layer, so the trained layers are pushed towards features the source cannot be
    /// read from (Ganin & Lempitsky 2015). As there, λ ramps up as `λ (2 / (1 + e^(-10 p)) - 1)`
    /// over training progress `p`; the domain head sees L2-normalised features, so the reversed
    /// gradient cannot be satisfied by inflating the features (which diverged to NaN without
    /// it). The domain head is checkpointed with the model (`domain.safetensors`), never exported.
    #[serde(default)]
    pub domain_adversarial: f64,
}

impl TrainOptions {
    /// The network this run trains.
    pub fn spec(&self) -> LeukNetSpec {
        let mut spec = self.mode.paper_spec();
        spec.head = self.head.clone();
        spec.with_width_div(self.width_div)
    }

    /// Where activations can be cached for this run.
    pub fn cache_stage(&self) -> Stage {
        let spec = self.spec();
        match self.frozen_blocks {
            None => self.mode.cache_stage(&spec),
            Some(0) => Stage::Input,
            Some(k) if k >= spec.pool_count() => Stage::Flatten,
            Some(k) => Stage::Pool(k),
        }
    }
}

/// What the samples, images and (optional) cache of one experiment share between runs.
pub struct Context<'a> {
    pub samples: &'a [Sample],
    pub images: &'a ImageSet,
    pub cache: Option<&'a ActivationCache>,
    pub init: &'a Init,
    pub device: Device,
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tch: {0}")]
    Tch(#[from] tch::TchError),
    #[error("no usable training sample")]
    NoData,
    #[error("training diverged in {run}, epoch {epoch}: the loss is {loss} (lower the learning rate or --domain-adversarial)")]
    Diverged {
        run: String,
        epoch: usize,
        loss: f64,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

/// A fresh model for `opts`: initialised (head seeded by `opts.seed`) and frozen per mode.
pub fn fresh_model(
    opts: &TrainOptions,
    init: &Init,
    device: Device,
) -> Result<LeukNet, TrainError> {
    tch::manual_seed(opts.seed as i64);
    let mut model = LeukNet::with_init(opts.spec(), device, init)?;
    model.set_trainable(opts.mode);
    if let Some(k) = opts.frozen_blocks {
        model.set_frozen_blocks(k);
    }
    Ok(model)
}

/// Folds a Platt calibration `sigmoid(a * logit + b)` into the last Linear layer, so the
/// exported graph's probability output is the calibrated one.
pub fn fold_platt(model: &LeukNet, a: f32, b: f32) -> Result<(), TrainError> {
    let shapes = model.spec.parameter_shapes();
    let n = shapes.len();
    let (w_name, b_name) = (&shapes[n - 2].0, &shapes[n - 1].0);
    let vars = model.vs.variables();
    let (Some(w), Some(bias)) = (vars.get(w_name), vars.get(b_name)) else {
        return Err(TrainError::NoData);
    };
    tch::no_grad(|| {
        let mut w = w.shallow_clone();
        let mut bias = bias.shallow_clone();
        let _ = w.f_mul_scalar_(a as f64)?;
        let _ = bias.f_mul_scalar_(a as f64)?.f_add_scalar_(b as f64)?;
        Ok::<(), tch::TchError>(())
    })?;
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    options: TrainOptions,
    train_hash: String,
    epochs_done: usize,
    curve: Vec<EpochRow>,
}

/// sha256 of the samples' own sha256s in the order given: what a checkpoint was trained on.
pub(crate) fn hash_indices(samples: &[Sample], idx: &[usize]) -> String {
    let mut all = String::new();
    for &i in idx {
        all.push_str(&samples[i].sha256);
    }
    crate::model_card::sha256_hex(all.as_bytes())
}

/// The domain classifier of [`TrainOptions::domain_adversarial`]: one Linear from the
/// penultimate features to the training sources, behind a gradient reversal.
struct DomainHead {
    vs: tch::nn::VarStore,
    linear: tch::nn::Linear,
    opt: std::cell::RefCell<tch::nn::Optimizer>,
    /// Source index of each training sample (by sample index).
    source: std::collections::HashMap<usize, i64>,
    device: Device,
}

impl DomainHead {
    fn new(
        ctx: &Context,
        train: &[usize],
        model: &LeukNet,
        opts: &TrainOptions,
    ) -> Result<Self, TrainError> {
        let mut names: Vec<&str> = train
            .iter()
            .map(|&i| ctx.samples[i].dataset.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let source = train
            .iter()
            .map(|&i| {
                let d = ctx.samples[i].dataset.as_str();
                (i, names.iter().position(|n| *n == d).unwrap_or(0) as i64)
            })
            .collect();
        let vs = tch::nn::VarStore::new(ctx.device);
        let width = model.spec.head.last().copied().unwrap_or(1) as i64;
        let linear = tch::nn::linear(
            vs.root() / "domain",
            width,
            names.len().max(1) as i64,
            Default::default(),
        );
        let opt = tch::nn::Sgd {
            momentum: opts.momentum,
            dampening: 0.0,
            wd: opts.weight_decay,
            nesterov: false,
        }
        .build(&vs, opts.lr)?;
        Ok(Self {
            vs,
            linear,
            opt: std::cell::RefCell::new(opt),
            source,
            device: ctx.device,
        })
    }

    /// `lambda` x the domain cross-entropy, with the features' gradient reversed: the forward
    /// value is the features themselves, the gradient reaching them is `-lambda` times the
    /// domain head's (written as `(1 + λ) f.detach() - λ f`).
    fn loss(&self, features: &Tensor, batch: &[usize], lambda: f64) -> Tensor {
        let reversed = features.detach() * (1.0 + lambda) - features * lambda;
        let norm = reversed
            .norm_scalaropt_dim(2.0, &[1i64][..], true)
            .clamp_min(1e-6);
        let reversed = reversed / norm;
        let target: Vec<i64> = batch
            .iter()
            .map(|i| self.source.get(i).copied().unwrap_or(0))
            .collect();
        let target = Tensor::from_slice(&target).to_device(self.device);
        use tch::nn::Module;
        self.linear
            .forward(&reversed)
            .cross_entropy_for_logits(&target)
    }

    /// Saves the source classifier next to the model's checkpoint.
    fn save(&self, path: &Path) -> Result<(), TrainError> {
        self.vs.save(path).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Restores the source classifier saved by [`DomainHead::save`], so that a resumed run
    /// goes on against the same adversary (its momentum restarts at zero, as the model's).
    fn load(&mut self, path: &Path) -> Result<(), TrainError> {
        self.vs.load(path).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// A batch of inputs at the run's cache stage for (sample, view) keys.
fn inputs(ctx: &Context, opts: &TrainOptions, keys: &[(usize, usize)]) -> Option<Tensor> {
    if let Some(cache) = ctx.cache {
        return cache.batch(keys, ctx.device);
    }
    let flat = view_batch(
        ctx.images,
        keys,
        &opts.augmenter,
        &opts.color_norm,
        opts.seed,
    )?;
    Some(
        Tensor::from_slice(&flat)
            .view([keys.len() as i64, 3, SIZE as i64, SIZE as i64])
            .to_device(ctx.device),
    )
}

/// Trains on `train` (sample indices) and returns the model and its loss curve. With
/// `checkpoint_dir`, saves `latest.safetensors` + `state.json` after every epoch and resumes
/// from them when they match these options and samples (momentum restarts at zero).
pub fn train(
    ctx: &Context,
    train: &[usize],
    opts: &TrainOptions,
    label: &str,
    checkpoint_dir: Option<&Path>,
) -> Result<(LeukNet, Vec<EpochRow>), TrainError> {
    let train: Vec<usize> = train
        .iter()
        .copied()
        .filter(|&i| ctx.images.images[i].is_some())
        .collect();
    if train.is_empty() {
        return Err(TrainError::NoData);
    }
    let mut model = fresh_model(opts, ctx.init, ctx.device)?;
    let stage = opts.cache_stage();
    if let Some(c) = ctx.cache {
        assert_eq!(c.stage, stage, "activation cache taken at another stage");
    }
    let train_hash = hash_indices(ctx.samples, &train);
    let mut curve = Vec::new();
    let mut start_epoch = 0;
    let (ckpt, state_path) = match checkpoint_dir {
        Some(d) => (
            Some(d.join("latest.safetensors")),
            Some(d.join("state.json")),
        ),
        None => (None, None),
    };
    if let (Some(ckpt), Some(state_path)) = (&ckpt, &state_path) {
        if let Ok(text) = std::fs::read_to_string(state_path) {
            if let Ok(state) = serde_json::from_str::<CheckpointState>(&text) {
                if state.options == *opts && state.train_hash == train_hash && ckpt.exists() {
                    model.load_safetensors(ckpt)?;
                    start_epoch = state.epochs_done;
                    curve = state.curve;
                    tracing::info!(run = label, epoch = start_epoch, "resuming from checkpoint");
                }
            }
        }
    }

    let positives = train.iter().filter(|&&i| ctx.samples[i].label == 1).count();
    let negatives = train.len() - positives;
    let pos_weight = (opts.class_weighting && positives > 0)
        .then(|| Tensor::from_slice(&[negatives as f32 / positives as f32]).to_device(ctx.device));
    let mut opt = tch::nn::Sgd {
        momentum: opts.momentum,
        dampening: 0.0,
        wd: opts.weight_decay,
        nesterov: false,
    }
    .build(&model.vs, opts.lr)?;

    let steps_per_epoch = train.len().div_ceil(opts.batch.max(1));
    let mut domain = (opts.domain_adversarial > 0.0)
        .then(|| DomainHead::new(ctx, &train, &model, opts))
        .transpose()?;
    let domain_ckpt = ckpt
        .as_ref()
        .map(|c| c.with_file_name("domain.safetensors"));
    if let (Some(d), Some(path)) = (domain.as_mut(), &domain_ckpt) {
        if start_epoch > 0 && path.exists() {
            d.load(path)?;
        }
    }
    for epoch in start_epoch..opts.epochs {
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ ((epoch as u64 + 1) << 32));
        let batches: Vec<Vec<usize>> = if opts.balanced {
            balanced_batches(ctx.samples, &train, opts.batch, opts.seed, epoch as u64)
        } else {
            let mut order = train.clone();
            order.shuffle(&mut rng);
            order
                .chunks(opts.batch.max(1))
                .map(<[usize]>::to_vec)
                .collect()
        };
        let pb = progress(
            steps_per_epoch as u64,
            &format!("{label} e{}/{}", epoch + 1, opts.epochs),
        );
        let (mut sum, mut count) = (0.0f64, 0usize);
        for b in batches {
            let keys: Vec<(usize, usize)> = b
                .iter()
                .map(|&i| (i, rng.random_range(0..opts.views.max(1))))
                .collect();
            let Some(x) = inputs(ctx, opts, &keys) else {
                continue;
            };
            let y: Vec<f32> = b.iter().map(|&i| ctx.samples[i].label as f32).collect();
            let y = Tensor::from_slice(&y).to_device(ctx.device);
            let (logits, features) = model.forward_parts(&x, stage, true);
            let logits = logits.view([-1]);
            let mut loss = logits.binary_cross_entropy_with_logits::<Tensor>(
                &y,
                None,
                pos_weight.as_ref().map(Tensor::shallow_clone),
                Reduction::Mean,
            );
            if let Some(d) = &domain {
                let done = (epoch * steps_per_epoch + count / opts.batch.max(1)) as f64;
                let p = done / (opts.epochs * steps_per_epoch).max(1) as f64;
                let lambda = opts.domain_adversarial * (2.0 / (1.0 + (-10.0 * p).exp()) - 1.0);
                loss += d.loss(&features, &b, lambda);
                d.opt.borrow_mut().zero_grad();
            }
            opt.backward_step(&loss);
            if let Some(d) = &domain {
                d.opt.borrow_mut().step();
            }
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    run: label.to_string(),
                    epoch: epoch + 1,
                    loss: value,
                });
            }
            sum += value * b.len() as f64;
            count += b.len();
            pb.inc(1);
        }
        pb.finish_and_clear();
        let train_loss = sum / count.max(1) as f64;
        tracing::info!(run = label, epoch = epoch + 1, train_loss, "epoch done");
        curve.push(EpochRow {
            epoch: epoch + 1,
            train_loss,
            val_loss: None,
            val_balanced_accuracy: None,
        });
        if let (Some(ckpt), Some(state_path)) = (&ckpt, &state_path) {
            if let Some(d) = ckpt.parent() {
                std::fs::create_dir_all(d).map_err(|e| TrainError::Checkpoint {
                    path: d.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
            model.save_safetensors(ckpt)?;
            if let (Some(d), Some(path)) = (&domain, &domain_ckpt) {
                d.save(path)?;
            }
            let state = CheckpointState {
                options: opts.clone(),
                train_hash: train_hash.clone(),
                epochs_done: epoch + 1,
                curve: curve.clone(),
            };
            let text = serde_json::to_string_pretty(&state).unwrap_or_default();
            std::fs::write(state_path, text).map_err(|e| TrainError::Checkpoint {
                path: state_path.clone(),
                message: e.to_string(),
            })?;
        }
    }
    Ok((model, curve))
}

/// Eval-mode logits of view 0 (the plain image) of each sample in `indices`; samples that did
/// not decode are skipped, so the result pairs with the returned indices.
pub fn predict_logits(
    ctx: &Context,
    model: &LeukNet,
    opts: &TrainOptions,
    indices: &[usize],
) -> (Vec<usize>, Vec<f32>) {
    let kept: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| ctx.images.images[i].is_some())
        .collect();
    // Without a cache the inputs are whole images, whatever stage the options would cache at.
    let stage = if ctx.cache.is_some() {
        opts.cache_stage()
    } else {
        Stage::Input
    };
    let mut logits = Vec::with_capacity(kept.len());
    let pb = progress(kept.len() as u64, "predict");
    for chunk in kept.chunks(32) {
        pb.inc(chunk.len() as u64);
        let keys: Vec<(usize, usize)> = chunk.iter().map(|&i| (i, 0)).collect();
        let Some(x) = inputs(ctx, opts, &keys) else {
            continue;
        };
        let out = tch::no_grad(|| model.forward_from(&x, stage, false))
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .view([-1]);
        logits.extend(Vec::<f32>::try_from(&out).unwrap_or_default());
    }
    pb.finish_and_clear();
    (kept, logits)
}
