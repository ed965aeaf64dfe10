//! Tests of `leuknet::train::augment`: seeding, flips, reflection fill, identity, range, stain
//! jitter, grayscale, blur, rescale, and a printed timing for 1000 views.
//!
//! Real images come from `$LEUKNET_DATA` (default `../shared/data`); the tests that need them
//! print why and pass when the folder is absent.
#![cfg(feature = "train")]

use std::path::{Path, PathBuf};
use std::time::Instant;

use leuknet::preprocess::{preprocess, Limits};
use leuknet::train::augment::{
    gaussian_blur, reflect_coord, rescale_low_res, stain_jitter, to_grayscale, view_seed, warp,
    Augmenter, ColorAug, GeometricAug, GeometricParams,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 224;

/// A synthetic image with structure at all scales, values in [0.05, 0.95] (never black).
fn synthetic(size: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plane = size * size;
    let mut v = vec![0.0f32; 3 * plane];
    for ch in 0..3 {
        for r in 0..size {
            for c in 0..size {
                let x = c as f32 / size as f32;
                let y = r as f32 / size as f32;
                let smooth = 0.5 + 0.3 * ((x * 7.0 + ch as f32).sin() * (y * 5.0).cos());
                let noise = 0.15 * (rng.random::<f32>() - 0.5);
                v[ch * plane + r * size + c] = (smooth + noise).clamp(0.05, 0.95);
            }
        }
    }
    v
}

fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LEUKNET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    dir.join("MANIFEST.csv").is_file().then_some(dir)
}

/// The first image of each dataset in the manifest, preprocessed to 224; None (after a
/// message) without the shared data.
fn real_images(test: &str) -> Option<Vec<(String, Vec<f32>)>> {
    let Some(dir) = data_dir() else {
        eprintln!(
            "skipping {test}: shared data not found (set LEUKNET_DATA to the shared data folder)"
        );
        return None;
    };
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.csv")).expect("read manifest");
    let mut seen = Vec::<String>::new();
    let mut out = Vec::new();
    for line in manifest.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 2 || seen.iter().any(|d| d == f[0]) {
            continue;
        }
        seen.push(f[0].to_owned());
        let bytes = std::fs::read(dir.join(f[1])).expect("read image");
        let t = preprocess(&bytes, SIZE as u32, &Limits::default()).expect("preprocess");
        out.push((f[1].to_owned(), t.tensor));
    }
    Some(out)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// The tensor mirrored left-right, by index arithmetic.
fn mirrored(chw: &[f32], size: usize) -> Vec<f32> {
    let mut out = vec![0.0; chw.len()];
    for ch in 0..3 {
        for r in 0..size {
            for c in 0..size {
                out[ch * size * size + r * size + c] =
                    chw[ch * size * size + r * size + size - 1 - c];
            }
        }
    }
    out
}

/// Sum of squared discrete Laplacians over the interior: high-frequency energy.
fn hf_energy(chw: &[f32], size: usize) -> f64 {
    let mut e = 0.0f64;
    for p in chw.chunks_exact(size * size) {
        for r in 1..size - 1 {
            for c in 1..size - 1 {
                let i = r * size + c;
                let lap = 4.0 * p[i] - p[i - 1] - p[i + 1] - p[i - size] - p[i + size];
                e += f64::from(lap).powi(2);
            }
        }
    }
    e
}

fn strong() -> Augmenter {
    Augmenter {
        geometric: Some(GeometricAug::paper()),
        color: Some(ColorAug {
            brightness: 0.5,
            contrast: 0.5,
            saturation: 0.5,
            hue: 0.2,
            grayscale_p: 0.2,
            stain_jitter: 0.2,
            blur_p: 0.5,
            blur_sigma: (0.5, 3.0),
            rescale_p: 0.5,
            rescale: (0.2, 0.9),
        }),
    }
}

#[test]
fn same_seed_same_output_different_seed_different() {
    let img = synthetic(SIZE, 1);
    for aug in [Augmenter::paper(), Augmenter::paper_with_stain(), strong()] {
        let a = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(42));
        let b = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(42));
        let c = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(43));
        assert_eq!(a, b, "same seed must give identical output");
        assert!(
            mean_abs_diff(&a, &c) > 1e-3,
            "different seeds gave the same view"
        );
    }
}

#[test]
fn views_are_deterministic_per_seed_image_and_view() {
    let img = synthetic(SIZE, 2);
    let aug = Augmenter::paper_with_stain();
    let views = aug.views(&img, SIZE, 4, 7, 3);
    assert_eq!(views.len(), 4);
    assert_eq!(views, aug.views(&img, SIZE, 4, 7, 3));
    for (v, view) in views.iter().enumerate() {
        assert_eq!(*view, aug.view(&img, SIZE, 7, 3, v as u64));
        let mut rng = StdRng::seed_from_u64(view_seed(7, 3, v as u64));
        assert_eq!(*view, aug.apply(&img, SIZE, &mut rng));
    }
    assert_ne!(views[0], views[1], "views of one image must differ");
    assert_ne!(
        views[0],
        aug.view(&img, SIZE, 7, 4, 0),
        "image index must matter"
    );
    assert_ne!(views[0], aug.view(&img, SIZE, 8, 3, 0), "seed must matter");
    // The 20x expansion gives 20 pairwise different views.
    let twenty = aug.views(&img, SIZE, 20, 7, 0);
    for i in 0..20 {
        for j in i + 1..20 {
            assert_ne!(twenty[i], twenty[j], "views {i} and {j} are equal");
        }
    }
    // Seeds of nearby (seed, image, view) triples are all distinct.
    let mut seeds: Vec<u64> = (0..4)
        .flat_map(|s| (0..50).flat_map(move |i| (0..20).map(move |v| view_seed(s, i, v))))
        .collect();
    let n = seeds.len();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), n);
}

#[test]
fn hflip_is_exact_mirror_and_involution() {
    let img = synthetic(SIZE, 3);
    let flip = GeometricParams {
        hflip: true,
        ..GeometricParams::identity()
    };
    let once = warp(&img, SIZE, &flip);
    assert_eq!(
        once,
        mirrored(&img, SIZE),
        "pure hflip must equal the mirrored tensor"
    );
    assert_eq!(
        warp(&once, SIZE, &flip),
        img,
        "hflip twice must be the identity"
    );
    let vflip = GeometricParams {
        vflip: true,
        ..GeometricParams::identity()
    };
    assert_eq!(warp(&warp(&img, SIZE, &vflip), SIZE, &vflip), img);
    // Through the augmenter: a flip-only geometry gives either the input or its mirror, and
    // both happen.
    let aug = Augmenter {
        geometric: Some(GeometricAug {
            hflip: true,
            ..GeometricAug::identity()
        }),
        color: None,
    };
    let mirror = mirrored(&img, SIZE);
    let (mut same, mut flipped) = (0, 0);
    for seed in 0..32 {
        let out = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(seed));
        if out == img {
            same += 1;
        } else {
            assert_eq!(out, mirror);
            flipped += 1;
        }
    }
    assert!(same > 0 && flipped > 0, "same {same}, flipped {flipped}");
}

#[test]
fn identity_parameters_return_the_input() {
    let img = synthetic(SIZE, 4);
    assert_eq!(warp(&img, SIZE, &GeometricParams::identity()), img);
    for aug in [
        Augmenter::none(),
        Augmenter {
            geometric: Some(GeometricAug::identity()),
            color: Some(ColorAug::none()),
        },
    ] {
        let out = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(5));
        assert!(max_abs_diff(&out, &img) <= 1e-5);
    }
    // A rotation by a full turn and a zero-rotation with unit zoom go through the bilinear
    // sampler and must still give the input back (to rounding).
    let turn = GeometricParams {
        rotation_deg: 360.0,
        ..GeometricParams::identity()
    };
    assert!(max_abs_diff(&warp(&img, SIZE, &turn), &img) <= 1e-3);
    // Integer shifts sample pixel centres: exact reflected copies.
    let shift = GeometricParams {
        shift_x: 10.0,
        shift_y: -5.0,
        ..GeometricParams::identity()
    };
    let out = warp(&img, SIZE, &shift);
    for ch in 0..3 {
        for r in 0..SIZE {
            for c in 0..SIZE {
                let sr = reflect_coord(r as f32 - 5.0, SIZE) as usize;
                let sc = reflect_coord(c as f32 + 10.0, SIZE) as usize;
                let want = img[ch * SIZE * SIZE + sr * SIZE + sc];
                let got = out[ch * SIZE * SIZE + r * SIZE + c];
                assert!((got - want).abs() <= 1e-6, "({ch},{r},{c}) {got} vs {want}");
            }
        }
    }
}

#[test]
fn reflection_mirrors_at_the_edges() {
    let n = 5;
    // Half-sample symmetric: ... 1 0 | 0 1 2 3 4 | 4 3 ...
    let cases = [
        (-1.0, 0.0),
        (-2.0, 1.0),
        (5.0, 4.0),
        (6.0, 3.0),
        (10.0, 0.0),
        (-0.5, 0.0),
        (2.25, 2.25),
        (-1.5, 0.5),
    ];
    for (x, want) in cases {
        assert!(
            (reflect_coord(x, n) - want).abs() < 1e-6,
            "reflect({x}) = {}",
            reflect_coord(x, n)
        );
    }
}

#[test]
fn geometry_leaves_no_black_pixels_on_real_images() {
    let Some(images) = real_images("geometry_leaves_no_black_pixels_on_real_images") else {
        return;
    };
    let plane = SIZE * SIZE;
    let is_black = |t: &[f32], i: usize| (0..3).all(|ch| t[ch * plane + i] <= 0.0);
    let geometric = GeometricAug {
        hflip: false,
        vflip: false,
        ..GeometricAug::paper()
    };
    let aug = Augmenter {
        geometric: Some(geometric),
        color: None,
    };
    let mut tested = 0;
    for (name, t) in &images {
        if (0..plane).any(|i| is_black(t, i)) {
            eprintln!("{name} has black pixels of its own; not used");
            continue;
        }
        tested += 1;
        for seed in 0..10 {
            let out = aug.apply(t, SIZE, &mut StdRng::seed_from_u64(seed));
            let black = (0..plane).filter(|&i| is_black(&out, i)).count();
            assert_eq!(black, 0, "{name}, seed {seed}: {black} black pixels");
            // Corners are where a constant fill would show.
            for i in [0, SIZE - 1, plane - SIZE, plane - 1] {
                assert!(
                    (0..3).any(|ch| out[ch * plane + i] > 0.02),
                    "{name}: dark corner"
                );
            }
        }
        // Extreme transforms (a shift of 60 % and a 45-degree turn, zoomed out) as well.
        let extreme = GeometricParams {
            rotation_deg: 45.0,
            shift_x: 0.6 * SIZE as f32,
            shift_y: -0.4 * SIZE as f32,
            shear: 0.2,
            zoom_x: 1.6,
            zoom_y: 1.3,
            hflip: false,
            vflip: false,
        };
        let out = warp(t, SIZE, &extreme);
        assert_eq!(
            (0..plane).filter(|&i| is_black(&out, i)).count(),
            0,
            "{name} extreme"
        );
    }
    assert!(tested > 0, "no real image without black pixels");
}

#[test]
fn values_stay_in_unit_range() {
    let mut inputs = vec![synthetic(SIZE, 6)];
    // Saturated primaries, black and white too.
    let mut rng = StdRng::seed_from_u64(6);
    inputs.push(
        (0..3 * SIZE * SIZE)
            .map(|_| if rng.random::<bool>() { 1.0 } else { 0.0 })
            .collect(),
    );
    inputs.push(vec![1.0; 3 * SIZE * SIZE]);
    inputs.push(vec![0.0; 3 * SIZE * SIZE]);
    let aug = strong();
    for (k, img) in inputs.iter().enumerate() {
        for seed in 0..8 {
            let out = aug.apply(img, SIZE, &mut StdRng::seed_from_u64(seed));
            assert_eq!(out.len(), img.len());
            assert!(
                out.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)),
                "input {k} seed {seed}: value outside [0, 1]"
            );
        }
    }
}

#[test]
fn stain_jitter_zero_is_identity_and_nonzero_changes_colours() {
    let mut inputs = vec![synthetic(SIZE, 7)];
    if let Some(real) = real_images("stain_jitter (real images part)") {
        inputs.extend(real.into_iter().map(|(_, t)| t));
    }
    for img in &inputs {
        let mut x = img.clone();
        stain_jitter(&mut x, SIZE, [1.0; 3], [0.0; 3]);
        let d = max_abs_diff(&x, img);
        assert!(
            d <= 1e-3,
            "stain jitter with sigma 0 changed a value by {d}"
        );
    }
    let img = &inputs[inputs.len() - 1];
    let sigma0 = Augmenter {
        geometric: None,
        color: Some(ColorAug {
            stain_jitter: 0.0,
            ..ColorAug::none()
        }),
    };
    assert!(max_abs_diff(&sigma0.apply(img, SIZE, &mut StdRng::seed_from_u64(1)), img) <= 1e-3);
    let jitter = Augmenter {
        geometric: None,
        color: Some(ColorAug {
            stain_jitter: 0.05,
            ..ColorAug::none()
        }),
    };
    let plane = SIZE * SIZE;
    let channel_mean =
        |t: &[f32], ch: usize| t[ch * plane..(ch + 1) * plane].iter().sum::<f32>() / plane as f32;
    let mut shifts = Vec::new();
    for seed in 0..5 {
        let out = jitter.apply(img, SIZE, &mut StdRng::seed_from_u64(seed));
        let d = mean_abs_diff(&out, img);
        assert!(d > 2e-3, "stain jitter 0.05 barely changed the image ({d})");
        shifts.push([0, 1, 2].map(|ch| channel_mean(&out, ch) - channel_mean(img, ch)));
    }
    // The colour changes, not just the brightness: channel means move by different amounts.
    assert!(
        shifts
            .iter()
            .any(|s| (s[0] - s[1]).abs() > 1e-3 || (s[1] - s[2]).abs() > 1e-3),
        "{shifts:?}"
    );
    eprintln!("channel-mean shifts under stain jitter 0.05: {shifts:?}");
}

#[test]
fn grayscale_makes_channels_equal() {
    let img = synthetic(SIZE, 8);
    let aug = Augmenter {
        geometric: None,
        color: Some(ColorAug {
            grayscale_p: 1.0,
            ..ColorAug::none()
        }),
    };
    let out = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(0));
    let plane = SIZE * SIZE;
    for i in 0..plane {
        assert_eq!(out[i], out[plane + i]);
        assert_eq!(out[i], out[2 * plane + i]);
    }
    let mut g = img.clone();
    to_grayscale(&mut g, SIZE);
    assert_eq!(g, out);
}

#[test]
fn blur_reduces_high_frequency_energy() {
    let img = synthetic(SIZE, 9);
    let e0 = hf_energy(&img, SIZE);
    let mut last = e0;
    for sigma in [0.5, 1.0, 2.0] {
        let mut x = img.clone();
        gaussian_blur(&mut x, SIZE, sigma);
        let e = hf_energy(&x, SIZE);
        assert!(e < 0.7 * last, "sigma {sigma}: energy {e} not below {last}");
        last = e;
        // Blur keeps the mean (normalised kernel, reflection borders).
        let m0: f32 = img.iter().sum::<f32>() / img.len() as f32;
        let m1: f32 = x.iter().sum::<f32>() / x.len() as f32;
        assert!((m0 - m1).abs() < 1e-3);
    }
    let aug = Augmenter {
        geometric: None,
        color: Some(ColorAug {
            blur_p: 1.0,
            blur_sigma: (1.0, 2.0),
            ..ColorAug::none()
        }),
    };
    let out = aug.apply(&img, SIZE, &mut StdRng::seed_from_u64(0));
    assert!(hf_energy(&out, SIZE) < 0.2 * e0);
    // A constant image stays constant.
    let mut flat = vec![0.4f32; 3 * SIZE * SIZE];
    gaussian_blur(&mut flat, SIZE, 1.5);
    assert!(flat.iter().all(|v| (v - 0.4).abs() < 1e-5));
}

#[test]
fn rescale_loses_detail_and_keeps_shape() {
    let img = synthetic(SIZE, 10);
    let mut x = img.clone();
    rescale_low_res(&mut x, SIZE, 0.4);
    assert_eq!(x.len(), img.len());
    assert!(hf_energy(&x, SIZE) < 0.3 * hf_energy(&img, SIZE));
    assert!(
        mean_abs_diff(&x, &img) < 0.1,
        "the picture itself must survive"
    );
    let mut same = img.clone();
    rescale_low_res(&mut same, SIZE, 1.0);
    assert_eq!(same, img);
}

#[test]
fn timing_of_1000_views() {
    let img = match real_images("timing (uses a synthetic image instead)") {
        Some(v) => v[0].1.clone(),
        None => synthetic(SIZE, 11),
    };
    for (label, aug) in [
        ("paper geometry", Augmenter::paper()),
        (
            "paper geometry + default_stain",
            Augmenter::paper_with_stain(),
        ),
    ] {
        let start = Instant::now();
        let mut checksum = 0.0f32;
        for i in 0..1000u64 {
            let v = aug.view(&img, SIZE, 0, i / 20, i % 20);
            checksum += v[i as usize % v.len()];
        }
        let el = start.elapsed();
        eprintln!(
            "{label}: 1000 views of {SIZE}x{SIZE} in {:.2} s, {:.2} ms/view on one thread \
             ({} build; checksum {checksum})",
            el.as_secs_f64(),
            el.as_secs_f64(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
}
